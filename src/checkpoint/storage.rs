//! Where an opened checkpoint's tensor bytes come from (`Storage`: memory, safetensors files
//! held open, or a torch zip read tensor by tensor) and what a format reader hands back
//! (`Loaded`). The format readers in `format/` build these; `Checkpoint` reads through them.
//! This module parses no format.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::identity::Identity;
use super::pinned::PinnedFile;
use super::strided::{gather, is_contiguous};
use super::{DType, Format, InputIo, TensorMeta, TensorReader};
use crate::error::{Error, Result};

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

/// Tensor name (as stored) → (file index, absolute byte range).
pub(crate) type FileIndex = HashMap<String, (usize, Range<usize>)>;

/// Where tensor bytes come from. Keys are the names as stored in the file.
pub(crate) enum Storage {
    Memory(BTreeMap<String, Vec<u8>>),
    /// safetensors (one file or shards): tensor → (file index, absolute byte range), read with
    /// positioned reads from the files held open since `open`.
    Files {
        files: Vec<PinnedFile>,
        index: FileIndex,
    },
    /// torch zip pickle: tensors read on demand.
    Pickle(PickleStore),
}

impl Storage {
    /// See `Checkpoint::still_valid`.
    pub fn still_valid(&self) -> bool {
        match self {
            Storage::Memory(_) => true,
            Storage::Files { files, .. } => files.iter().all(PinnedFile::still_valid),
            Storage::Pickle(p) => p.still_valid(),
        }
    }

    /// See `Checkpoint::unlinked_bytes`.
    pub fn unlinked_bytes(&self) -> u64 {
        match self {
            Storage::Memory(_) => 0,
            Storage::Files { files, .. } => files.iter().map(PinnedFile::unlinked_bytes).sum(),
            Storage::Pickle(p) => {
                p.file.metadata().map_or(0, |m| super::pinned::unlinked_bytes(&m))
            }
        }
    }

    /// A reader of the tensor stored under `key` (`meta` is its normalised description);
    /// `None` when there is no such key. A pickle tensor is decoded into memory here.
    pub fn reader<'a>(
        &'a self,
        key: &str,
        meta: &'a TensorMeta,
    ) -> Result<Option<TensorReader<'a>>> {
        Ok(Some(match self {
            Storage::Memory(m) => {
                let Some(bytes) = m.get(key) else { return Ok(None) };
                TensorReader::memory(&meta.name, Cow::Borrowed(bytes))
            }
            Storage::Files { files, index } => {
                let Some((f, range)) = index.get(key) else { return Ok(None) };
                TensorReader::file(&meta.name, &files[*f], range.clone())
            }
            Storage::Pickle(p) => TensorReader::memory(&meta.name, Cow::Owned(p.read(key, meta)?)),
        }))
    }
}

/// Where one tensor's elements live: a stored zip entry plus a strided view into it.
pub(crate) struct PickleTensor {
    /// Absolute file offset of the storage entry's bytes.
    pub data_start: u64,
    pub dtype: DType,
    /// View, in elements: offset into the storage and strides per dimension.
    pub offset: usize,
    /// Storage elements from the view's first to its last element (checked at open).
    pub span: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

/// An open torch zip file and the index of its state-dict tensors.
pub(crate) struct PickleStore {
    path: PathBuf,
    file: File,
    identity: Identity,
    tensors: HashMap<String, PickleTensor>,
}

impl PickleStore {
    pub fn new(
        path: &Path,
        file: File,
        identity: Identity,
        tensors: HashMap<String, PickleTensor>,
    ) -> Self {
        PickleStore { path: path.to_path_buf(), file, identity, tensors }
    }

    pub fn still_valid(&self) -> bool {
        self.file.metadata().map(|m| Identity::from_metadata(&m) == self.identity).unwrap_or(false)
    }

    /// The tensor's bytes in row-major order (strided views are made contiguous).
    pub fn read(&self, key: &str, meta: &TensorMeta) -> Result<Vec<u8>> {
        let t = self
            .tensors
            .get(key)
            .ok_or_else(|| Error::bad_input(&self.path, format!("no tensor named {key}")))?;
        self.read_tensor(t, meta.numel())
    }

    /// The first `numel` elements of `t`'s view, in row-major order.
    pub fn read_tensor(&self, t: &PickleTensor, numel: usize) -> Result<Vec<u8>> {
        let es = t.dtype.size();
        if numel == 0 {
            return Ok(Vec::new());
        }
        let mut raw = vec![0u8; t.span * es];
        let at = t.data_start + (t.offset * es) as u64;
        self.file.read_exact_at(&mut raw, at).input(&self.path)?;
        if is_contiguous(&t.shape, &t.stride) {
            raw.truncate(numel * es);
            return Ok(raw);
        }
        Ok(gather(&raw, &t.shape, &t.stride, es))
    }
}
