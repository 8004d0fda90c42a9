//! Reading one tensor's bytes piece by piece, whatever the storage: bytes already in memory are
//! borrowed in place (zero-copy), file bytes are read on demand with positioned reads into the
//! caller's buffer (see `pinned` for why that is safe when the file changes). Every consumer
//! of tensor bytes (averaging kernel, running average, blends, NaN scan) reads through here.

use std::borrow::Cow;
use std::ops::Range;

use super::pinned::PinnedFile;
use super::storage::Segment;
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
    /// Consecutive pieces of held files (`len` = their total).
    Segments { files: &'c [PinnedFile], segs: &'c [Segment], len: usize },
}

impl<'c> TensorReader<'c> {
    pub(super) fn memory(name: &'c str, bytes: Cow<'c, [u8]>) -> Self {
        TensorReader { name, src: Source::Memory(bytes) }
    }

    pub(super) fn file(name: &'c str, file: &'c PinnedFile, range: Range<usize>) -> Self {
        TensorReader { name, src: Source::File { file, range } }
    }

    pub(super) fn segments(name: &'c str, files: &'c [PinnedFile], segs: &'c [Segment]) -> Self {
        let len = segs.iter().map(|s| s.len).sum();
        TensorReader { name, src: Source::Segments { files, segs, len } }
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
            Source::Segments { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes, when they are in memory: read them in place.
    pub fn in_memory(&self) -> Option<&[u8]> {
        match &self.src {
            Source::Memory(b) => Some(b),
            Source::File { .. } | Source::Segments { .. } => None,
        }
    }

    /// True when this reader holds its own copy of the tensor (a decoded pickle tensor), which
    /// costs memory as long as the reader lives.
    pub fn is_copy(&self) -> bool {
        matches!(self.src, Source::Memory(Cow::Owned(_)))
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
            Source::Segments { files, segs, .. } => {
                let out = &mut buf[..range.len()];
                read_segments(files, segs, range.start, out, self.name)?;
                Ok(out)
            }
        }
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
            Source::Segments { files, segs, .. } => {
                read_segments(files, segs, range.start, buf, self.name)?
            }
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
            Source::Segments { files, segs, len } => {
                let mut out = vec![0u8; len];
                read_segments(files, segs, 0, &mut out, self.name)?;
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

/// Fill `out` with the bytes from `offset` on of the concatenation of `segs`: each piece that
/// overlaps is read straight into its place in `out` (the caller checked the range).
fn read_segments(
    files: &[PinnedFile],
    segs: &[Segment],
    offset: usize,
    out: &mut [u8],
    name: &str,
) -> Result<()> {
    let (mut at, mut done) = (0usize, 0usize);
    for seg in segs {
        let (start, end) = (at, at + seg.len);
        at = end;
        if end <= offset + done || done == out.len() {
            continue;
        }
        let from = offset + done - start;
        let n = (seg.len - from).min(out.len() - done);
        let file = files.get(seg.file).ok_or_else(|| {
            Error::Internal(format!("tensor {name}: segment names file {}", seg.file))
        })?;
        file.read_at(seg.start + from as u64, &mut out[done..done + n], name)?;
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{PinnedFile, Segment, TensorReader};
    use crate::checkpoint::{Checkpoint, DType};

    /// A tensor pieced from byte ranges of two files reads, by any range or chunk size, as the
    /// concatenation of its pieces (ranges start and end inside pieces and span several).
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
        let r = TensorReader::segments("t", &files, &segs);
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
