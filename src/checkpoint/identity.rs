//! Identity of the files behind a checkpoint: (device, inode, size, mtime). The watcher compares
//! identities across its quiet period; an opened checkpoint compares the files it holds with
//! their identity at open time to detect an in-place rewrite (after every read, see `pinned`).
//! This module does not read file contents.

use std::fs::Metadata;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::InputIo;
use crate::error::Result;

/// (device, inode, size, mtime in ns). For a directory: the directory's device and inode, the
/// total size and newest mtime of the weight files inside, plus a digest of each weight file's
/// own identity (so replacing one shard by a same-sized file is still a change).
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    /// Digest over the member files of a directory; 0 for a plain file.
    members: u64,
}

impl Identity {
    /// Identity of a file or checkpoint directory (follows symlinks, as opening does).
    pub fn of(path: &Path) -> Result<Identity> {
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
    pub(crate) fn none() -> Identity {
        Identity { dev: 0, ino: 0, size: 0, mtime_ns: 0, members: 0 }
    }

    /// Identity from already fetched metadata (e.g. `fstat` of a file we hold open).
    pub fn from_metadata(meta: &Metadata) -> Identity {
        Identity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            members: 0,
        }
    }
}

/// Files inside a checkpoint directory whose change means the weights changed. The marker
/// (`trainer_state.json`) counts too: HF writes it last, so a rewrite of the directory shows.
pub(crate) fn is_weight_file(name: &str) -> bool {
    name.ends_with(".safetensors")
        || name.ends_with(".index.json")
        || (name.starts_with("pytorch_model") && name.ends_with(".bin"))
        || name == "trainer_state.json"
}
