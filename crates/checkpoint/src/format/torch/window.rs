//! A byte window `[base, base + len)` of an open file, as a `Read + Seek` stream for the zip
//! reader: a whole `.pt` file is the window over all of it, a DCP chunk the window its
//! `.metadata` names. Reads are positioned (`pread`), so the descriptor's own offset never
//! moves and one file can back any number of windows; nothing is copied or mapped.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::InputIo;
use crate::error::{Error, Result};

/// See the module header. Reads past `len` return end of file.
pub(crate) struct Window<'f> {
    file: &'f File,
    base: u64,
    len: u64,
    pos: u64,
}

impl<'f> Window<'f> {
    /// All of `file` (opened from `path`).
    pub fn whole(path: &Path, file: &'f File) -> Result<Window<'f>> {
        let len = file.metadata().input(path)?.len();
        Ok(Window { file, base: 0, len, pos: 0 })
    }

    /// `len` bytes of `file` from `base` on; the window must lie inside the file as it is now
    /// (`path` names it in the error).
    pub fn slice(path: &Path, file: &'f File, base: u64, len: u64) -> Result<Window<'f>> {
        let size = file.metadata().input(path)?.len();
        if base.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::bad_input(
                path,
                format!(
                    "item at bytes {base}..{} lies past the end of the {size}-byte file: \
                     truncated, or not the file its .metadata describes",
                    base.saturating_add(len)
                ),
            ));
        }
        Ok(Window { file, base, len, pos: 0 })
    }

    /// Where the window starts in the file.
    pub fn base(&self) -> u64 {
        self.base
    }

    pub fn len(&self) -> u64 {
        self.len
    }
}

impl Read for Window<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        if n == 0 {
            return Ok(0);
        }
        let got = self.file.read_at(&mut buf[..n], self.base + self.pos)?;
        self.pos += got as u64;
        Ok(got)
    }
}

impl Seek for Window<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = target.ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "seek before the start of the window")
        })?;
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_window_reads_only_its_bytes_and_seeks_relative_to_itself() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"0123456789").unwrap();
        let path = Path::new("t");
        let mut w = Window::slice(path, &f, 3, 4).unwrap();
        let mut s = String::new();
        w.read_to_string(&mut s).unwrap();
        assert_eq!(s, "3456");
        assert_eq!(w.seek(SeekFrom::End(-1)).unwrap(), 3);
        let mut b = [0u8; 8];
        assert_eq!(w.read(&mut b).unwrap(), 1);
        assert_eq!(b[0], b'6');
        assert!(w.seek(SeekFrom::Current(-9)).is_err());
        assert!(Window::slice(path, &f, 8, 3).is_err(), "past the end");
        assert!(Window::slice(path, &f, u64::MAX, 3).is_err(), "overflow");
        assert_eq!(Window::whole(path, &f).unwrap().len(), 10);
    }
}
