//! A batch's intake: settled candidates → loads (guarded against panics) → window actions
//! (members admitted, evicted, quarantined; a change of the run's layout; a window shrunk for
//! lack of file descriptors), and how loudly each rejection is logged.

use std::panic::UnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{debug, info, info_span, warn};

use super::super::descriptors;
use super::super::load::{self, Refusal, Shortage};
use super::super::loudness::Level;
use super::super::progress::disk_bytes;
use super::super::{disk, panics};
use super::{Pipeline, trusted};
use crate::window::{Action, Event, Member};
use sewa_checkpoint::text;
use sewa_checkpoint::{Checkpoint, Identity};

impl Pipeline {
    /// Let go of checkpoints deleted from disk when `disk` says so (`[window] keep_deleted`,
    /// `min_free_bytes`): before anything else, so the trainer's next save finds the room.
    pub(super) fn guard_disk(&mut self) {
        let held = disk::holdings(self.window.members(), &self.open, &self.running.held());
        let release = disk::release(&self.cfg.window, &self.cfg.watch.dir, &held);
        if release.average {
            self.running.reset(); // it holds its inputs open; the next publish recomputes
        }
        for path in release.members {
            self.status.counters.released += 1;
            let actions = self.window.handle(Event::Released { path });
            self.apply(actions);
        }
    }

    /// Drop members whose file was rewritten in place (before reading them again).
    pub(super) fn check_members(&mut self) {
        let stale: Vec<PathBuf> =
            self.open.iter().filter(|(_, c)| !trusted(c)).map(|(p, _)| p.clone()).collect();
        for path in stale {
            let reason = "rewritten in place while in the window (dropped before reading)".into();
            let actions = self.window.handle(Event::Invalidated { path, reason });
            self.apply(actions);
        }
    }

    pub(super) fn apply(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Load { path, sig } => self.load(path, sig),
                Action::Evict { path } => {
                    debug!(path = %text::path(&path), "evicted from the window");
                    self.open.remove(&path);
                    self.sides.evict(&path);
                }
                Action::Quarantine { path, reason } => self.report_rejection(&path, &reason),
                Action::Reselect => self.reselect = true,
                Action::Relayout { by, against, reason, superseded } => {
                    let superseded: Vec<String> =
                        superseded.iter().map(|p| text::path(p).to_string()).collect();
                    warn!(
                        new = %text::path(&by), old = %text::path(&against), %reason,
                        superseded = %superseded.join(", "),
                        "the run's checkpoints changed layout: the newest consistent checkpoints \
                         win; members of the old layout leave the window"
                    );
                    self.status.counters.relayouts += 1;
                    self.running.reset(); // its inputs have the old layout
                }
                Action::Shrunk { members } => {
                    let limit = descriptors::current();
                    warn!(
                        members,
                        soft = limit.soft,
                        hard = limit.hard,
                        "out of file descriptors: the window keeps at most {members} members \
                         until a reload; raise the limit (systemd LimitNOFILE=, ulimit -n)"
                    );
                    // The running average holds its inputs open: let the evicted one close.
                    self.running.reset();
                }
            }
        }
    }

    /// Log a rejection as loudly as `Loudness` decides; only warnings count as quarantined.
    fn report_rejection(&mut self, path: &Path, reason: &str) {
        let Some(r) = self.window.rejected().find(|r| r.path == path) else { return };
        let (incomplete, skipped) = (r.incomplete, r.skipped);
        let report = self.loudness.judge(r);
        let hint = report.hint.unwrap_or_default();
        let path = text::path(path);
        match report.level {
            Level::Warn => {
                warn!(%path, %reason, %hint, "quarantined");
                self.status.counters.quarantined += 1;
            }
            Level::Info if incomplete => {
                info!(%path, %reason, "not complete yet; waiting for it to change")
            }
            Level::Info => info!(
                files = %text::escape(&report.files), %reason, %hint,
                "skipping files like this, which are not checkpoints to average; more are logged at debug level"
            ),
            Level::Debug if skipped => debug!(%path, %reason, "skipped"),
            Level::Debug => debug!(%path, %reason, "rejected again for the same reason"),
        }
    }

    fn load(&mut self, path: PathBuf, sig: Identity) {
        let span =
            info_span!("checkpoint", step = tracing::field::Empty, path = %text::path(&path));
        let _enter = span.enter();
        self.beat(disk_bytes(&path));
        let reference = self.open.values().next().map(|c| c.tensors().to_vec());
        let peer = self.open.values().next().cloned();
        let (watch, metric) = (&self.cfg.watch, &self.cfg.select.metric);
        // Unwind-safe: the loader keeps no state and only reads its arguments (a path, the
        // watch config, a copy of the window's schema); what it opens lives in its own frames and
        // is dropped while unwinding. The window and `self` change only after it returns.
        let loaded =
            guarded(|| load::load(&path, watch, metric, reference.as_deref(), peer.as_deref()));
        self.admit(path, sig, &span, loaded);
    }

    /// Carry out a load's outcome: a member (if the window keeps it) or a quarantine.
    fn admit(&mut self, path: PathBuf, sig: Identity, span: &tracing::Span, loaded: Loaded) {
        match loaded {
            Ok((ckpt, step, metric)) => {
                span.record("step", step);
                let member = Member { path: path.clone(), sig, step, metric };
                let actions = self.window.handle(Event::Loaded(member));
                self.apply(actions);
                // Not admitted: older than the window, or a copy of a member (reported above).
                if self.window.members().iter().any(|m| m.path == path && m.sig == sig) {
                    info!(tensors = ckpt.tensors().len(), bytes = ckpt.total_bytes(), "loaded");
                    self.status.counters.loaded += 1;
                    self.loudness.loaded(&path);
                    if !crate::publish::is_file_output(&self.cfg.publish.out) {
                        self.sides.admit(&path, &ckpt);
                    }
                    self.open.insert(path, Arc::new(ckpt));
                }
            }
            Err(refusal) => {
                let event = self.refused(path, sig, refusal);
                let actions = self.window.handle(event);
                self.apply(actions);
            }
        }
    }
}

impl Pipeline {
    /// The window's event for a refused load: another layout and running out of file
    /// descriptors are no verdict on the file (the window decides what they mean).
    fn refused(&mut self, path: PathBuf, sig: Identity, refusal: Refusal) -> Event {
        if let Some(shortage) = refusal.descriptors {
            let limit = descriptors::current();
            warn!(
                path = %text::path(&path), reason = %refusal.reason,
                soft = limit.soft, hard = limit.hard,
                "out of file descriptors: not quarantined, loaded again at the next rescan"
            );
            self.status.counters.deferred += 1;
            let step = sewa_checkpoint::step_of(&path);
            return Event::OutOfDescriptors {
                path,
                sig,
                step,
                ours: shortage == Shortage::Process,
            };
        }
        let reason = refusal.reason;
        if let Some(layout) = refusal.layout {
            return Event::Mismatched { path, sig, layout, reason };
        }
        let (incomplete, skipped) = (refusal.incomplete, refusal.not_weights);
        Event::Rejected { path, sig, reason, incomplete, skipped }
    }
}

type Loaded = std::result::Result<(Checkpoint, u64, Option<f64>), Refusal>;

/// Run one checkpoint's load; a panic in it (a bug in sewa or a library) becomes that
/// checkpoint's refusal, so the daemon quarantines it and carries on instead of dying on it
/// at every restart.
fn guarded(load: impl FnOnce() -> Loaded + UnwindSafe) -> Loaded {
    panics::catch(load).unwrap_or_else(|msg| {
        Err(Refusal::new(
            format!("sewa panicked reading it (a bug in sewa, please report it): {msg}"),
            false,
            false,
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn pipeline(dir: &Path) -> Pipeline {
        let text = format!(
            "[watch]\ndir = {:?}\n[publish]\nout = {:?}\n",
            dir.join("runs"),
            dir.join("out.safetensors")
        );
        Pipeline::new(Config::parse(&text, &dir.join("sewa.toml")).unwrap())
    }

    #[test]
    fn a_panic_while_loading_quarantines_that_checkpoint_with_the_message() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = pipeline(dir.path());
        let path = dir.path().join("runs/modèle_é.safetensors");
        let sig = Identity { dev: 1, ino: 2, size: 3, mtime_ns: 4, members: 0 };
        let loaded = guarded(|| -> Loaded { panic!("byte index 13 is not a char boundary") });
        p.admit(path.clone(), sig, &tracing::Span::none(), loaded);
        let q: Vec<_> = p.window.rejected().collect();
        assert_eq!(q.len(), 1);
        assert_eq!(q[0].path, path);
        assert!(q[0].reason.contains("panicked") && q[0].reason.contains("char boundary"));
        assert!(!q[0].incomplete, "a panic is not 'still being written'");
        assert_eq!(p.status.counters.quarantined, 1);
        assert!(p.window.members().is_empty());
    }
}
