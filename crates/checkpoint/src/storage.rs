//! Where an opened checkpoint's tensor bytes come from: the `Storage` trait, which each format
//! implements in its own folder or builds from the byte layouts shared here (`MemoryStore`:
//! tensors in memory; `FileStore`: byte ranges of files held open, as safetensors stores
//! them; `SegmentStore`: tensors that are the concatenation of byte ranges of several files,
//! as DeepSpeed's ZeRO partitions are), and what a format reader hands back (`Loaded`).
//! `Checkpoint` reads through them. This module parses no format and names none.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::pinned::PinnedFile;
use super::reader::{Piece, Run};
use super::{Format, TensorMeta, TensorReader};
use crate::error::{Error, Result};

/// What a format reader hands back before key normalisation.
pub(crate) struct Loaded {
    pub format: Format,
    pub tensors: Vec<TensorMeta>,
    pub storage: Box<dyn Storage>,
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

/// Where tensor bytes come from. Keys are the names as stored in the file. (Unwind safe: the
/// daemon catches a panic on one checkpoint and goes on with the others.)
pub(crate) trait Storage: Send + Sync + std::panic::RefUnwindSafe {
    /// See `Checkpoint::still_valid`.
    fn still_valid(&self) -> bool;

    /// See `Checkpoint::unlinked_bytes`.
    fn unlinked_bytes(&self) -> u64;

    /// A reader of the tensor stored under `key` (`meta` is its normalised description);
    /// `None` when there is no such key.
    fn reader<'a>(&'a self, key: &str, meta: &'a TensorMeta) -> Result<Option<TensorReader<'a>>>;

    /// The pieces tensor `key` is stored in, for formats that store tensors in pieces.
    fn chunks(&self, _key: &str) -> Option<Vec<ChunkInfo>> {
        None
    }
}

/// Tensors held in memory (checkpoints built by `Checkpoint::from_memory`).
pub(crate) struct MemoryStore(pub BTreeMap<String, Vec<u8>>);

impl Storage for MemoryStore {
    fn still_valid(&self) -> bool {
        true
    }

    fn unlinked_bytes(&self) -> u64 {
        0
    }

    fn reader<'a>(&'a self, key: &str, meta: &'a TensorMeta) -> Result<Option<TensorReader<'a>>> {
        let Some(bytes) = self.0.get(key) else { return Ok(None) };
        Ok(Some(TensorReader::memory(&meta.name, Cow::Borrowed(bytes))))
    }
}

/// Tensors at byte ranges of files held open since `open` (safetensors, one file or shards),
/// read with positioned reads.
pub(crate) struct FileStore {
    pub files: Vec<PinnedFile>,
    pub index: FileIndex,
}

impl Storage for FileStore {
    fn still_valid(&self) -> bool {
        self.files.iter().all(PinnedFile::still_valid)
    }

    fn unlinked_bytes(&self) -> u64 {
        self.files.iter().map(PinnedFile::unlinked_bytes).sum()
    }

    fn reader<'a>(&'a self, key: &str, meta: &'a TensorMeta) -> Result<Option<TensorReader<'a>>> {
        let Some((f, range)) = self.index.get(key) else { return Ok(None) };
        Ok(Some(TensorReader::file(&meta.name, &self.files[*f], range.clone())))
    }
}

/// Tensors that are the concatenation of byte ranges of several held files (DeepSpeed ZeRO
/// partitions: one parameter = a slice of each rank's flat fp32 group), read through the same
/// pieces reader as DCP chunks: in place, nothing gathered into memory.
pub(crate) struct SegmentStore {
    /// The checkpoint directory (for errors).
    pub dir: PathBuf,
    pub files: Vec<PinnedFile>,
    pub index: HashMap<String, Vec<Segment>>,
}

impl Storage for SegmentStore {
    fn still_valid(&self) -> bool {
        self.files.iter().all(PinnedFile::still_valid)
    }

    fn unlinked_bytes(&self) -> u64 {
        self.files.iter().map(PinnedFile::unlinked_bytes).sum()
    }

    fn reader<'a>(&'a self, key: &str, meta: &'a TensorMeta) -> Result<Option<TensorReader<'a>>> {
        let Some(segs) = self.index.get(key) else { return Ok(None) };
        segments_reader(&self.dir, &meta.name, &self.files, segs).map(Some)
    }
}

/// One piece of a tensor's bytes: `len` bytes at absolute offset `start` of file `file`
/// (an index into the storage's files). Built only from ranges checked against the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Segment {
    pub file: usize,
    pub start: u64,
    pub len: usize,
}

/// The reader of a tensor made of `segs` in order.
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
