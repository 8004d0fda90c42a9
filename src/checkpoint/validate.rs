//! Cheap validation for the watcher, without reading tensor data: safetensors
//! header and length, zip end-of-central-directory record for torch files, HF directory marker
//! and shard completeness. Opening (`Checkpoint::open`) repeats these checks and more.

use std::fs::File;
use std::path::Path;

use super::detect::{Sniffed, sniff};
use super::hf_dir::{self, Weights};
use super::{InputIo, files, pickle, safetensors, sharded};
use crate::error::{Error, Result};

/// Is the checkpoint at `path` complete enough to open? `marker` is the file an HF checkpoint
/// directory must contain (the Trainer writes `trainer_state.json` last); empty = no marker.
/// Never call this on temp names (see `is_temp_name`): a preallocated temp file can pass.
pub fn quick_check(path: &Path, marker: &str) -> Result<()> {
    let meta = std::fs::metadata(path).input(path)?;
    if meta.is_dir() {
        return check_dir(path, marker);
    }
    check_file(path)
}

fn check_dir(dir: &Path, marker: &str) -> Result<()> {
    if !marker.is_empty() && !files::has_file(dir, Path::new(marker))? {
        return Err(Error::bad_input(
            dir,
            format!("no {marker} yet (HF Trainer writes it last): checkpoint still being written"),
        ));
    }
    match hf_dir::find_weights(dir)? {
        Weights::Single(p) => safetensors::check_file(&p, files::open_child(&p)?),
        Weights::Index(p) => sharded::check(&p, files::open_child(&p)?),
        Weights::TorchBin(p) => check_opened(&p, files::open_child(&p)?),
    }
}

fn check_file(path: &Path) -> Result<()> {
    check_opened(path, files::open_regular(path)?)
}

fn check_opened(path: &Path, file: File) -> Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if name.ends_with(".index.json") {
        return sharded::check(path, file);
    }
    match sniff(path, &file)? {
        Sniffed::Zip => pickle::check_zip(path, file),
        Sniffed::LegacyPickle => Err(pickle::legacy_error(path)),
        Sniffed::Other if pickle::has_torch_extension(&name) => Err(pickle::not_zip_error(path)),
        Sniffed::Other => safetensors::check_file(path, file),
    }
}
