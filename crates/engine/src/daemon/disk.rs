//! The disk guard. sewa reads tensor bytes from files it holds open, so a window member whose
//! file the trainer's rotation deleted (or renamed a new version over) keeps its blocks
//! allocated until sewa lets it go: space the user cannot see, which can make the trainer's
//! next save fail with ENOSPC. This module lists what sewa holds (`holdings`), decides in pure
//! code which deleted checkpoints to release (`decide`: all of them with `[window] keep_deleted
//! = false`, else the oldest first while the run directory's filesystem has less than `[window]
//! min_free_bytes` free) and measures the filesystem (`Space::of`, one `statvfs`). The pipeline
//! carries out the releases (the window drops the members, the running average its inputs).
//! It never deletes a file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{info, warn};

use crate::config::WindowConfig;
use crate::status::{DiskStatus, OnDisk};
use crate::window::Member;
use sewa_checkpoint::Checkpoint;
use sewa_checkpoint::text::{self, human_bytes};

/// One checkpoint sewa holds open.
#[derive(Clone, Debug, PartialEq)]
pub struct Held {
    pub path: PathBuf,
    /// The version sewa holds is no longer at its path (deleted, or replaced by a rename).
    pub deleted: bool,
    /// Bytes only sewa's descriptors keep allocated (its files no path links to any more).
    pub bytes: u64,
    /// A window member (else an input of the running average that already left the window).
    pub in_window: bool,
    /// An input of the running average (which holds it open until its next update).
    pub averaged: bool,
    /// The tensors' bytes (the size of a checkpoint like it, for the default threshold).
    pub size: u64,
}

/// What to let go of.
#[derive(Debug, Default, PartialEq)]
pub struct Release {
    /// Window members to drop, oldest first.
    pub members: Vec<PathBuf>,
    /// The running average must let go of its inputs (one of them is released).
    pub average: bool,
}

/// The run directory's filesystem, in bytes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Space {
    /// Available to unprivileged writers such as the trainer (`f_bavail`).
    pub free: u64,
    pub total: u64,
}

impl Space {
    /// `statvfs` of `dir`; `None` when it cannot be examined (then nothing is released for
    /// lack of space).
    pub fn of(dir: &Path) -> Option<Space> {
        let st = rustix::fs::statvfs(dir).ok()?;
        let block = st.f_frsize;
        Some(Space {
            free: st.f_bavail.saturating_mul(block),
            total: st.f_blocks.saturating_mul(block),
        })
    }
}

/// The checkpoints sewa holds, oldest first: inputs of the running average that left the
/// window (`averaged`, older than any member), then the window members.
pub fn holdings(
    window: &[Member],
    open: &BTreeMap<PathBuf, Arc<Checkpoint>>,
    averaged: &[Arc<Checkpoint>],
) -> Vec<Held> {
    let in_average = |c: &Arc<Checkpoint>| averaged.iter().any(|a| Arc::ptr_eq(a, c));
    let members: Vec<Held> = window
        .iter()
        .filter_map(|m| open.get(&m.path).map(|c| held(&m.path, c, true, in_average(c))))
        .collect();
    let in_window = |c: &&Arc<Checkpoint>| open.values().any(|o| Arc::ptr_eq(o, c));
    let left = averaged.iter().filter(|c| !in_window(c)).map(|c| held(c.path(), c, false, true));
    left.chain(members).collect()
}

/// `deleted`: a file sewa holds was unlinked (rotation, a new version renamed over it), or
/// nothing is at the path any more. A directory that merely changed (a file added) is not.
fn held(path: &Path, c: &Checkpoint, in_window: bool, averaged: bool) -> Held {
    let bytes = c.unlinked_bytes();
    Held {
        path: path.to_path_buf(),
        deleted: bytes > 0 || OnDisk::check(path, Some(c.identity())) == OnDisk::Deleted,
        bytes,
        in_window,
        averaged,
        size: c.total_bytes(),
    }
}

/// `[window] min_free_bytes` in force: as configured, else the larger of 5 % of the
/// filesystem and twice `newest` (the newest checkpoint's size: room for the trainer's next
/// save, plus as much again for a temp file or the published average beside it).
pub fn min_free(configured: Option<u64>, total: u64, newest: u64) -> u64 {
    configured.unwrap_or_else(|| (total / 20).max(newest.saturating_mul(2)))
}

/// Which of `held` (oldest first) to release, as indices in that order. With `keep_deleted`
/// false: every deleted one. Else, only while `free` is below `min_free`: deleted ones that
/// hold bytes, oldest first, until releasing them brings `free` back to `min_free` (or none
/// is left). Members still on disk are never released: releasing them frees nothing.
pub fn decide(held: &[Held], free: Option<u64>, min_free: u64, keep_deleted: bool) -> Vec<usize> {
    if !keep_deleted {
        return (0..held.len()).filter(|&i| held[i].deleted).collect();
    }
    let Some(mut free) = free else { return Vec::new() };
    let mut out = Vec::new();
    for (i, h) in held.iter().enumerate() {
        if free >= min_free {
            break;
        }
        if h.deleted && h.bytes > 0 {
            free = free.saturating_add(h.bytes);
            out.push(i);
        }
    }
    out
}

/// Measure the run directory's filesystem, decide and log each release (once: a released
/// member leaves the window).
pub fn release(cfg: &WindowConfig, dir: &Path, held: &[Held]) -> Release {
    let space = Space::of(dir);
    let newest = held.iter().rfind(|h| h.in_window).map_or(0, |h| h.size);
    let min = min_free(cfg.min_free_bytes, space.map_or(0, |s| s.total), newest);
    let chosen = decide(held, space.map(|s| s.free), min, cfg.keep_deleted);
    let mut out = Release::default();
    for h in chosen.into_iter().map(|i| &held[i]) {
        let (path, freed) = (text::path(&h.path), human_bytes(h.bytes));
        match space {
            Some(s) if cfg.keep_deleted => warn!(
                %path, %freed, free = %human_bytes(s.free), min_free_bytes = min,
                "releasing a checkpoint deleted from disk: the run directory's filesystem has \
                 less free space than [window] min_free_bytes"
            ),
            _ => {
                info!(%path, %freed, "releasing a checkpoint deleted from disk ([window] keep_deleted = false)")
            }
        }
        out.average |= h.averaged;
        if h.in_window {
            out.members.push(h.path.clone());
        }
    }
    out
}

/// The disk part of the status file.
pub fn status(cfg: &WindowConfig, dir: &Path, held: &[Held]) -> Option<DiskStatus> {
    let space = Space::of(dir)?;
    let newest = held.iter().rfind(|h| h.in_window).map_or(0, |h| h.size);
    Some(DiskStatus {
        free_bytes: space.free,
        total_bytes: space.total,
        min_free_bytes: min_free(cfg.min_free_bytes, space.total, newest),
        held_bytes: held.iter().map(|h| h.bytes).sum(),
        keep_deleted: cfg.keep_deleted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn h(step: u64, deleted: bool, bytes: u64) -> Held {
        let path = PathBuf::from(format!("step_{step}.safetensors"));
        Held { path, deleted, bytes, in_window: true, averaged: false, size: 4 * MIB }
    }

    #[test]
    fn nothing_is_released_while_free_space_reaches_the_threshold() {
        let held = [h(1, true, 4 * MIB), h(2, true, 4 * MIB), h(3, false, 0)];
        assert!(decide(&held, Some(8 * MIB), 8 * MIB, true).is_empty());
        assert!(decide(&held, None, 8 * MIB, true).is_empty(), "unknown free space");
        assert!(decide(&held, Some(0), 0, true).is_empty(), "min_free_bytes = 0: never");
    }

    #[test]
    fn below_the_threshold_the_oldest_deleted_go_first_and_only_as_many_as_needed() {
        let held = [h(1, false, 0), h(2, true, 4 * MIB), h(3, true, 4 * MIB), h(4, true, 4 * MIB)];
        // 3 MiB short: the oldest deleted one is enough; the member on disk frees nothing.
        assert_eq!(decide(&held, Some(5 * MIB), 8 * MIB, true), vec![1]);
        // 5 MiB short: two of them.
        assert_eq!(decide(&held, Some(3 * MIB), 8 * MIB, true), vec![1, 2]);
        // Beyond what all of them hold: all the deleted ones, never the one on disk.
        assert_eq!(decide(&held, Some(0), 64 * MIB, true), vec![1, 2, 3]);
    }

    #[test]
    fn a_deleted_member_whose_blocks_someone_else_keeps_is_not_released_for_space() {
        // Deleted from its path but still linked elsewhere (a hard link): releasing it frees
        // nothing, so the guard keeps it; keep_deleted = false still lets it go.
        let held = [h(1, true, 0), h(2, true, 4 * MIB)];
        assert_eq!(decide(&held, Some(0), 4 * MIB, true), vec![1]);
        assert_eq!(decide(&held, Some(100 * MIB), 4 * MIB, false), vec![0, 1]);
    }

    #[test]
    fn keep_deleted_false_releases_every_deleted_one_whatever_the_space() {
        let held = [h(1, true, 4 * MIB), h(2, false, 0), h(3, true, 4 * MIB)];
        assert_eq!(decide(&held, Some(u64::MAX), 0, false), vec![0, 2]);
        assert_eq!(decide(&held, None, 0, false), vec![0, 2]);
    }

    #[test]
    fn the_default_threshold_is_five_percent_or_twice_the_newest_checkpoint() {
        assert_eq!(min_free(None, 1000 * MIB, 4 * MIB), 50 * MIB);
        assert_eq!(min_free(None, 100 * MIB, 4 * MIB), 8 * MIB);
        assert_eq!(min_free(Some(3), 100 * MIB, 4 * MIB), 3);
        assert_eq!(min_free(None, 0, u64::MAX), u64::MAX, "no overflow");
    }

    #[test]
    fn holdings_list_the_averaged_inputs_that_left_the_window_first() {
        use sewa_checkpoint::{DType, Identity};
        let ckpt = |name: &str| {
            let t = vec![("w".to_string(), DType::F32, vec![1], vec![0u8; 4])];
            Arc::new(Checkpoint::from_memory(name, Some(1), t).unwrap())
        };
        let (a, b, c) = (ckpt("a"), ckpt("b"), ckpt("c"));
        let sig = Identity::none();
        let member = |p: &str| Member { path: p.into(), sig, step: 1, metric: None };
        let open = BTreeMap::from([(PathBuf::from("b"), b.clone()), (PathBuf::from("c"), c)]);
        let held = holdings(&[member("b"), member("c")], &open, &[a, b]);
        let got: Vec<_> =
            held.iter().map(|h| (h.path.to_str().unwrap(), h.in_window, h.averaged)).collect();
        assert_eq!(got, [("a", false, true), ("b", true, true), ("c", true, false)]);
        assert!(held.iter().all(|h| h.bytes == 0 && h.size == 4), "memory holds no disk");
    }

    #[test]
    fn releasing_an_averaged_input_asks_the_running_average_to_let_go() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = WindowConfig { keep_deleted: false, ..WindowConfig::default() };
        let mut gone = h(1, true, MIB);
        gone.in_window = false;
        gone.averaged = true;
        let held = [gone, h(2, false, 0), h(3, true, MIB)];
        let r = release(&cfg, dir.path(), &held);
        assert_eq!(
            r,
            Release { members: vec![PathBuf::from("step_3.safetensors")], average: true }
        );
        let r = release(&cfg, dir.path(), &held[1..]);
        assert!(!r.average, "{r:?}");
    }

    fn write_st(path: &Path) {
        let data = vec![1u8; 1 << 16];
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::U8, vec![1 << 16], &data);
        safetensors::serialize_to_file([("w", view.unwrap())], None, path).unwrap();
    }

    #[test]
    fn unlinked_bytes_are_what_an_open_deleted_file_keeps_allocated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("step_1.safetensors");
        write_st(&path);
        let c = Checkpoint::open(&path, &Default::default()).unwrap();
        assert_eq!(c.unlinked_bytes(), 0, "still linked");
        assert!(!held(&path, &c, true, false).deleted);
        std::fs::remove_file(&path).unwrap();
        assert!(c.unlinked_bytes() >= 1 << 16, "{}", c.unlinked_bytes());
        let h = held(&path, &c, true, false);
        assert!(h.deleted && h.bytes == c.unlinked_bytes());
        // A new version renamed over the path: the old one is deleted, its blocks held.
        write_st(&dir.path().join("new"));
        std::fs::rename(dir.path().join("new"), &path).unwrap();
        let h = held(&path, &c, true, false);
        assert!(h.deleted && h.bytes >= 1 << 16, "{h:?}");
    }

    #[test]
    fn a_deleted_path_whose_file_is_linked_elsewhere_is_deleted_but_holds_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("step_1.safetensors");
        write_st(&path);
        let c = Checkpoint::open(&path, &Default::default()).unwrap();
        std::fs::hard_link(&path, dir.path().join("backup")).unwrap();
        std::fs::remove_file(&path).unwrap();
        let h = held(&path, &c, true, false);
        assert!(h.deleted && h.bytes == 0, "{h:?}");
    }
}
