//! Reading one tensor's bytes piece by piece, whatever the storage: bytes already in memory are
//! borrowed in place (zero-copy), file bytes are read on demand with positioned reads into the
//! caller's buffer (see `pinned` for why that is safe when the file changes). A tensor
//! stored in pieces (a DCP tensor's chunks, one per rank) reads as one tensor: its byte
//! ranges map to runs of those pieces, read on demand, so no piece is copied whole. Every
//! consumer of tensor bytes (averaging kernel, running average, blends, NaN scan) reads
//! through here.

use std::borrow::Cow;
use std::ops::Range;

use super::pinned::PinnedFile;
use crate::error::{Error, Result};

/// One tensor's little-endian bytes, to read by range or chunk. Not aligned: decode elements
/// with `from_le_bytes` or check alignment. Get one from `Checkpoint::reader`.
pub struct TensorReader<'c> {
    name: &'c str,
    src: Source<'c>,
}

enum Source<'c> {
    /// Built in memory (borrowed) or decoded from a pickle (owned).
    Memory(Cow<'c, [u8]>),
    /// Absolute byte range in a held file.
    File { file: &'c PinnedFile, range: Range<usize> },
    /// Runs of pieces tiling the tensor (checked by [`TensorReader::pieces`]).
    Pieces { pieces: Vec<Piece<'c>>, runs: Vec<Run>, len: usize },
}

/// One stored piece of a tensor assembled from pieces.
pub(crate) enum Piece<'c> {
    /// `len` bytes from absolute offset `start` of a held file.
    File { file: &'c PinnedFile, start: u64, len: usize },
    /// Bytes in memory (a strided piece made row-major).
    Memory(Vec<u8>),
}

impl Piece<'_> {
    fn len(&self) -> usize {
        match self {
            Piece::File { len, .. } => *len,
            Piece::Memory(b) => b.len(),
        }
    }
}

/// Tensor bytes `at..at + len` are piece `piece`'s bytes `from..from + len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Run {
    pub at: usize,
    pub len: usize,
    pub piece: usize,
    pub from: usize,
}

impl<'c> TensorReader<'c> {
    pub(super) fn memory(name: &'c str, bytes: Cow<'c, [u8]>) -> Self {
        TensorReader { name, src: Source::Memory(bytes) }
    }

    pub(super) fn file(name: &'c str, file: &'c PinnedFile, range: Range<usize>) -> Self {
        TensorReader { name, src: Source::File { file, range } }
    }

    /// A tensor of `len` bytes made of `runs` of `pieces`. The runs must tile `0..len` exactly
    /// (no gap, no overlap) and stay inside their pieces; anything else is bad input of the
    /// file `path`, which stored the pieces. Adjacent runs that continue each other in the
    /// same piece are merged, so a piece stored whole costs one read per request.
    pub(crate) fn pieces(
        path: &std::path::Path,
        name: &'c str,
        pieces: Vec<Piece<'c>>,
        mut runs: Vec<Run>,
        len: usize,
    ) -> Result<Self> {
        runs.sort_unstable_by_key(|r| r.at);
        let mut merged: Vec<Run> = Vec::with_capacity(runs.len());
        for r in runs {
            let end = merged.last().map_or(0, |m| m.at + m.len);
            let inside = pieces
                .get(r.piece)
                .is_some_and(|p| r.from.checked_add(r.len).is_some_and(|e| e <= p.len()));
            if r.at != end || !inside {
                let what = if r.at < end { "overlap" } else { "leave a gap" };
                let what = if inside { what } else { "reach past their stored data" };
                return Err(Error::bad_input(
                    path,
                    format!("tensor {name}: its chunks {what} at byte {}", r.at.min(end)),
                ));
            }
            match merged.last_mut() {
                Some(m) if m.piece == r.piece && m.from + m.len == r.from => m.len += r.len,
                _ => merged.push(r),
            }
        }
        if merged.last().map_or(0, |m| m.at + m.len) != len {
            return Err(Error::bad_input(
                path,
                format!("tensor {name}: its chunks do not cover its {len} bytes"),
            ));
        }
        Ok(TensorReader { name, src: Source::Pieces { pieces, runs: merged, len } })
    }

    /// The tensor's name (as the checkpoint lists it).
    pub fn name(&self) -> &str {
        self.name
    }

    /// Bytes in the tensor.
    pub fn len(&self) -> usize {
        match &self.src {
            Source::Memory(b) => b.len(),
            Source::File { range, .. } => range.len(),
            Source::Pieces { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes, when they are in memory: read them in place.
    pub fn in_memory(&self) -> Option<&[u8]> {
        match &self.src {
            Source::Memory(b) => Some(b),
            Source::File { .. } | Source::Pieces { .. } => None,
        }
    }

    /// True when this reader holds its own copy of the tensor (a decoded pickle tensor), which
    /// costs memory as long as the reader lives.
    pub fn is_copy(&self) -> bool {
        match &self.src {
            Source::Memory(b) => matches!(b, Cow::Owned(_)),
            Source::File { .. } => false,
            Source::Pieces { pieces, .. } => pieces.iter().any(|p| matches!(p, Piece::Memory(_))),
        }
    }

    /// Bytes `range` of the tensor: borrowed when in memory, else read into the front of `buf`
    /// (which must be at least `range.len()` long). Fails, naming the file and the tensor, if
    /// the file was truncated or changed since it was opened.
    pub fn bytes<'b>(&'b self, range: Range<usize>, buf: &'b mut [u8]) -> Result<&'b [u8]> {
        self.check(&range, buf.len())?;
        match &self.src {
            Source::Memory(b) => Ok(&b[range]),
            Source::File { file, range: at } => {
                let out = &mut buf[..range.len()];
                file.read_at((at.start + range.start) as u64, out, self.name)?;
                Ok(out)
            }
            Source::Pieces { .. } => {
                let out = &mut buf[..range.len()];
                self.read_pieces(range.start, out)?;
                Ok(out)
            }
        }
    }

    /// Fill `out` with the tensor's bytes from `offset` on, run by run (`Source::Pieces`).
    fn read_pieces(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        let Source::Pieces { pieces, runs, .. } = &self.src else { return Ok(()) };
        let mut i = runs.partition_point(|r| r.at + r.len <= offset);
        let mut done = 0;
        while done < out.len() {
            let Some(r) = runs.get(i) else { break }; // `check` kept the range inside
            let skip = offset + done - r.at;
            let n = (r.len - skip).min(out.len() - done);
            let dst = &mut out[done..done + n];
            match &pieces[r.piece] {
                Piece::File { file, start, .. } => {
                    file.read_at(start + (r.from + skip) as u64, dst, self.name)?
                }
                Piece::Memory(b) => dst.copy_from_slice(&b[r.from + skip..r.from + skip + n]),
            }
            done += n;
            i += 1;
        }
        Ok(())
    }

    /// Copy bytes from `offset` on into all of `buf` (for callers that keep the whole tensor).
    pub fn read_into(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        let range = offset..offset.saturating_add(buf.len());
        self.check(&range, buf.len())?;
        match &self.src {
            Source::Memory(b) => buf.copy_from_slice(&b[range]),
            Source::File { file, range: at } => {
                file.read_at((at.start + range.start) as u64, buf, self.name)?
            }
            Source::Pieces { .. } => self.read_pieces(offset, buf)?,
        }
        Ok(())
    }

    /// A range outside the tensor (or a buffer too small for it) is a caller's bug: an error,
    /// not a read of the neighbouring tensor's bytes or a panic.
    fn check(&self, range: &Range<usize>, buf_len: usize) -> Result<()> {
        let file = !matches!(self.src, Source::Memory(_));
        if range.start > range.end || range.end > self.len() || (file && buf_len < range.len()) {
            return Err(Error::Internal(format!(
                "tensor {}: bytes {range:?} requested of {} (buffer of {buf_len})",
                self.name,
                self.len()
            )));
        }
        Ok(())
    }

    /// All the bytes: as they are when in memory, else read into a new buffer of the
    /// tensor's size.
    pub fn into_bytes(self) -> Result<Cow<'c, [u8]>> {
        match self.src {
            Source::Memory(b) => Ok(b),
            Source::File { file, range } => {
                let mut out = vec![0u8; range.len()];
                file.read_at(range.start as u64, &mut out, self.name)?;
                Ok(Cow::Owned(out))
            }
            Source::Pieces { len, .. } => {
                let mut out = vec![0u8; len];
                self.read_pieces(0, &mut out)?;
                Ok(Cow::Owned(out))
            }
        }
    }

    /// Call `f(offset, bytes)` on consecutive pieces of the tensor of at most `chunk` bytes
    /// (rounded down to a multiple of 8, so pieces hold whole elements of any dtype). File
    /// bytes are read into `buf`, which grows to one piece and can be reused across calls.
    pub fn for_each_chunk(
        &self,
        chunk: usize,
        buf: &mut Vec<u8>,
        mut f: impl FnMut(usize, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let chunk = (chunk / 8).max(1) * 8;
        let len = self.len();
        if self.in_memory().is_none() && buf.len() < chunk.min(len) {
            buf.resize(chunk.min(len), 0);
        }
        let mut offset = 0;
        while offset < len {
            let end = len.min(offset + chunk);
            f(offset, self.bytes(offset..end, buf)?)?;
            offset = end;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{Piece, Run, TensorReader};
    use crate::{Checkpoint, DType};

    fn run(at: usize, len: usize, piece: usize, from: usize) -> Run {
        Run { at, len, piece, from }
    }

    /// Two pieces interleaved row by row (a tensor split along its last dimension) read back
    /// in order across run boundaries; runs that overlap, leave a gap or reach past their
    /// piece are bad input, never a read of the wrong bytes.
    #[test]
    fn pieces_read_as_one_tensor_and_bad_tilings_are_refused() {
        let path = std::path::Path::new("d");
        let pieces = || vec![Piece::Memory(b"abef".to_vec()), Piece::Memory(b"cdgh".to_vec())];
        let runs = vec![run(0, 2, 0, 0), run(4, 2, 0, 2), run(2, 2, 1, 0), run(6, 2, 1, 2)];
        let r = TensorReader::pieces(path, "t", pieces(), runs, 8).unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(r.bytes(1..7, &mut buf).unwrap(), b"bcdefg");
        assert_eq!(&*r.into_bytes().unwrap(), b"abcdefgh");
        let bad = [
            (vec![run(0, 4, 0, 0), run(2, 4, 1, 0)], "overlap"),
            (vec![run(0, 2, 0, 0), run(4, 4, 1, 0)], "gap"),
            (vec![run(0, 4, 0, 2), run(4, 4, 1, 0)], "past their stored data"),
            (vec![run(0, 4, 0, 0), run(4, 2, 1, 0)], "do not cover"),
            (vec![run(0, 4, 0, 0), run(4, 4, 7, 0)], "past their stored data"),
        ];
        for (runs, says) in bad {
            let err = TensorReader::pieces(path, "t", pieces(), runs, 8).err().unwrap();
            assert!(err.to_string().contains(says), "{err}");
        }
    }

    #[test]
    fn chunks_cover_the_tensor_in_whole_elements_and_bad_ranges_are_errors() {
        let bytes: Vec<u8> = (0..60).collect();
        let t = vec![("w".to_string(), DType::F32, vec![15], bytes.clone())];
        let ck = Checkpoint::from_memory("m.safetensors", None, t).unwrap();
        let reader = ck.reader("w").unwrap();
        let mut seen = Vec::new();
        reader
            .for_each_chunk(13, &mut Vec::new(), |offset, b| {
                assert_eq!((offset % 8, b.len() <= 8), (0, true), "pieces of 13 round to 8");
                seen.extend_from_slice(b);
                Ok(())
            })
            .unwrap();
        assert_eq!(seen, bytes);
        assert!(reader.bytes(56..64, &mut [0; 8]).is_err(), "past the end");
        assert!(reader.read_into(50, &mut [0; 20]).is_err(), "past the end");
        assert!(ck.reader("nope").is_err());
    }
}
