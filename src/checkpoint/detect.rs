//! Which reader handles a path: directories are HF checkpoints, `*.index.json` is a shard
//! index, and files are told apart by their first bytes (zip, legacy pickle, safetensors),
//! not by trusting the extension. Also the shared shape of a reader's result (`Loaded`).
//! The readers themselves live in their own modules.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};

use std::fs::File;

use super::{Format, InputIo, Storage, TensorMeta, files, hf_dir, pickle, safetensors, sharded};
use crate::error::Result;

/// What a format reader hands back before key normalisation.
pub(crate) struct Loaded {
    pub format: Format,
    pub tensors: Vec<TensorMeta>,
    pub storage: Storage,
    pub metadata: BTreeMap<String, String>,
    /// Step found inside the checkpoint (metadata, trainer_state.json, Lightning global_step).
    pub step: Option<u64>,
    pub side_dir: Option<PathBuf>,
}

/// Detect the format of `path` and read it. `state_key` names the entry of a torch pickle
/// that holds the state dict (HF directories' `pytorch_model.bin` is always a bare one).
pub(crate) fn load(path: &Path, state_key: Option<&str>) -> Result<Loaded> {
    let meta = std::fs::metadata(path).input(path)?;
    if meta.is_dir() {
        return hf_dir::open(path);
    }
    let file = files::open_regular(path)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if name.ends_with(".index.json") {
        return sharded::open(path, file);
    }
    match sniff(path, &file)? {
        Sniffed::Zip => pickle::open(path, file, state_key),
        Sniffed::LegacyPickle => Err(pickle::legacy_error(path)),
        Sniffed::Other if pickle::has_torch_extension(&name) => Err(pickle::not_zip_error(path)),
        Sniffed::Other => single_safetensors(path, file),
    }
}

pub(crate) fn single_safetensors(path: &Path, file: File) -> Result<Loaded> {
    let st = safetensors::open(path, file)?;
    let step = step_from_metadata(&st.header.metadata);
    let (tensors, index) = index_files(vec![(0, st.header.tensors)]);
    Ok(Loaded {
        format: Format::Safetensors,
        tensors,
        storage: Storage::Files { files: vec![st.file], index },
        metadata: st.header.metadata,
        step,
        side_dir: None,
    })
}

pub(crate) type FileIndex = HashMap<String, (usize, Range<usize>)>;

/// Flatten per-file tensor lists into the tensor list and the name → (file, range) index.
fn index_files(per_file: Vec<(usize, safetensors::TensorRanges)>) -> (Vec<TensorMeta>, FileIndex) {
    let mut metas = Vec::new();
    let mut index = HashMap::new();
    for (f, tensors) in per_file {
        for (meta, range) in tensors {
            index.insert(meta.name.clone(), (f, range));
            metas.push(meta);
        }
    }
    (metas, index)
}

pub(crate) enum Sniffed {
    Zip,
    LegacyPickle,
    Other,
}

/// Look at the first bytes: zip local header (`PK\x03\x04`), pickle protocol opcode (`\x80`,
/// the legacy torch format starts with a pickled magic number) or anything else.
pub(crate) fn sniff(path: &Path, file: &File) -> Result<Sniffed> {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 8];
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], n as u64).input(path)? {
            0 => break,
            got => n += got,
        }
    }
    let head = &buf[..n];
    // A safetensors file starts with its header length; one above 100 MB is not safetensors.
    let as_len = head.iter().rev().fold(0u64, |acc, &b| (acc << 8) | b as u64);
    Ok(match head {
        [b'P', b'K', 3, 4, ..] => Sniffed::Zip,
        [0x80, 2..=5, ..] if n == 8 && as_len > 100_000_000 => Sniffed::LegacyPickle,
        _ => Sniffed::Other,
    })
}

/// Step recorded in safetensors `__metadata__`: `step`, else `global_step`.
pub(crate) fn step_from_metadata(meta: &BTreeMap<String, String>) -> Option<u64> {
    ["step", "global_step"].iter().find_map(|k| meta.get(*k)?.trim().parse().ok())
}
