//! Identity of the files behind a checkpoint: (device, inode, size, mtime). The watcher compares
//! identities across its quiet period (`Identity::stat`); an opened checkpoint compares the
//! files it holds with their identity at open time to detect an in-place rewrite (after every
//! read, see `pinned`) and the path with `Identity::of`. This module does not read file contents.

use std::fs::Metadata;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::InputIo;
use crate::error::Result;

/// (device, inode, size, mtime in ns). For a directory: the directory's device and inode, the
/// total size and newest mtime of the weight files inside, plus a digest of each weight file's
/// own identity (so replacing one shard by a same-sized file is still a change). Compare only
/// identities taken the same way (`of`/`from_metadata`, or `stat`): they summarise directories
/// differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    /// A summary of the files in a directory: a digest of the weight files' identities (`of`),
    /// or the number of files below it (`stat`); 0 for a plain file.
    pub members: u64,
}

impl Identity {
    /// Identity of a file or checkpoint directory (follows symlinks, as opening does), where
    /// `is_weight_file` says which files of a directory count (`Identity::of` asks every
    /// format: see `detect`).
    pub(crate) fn of_with(path: &Path, is_weight_file: fn(&str) -> bool) -> Result<Identity> {
        let meta = std::fs::metadata(path).input(path)?;
        if !meta.is_dir() {
            return Ok(Identity::from_metadata(&meta));
        }
        let mut files = Vec::new();
        for entry in std::fs::read_dir(path).input(path)? {
            let entry = entry.input(path)?;
            let name = entry.file_name();
            if is_weight_file(&name.to_string_lossy()) {
                let child = entry.path();
                let m = std::fs::metadata(&child).input(&child)?;
                files.push((name.as_bytes().to_vec(), Identity::from_metadata(&m)));
            }
        }
        Ok(Identity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: files.iter().map(|(_, id)| id.size).sum(),
            mtime_ns: files.iter().map(|(_, id)| id.mtime_ns).max().unwrap_or(0),
            members: digest(&mut files),
        })
    }

    /// The identity of something that is not a file (checkpoints built in memory).
    pub fn none() -> Identity {
        Identity { dev: 0, ino: 0, size: 0, mtime_ns: 0, members: 0 }
    }

    /// Identity from already fetched metadata (e.g. `fstat` of a file we hold open).
    pub fn from_metadata(meta: &Metadata) -> Identity {
        Identity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime_ns: mtime_ns(meta),
            members: 0,
        }
    }
}

impl Identity {
    /// What `stat` says about a watched candidate, enough to notice any write, rename or
    /// rewrite: for a directory, every file up to two levels below it is folded in (sizes and
    /// inodes summed, newest mtime, number of files). `None` if it does not exist. Never an
    /// error: the watcher only compares these across its quiet period.
    pub fn stat(path: &Path) -> Option<Identity> {
        let m = std::fs::metadata(path).ok()?;
        let mut id = Identity {
            dev: m.dev(),
            ino: m.ino(),
            size: if m.is_dir() { 0 } else { m.size() },
            mtime_ns: mtime_ns(&m),
            members: 0,
        };
        if m.is_dir() {
            fold_dir(path, &mut id, 2);
        }
        Some(id)
    }
}

/// The digest of a directory's weight files, (name, identity) each: XXH3-64 (seed 0) over,
/// for each file in byte order of its name, the name's length (u64) and bytes, then `dev`,
/// `ino`, `size` (u64), `mtime_ns` (i128) and `members` (u64), all little-endian; with the low
/// bit set, so a directory's digest is never a plain file's 0. Why a named algorithm over a
/// stated encoding, not `std`'s `DefaultHasher` over `Hash`: the identity is persisted (in
/// the manifest) and compared by the next sewa after a restart, possibly built by another
/// toolchain; `DefaultHasher`'s algorithm may change with any Rust release and would make
/// every directory member look rewritten.
fn digest(files: &mut [(Vec<u8>, Identity)]) -> u64 {
    // read_dir order is arbitrary; the digest must not depend on it.
    files.sort_by(|a, b| a.0.cmp(&b.0));
    let mut bytes = Vec::new();
    for (name, id) in files.iter() {
        bytes.extend_from_slice(&(name.len() as u64).to_le_bytes());
        bytes.extend_from_slice(name);
        bytes.extend_from_slice(&id.dev.to_le_bytes());
        bytes.extend_from_slice(&id.ino.to_le_bytes());
        bytes.extend_from_slice(&id.size.to_le_bytes());
        bytes.extend_from_slice(&id.mtime_ns.to_le_bytes());
        bytes.extend_from_slice(&id.members.to_le_bytes());
    }
    xxhash_rust::xxh3::xxh3_64(&bytes) | 1
}

fn mtime_ns(m: &Metadata) -> i128 {
    m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128
}

fn fold_dir(dir: &Path, id: &mut Identity, depth: u32) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for entry in rd.flatten() {
        let Ok(m) = entry.metadata() else { continue };
        id.mtime_ns = id.mtime_ns.max(mtime_ns(&m));
        if m.is_dir() {
            if depth > 0 {
                fold_dir(&entry.path(), id, depth - 1);
            }
        } else {
            id.members += 1;
            // Wrapping sum: sizes plus inodes notice a file replaced by one of the same size.
            id.size = id.size.wrapping_add(m.size()).wrapping_add(m.ino() << 20);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(dev: u64, ino: u64, size: u64, mtime_ns: i128) -> Identity {
        Identity { dev, ino, size, mtime_ns, members: 0 }
    }

    /// The digest is persisted across restarts and toolchains: its value for a fixed input is
    /// pinned (XXH3-64 of the encoding `digest` documents), and it ignores listing order.
    #[test]
    fn the_directory_digest_is_pinned_and_order_free() {
        let mut files = vec![
            (b"model.safetensors".to_vec(), id(2049, 77, 1 << 20, 1_700_000_000_123_456_789)),
            (b"config.json".to_vec(), id(2049, 78, 512, -5)),
        ];
        let pinned = digest(&mut files);
        // Checked against the reference C libxxhash 0.8.1 (`XXH3_64bits` of the same bytes).
        assert_eq!(pinned, 0x03b4_e9e6_fc90_7e6b, "{pinned:#018x}");
        files.reverse();
        assert_eq!(digest(&mut files), pinned);
        assert_eq!(digest(&mut []), xxhash_rust::xxh3::xxh3_64(b"") | 1);
        // Every field counts.
        files[0].1.ino += 1;
        assert_ne!(digest(&mut files), pinned);
    }
}
