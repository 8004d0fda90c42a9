//! The one place sewa maps files into memory (and the only `unsafe` in the crate): a read-only
//! shared mapping of a checkpoint file, plus releasing a range of its pages after use.
//! Callers validate file contents with ordinary reads *before* mapping; this module does not
//! parse anything.
#![allow(unsafe_code)]

use std::fs::File;
use std::ops::Range;
use std::path::Path;

use memmap2::{Mmap, UncheckedAdvice};

use super::InputIo;
use super::identity::Identity;
use crate::error::{Error, Result};

/// A read-only mapping of one file, with the identity the file had when it was mapped.
pub(crate) struct MappedFile {
    file: File,
    map: Mmap,
    pub identity: Identity,
}

impl MappedFile {
    /// Map `file` (already opened from `path`) read-only.
    ///
    /// # Safety
    ///
    /// A mapping is only sound while nobody changes the file's bytes underneath it. sewa's
    /// contract: writers that *replace* a file (write a temp file, rename it over; unlink;
    /// checkpoint rotation) are harmless, because the mapped inode lives on until we unmap it
    /// and its bytes never change. Writers that rewrite a file *in place* (torch.save to the
    /// same path, `last.ckpt`, safetensors ≤ 0.7) are not: truncation makes page accesses
    /// raise SIGBUS, and rewriting changes bytes we hand out as `&[u8]`. We do not lock the
    /// file (advisory locks would not stop trainers). Instead every holder of a mapping checks
    /// [`MappedFile::still_valid`] (same size and mtime as at open, via `fstat` on the file we
    /// hold) before touching pages, and drops the checkpoint when it fails. The window between
    /// that check and the read remains; the watcher narrows it by mapping only files that
    /// stayed unchanged through a quiet period and by never mapping temp names.
    pub fn map(path: &Path, file: File) -> Result<MappedFile> {
        let meta = file.metadata().input(path)?;
        let identity = Identity::from_metadata(&meta);
        // SAFETY: see the `# Safety` contract above; the map is read-only.
        let map = unsafe { Mmap::map(&file) }.input(path)?;
        if map.len() as u64 != meta.len() {
            return Err(Error::bad_input(path, "file changed size while being mapped"));
        }
        Ok(MappedFile { file, map, identity })
    }

    /// Bytes of `range` within the file, straight from the map.
    pub fn bytes(&self, range: Range<usize>) -> &[u8] {
        &self.map[range]
    }

    /// True when the mapped file still has the size and mtime it had when mapped (an in-place
    /// rewrite changes at least the mtime). Cheap: one `fstat`.
    pub fn still_valid(&self) -> bool {
        match self.file.metadata() {
            Ok(meta) => Identity::from_metadata(&meta) == self.identity,
            Err(_) => false,
        }
    }

    /// Drop the resident pages of `range` (we are done with that tensor); they are read
    /// again from the file if touched later. Errors are ignored: this is only a hint.
    /// A range running past the end of the file is clipped to it.
    pub fn release(&self, range: Range<usize>) {
        let range = range.start..range.end.min(self.map.len());
        if range.is_empty() {
            return;
        }
        // SAFETY: MADV_DONTNEED on a read-only, file-backed mapping that we never
        // wrote to only discards clean page-cache references; later reads fault the same
        // file bytes back in. No reference into the map observes a change of contents.
        let _ = unsafe {
            self.map.unchecked_advise_range(UncheckedAdvice::DontNeed, range.start, range.len())
        };
    }
}
