//! Megatron-LM / megatron-core `torch_dist` checkpoints: `iter_0000100/` as
//! `megatron.core.dist_checkpointing.save` writes it, a DCP directory (`.metadata`,
//! `__{rank}_{k}.distcp`, read by `dcp`) plus `common.pt` and `metadata.json`.
//!
//! How megatron-core finishes a save (`dist_checkpointing/serialization.py::save`, 0.16):
//! rank 0 writes `common.pt` first (args, iteration, scheduler: pickled Python objects), then
//! every rank its `.distcp` files and rank 0 `.metadata` (by rename), then, after all of that,
//! rank 0 writes `metadata.json` (`{"sharded_backend": "torch_dist", ...}`, with a plain
//! `json.dump`, not a rename) and all ranks meet at a barrier; only then does Megatron-LM's
//! training loop rewrite `latest_checkpointed_iteration.txt` in the parent. So the directory
//! is finished once `metadata.json` is complete JSON; the tracker file, written later still
//! and outside the directory, adds nothing and is not a candidate (a `.txt`). Megatron uses no
//! temporary name for the directory.
//!
//! The model's tensors are every ShardedTensor not under `optimizer.` or `chained_N.optimizer.`
//! (`dcp::Keys::Megatron`), under their own keys. `common.pt` is never read: it holds no weights, and unpickling it
//! would need classes (`argparse.Namespace`) that sewa does not decode.

use std::path::{Path, PathBuf};

use super::dcp::{self, Keys};
use super::{Claim, FormatSpec, Found, Probe};
use crate::error::{Error, Result};
use crate::storage::Loaded;
use crate::{Format, files};

/// megatron-core's `CONFIG_FNAME`: which backend wrote the sharded tensors; written last.
pub(crate) const CONFIG: &str = "metadata.json";
/// megatron-core's `COMMON_STATE_FNAME`: the non-sharded state; written first.
pub(crate) const COMMON: &str = "common.pt";
/// The only backend whose items sewa reads (Megatron-LM's default `--ckpt-format`).
const TORCH_DIST: &str = "torch_dist";
/// Largest `metadata.json` read: megatron-core writes about 120 bytes.
const CONFIG_CAP: u64 = 64 << 10;

/// A directory holding `common.pt` (megatron-core's first file) or a `metadata.json` naming a
/// `sharded_backend` (its last); `detect` tries it before plain DCP, so another tool's
/// `metadata.json` beside a DCP or HF checkpoint leaves it to them.
pub(crate) const FORMAT: FormatSpec =
    FormatSpec { detect: claim, weight_file: dcp::weight_file, endings: &[] };

fn claim(probe: &Probe<'_>) -> Claim {
    if probe.file.is_some() {
        return Ok(None);
    }
    let dir = probe.path;
    if !(files::has_file(dir, Path::new(COMMON))? || names_a_backend(dir)?) {
        return Ok(None);
    }
    Ok(Some(Box::new(FoundMegatron {
        dir: dir.to_path_buf(),
        state_key: probe.opts.state_key.clone(),
    })))
}

struct FoundMegatron {
    dir: PathBuf,
    state_key: Option<String>,
}

impl Found for FoundMegatron {
    /// Finished (`metadata.json` complete, naming `torch_dist`), then DCP's check: `.metadata`
    /// decodes and every file it names is long enough.
    fn quick_check(&self, _marker: &str) -> Result<()> {
        finished(&self.dir)?;
        dcp::quick_check(&self.dir)
    }

    fn open(self: Box<Self>) -> Result<Loaded> {
        let config = finished(&self.dir)?;
        let mut loaded = dcp::open(&self.dir, self.state_key.as_deref(), Keys::Megatron)?;
        loaded.format = Format::Megatron;
        loaded.metadata.insert("megatron_backend".to_string(), config.describe());
        Ok(loaded)
    }
}

/// What `metadata.json` says (megatron-core's `CheckpointingConfig`; other fields ignored).
#[derive(serde::Deserialize)]
struct Config {
    sharded_backend: String,
    sharded_backend_version: Option<serde_json::Number>,
}

impl Config {
    /// `torch_dist 1`, for `inspect`.
    fn describe(&self) -> String {
        let version = self.sharded_backend_version.as_ref().map(|v| format!(" {v}"));
        format!("{}{}", self.sharded_backend, version.unwrap_or_default())
    }
}

/// The directory's `metadata.json`, which must be there (Megatron writes it last), complete
/// and naming the `torch_dist` backend.
fn finished(dir: &Path) -> Result<Config> {
    let path = dir.join(CONFIG);
    if !files::has_file(dir, Path::new(CONFIG))? {
        return Err(Error::bad_input(
            &path,
            "is not there yet: megatron-core writes it last, after every rank's files, so the \
             save is still running (or was cut short)",
        ));
    }
    let bytes = files::read_capped(&path, files::open_in_dir(dir, Path::new(CONFIG))?, CONFIG_CAP)?;
    parse(&path, &bytes)
}

/// Is there a `metadata.json` whose JSON is an object with a `sharded_backend` key?
fn names_a_backend(dir: &Path) -> Result<bool> {
    if !files::has_file(dir, Path::new(CONFIG))? {
        return Ok(false);
    }
    let path = dir.join(CONFIG);
    let bytes = files::read_capped(&path, files::open_in_dir(dir, Path::new(CONFIG))?, CONFIG_CAP)?;
    Ok(has_backend_key(&bytes))
}

/// Pure half of [`names_a_backend`].
fn has_backend_key(bytes: &[u8]) -> bool {
    let json = serde_json::from_slice::<serde_json::Value>(bytes);
    json.is_ok_and(|v| v.get("sharded_backend").is_some())
}

/// Decode `metadata.json` (its bytes; `path` names it in errors). Pure.
fn parse(path: &Path, bytes: &[u8]) -> Result<Config> {
    let config: Config = serde_json::from_slice(bytes).map_err(|e| {
        let why = if e.is_eof() {
            "is incomplete JSON: megatron-core is still writing it (or its save was cut short)"
        } else {
            "is not megatron-core's checkpoint config"
        };
        Error::bad_input(path, format!("{why} ({e})"))
    })?;
    if config.sharded_backend != TORCH_DIST {
        return Err(Error::bad_input(
            path,
            format!(
                "names the sharded backend {:?}; sewa reads Megatron checkpoints saved with \
                 \"{TORCH_DIST}\" (Megatron-LM's default --ckpt-format torch_dist)",
                config.sharded_backend
            ),
        ));
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> std::result::Result<String, String> {
        parse(Path::new("iter_0000100/metadata.json"), text.as_bytes())
            .map(|c| c.describe())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn metadata_json_must_be_complete_and_torch_dist() {
        let real = r#"{"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch", "common_backend_version": 1}"#;
        assert_eq!(parsed(real).unwrap(), "torch_dist 1");
        // Torn by the non-atomic json.dump: every prefix is "incomplete", none panics.
        for cut in 0..real.len() {
            let err = parsed(&real[..cut]).unwrap_err();
            assert!(err.contains("metadata.json") && err.contains("incomplete"), "{cut}: {err}");
        }
        let zarr = parsed(r#"{"sharded_backend": "zarr", "sharded_backend_version": 1}"#);
        assert!(zarr.unwrap_err().contains("\"zarr\"; sewa reads"));
        assert!(has_backend_key(real.as_bytes()) && has_backend_key(b"{\"sharded_backend\": 3}"));
        assert!(
            !has_backend_key(b"{\"format\": \"pt\"}") && !has_backend_key(&real.as_bytes()[..9])
        );
        for other in ["[]", "{\"sharded_backend\": 3}", "{}", "\u{0}\u{0}"] {
            let err = parsed(other).unwrap_err();
            assert!(err.contains("not megatron-core's checkpoint config"), "{other}: {err}");
        }
    }
}
