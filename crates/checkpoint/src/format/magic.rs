//! What a file's first bytes say it is: a zip (torch.save), a legacy torch pickle, or anything
//! else (safetensors starts with its header length, which has no magic). Reads 8 bytes at most.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::InputIo;
use crate::error::Result;

pub(crate) enum Magic {
    Zip,
    LegacyPickle,
    Other,
}

/// Look at the first bytes: zip local header (`PK\x03\x04`), pickle protocol opcode (`\x80`,
/// the legacy torch format starts with a pickled magic number) or anything else.
pub(crate) fn sniff(path: &Path, file: &File) -> Result<Magic> {
    let mut buf = [0u8; 8];
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], n as u64).input(path)? {
            0 => break,
            got => n += got,
        }
    }
    let head = &buf[..n];
    // A safetensors file starts with its header length; one above 100 MB is not safetensors.
    let as_len = head.iter().rev().fold(0u64, |acc, &b| (acc << 8) | b as u64);
    Ok(match head {
        [b'P', b'K', 3, 4, ..] => Magic::Zip,
        [0x80, 2..=5, ..] if n == 8 && as_len > 100_000_000 => Magic::LegacyPickle,
        _ => Magic::Other,
    })
}
