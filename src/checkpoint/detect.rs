//! Which format handles a path, decided once for both `quick_check` and `Checkpoint::open`:
//! directories are DCP checkpoints when they hold `.metadata` (or Accelerate's
//! `pytorch_model_fsdp_0/` does), DeepSpeed checkpoints (`global_stepN/` content or a
//! `latest` tag), PEFT adapters (`adapter_config.json`), else HF checkpoints,
//! `*.index.json` is a shard index, and files are told apart
//! by their first bytes (zip, legacy pickle, safetensors), not by trusting the extension.
//! The formats themselves live in `format/`; this module only dispatches.

use std::fs::File;
use std::path::Path;

use super::format::magic::{Magic, sniff};
use super::format::{dcp, deepspeed, hf_dir, peft, safetensors, sharded, torch};
use super::storage::Loaded;
use super::{InputIo, OpenOptions, files};
use crate::error::Result;

/// The format of a checkpoint file (directories are told apart in `load` and `quick_check_with`:
/// DCP, DeepSpeed, PEFT adapter, else an HF checkpoint).
enum FileFormat {
    Sharded,
    Torch,
    Safetensors,
}

/// Which format `path` (opened as `file`) is in. A legacy torch pickle, or a file named as a
/// torch file without a zip header, is refused here with an error saying so.
fn detect(path: &Path, file: &File) -> Result<FileFormat> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if name.ends_with(".index.json") {
        return Ok(FileFormat::Sharded);
    }
    match sniff(path, file)? {
        Magic::Zip => Ok(FileFormat::Torch),
        Magic::LegacyPickle => Err(torch::legacy_error(path)),
        Magic::Other if torch::has_torch_extension(&name) => Err(torch::not_zip_error(path)),
        Magic::Other => Ok(FileFormat::Safetensors),
    }
}

/// Detect the format of `path` and read it. `opts.state_key` names the entry of a torch
/// pickle that holds the state dict (not applied to an HF directory's `pytorch_model.bin`,
/// which is read with the default lookup: HF saves a bare state dict).
pub(crate) fn load(path: &Path, opts: &OpenOptions) -> Result<Loaded> {
    let state_key = opts.state_key.as_deref();
    let meta = std::fs::metadata(path).input(path)?;
    if meta.is_dir() {
        if let Some((dir, nested)) = dcp::find(path)? {
            let mut loaded = dcp::open(&dir, state_key)?;
            // An HF Trainer checkpoint around Accelerate's DCP: config, tokenizer beside it.
            loaded.side_dir = nested.then(|| path.to_path_buf());
            return Ok(loaded);
        }
        if let Some(dir) = deepspeed::detect(path)? {
            return deepspeed::open(&dir, opts.deepspeed_weights);
        }
        if peft::is_adapter_dir(path) {
            return peft::open(path);
        }
        return hf_dir::open(path);
    }
    let file = files::open_regular(path)?;
    match detect(path, &file)? {
        FileFormat::Sharded => sharded::open(path, file),
        FileFormat::Torch => torch::open(path, file, state_key),
        FileFormat::Safetensors => safetensors::open(path, file),
    }
}

/// Is the checkpoint at `path` complete enough to open? Cheap, without reading tensor data:
/// safetensors header and length, zip end-of-central-directory record for torch files, HF
/// directory marker and shard completeness; opening repeats these checks and more. `marker` is
/// the file an HF checkpoint directory must contain (the Trainer writes `trainer_state.json`
/// last); empty = no marker. Never call this on temp names (see `is_temp_name`): a
/// preallocated temp file can pass.
pub fn quick_check(path: &Path, marker: &str) -> Result<()> {
    quick_check_with(path, marker, &OpenOptions::default())
}

/// [`quick_check`] for the weights `opts` asks for (DeepSpeed fp32 masters need every rank's
/// optimizer states). The HF `marker` does not apply to DeepSpeed and PEFT directories:
/// they have their own completion rules (see their modules).
pub fn quick_check_with(path: &Path, marker: &str, opts: &OpenOptions) -> Result<()> {
    let meta = std::fs::metadata(path).input(path)?;
    if meta.is_dir() {
        // `.metadata` is a DCP directory's marker (renamed in last); one nested in an HF
        // Trainer checkpoint also waits for the Trainer's marker.
        if let Some((dir, nested)) = dcp::find(path)? {
            if nested {
                hf_dir::check_marker(path, marker)?;
            }
            return dcp::quick_check(&dir);
        }
        if let Some(dir) = deepspeed::detect(path)? {
            return deepspeed::quick_check(&dir, opts.deepspeed_weights);
        }
        if peft::is_adapter_dir(path) {
            return peft::quick_check(path);
        }
        return hf_dir::quick_check(path, marker);
    }
    let file = files::open_regular(path)?;
    match detect(path, &file)? {
        FileFormat::Sharded => sharded::quick_check(path, file),
        // The zip header was just seen: only the end record is left to check.
        FileFormat::Torch => torch::check_zip(path, file),
        FileFormat::Safetensors => safetensors::quick_check(path, file),
    }
}
