//! How sewa reads the small text files an operator names — the config file (`check-config`,
//! `watch`, `status` and every SIGHUP reload) and the status file `sewa status` prints: a
//! regular file (symlinks followed), at most a stated size. A FIFO, a device such as
//! `/dev/zero`, a directory or a socket in its place is refused at once, naming what it is:
//! the path is `stat`ed first, then opened with `O_NONBLOCK` (a FIFO swapped in between cannot
//! block `open()` waiting for a writer) and `fstat`ed again, and at most `cap + 1` bytes are
//! ever read (a file growing while read cannot make sewa buffer without bound).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use rustix::fs::OFlags;

/// Largest config file read: real ones are a few KiB (the shipped, fully commented example
/// is under 16 KiB), so a MiB leaves room for any hand-written file and refuses a runaway one.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The bytes of the regular file `path`, at most `cap` of them; otherwise why not (without
/// the path, which the caller's error names).
pub fn read_small(path: &Path, cap: u64) -> std::result::Result<Vec<u8>, String> {
    let before = std::fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    regular(&before.file_type())?;
    let flags = OFlags::NONBLOCK | OFlags::NOCTTY;
    let file = File::options()
        .read(true)
        .custom_flags(flags.bits() as i32)
        .open(path)
        .map_err(|e| format!("cannot read: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("cannot read: {e}"))?;
    regular(&meta.file_type())?;
    let too_big = || format!("is larger than {cap} bytes; refused (is this the right file?)");
    if meta.len() > cap {
        return Err(too_big());
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(cap + 1).read_to_end(&mut bytes).map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > cap {
        return Err(too_big());
    }
    Ok(bytes)
}

/// Refuse anything but a regular file, saying what it is.
fn regular(kind: &std::fs::FileType) -> std::result::Result<(), String> {
    let what = if kind.is_file() {
        return Ok(());
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO (named pipe)"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    };
    Err(format!("is {what}, not a regular file; refused"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_up_to_the_cap_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sewa.toml");
        std::fs::write(&file, "0123456789").unwrap();
        assert_eq!(read_small(&file, 10).unwrap(), b"0123456789");
        let err = read_small(&file, 9).unwrap_err();
        assert!(err.contains("larger than 9 bytes"), "{err}");
        // Symlinks are followed: the operator named this path.
        let link = dir.path().join("link.toml");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert_eq!(read_small(&link, 10).unwrap(), b"0123456789");
        let err = read_small(dir.path(), 10).unwrap_err();
        assert!(err.contains("is a directory"), "{err}");
        let err = read_small(Path::new("/dev/zero"), MAX_CONFIG_BYTES).unwrap_err();
        assert!(err.contains("character device"), "{err}");
        let err = read_small(&dir.path().join("missing"), 10).unwrap_err();
        assert!(err.contains("cannot read") && err.contains("No such file"), "{err}");
    }

    /// A FIFO with no writer made `open()` wait forever; now it is refused without opening,
    /// and a FIFO swapped in after the `stat` is opened non-blocking and refused by `fstat`.
    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("sewa.toml");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(made.success());
        let (tx, rx) = std::sync::mpsc::channel();
        let path = fifo.clone();
        std::thread::spawn(move || tx.send(read_small(&path, MAX_CONFIG_BYTES)));
        let got = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("did not block");
        assert!(got.unwrap_err().contains("FIFO"));
        let file = File::options()
            .read(true)
            .custom_flags(OFlags::NONBLOCK.bits() as i32)
            .open(&fifo)
            .unwrap();
        assert!(regular(&file.metadata().unwrap().file_type()).unwrap_err().contains("FIFO"));
    }
}
