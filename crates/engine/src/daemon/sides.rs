//! The HF side files (config, tokenizer) of the window's members, read when each is admitted,
//! for a directory output: beside a trainer with `save_total_limit`, a selected member's
//! directory is often deleted before the publication that needs its config, and an open
//! member pins only its weights. Held per member; equal files are shared between members
//! (a run's config and tokenizer rarely change), so a window costs about one copy.
//! Which member's side files a publication takes is decided here (`for_publish`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::warn;

use crate::error::{Error, Result};
use crate::publish::SideFiles;
use sewa_checkpoint::Checkpoint;
use sewa_checkpoint::text;

/// What was kept of a member's side files.
#[derive(Debug)]
enum Kept {
    Files(Arc<SideFiles>),
    /// They could not be read (a symlink, a file over the caps...): why, about which directory.
    Failed {
        dir: PathBuf,
        why: String,
    },
}

#[derive(Debug, Default)]
pub struct Sides {
    by_member: BTreeMap<PathBuf, Kept>,
}

impl Sides {
    /// Read the side files of `ckpt`, just admitted at `member`, if it has a side directory.
    /// A failure is logged now and reported by the publication that would need them.
    pub fn admit(&mut self, member: &Path, ckpt: &Checkpoint) {
        let Some(dir) = ckpt.side_dir() else { return };
        let kept = match SideFiles::read(dir) {
            Ok(mut files) => {
                for held in self.by_member.values() {
                    if let Kept::Files(other) = held {
                        files.share_with(other);
                    }
                }
                Kept::Files(Arc::new(files))
            }
            Err(e) => {
                let why = e.reason_about(dir);
                warn!(dir = %text::path(dir), error = %e, "side files (config, tokenizer) not kept; a publication that needs them will fail");
                Kept::Failed { dir: dir.to_path_buf(), why }
            }
        };
        self.by_member.insert(member.to_path_buf(), kept);
    }

    pub fn evict(&mut self, member: &Path) {
        self.by_member.remove(member);
    }

    pub fn clear(&mut self) {
        self.by_member.clear();
    }

    /// The side files for a publication of `selected` (member path and checkpoint, newest
    /// last): those of the newest selected member with a side directory, as kept when it was
    /// admitted. A member admitted without them kept (the output became a directory by a
    /// reload) falls back to the newest selected member whose directory still exists, read
    /// now. `None` when no selected member has side files at all.
    pub fn for_publish(&self, selected: &[(&Path, &Checkpoint)]) -> Result<Option<Arc<SideFiles>>> {
        let with_side = || selected.iter().rev().filter(|(_, c)| c.side_dir().is_some());
        let Some((newest, ckpt)) = with_side().next() else { return Ok(None) };
        match self.by_member.get(*newest) {
            Some(Kept::Files(files)) => return Ok(Some(Arc::clone(files))),
            Some(Kept::Failed { dir, why }) => return Err(Error::bad_input(dir, why.clone())),
            None => {}
        }
        let on_disk = with_side().find_map(|(_, c)| c.side_dir().filter(|d| d.is_dir()));
        match on_disk {
            Some(dir) => SideFiles::read(dir).map(|f| Some(Arc::new(f))),
            None => {
                let dir = ckpt.side_dir().unwrap_or(newest);
                let msg = "side files (config, tokenizer) were not kept when it was admitted and \
                           no selected member's directory exists any more; the next \
                           checkpoint admitted brings its own";
                Err(Error::bad_input(dir, msg))
            }
        }
    }
}
