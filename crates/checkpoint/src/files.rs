//! How every checkpoint reader opens a file — one mechanism, so no reader can forget a rule:
//!
//! * only regular files: a FIFO, socket or device in a run directory must neither block
//!   `open()` forever (a FIFO with no writer does) nor be read as a checkpoint. We `stat`
//!   first, open with `O_NONBLOCK` (so even a file swapped for a FIFO in between cannot
//!   block), `fstat` what we got, then clear `O_NONBLOCK`;
//! * inside a checkpoint directory (shards, `trainer_state.json`, side files), never through
//!   a symbolic link, at any component: anyone who can write the run directory could
//!   otherwise make sewa read — and publish — any file sewa can read
//!   (`tokenizer.json -> /etc/shadow`). Names must be plain relative names below the directory,
//!   spelled canonically (`a/b`, never `a//b`, `a/` or `a/.`): callers that tell files apart
//!   by name must not see one file under several names.
//!
//! A path the operator names (a command-line input, an entry of the watched directory, the
//! checkpoint directory itself) may be a symlink: that choice is theirs. This module opens;
//! it does not parse.

use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Component, Path};

use rustix::fs::{AtFlags, CWD, FileType, Mode, OFlags, fcntl_getfl, fcntl_setfl, openat, statat};

use crate::error::{Error, Result};

/// Read-only, close-on-exec, never blocking in `open()`, never acquiring a terminal.
const READ: OFlags =
    OFlags::RDONLY.union(OFlags::NONBLOCK).union(OFlags::CLOEXEC).union(OFlags::NOCTTY);
const DIR: OFlags = OFlags::RDONLY.union(OFlags::DIRECTORY).union(OFlags::CLOEXEC);

/// Open a checkpoint file the operator named (symlinks followed). Anything but a regular file
/// is refused with a clear error instead of being opened.
pub fn open_regular(path: &Path) -> Result<File> {
    let meta = std::fs::metadata(path).map_err(|e| Error::bad_input(path, e.to_string()))?;
    if !meta.is_file() {
        return Err(not_regular(path, FileType::from_raw_mode(meta_mode(&meta))));
    }
    let fd = openat(CWD, path, READ, Mode::empty()).map_err(|e| os_error(path, e))?;
    regular(path, fd)
}

/// Open `rel` (plain relative names only) inside the checkpoint directory `dir`, refusing a
/// symlink at any component and anything that is not a regular file.
pub fn open_in_dir(dir: &Path, rel: &Path) -> Result<File> {
    let shown = dir.join(rel);
    let (parent, name) = walk(dir, rel, &shown)?.ok_or_else(|| missing(&shown))?;
    let st = statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| os_error(&shown, e))?;
    let kind = FileType::from_raw_mode(st.st_mode);
    if kind != FileType::RegularFile {
        return Err(not_regular(&shown, kind));
    }
    let fd = openat(&parent, name, READ | OFlags::NOFOLLOW, Mode::empty())
        .map_err(|e| os_error(&shown, e))?;
    regular(&shown, fd)
}

/// [`open_in_dir`] for a direct child: `path`'s last component inside `path`'s parent.
pub fn open_child(path: &Path) -> Result<File> {
    let (dir, name) = split(path);
    open_in_dir(dir, Path::new(name))
}

/// Whether the checkpoint directory `dir` holds `rel` as a regular file: `false` when it is
/// absent, an error when something else (a symlink, FIFO, directory...) has that name.
pub fn has_file(dir: &Path, rel: &Path) -> Result<bool> {
    let shown = dir.join(rel);
    let Some((parent, name)) = walk(dir, rel, &shown)? else { return Ok(false) };
    match statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW) {
        Err(rustix::io::Errno::NOENT) => Ok(false),
        Err(e) => Err(os_error(&shown, e)),
        Ok(st) => match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => Ok(true),
            kind => Err(not_regular(&shown, kind)),
        },
    }
}

/// Read a whole small file (JSON index, trainer state) of at most `cap` bytes. A file whose
/// size already says it is larger is refused before any of it is read; the read itself
/// stops one byte past the cap either way (a file may grow, or report no size).
pub fn read_capped(path: &Path, file: File, cap: u64) -> Result<Vec<u8>> {
    let too_large = || {
        let msg = format!("larger than {cap} bytes: too large for this kind of file (corrupt?)");
        Error::bad_input(path, msg)
    };
    let size = file.metadata().map_err(|e| Error::bad_input(path, e.to_string()))?.len();
    if size > cap {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(cap + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::bad_input(path, e.to_string()))?;
    if bytes.len() as u64 > cap {
        return Err(too_large());
    }
    Ok(bytes)
}

/// Is `rel` spelled canonically: plain names joined by single `/`, with no empty, `.` or `..`
/// component (so not absolute, no `//`, no trailing `/`)? Other spellings (`a/`, `a//b`,
/// `a/.`) name the same file as the canonical one, and would let one file pass for several
/// where files are told apart by name.
pub fn is_plain(rel: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let bytes = rel.as_os_str().as_bytes();
    !bytes.is_empty()
        && bytes.split(|&b| b == b'/').all(|c| !c.is_empty() && c != b"." && c != b"..")
}

/// `(dir, name)` of a path, with `.` for a bare name.
fn split(path: &Path) -> (&Path, &std::ffi::OsStr) {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    (dir, path.file_name().unwrap_or(path.as_os_str()))
}

/// Open the directories on the way to `rel`'s last component without following symlinks.
/// `None` when one of them does not exist.
fn walk<'r>(
    dir: &Path,
    rel: &'r Path,
    shown: &Path,
) -> Result<Option<(OwnedFd, &'r std::ffi::OsStr)>> {
    if !is_plain(rel) {
        return Err(Error::bad_input(
            shown,
            "is not a plain name inside its checkpoint directory (absolute, leaves it with .., \
             or spelled with ., // or a trailing /); refused",
        ));
    }
    let parts: Vec<_> = rel.components().map(Component::as_os_str).collect();
    let Some((name, subdirs)) = parts.split_last() else {
        return Err(Error::bad_input(shown, "empty file name in a checkpoint directory"));
    };
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    let mut cur = openat(CWD, dir, DIR, Mode::empty()).map_err(|e| os_error(dir, e))?;
    for sub in subdirs {
        cur = match openat(&cur, *sub, DIR | OFlags::NOFOLLOW, Mode::empty()) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR) => {
                return Err(Error::bad_input(
                    shown,
                    format!(
                        "{} on the way is a symbolic link or not a directory; refused",
                        Path::new(sub).display()
                    ),
                ));
            }
            Err(e) => return Err(os_error(shown, e)),
        };
    }
    Ok(Some((cur, *name)))
}

/// `fstat` the opened file: it must still be a regular file; then make reads blocking again.
fn regular(path: &Path, fd: OwnedFd) -> Result<File> {
    let file = File::from(fd);
    let meta = file.metadata().map_err(|e| Error::bad_input(path, e.to_string()))?;
    if !meta.is_file() {
        return Err(not_regular(path, FileType::from_raw_mode(meta_mode(&meta))));
    }
    let flags = fcntl_getfl(&file).map_err(|e| os_error(path, e))?;
    fcntl_setfl(&file, flags - OFlags::NONBLOCK).map_err(|e| os_error(path, e))?;
    Ok(file)
}

fn meta_mode(meta: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::MetadataExt;
    meta.mode()
}

fn missing(path: &Path) -> Error {
    Error::bad_input(path, "No such file or directory")
}

fn os_error(path: &Path, e: rustix::io::Errno) -> Error {
    if e == rustix::io::Errno::LOOP {
        return not_regular(path, FileType::Symlink);
    }
    Error::bad_input(path, std::io::Error::from(e).to_string())
}

fn not_regular(path: &Path, kind: FileType) -> Error {
    let what = match kind {
        FileType::Symlink => {
            return Error::bad_input(
                path,
                "is a symbolic link: files inside a checkpoint directory must be regular files \
                 in it (a link could point at any file sewa can read); copy the file in instead",
            );
        }
        FileType::Fifo => "a FIFO (named pipe)",
        FileType::Socket => "a socket",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        FileType::Directory => "a directory",
        _ => "not a regular file",
    };
    Error::bad_input(
        path,
        format!(
            "is {what}, not a regular file; refused (a checkpoint is a regular file or a \
             directory of regular files)"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 19: `__0_0.distcp/`, `__0_0.distcp//` and `./__0_0.distcp` name the same file as
    /// `__0_0.distcp`; only the last spelling is accepted, and a hard link stays a second name
    /// (callers compare file identities for that).
    #[test]
    fn only_canonical_spellings_are_plain_names() {
        for ok in ["a", "a/b", "__0_0.distcp", "..a", "a..", ".metadata", "sub/.hidden"] {
            assert!(is_plain(Path::new(ok)), "{ok}");
        }
        for bad in ["", "/a", "a/", "a//b", "./a", "a/.", "a/./b", "../a", "a/..", ".", "..", "//"]
        {
            assert!(!is_plain(Path::new(bad)), "{bad:?}");
        }
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("x"), b"1").unwrap();
        for alias in ["x/", "x//", "x/.", "./x"] {
            let err = open_in_dir(tmp.path(), Path::new(alias)).unwrap_err().to_string();
            assert!(err.contains("not a plain name"), "{alias}: {err}");
            let err = has_file(tmp.path(), Path::new(alias)).unwrap_err().to_string();
            assert!(err.contains("not a plain name"), "{alias}: {err}");
        }
        assert!(open_in_dir(tmp.path(), Path::new("x")).is_ok());
    }
}
