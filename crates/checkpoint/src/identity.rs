//! Identity of the files behind a checkpoint: (device, inode, size, mtime). The watcher compares
//! identities across its quiet period (`Identity::stat`); an opened checkpoint compares the
//! files it holds with their identity at open time to detect an in-place rewrite (after every
//! read, see `pinned`) and the path with `Identity::of`. This module does not read file contents.

use std::fs::Metadata;
use std::hash::{Hash, Hasher};
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
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_weight_file(&name) {
                let child = entry.path();
                let m = std::fs::metadata(&child).input(&child)?;
                files.push((name, Identity::from_metadata(&m)));
            }
        }
        // read_dir order is arbitrary; the digest must not depend on it.
        files.sort_by(|a, b| a.0.cmp(&b.0));
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        files.hash(&mut hasher);
        Ok(Identity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: files.iter().map(|(_, id)| id.size).sum(),
            mtime_ns: files.iter().map(|(_, id)| id.mtime_ns).max().unwrap_or(0),
            members: hasher.finish() | 1,
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
