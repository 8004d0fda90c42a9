//! Reading an opened DCP checkpoint's tensors: each tensor is its chunks, each chunk a
//! `torch.save` stream inside a `.distcp` file, read in place through the torch reader's
//! `Window`. A tensor's reader maps its row-major bytes to runs of its chunks (one run per
//! chunk when tensors are split along their first dimension, as FSDP does; one per row of a
//! chunk when split along a later one, as tensor parallelism does), so averaging streams it
//! like any file-backed tensor. The `.distcp` files are opened the first time one of their
//! chunks is read, then held (see `pinned`), and must still be the files seen at open.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::error::{Error, Result};
use crate::format::torch::PickleTensor;
use crate::format::torch::{self, Window};
use crate::identity::Identity;
use crate::pinned::PinnedFile;
use crate::reader::{Piece, Run};
use crate::storage::{ChunkInfo, Storage};
use crate::strided::{gather, is_contiguous, numel};
use crate::{DType, InputIo, TensorMeta, TensorReader, files};

/// A `.distcp` file: where it is, what it was at open, and its descriptor once needed.
pub(crate) struct LazyFile {
    pub rel: String,
    pub path: PathBuf,
    pub identity: Identity,
    held: OnceLock<PinnedFile>,
}

impl LazyFile {
    pub fn new(rel: String, path: PathBuf, identity: Identity) -> LazyFile {
        LazyFile { rel, path, identity, held: OnceLock::new() }
    }

    /// The held file, opened now (inside `dir`, no symlinks) if it is not yet: it must be
    /// the file `.metadata` was checked against at open.
    fn get(&self, dir: &Path) -> Result<&PinnedFile> {
        if let Some(f) = self.held.get() {
            return Ok(f);
        }
        let file = files::open_in_dir(dir, Path::new(&self.rel))?;
        if Identity::from_metadata(&file.metadata().input(&self.path)?) != self.identity {
            return Err(Error::bad_input(
                &self.path,
                "changed since the checkpoint was opened (rewritten in place?); not reading it",
            ));
        }
        let pinned = PinnedFile::new(&self.path, file)?;
        Ok(self.held.get_or_init(|| pinned))
    }

    fn still_valid(&self) -> bool {
        match self.held.get() {
            Some(f) => f.still_valid(),
            None => std::fs::symlink_metadata(&self.path)
                .is_ok_and(|m| Identity::from_metadata(&m) == self.identity),
        }
    }
}

/// One chunk: a box of the tensor and the byte range of its `torch.save` stream.
pub(crate) struct DcpChunk {
    pub offsets: Vec<usize>,
    pub sizes: Vec<usize>,
    pub file: usize,
    pub offset: u64,
    pub length: u64,
}

pub(crate) struct DcpTensor {
    /// The FQN in `.metadata` (names in errors).
    pub fqn: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub chunks: Vec<DcpChunk>,
}

/// An opened DCP directory's tensors (keyed by the names `open` gave them) and its files.
pub(crate) struct DcpStore {
    dir: PathBuf,
    files: Vec<LazyFile>,
    tensors: HashMap<String, DcpTensor>,
}

/// Above this many runs per byte of tensor (runs of under 64 bytes on average: a tensor
/// split along its last dimensions into tiny pieces) the tensor is assembled in memory
/// instead, so the run list never costs more than the tensor itself.
const MIN_RUN_BYTES: usize = 64;

impl DcpStore {
    pub fn new(dir: &Path, files: Vec<LazyFile>, tensors: HashMap<String, DcpTensor>) -> Self {
        DcpStore { dir: dir.to_path_buf(), files, tensors }
    }
}

impl Storage for DcpStore {
    fn still_valid(&self) -> bool {
        self.files.iter().all(LazyFile::still_valid)
    }

    /// See `Checkpoint::unlinked_bytes`: only files already opened are held.
    fn unlinked_bytes(&self) -> u64 {
        self.files.iter().filter_map(|f| f.held.get()).map(PinnedFile::unlinked_bytes).sum()
    }

    /// Tensor `key`'s chunks (for `inspect`).
    fn chunks(&self, key: &str) -> Option<Vec<ChunkInfo>> {
        let t = self.tensors.get(key)?;
        let info = |c: &DcpChunk| {
            let rel = &self.files[c.file].rel;
            let (offsets, sizes) = (c.offsets.clone(), c.sizes.clone());
            ChunkInfo { offsets, sizes, file: rel.clone(), rank: super::rank_of(rel) }
        };
        Some(t.chunks.iter().map(info).collect())
    }

    /// A reader of tensor `key` assembled from its chunks; `None` when there is none.
    fn reader<'a>(&'a self, key: &str, meta: &'a TensorMeta) -> Result<Option<TensorReader<'a>>> {
        let Some(t) = self.tensors.get(key) else { return Ok(None) };
        let es = t.dtype.size();
        let split = split_dim(t);
        let count: usize = t.chunks.iter().map(|c| run_count(c, split)).sum();
        if count > (meta.nbytes() / MIN_RUN_BYTES).max(1024) {
            return self.assembled(t, meta, split).map(Some);
        }
        let mut pieces = Vec::with_capacity(t.chunks.len());
        let mut runs = Vec::with_capacity(count);
        for c in t.chunks.iter().filter(|c| !c.sizes.contains(&0)) {
            pieces.push(self.piece(t, c)?);
            let piece = pieces.len() - 1;
            for_each_run(&t.shape, c, es, split, |at, from, len| {
                runs.push(Run { at, len, piece, from })
            });
        }
        TensorReader::pieces(&self.dir, &meta.name, pieces, runs, meta.nbytes()).map(Some)
    }
}

impl DcpStore {
    /// The chunk's stored tensor, located in its `.distcp` file and checked against what
    /// `.metadata` says it is: a byte range of the file when it is stored row-major (always,
    /// as DCP writes), else its elements made row-major in memory.
    fn piece<'a>(&'a self, t: &DcpTensor, c: &DcpChunk) -> Result<Piece<'a>> {
        let lf = &self.files[c.file];
        let file = lf.get(&self.dir)?;
        let window = Window::slice(&lf.path, file.file(), c.offset, c.length)?;
        let stored = torch::window_tensor(&lf.path, window, &t.fqn)?;
        if stored.dtype != t.dtype || stored.shape != c.sizes {
            return Err(Error::bad_input(
                &lf.path,
                format!(
                    "tensor {}: the chunk at offsets {:?} is stored as {:?} {:?}, .metadata \
                     says {:?} {:?}",
                    t.fqn, c.offsets, stored.dtype, stored.shape, t.dtype, c.sizes
                ),
            ));
        }
        let es = t.dtype.size();
        let len = numel(&c.sizes).unwrap_or(0) * es;
        if is_contiguous(&stored.shape, &stored.stride) {
            let start = stored.data_start + (stored.offset * es) as u64;
            return Ok(Piece::File { file, start, len });
        }
        Ok(Piece::Memory(read_strided(file, &stored, &t.fqn)?))
    }

    /// The whole tensor in memory, chunk by chunk (for tensors cut into tiny runs). The
    /// chunks must tile it exactly, as on the run-by-run path (`TensorReader::pieces`): every
    /// element written once, so chunks that overlap (and so leave a gap, their element counts
    /// adding up) are refused, never read as zeros.
    fn assembled<'a>(
        &'a self,
        t: &DcpTensor,
        meta: &'a TensorMeta,
        split: Option<usize>,
    ) -> Result<TensorReader<'a>> {
        let es = t.dtype.size();
        let mut out = vec![0u8; meta.nbytes()];
        let mut covered = Covered::new(meta.nbytes() / es.max(1));
        let bad = |what: &str, element: usize| {
            let msg = format!("tensor {}: its chunks {what} at byte {}", meta.name, element * es);
            Error::bad_input(&self.dir, msg)
        };
        for c in t.chunks.iter().filter(|c| !c.sizes.contains(&0)) {
            let mut overlap = None;
            for_each_run(&t.shape, c, es, split, |at, _, len| {
                overlap = overlap.or_else(|| covered.mark(at / es, (at + len) / es));
            });
            if let Some(e) = overlap {
                return Err(bad("overlap", e));
            }
            let bytes = match self.piece(t, c)? {
                Piece::File { file, start, len } => {
                    let mut b = vec![0u8; len];
                    file.read_at(start, &mut b, &t.fqn)?;
                    b
                }
                Piece::Memory(b) => b,
            };
            for_each_run(&t.shape, c, es, split, |at, from, len| {
                out[at..at + len].copy_from_slice(&bytes[from..from + len]);
            });
        }
        if let Some(e) = covered.first_unmarked() {
            return Err(bad("leave a gap", e));
        }
        let runs = vec![Run { at: 0, len: out.len(), piece: 0, from: 0 }];
        let len = out.len();
        TensorReader::pieces(&self.dir, &meta.name, vec![Piece::Memory(out)], runs, len)
    }
}

/// Which elements of a tensor assembled in memory its chunks have written: one bit each.
struct Covered {
    words: Vec<u64>,
    len: usize,
}

impl Covered {
    fn new(len: usize) -> Covered {
        Covered { words: vec![0; len.div_ceil(64)], len }
    }

    /// Mark elements `a..b` (inside `0..len`); the first of them already marked, if any.
    fn mark(&mut self, a: usize, b: usize) -> Option<usize> {
        let mut i = a;
        while i < b {
            let (w, bit) = (i / 64, i % 64);
            let n = (64 - bit).min(b - i);
            let mask = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << bit };
            let seen = self.words[w] & mask;
            if seen != 0 {
                return Some(w * 64 + seen.trailing_zeros() as usize);
            }
            self.words[w] |= mask;
            i += n;
        }
        None
    }

    /// The first element not marked, if any.
    fn first_unmarked(&self) -> Option<usize> {
        let (w, word) = self.words.iter().enumerate().find(|(_, w)| **w != u64::MAX)?;
        Some(w * 64 + (!word).trailing_zeros() as usize).filter(|&e| e < self.len)
    }
}

/// A strided stored tensor's elements in row-major order (its span was checked against its
/// storage, and the storage against its window, by `torch::window_tensor`).
fn read_strided(file: &PinnedFile, t: &PickleTensor, name: &str) -> Result<Vec<u8>> {
    let es = t.dtype.size();
    let mut raw = vec![0u8; t.span * es];
    file.read_at(t.data_start + (t.offset * es) as u64, &mut raw, name)?;
    Ok(gather(&raw, &t.shape, &t.stride, es))
}

/// The last dimension along which some chunk does not span the whole tensor: each chunk is
/// contiguous in the tensor's row-major order in the dimensions after it. `None` when every
/// chunk spans everything (a tensor stored whole).
fn split_dim(t: &DcpTensor) -> Option<usize> {
    let cut = |d: usize| t.chunks.iter().any(|c| c.sizes[d] != t.shape[d]);
    (0..t.shape.len()).rev().find(|&d| cut(d))
}

/// How many runs [`for_each_run`] calls for `c` (saturating: hostile sizes only make the
/// count larger, which sends the tensor to the in-memory path bounded by its real size).
fn run_count(c: &DcpChunk, split: Option<usize>) -> usize {
    match split {
        _ if c.sizes.contains(&0) => 0,
        None => 1,
        Some(d) => c.sizes[..d].iter().fold(1usize, |a, &s| a.saturating_mul(s)),
    }
}

/// Call `f(tensor byte, chunk byte, len)` for each run of chunk `c` contiguous in the
/// tensor's row-major order (`split` from [`split_dim`]); runs are in the chunk's order.
/// `c` lies inside the tensor (checked when `.metadata` was decoded).
fn for_each_run(
    shape: &[usize],
    c: &DcpChunk,
    es: usize,
    split: Option<usize>,
    mut f: impl FnMut(usize, usize, usize),
) {
    // Row-major element strides of the whole tensor.
    let mut stride = vec![1usize; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        stride[d] = stride[d + 1] * shape[d + 1];
    }
    let Some(d) = split else {
        return f(0, 0, numel(&c.sizes).unwrap_or(0) * es);
    };
    let run = c.sizes[d] * stride[d] * es;
    let rows: usize = c.sizes[..d].iter().product();
    let mut idx = vec![0usize; d];
    for row in 0..rows {
        let at: usize =
            (0..=d).map(|k| (c.offsets[k] + idx.get(k).copied().unwrap_or(0)) * stride[k]).sum();
        f(at * es, row * run, run);
        for k in (0..d).rev() {
            idx[k] += 1;
            if idx[k] < c.sizes[k] {
                break;
            }
            idx[k] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(
        shape: &[usize],
        offsets: &[usize],
        sizes: &[usize],
        split: Option<usize>,
    ) -> Vec<(usize, usize, usize)> {
        let c = DcpChunk {
            offsets: offsets.to_vec(),
            sizes: sizes.to_vec(),
            file: 0,
            offset: 0,
            length: 0,
        };
        let mut out = Vec::new();
        for_each_run(shape, &c, 1, split, |a, b, l| out.push((a, b, l)));
        out
    }

    #[test]
    fn coverage_finds_the_first_overlap_and_the_first_gap() {
        let mut c = Covered::new(130);
        assert_eq!(c.mark(0, 3), None);
        assert_eq!(c.mark(5, 129), None);
        assert_eq!(c.first_unmarked(), Some(3));
        assert_eq!(c.mark(60, 70), Some(60));
        assert_eq!(c.mark(3, 5), None);
        assert_eq!(c.first_unmarked(), Some(129));
        assert_eq!(c.mark(129, 130), None);
        assert_eq!(c.first_unmarked(), None, "the last word's spare bits are not a gap");
        assert_eq!(c.mark(128, 130), Some(128));
        assert_eq!(Covered::new(0).first_unmarked(), None);
    }

    #[test]
    fn chunks_split_along_a_later_dimension_are_one_run_per_row() {
        // [4, 6] split on dim 1 at column 3: the right half is rows of 3 bytes at 3, 9, 15, 21.
        assert_eq!(
            runs(&[4, 6], &[0, 3], &[4, 3], Some(1)),
            [(3, 0, 3), (9, 3, 3), (15, 6, 3), (21, 9, 3)]
        );
        // [5, 6] split on dim 0: one run from row 3 on.
        assert_eq!(runs(&[5, 6], &[3, 0], &[2, 6], Some(0)), [(18, 0, 12)]);
        // [2, 2, 4] split on dims 0 and 2: rows along dim 1 stay whole where dim 2 is cut.
        assert_eq!(runs(&[2, 2, 4], &[1, 0, 2], &[1, 2, 2], Some(2)), [(10, 0, 2), (14, 2, 2)]);
        // A tensor stored whole, 0-d included.
        assert_eq!(runs(&[3, 2], &[0, 0], &[3, 2], None), [(0, 0, 6)]);
        assert_eq!(runs(&[], &[], &[], None), [(0, 0, 1)]);
    }
}
