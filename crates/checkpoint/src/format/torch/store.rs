//! An opened torch zip file as a checkpoint's `Storage`: where each state-dict tensor lives
//! (`PickleTensor`: a stored zip entry and a strided view into it, also what DCP and DeepSpeed
//! read torch streams with), read with positioned reads on the file opened at open time and
//! made contiguous when the view is strided.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::identity::Identity;
use crate::pinned::unlinked_bytes;
use crate::storage::Storage;
use crate::strided::{gather, is_contiguous};
use crate::{DType, InputIo, TensorMeta, TensorReader};

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

impl Storage for PickleStore {
    fn still_valid(&self) -> bool {
        self.file.metadata().map(|m| Identity::from_metadata(&m) == self.identity).unwrap_or(false)
    }

    fn unlinked_bytes(&self) -> u64 {
        self.file.metadata().map_or(0, |m| unlinked_bytes(&m))
    }

    /// A pickle tensor is decoded into memory here.
    fn reader<'a>(&'a self, key: &str, meta: &'a TensorMeta) -> Result<Option<TensorReader<'a>>> {
        Ok(Some(TensorReader::memory(&meta.name, Cow::Owned(self.read(key, meta)?))))
    }
}
