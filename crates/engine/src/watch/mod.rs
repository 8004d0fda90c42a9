//! File-system events → hints about top-level candidates. The notify callback only maps each
//! event path to the entry directly under the watched directory that contains it and sends it
//! on a bounded channel; a full channel or a notify rescan flag asks for a full rescan instead
//! (events are hints, the rescan is the truth). Debouncing lives in `settler`; validation in
//! `checkpoint`. This module decides nothing about checkpoints beyond their names.
//!
//! What is watched: the run directory itself, not recursively, plus each candidate directory
//! (`checkpoint-N/`) one level down, added as it appears and dropped as it goes (`Watch::follow`).
//! Symlinks are never followed into other trees: a `data -> /usr` link costs no watch at all.
//! The candidate directories have a watcher (an inotify instance) of their own: in one
//! instance, a deleted `checkpoint-N/` is reported twice (the run directory's "deleted" and the
//! directory's own "deleted self"), notify drops its watch twice and logs the second time as a
//! warning (`WatchNotFound`) — for every directory a trainer's rotation removes, a normal event.

pub mod settler;

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

pub use settler::{Settled, Settler};

use crate::checked::Pattern;
use crate::config::Config;
use crate::error::{Error, Result};

/// Which top-level entries of the watched directory are candidates.
#[derive(Clone, Debug)]
pub struct Filter {
    dir: PathBuf,
    pattern: Pattern,
    /// Top-level entries holding sewa's own files (output, manifest, state, status).
    own: Vec<PathBuf>,
}

impl Filter {
    pub fn new(cfg: &Config) -> Filter {
        let dir = absolute(&cfg.watch.dir);
        let own_paths = [
            cfg.publish.out.clone(),
            crate::publish::manifest_path(&cfg.publish.out),
            cfg.state_dir(),
            cfg.status_file(),
        ];
        let own = own_paths.iter().filter_map(|p| top_level(&dir, &absolute(p))).collect();
        Filter { dir, pattern: cfg.watch.pattern.clone(), own }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The candidate an event path belongs to, if it is one.
    pub fn candidate(&self, event_path: &Path) -> Option<PathBuf> {
        let top = top_level(&self.dir, event_path)?;
        self.accepts(&top).then_some(top)
    }

    /// Name rules: hidden, temporary, sewa's own and pattern-mismatched entries are not candidates.
    /// Names that are not UTF-8 are matched lossily (the replaced bytes match `*` and `?`).
    pub fn accepts(&self, top: &Path) -> bool {
        let Some(name) = top.file_name().map(|n| n.to_string_lossy()) else { return false };
        !name.starts_with('.')
            && !sewa_checkpoint::is_temp_name(&name)
            && !self.own.iter().any(|o| o == top)
            && self.pattern.matches(&name)
            && looks_like_checkpoint(top, &name)
    }

    /// Every candidate in the directory now.
    pub fn scan(&self) -> Result<Vec<PathBuf>> {
        let rd = std::fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        let all = rd.flatten().map(|e| self.dir.join(e.file_name()));
        Ok(all.filter(|p| self.accepts(p)).collect())
    }
}

/// Directories (HF `checkpoint-N/`) and regular files with an ending a checkpoint format
/// reads (`checkpoint_endings`); other files in a run directory (logs, TensorBoard events,
/// configs) are not candidates, so they are not validated and quarantined over and over. A path that
/// no longer exists passes, so the settler can report it gone. FIFOs, sockets and devices are
/// never candidates (opening a FIFO blocks); `checkpoint::open_regular` refuses them too, in
/// case one replaces a file after this look.
fn looks_like_checkpoint(path: &Path, name: &str) -> bool {
    if std::fs::metadata(path).is_ok_and(|m| !m.is_file() && !m.is_dir()) {
        return false;
    }
    let lower = name.to_ascii_lowercase();
    sewa_checkpoint::checkpoint_endings().any(|e| lower.ends_with(e))
        || std::fs::symlink_metadata(path).map_or(true, |m| m.is_dir())
}

/// `dir/<first component of path below dir>`, or None if `path` is not strictly below `dir`.
fn top_level(dir: &Path, path: &Path) -> Option<PathBuf> {
    let rest = path.strip_prefix(dir).ok()?;
    match rest.components().next()? {
        Component::Normal(first) => Some(dir.join(first)),
        _ => None,
    }
}

/// Absolute, with symlinks in the existing part resolved, so event paths compare equal.
pub fn absolute(p: &Path) -> PathBuf {
    if let Ok(c) = p.canonicalize() {
        return c;
    }
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => absolute(parent).join(name),
        _ => abs,
    }
}

/// What the watcher tells the daemon.
#[derive(Debug)]
pub enum Hint {
    Candidate(PathBuf),
    /// Rescan everything: overflow, a watch error, or a dropped hint.
    Rescan(String),
}

/// A running watcher; dropping it stops the watch.
pub struct Watch {
    /// The run directory's watcher.
    _run: Box<dyn Watcher + Send>,
    /// The candidate directories' watcher (apart: see the module docs).
    members: Box<dyn Watcher + Send>,
    /// Candidate directories watched one level down.
    dirs: BTreeSet<PathBuf>,
    /// Set when a hint could not be queued: the daemon rescans.
    pub overflowed: Arc<AtomicBool>,
}

impl Watch {
    /// Keep candidate `path`'s watch in line with what it is now: a real directory (not a
    /// symlink) is watched, without recursion, so the files written into it are events;
    /// anything else has no watch of its own (the directory's watch sees files). An error
    /// (e.g. the inotify watch limit) leaves the candidate to the rescans.
    pub fn follow(&mut self, path: &Path) -> Result<()> {
        let is_dir = std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir());
        match (is_dir, self.dirs.contains(path)) {
            (true, false) => {
                self.members
                    .watch(path, RecursiveMode::NonRecursive)
                    .map_err(|e| watch_err(path, e))?;
                self.dirs.insert(path.to_path_buf());
            }
            (false, true) => self.unfollow(path),
            _ => {}
        }
        Ok(())
    }

    /// Drop the watches of directories that are no longer among `candidates` (a rescan).
    pub fn prune(&mut self, candidates: &[PathBuf]) {
        let keep: BTreeSet<&PathBuf> = candidates.iter().collect();
        let gone: Vec<PathBuf> = self.dirs.iter().filter(|d| !keep.contains(d)).cloned().collect();
        gone.iter().for_each(|d| self.unfollow(d));
    }

    /// How many candidate directories are watched (the run directory's own watch aside).
    pub fn followed(&self) -> usize {
        self.dirs.len()
    }

    fn unfollow(&mut self, path: &Path) {
        self.dirs.remove(path);
        // A deleted directory's watch is already gone in the kernel: nothing to report.
        let _ = self.members.unwatch(path);
    }
}

/// Start watching `filter.dir()` (inotify, or polling every `poll_ms`), without recursion;
/// candidate directories are added with `Watch::follow`.
pub fn start(filter: Filter, poll_ms: u64, tx: mpsc::Sender<Hint>) -> Result<Watch> {
    let overflowed = Arc::new(AtomicBool::new(false));
    let dir = filter.dir().to_path_buf();
    let watcher = |handler| new_watcher(handler, poll_ms, &dir);
    let mut run = watcher(hints(filter.clone(), tx.clone(), overflowed.clone()))?;
    let members = watcher(hints(filter, tx, overflowed.clone()))?;
    run.watch(&dir, RecursiveMode::NonRecursive).map_err(|e| watch_err(&dir, e))?;
    Ok(Watch { _run: run, members, dirs: BTreeSet::new(), overflowed })
}

/// A watcher (inotify, or polling every `poll_ms`) calling `handler`; it watches nothing yet.
fn new_watcher(
    handler: impl notify::EventHandler,
    poll_ms: u64,
    dir: &Path,
) -> Result<Box<dyn Watcher + Send>> {
    let cfg = notify::Config::default().with_follow_symlinks(false);
    if poll_ms > 0 {
        let cfg = cfg.with_poll_interval(Duration::from_millis(poll_ms));
        return Ok(Box::new(
            notify::PollWatcher::new(handler, cfg).map_err(|e| watch_err(dir, e))?,
        ));
    }
    let w = notify::RecommendedWatcher::new(handler, cfg).map_err(|e| watch_err(dir, e))?;
    Ok(Box::new(w))
}

/// The notify callback: events → hints on `tx`; a hint that does not fit sets `flag`.
fn hints(
    filter: Filter,
    tx: mpsc::Sender<Hint>,
    flag: Arc<AtomicBool>,
) -> impl Fn(notify::Result<notify::Event>) + Send + 'static {
    move |res: notify::Result<notify::Event>| {
        let hints: Vec<Hint> = match res {
            Ok(ev) if ev.need_rescan() => vec![Hint::Rescan("event queue overflow".into())],
            Ok(ev) if is_own_read(&ev.kind) => Vec::new(),
            Ok(ev) => {
                ev.paths.iter().filter_map(|p| filter.candidate(p)).map(Hint::Candidate).collect()
            }
            Err(e) => vec![Hint::Rescan(format!("watch error: {e}"))],
        };
        for h in hints {
            if tx.try_send(h).is_err() {
                flag.store(true, Ordering::Relaxed); // dropped: the rescan is the backstop
            }
        }
    }
}

/// Opens and reads (ours included: stat walks, validation, tensor reads) change nothing; only a
/// close after writing says a writer finished. Without this, reading a candidate re-hints it.
fn is_own_read(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    matches!(kind, EventKind::Access(a) if *a != AccessKind::Close(AccessMode::Write))
}

fn watch_err(dir: &Path, e: notify::Error) -> Error {
    let hint = match &e.kind {
        notify::ErrorKind::MaxFilesWatch => {
            "; raise fs.inotify.max_user_watches (sysctl) or set [watch] poll_interval_ms"
        }
        notify::ErrorKind::PathNotFound => "; create it or fix [watch] dir",
        _ => "",
    };
    Error::config(dir, format!("cannot watch this directory: {e}{hint}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(out: &str) -> Filter {
        let text =
            format!("[watch]\ndir = \"/runs/x\"\npattern = \"*\"\n[publish]\nout = \"{out}\"\n");
        Filter::new(&Config::parse(&text, Path::new("t.toml")).unwrap())
    }

    #[test]
    fn events_map_to_top_level_candidates() {
        let f = filter("/runs/x/averaged/model.safetensors");
        let c = |p: &str| f.candidate(Path::new(p)).map(|p| p.display().to_string());
        assert_eq!(
            c("/runs/x/checkpoint-5/model.safetensors").as_deref(),
            Some("/runs/x/checkpoint-5")
        );
        assert_eq!(c("/runs/x/step_5.safetensors").as_deref(), Some("/runs/x/step_5.safetensors"));
        assert_eq!(c("/runs/x"), None, "the directory itself is not a candidate");
        assert_eq!(c("/elsewhere/a.pt"), None);
        assert_eq!(c("/runs/x/.tmpA1b2C3"), None, "temp names");
        assert_eq!(c("/runs/x/tmp-checkpoint-7/model.safetensors"), None);
        assert_eq!(c("/runs/x/.hidden"), None);
        assert_eq!(c("/runs/x/averaged/model.safetensors"), None, "sewa's own output dir");
    }

    #[test]
    fn own_output_file_and_manifest_are_ignored_but_siblings_are_not() {
        let f = filter("/runs/x/avg.safetensors");
        assert!(!f.accepts(Path::new("/runs/x/avg.safetensors")));
        assert!(!f.accepts(Path::new("/runs/x/avg.safetensors.manifest.json")));
        assert!(f.accepts(Path::new("/runs/x/step_1.safetensors")));
    }

    #[test]
    fn only_real_candidate_directories_get_a_watch_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("avg.safetensors");
        let text = format!("[watch]\ndir = {:?}\n[publish]\nout = {out:?}\n", dir.path());
        let filter = Filter::new(&Config::parse(&text, Path::new("t.toml")).unwrap());
        let (tx, _rx) = mpsc::channel(16);
        let mut w = start(filter, 0, tx).unwrap();
        let ckpt = dir.path().join("checkpoint-5");
        std::fs::create_dir(&ckpt).unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let link = dir.path().join("data");
        std::os::unix::fs::symlink(elsewhere.path(), &link).unwrap();
        let file = dir.path().join("step_1.safetensors");
        std::fs::write(&file, b"x").unwrap();
        for path in [&ckpt, &link, &file, &ckpt] {
            w.follow(path).unwrap();
        }
        assert_eq!(w.followed(), 1, "the directory, once; never through the symlink");
        std::fs::remove_dir(&ckpt).unwrap();
        w.follow(&ckpt).unwrap();
        assert_eq!(w.followed(), 0, "gone, so no watch");
        std::fs::create_dir(&ckpt).unwrap();
        w.follow(&ckpt).unwrap();
        w.prune(std::slice::from_ref(&ckpt));
        assert_eq!(w.followed(), 1, "still a candidate");
        w.prune(&[]);
        assert_eq!(w.followed(), 0, "no longer a candidate");
    }

    #[test]
    fn only_directories_and_checkpoint_files_are_candidates() {
        let dir = tempfile::tempdir().unwrap();
        let make = |name: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, b"x").unwrap();
            p
        };
        for name in ["events.out.tfevents.1.host", "train.log", "config.json"] {
            assert!(!looks_like_checkpoint(&make(name), name), "{name}");
        }
        for name in ["a.pt", "b.ckpt", "c.bin", "d.safetensors", "m.safetensors.index.json"] {
            assert!(looks_like_checkpoint(&make(name), name), "{name}");
        }
        let sub = dir.path().join("checkpoint-5");
        std::fs::create_dir(&sub).unwrap();
        assert!(looks_like_checkpoint(&sub, "checkpoint-5"));
        assert!(looks_like_checkpoint(&dir.path().join("gone"), "gone"), "deletions pass");
        let fifo = dir.path().join("step_000400.safetensors");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        assert!(!looks_like_checkpoint(&fifo, "step_000400.safetensors"), "a FIFO is no candidate");
    }
}
