//! Checkpoint files held open for their tensor bytes, read with positioned reads (`pread`)
//! into the caller's buffer. sewa maps no checkpoint into memory: this module replaced the one
//! mmap (and the crate's only `unsafe`), and parses nothing.
//!
//! # Safety (why positioned reads, not a map)
//!
//! A trainer may change a file while sewa reads it: torch.save and `last.ckpt` rewrite in
//! place, safetensors ≤ 0.7 writes in place, a user truncates a `sewa average` input. Through
//! a map, a truncation turns the next touch of a page past the new end into SIGBUS, which kills
//! the process (the daemon included), and an in-place rewrite changes bytes already handed out
//! as `&[u8]`. No check before the read can close that window (check, then another process
//! truncates, then we touch the page), and catching SIGBUS needs per-thread signal handling
//! and `unsafe` around every copy. Positioned reads are safe by construction instead:
//!
//! - **Truncation** makes `pread` return short, never a signal: a short read becomes
//!   [`Error::BadInput`] "truncated while reading tensor X", naming the file.
//! - **Rewrite in place** (same size, new bytes): after every read we `fstat` the descriptor we
//!   hold and compare size and mtime with the file's identity at open. A write moves the mtime
//!   before it copies its bytes in, so bytes we just read that a writer touched show up as a
//!   changed identity and the read fails: sewa never averages a mix of old and new bytes
//!   unnoticed. (The one blind spot: a rewrite within the same file-system timestamp tick as
//!   the write before our open, which the watcher's quiet period rules out.)
//! - **Replacement** (rename over, unlink, checkpoint rotation) is harmless: the descriptor
//!   pins the old inode, whose bytes never change, until the checkpoint is dropped.
//!
//! Reads go through the page cache into buffers the caller reuses (an L2-sized slab in the
//! averaging kernel), so reading maps no page of a checkpoint into sewa's memory and costs
//! the same buffers whatever the inputs' size or number. (What callers keep decoded — the
//! daemon's running average, a selection's members when they fit its budget — is theirs.)

use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::InputIo;
use super::identity::Identity;
use crate::error::{Error, Result};

/// One open checkpoint file, with the identity it had when opened.
pub(crate) struct PinnedFile {
    path: PathBuf,
    file: File,
    identity: Identity,
}

impl PinnedFile {
    /// Hold `file` (already opened from `path` and validated).
    pub fn new(path: &Path, file: File) -> Result<PinnedFile> {
        let identity = Identity::from_metadata(&file.metadata().input(path)?);
        Ok(PinnedFile { path: path.to_path_buf(), file, identity })
    }

    /// The file itself, for reading what describes the tensor bytes (a zip directory);
    /// tensor bytes go through [`read_at`](Self::read_at), which checks the identity.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// True when the file still has the size and mtime it had when opened (an in-place
    /// rewrite changes at least the mtime). Cheap: one `fstat`.
    pub fn still_valid(&self) -> bool {
        match self.file.metadata() {
            Ok(meta) => Identity::from_metadata(&meta) == self.identity,
            Err(_) => false,
        }
    }

    /// Disk space only this descriptor keeps allocated: the file's allocated bytes once no
    /// path links to it any more (rotation deleted it, a new version was renamed over it),
    /// else 0. One `fstat`.
    pub fn unlinked_bytes(&self) -> u64 {
        self.file.metadata().map_or(0, |m| unlinked_bytes(&m))
    }

    /// Fill `buf` with the file's bytes from `offset` on; `tensor` names what is read, for
    /// errors. Fails (bad input, naming the file) if the file was truncated or changed since
    /// it was opened, so the bytes in `buf` are the ones that were validated at open.
    pub fn read_at(&self, offset: u64, buf: &mut [u8], tensor: &str) -> Result<()> {
        let read = self.file.read_exact_at(buf, offset);
        if let Err(e) = &read
            && e.kind() != ErrorKind::UnexpectedEof
        {
            return Err(Error::bad_input(&self.path, format!("reading tensor {tensor}: {e}")));
        }
        // Short or not, the read is only good if the file is still what was validated: bytes
        // read from a file changed meanwhile may be a mix of old and new.
        let now = Identity::from_metadata(&self.file.metadata().input(&self.path)?);
        if read.is_err() || now.size < self.identity.size {
            return Err(Error::bad_input(
                &self.path,
                format!(
                    "truncated while reading tensor {tensor} (the file has {} bytes now, {} when \
                     opened; rewritten in place?); not reading it further",
                    now.size, self.identity.size
                ),
            ));
        }
        if now != self.identity {
            return Err(Error::bad_input(
                &self.path,
                format!(
                    "changed on disk while reading tensor {tensor} (rewritten in place?); not \
                     reading it further"
                ),
            ));
        }
        Ok(())
    }
}

/// Allocated bytes of a file that no directory entry links to (0 while one does).
pub(crate) fn unlinked_bytes(meta: &std::fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    if meta.nlink() == 0 { meta.blocks().saturating_mul(512) } else { 0 }
}
