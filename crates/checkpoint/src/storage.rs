//! Where an opened checkpoint's tensor bytes come from (`Storage`: memory, safetensors files
//! held open, a torch zip read tensor by tensor, a DCP directory's chunks, or DeepSpeed's
//! partitions) and what a
//! format reader hands back (`Loaded`). The format readers in `format/` build these;
//! `Checkpoint` reads through them. This module parses no format.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::format::dcp::DcpStore;
use super::identity::Identity;
use super::pinned::PinnedFile;
use super::reader::{Piece, Run};
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

/// One stored piece of a tensor kept in pieces (a DCP chunk), for `inspect`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ChunkInfo {
    /// Where the piece starts in the tensor, per dimension.
    pub offsets: Vec<usize>,
    pub sizes: Vec<usize>,
    /// The file holding it, relative to the checkpoint directory.
    pub file: String,
    /// The rank that wrote it (from the file name `__{rank}_{k}.distcp`).
    pub rank: Option<u32>,
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
    /// torch.distributed.checkpoint directory: each tensor assembled from its chunks.
    Dcp(DcpStore),
    /// Tensors that are the concatenation of byte ranges of several held files (DeepSpeed
    /// ZeRO partitions: one parameter = a slice of each rank's flat fp32 group), read through
    /// the same pieces reader as DCP chunks: in place, nothing gathered into memory.
    Segments {
        /// The checkpoint directory (for errors).
        dir: PathBuf,
        files: Vec<PinnedFile>,
        index: HashMap<String, Vec<Segment>>,
    },
}

/// One piece of a tensor's bytes: `len` bytes at absolute offset `start` of file `file`
/// (an index into the storage's files). Built only from ranges checked against the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Segment {
    pub file: usize,
    pub start: u64,
    pub len: usize,
}

/// The reader of a tensor made of `segs` in order (`Storage::Segments`).
fn segments_reader<'a>(
    dir: &Path,
    name: &'a str,
    files: &'a [PinnedFile],
    segs: &[Segment],
) -> Result<TensorReader<'a>> {
    let (mut pieces, mut runs, mut at) = (Vec::new(), Vec::new(), 0);
    for (i, s) in segs.iter().enumerate() {
        let file = files
            .get(s.file)
            .ok_or_else(|| Error::Internal(format!("tensor {name}: segment of file {}", s.file)))?;
        pieces.push(Piece::File { file, start: s.start, len: s.len });
        runs.push(Run { at, len: s.len, piece: i, from: 0 });
        at += s.len;
    }
    TensorReader::pieces(dir, name, pieces, runs, at)
}

impl Storage {
    /// See `Checkpoint::still_valid`.
    pub fn still_valid(&self) -> bool {
        match self {
            Storage::Memory(_) => true,
            Storage::Files { files, .. } => files.iter().all(PinnedFile::still_valid),
            Storage::Pickle(p) => p.still_valid(),
            Storage::Dcp(d) => d.still_valid(),
            Storage::Segments { files, .. } => files.iter().all(PinnedFile::still_valid),
        }
    }

    /// The pieces tensor `key` is stored in, for formats that store tensors in pieces.
    pub fn chunks(&self, key: &str) -> Option<Vec<ChunkInfo>> {
        match self {
            Storage::Dcp(d) => d.chunks(key),
            _ => None,
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
            Storage::Dcp(d) => d.unlinked_bytes(),
            Storage::Segments { files, .. } => files.iter().map(PinnedFile::unlinked_bytes).sum(),
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
            Storage::Dcp(d) => return d.reader(key, meta),
            Storage::Segments { dir, files, index } => {
                let Some(segs) = index.get(key) else { return Ok(None) };
                segments_reader(dir, &meta.name, files, segs)?
            }
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

#[cfg(test)]
mod tests {
    use super::{PinnedFile, Segment, segments_reader};

    /// A tensor pieced from byte ranges of two files reads, by any range or chunk size, as the
    /// concatenation of its segments (ranges start and end inside segments and span several).
    #[test]
    fn segments_read_as_their_concatenation_whatever_the_range() {
        let tmp = tempfile::tempdir().unwrap();
        let data: Vec<Vec<u8>> = (0..2u8).map(|f| (0..64).map(|i| f * 100 + i).collect()).collect();
        let files: Vec<PinnedFile> = (0..2)
            .map(|f| {
                let p = tmp.path().join(format!("f{f}"));
                std::fs::write(&p, &data[f]).unwrap();
                PinnedFile::new(&p, std::fs::File::open(&p).unwrap()).unwrap()
            })
            .collect();
        let segs = [(1, 3, 10), (0, 40, 7), (1, 50, 13)].map(|(file, start, len)| Segment {
            file,
            start,
            len,
        });
        let want: Vec<u8> =
            segs.iter().flat_map(|s| data[s.file][s.start as usize..][..s.len].to_vec()).collect();
        let r = segments_reader(tmp.path(), "t", &files, &segs).unwrap();
        assert_eq!(r.len(), 30);
        for chunk in [8, 16, 64] {
            let mut seen = Vec::new();
            r.for_each_chunk(chunk, &mut Vec::new(), |_, b| {
                seen.extend_from_slice(b);
                Ok(())
            })
            .unwrap();
            assert_eq!(seen, want, "chunks of {chunk}");
        }
        for (a, b) in [(0, 30), (9, 11), (12, 25), (17, 17), (29, 30)] {
            let mut buf = vec![0u8; 30];
            assert_eq!(r.bytes(a..b, &mut buf).unwrap(), &want[a..b], "{a}..{b}");
        }
        assert!(r.bytes(20..31, &mut [0; 16]).is_err(), "past the end");
        let bad = [Segment { file: 2, start: 0, len: 1 }];
        assert!(segments_reader(tmp.path(), "t", &files, &bad).is_err(), "no such file");
    }
}
