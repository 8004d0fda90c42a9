//! Atomic publication of an average, then its manifest.
//!
//! `PATH` ending in `.safetensors` is one file; any other `PATH` is a directory in Hugging Face
//! layout (`model.safetensors` or shards plus `model.safetensors.index.json`, side files such
//! as `config.json` and tokenizer files of the newest input, written from bytes read into
//! memory beforehand (`side.rs`), `manifest.json`) — or,
//! when the inputs are PEFT adapters, an adapter directory (`adapter_model.safetensors`,
//! `adapter_config.json`, `manifest.json`).
//!
//! Guarantee: a reader of `PATH` sees the complete old output or the complete new one, never a
//! mix or a torn file, and the new one is durable (fsynced, directory entry fsynced) before its
//! manifest appears. Files are written under hidden temp names in the destination directory
//! and renamed over; a directory is built as a hidden sibling and swapped in with
//! `renameat2(RENAME_EXCHANGE)`. Where the file system lacks RENAME_EXCHANGE the old directory
//! is renamed away and the new one renamed in, leaving a moment with no `PATH` (never a partial
//! one). Any failure (NaN in an input mid-stream, disk full) removes the temp file or directory
//! and leaves the old output untouched. Files are mode 0644. A directory output that is
//! replaced is kept, hidden as `.NAME.sewa-prev`, until the next publication replaces it in
//! turn, so a reader that opened it can finish reading it (a replaced file output needs no
//! such grace: a reader's open file keeps its inode).
//!
//! Model and manifest change together: a directory output carries its manifest inside, so one
//! swap replaces both. A file output's model and manifest are both written and fsynced under
//! temp names *before* either is renamed; then the model is renamed in, the directory fsynced,
//! and the manifest renamed in. A failure before the model's rename leaves the old pair; the
//! only moment a reader can see the new model beside the old manifest is the gap between the
//! two renames (one directory fsync; a crash there is finished by `recover` at the next
//! start-up). Every safetensors file carries `__metadata__.sewa_started`, equal to its
//! manifest's `started`, so a reader can check that the two belong together
//! ([`model_started`]). Who may publish to an output at all is `lock`'s business.
//!
//! `destination.rs` refuses outputs that are not ours to replace; `dir.rs` builds a directory
//! output. This module does not average (see `average`) and does not decide what to average.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::average::{AveragePlan, PlanSource, TensorSource};
use crate::error::{Error, Result, WithPath};
use crate::layout::{FileLayout, index_json, plan_files};
use crate::manifest::{AverageRecord, FileRecord, Manifest, Provenance};
use sewa_checkpoint::TensorMeta;

mod atomic;
mod destination;
mod dir;
mod distributed;
pub mod lock;
mod recover;
mod side;
pub use atomic::write_atomic;
use atomic::{
    PairError, commit_pair, hidden_prefix, parent_dir, stage, swap_dir_in, swap_in, sync_dir,
    write_new,
};
pub use destination::{check_destination, check_parent};
use dir::DirOutput;
pub use dir::newest_side_dir;
pub use distributed::{DistributedOptions, RankOutcome, Ranks, publish_distributed};
pub use lock::{OutputLock, hold};
pub use recover::{Recovered, STALE_AGE, model_started, recover};
pub use side::{MAX_SIDE_FILE, MAX_SIDE_TOTAL, SideFiles};

/// Default shard size for directory outputs (as `save_pretrained`'s `max_shard_size` 5GB).
pub const DEFAULT_SHARD_BYTES: u64 = 5 << 30;

/// Hugging Face side files copied into a directory output, when the newest input has them.
pub const SIDE_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "preprocessor_config.json",
    "chat_template.jinja",
    "chat_template.json",
];

#[derive(Clone, Debug)]
pub struct PublishOptions {
    /// Directory outputs above this many tensor bytes are sharded.
    pub shard_bytes: u64,
}

impl Default for PublishOptions {
    fn default() -> Self {
        PublishOptions { shard_bytes: DEFAULT_SHARD_BYTES }
    }
}

/// What was published.
#[derive(Debug)]
pub struct Published {
    pub path: PathBuf,
    pub manifest_path: PathBuf,
    pub manifest: Manifest,
}

/// True when `out` is published as a single file (it ends in `.safetensors`).
pub fn is_file_output(out: &Path) -> bool {
    out.extension().is_some_and(|e| e == "safetensors")
}

/// Where the manifest of output `out` goes.
pub fn manifest_path(out: &Path) -> PathBuf {
    if is_file_output(out) {
        let mut s = out.as_os_str().to_owned();
        s.push(".manifest.json");
        PathBuf::from(s)
    } else {
        out.join("manifest.json")
    }
}

/// Average `plan` into `out` and publish it atomically, then its manifest. `progress` is
/// called with the tensor bytes done so far.
pub fn publish(
    plan: &AveragePlan<'_>,
    out: &Path,
    provenance: Provenance,
    opts: &PublishOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<Published> {
    let manifest = Manifest::new(record_of(plan), out.to_path_buf(), provenance);
    let side = side_files_for(out, newest_side_dir(plan.inputs()))?;
    publish_tensors(&mut PlanSource::new(plan), manifest, side.as_ref(), out, opts, progress)
}

/// The side files a publication at `out` takes from `dir`: read now for a directory output,
/// none for a file output (which has nowhere to put them).
pub fn side_files_for(out: &Path, dir: Option<&Path>) -> Result<Option<SideFiles>> {
    match dir {
        Some(dir) if !is_file_output(out) => SideFiles::read(dir).map(Some),
        _ => Ok(None),
    }
}

/// The manifest's record of `plan`: its inputs (steps as the checkpoints say), weights,
/// renamed keys and options.
pub fn record_of(plan: &AveragePlan<'_>) -> AverageRecord {
    let inputs = plan.inputs().iter().zip(plan.weights()).map(|(c, w)| (*c, c.step(), *w));
    let opts = plan.options();
    AverageRecord {
        outputs: plan.outputs().to_vec(),
        dtype: opts.dtype,
        int_policy: opts.int_policy,
        dtype_overflow: opts.overflow,
        int_source: plan.int_source().map(|c| c.path().to_path_buf()),
        ..AverageRecord::new(inputs)
    }
}

/// Publish any tensor source at `out` with `manifest` (whose `output`, `layout`, `files`,
/// `side_*`, `finished` and `wall_time_s` are filled in here), writing the HF side files
/// `side` into a directory output (an adapter directory when they came from one).
pub fn publish_tensors(
    source: &mut dyn TensorSource,
    mut manifest: Manifest,
    side: Option<&SideFiles>,
    out: &Path,
    opts: &PublishOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<Published> {
    check_destination(out)?;
    let clock = Instant::now();
    manifest.output = crate::manifest::absolute(out);
    let metadata = provenance_metadata(&manifest);
    let parent = parent_dir(out);
    fs::create_dir_all(parent).with_path(parent)?;
    let outputs = source.tensors().to_vec();
    let mut writer = TensorWriter { source, done: 0, progress };
    if is_file_output(out) {
        publish_file(&mut writer, &outputs, &metadata, out, &mut manifest, clock)?;
    } else {
        // Averaged PEFT adapters are published as an adapter directory (what
        // `PeftModel.from_pretrained` loads): never sharded, its config copied.
        let adapter = side.is_some_and(|s| s.adapter);
        let (single, shard_bytes) = match adapter {
            true => ("adapter_model.safetensors", u64::MAX),
            false => ("model.safetensors", opts.shard_bytes),
        };
        let layouts = plan_files(&outputs, single, shard_bytes, &metadata)?;
        let index = (layouts.len() > 1).then(|| index_json(&layouts, &outputs)).transpose()?;
        let dir = DirOutput { layouts: &layouts, index, side, clock };
        dir.publish(&mut writer, out, &mut manifest)?;
    }
    tracing::debug!(out = %out.display(), bytes = writer.done, "published average");
    Ok(Published { path: out.to_path_buf(), manifest_path: manifest_path(out), manifest })
}

/// A file output: model and manifest both staged (written, fsynced) before either is renamed.
fn publish_file(
    writer: &mut TensorWriter<'_>,
    outputs: &[TensorMeta],
    metadata: &HashMap<String, String>,
    out: &Path,
    manifest: &mut Manifest,
    clock: Instant,
) -> Result<()> {
    let name = out
        .file_name()
        .ok_or_else(|| Error::Usage(format!("output {}: no file name", out.display())))?;
    let layout =
        plan_files(outputs, &name.to_string_lossy(), u64::MAX, metadata)?.into_iter().next();
    let layout = layout.ok_or_else(|| Error::Internal("no layout for a file output".into()))?;
    let model = stage(out, |f, p| writer.write(f, p, &layout))?;
    manifest.layout = crate::manifest::OutputLayout::File.into();
    manifest.files = vec![FileRecord { name: PathBuf::from(name), bytes: layout.size }];
    finish(manifest, clock);
    let json = manifest.to_json()?;
    let mpath = manifest_path(out);
    let side = stage(&mpath, |f, p| f.write_all(&json).with_path(p))?;
    commit_pair((model, out), (side, &mpath)).map_err(|e| match e {
        PairError::Neither(e) => e,
        PairError::FirstOnly(e, kept) => partly_published(out, &mpath, &manifest.started, e, kept),
    })
}

/// The new model is in place but its manifest is not: say exactly that.
fn partly_published(
    out: &Path,
    mpath: &Path,
    started: &str,
    e: Error,
    kept: Option<PathBuf>,
) -> Error {
    let kept = kept.map_or_else(String::new, |k| {
        format!(
            "; its new manifest is kept at {} and is renamed in at the next start-up",
            k.display()
        )
    });
    let msg = format!(
        "{} now holds the new model (sewa_started {started}) but its manifest could not be \
         renamed in ({e}); the manifest there, if any, still describes the previous model{kept}",
        out.display()
    );
    let kind = match &e {
        Error::Io { source, .. } => source.kind(),
        _ => std::io::ErrorKind::Other,
    };
    Error::io(mpath, std::io::Error::new(kind, PartlyPublished(msg)))
}

/// Marks the one publication error after which the output is not the previous one.
#[derive(Debug)]
struct PartlyPublished(String);

impl std::fmt::Display for PartlyPublished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PartlyPublished {}

/// True when a publish failed *after* renaming its new model in (its manifest is the old one):
/// the previous output does not stay. Every other publish error leaves the previous output
/// and its manifest as they were.
pub fn is_partly_published(e: &Error) -> bool {
    matches!(e, Error::Io { source, .. } if source.get_ref().is_some_and(|s| s.is::<PartlyPublished>()))
}

/// Streams tensors into files in layout order.
struct TensorWriter<'s> {
    source: &'s mut dyn TensorSource,
    done: u64,
    progress: &'s mut dyn FnMut(u64),
}

impl TensorWriter<'_> {
    fn write(&mut self, file: &mut File, path: &Path, layout: &FileLayout) -> Result<()> {
        file.write_all(&layout.header).with_path(path)?;
        let (done, progress) = (&mut self.done, &mut self.progress);
        for &i in &layout.tensors {
            // Piece by piece as the source produces them: no tensor-sized buffer is needed.
            self.source.write_tensor(i, &mut |bytes| {
                file.write_all(bytes).with_path(path)?;
                *done += bytes.len() as u64;
                progress(*done);
                Ok(())
            })?;
        }
        Ok(())
    }
}

fn finish(manifest: &mut Manifest, clock: Instant) {
    manifest.finished = crate::timestamp::now();
    manifest.wall_time_s = clock.elapsed().as_secs_f64();
}

/// Short provenance for safetensors `__metadata__` (the manifest has the full record).
/// `format = pt` is what transformers expects of a PyTorch-loadable file.
fn provenance_metadata(m: &Manifest) -> HashMap<String, String> {
    let join = |v: Vec<String>| v.join(",");
    HashMap::from([
        ("format".into(), "pt".into()),
        ("sewa_version".into(), m.sewa_version.clone()),
        ("sewa_method".into(), m.selection.method.to_string()),
        ("sewa_inputs".into(), m.inputs.len().to_string()),
        (
            "sewa_steps".into(),
            join(m.inputs.iter().map(|i| i.step.map_or("?".into(), |s| s.to_string())).collect()),
        ),
        ("sewa_weights".into(), join(m.weights.iter().map(|w| format!("{w:.6}")).collect())),
        ("sewa_dtype".into(), m.dtype.name()),
        ("sewa_int_policy".into(), m.int_policy.name()),
        ("sewa_started".into(), m.started.clone()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_paths() {
        assert_eq!(
            manifest_path(Path::new("a/m.safetensors")),
            Path::new("a/m.safetensors.manifest.json")
        );
        assert_eq!(manifest_path(Path::new("a/avg")), Path::new("a/avg/manifest.json"));
    }
}
