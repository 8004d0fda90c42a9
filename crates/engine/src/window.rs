//! The rolling window, as pure decisions: events in (a candidate settled, a load succeeded or
//! failed, a member vanished or was rewritten), actions out (load, evict, quarantine,
//! reselect). It keeps the last `size` valid checkpoints by training step and remembers every
//! rejected candidate with its signature so it is never retried until it changes (and, once
//! it changes, whether it failed the same way again), and every member evicted as too old with
//! its signature and step, so a rescan does not load it again (a step-less name only shows its
//! step once loaded) while the window is full of newer ones. A file whose name has no step
//! holding a member's step (`last.pt`) is a copy of that member, not a second one.
//! Checkpoints of another layout than the window's are quarantined, unless they are the run
//! as it is now (`layout.rs`: then the window changes layout). A load that failed for lack of
//! file descriptors is no verdict on the file: it is retried, and when sewa's own limit is what
//! ran out, the oldest member makes room for a newer checkpoint (the window holds fewer).
//! This module opens no files and holds no tensors: the daemon carries out the actions.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::select::MemberSummary;
use sewa_checkpoint::text;
use sewa_checkpoint::{Identity, step_of};

mod layout;
pub use layout::SWITCH_AFTER;
use layout::{Challenger, Challengers};

/// One admitted checkpoint, as the window sees it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Member {
    pub path: PathBuf,
    pub sig: Identity,
    pub step: u64,
    pub metric: Option<f64>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The settler found `path` quiet; `step` is parsed from its name when it has one.
    Settled { path: PathBuf, sig: Identity, step: Option<u64> },
    /// The daemon opened and validated it.
    Loaded(Member),
    /// The daemon could not use it. `incomplete` means "not finished yet" (no marker, no zip
    /// end record): logged quietly, retried when it changes, like any rejection. `skipped`
    /// means it is not a checkpoint to average (optimizer state, ...): reported quietly too.
    Rejected { path: PathBuf, sig: Identity, reason: String, incomplete: bool, skipped: bool },
    /// The path no longer exists (rotation). Members stay: their open file pins the data.
    Gone { path: PathBuf },
    /// A member's bytes can no longer be trusted (rewritten in place since it was opened).
    Invalidated { path: PathBuf, reason: String },
    /// A member whose file was deleted is let go (to free its disk space): it leaves the
    /// window like an evicted one, and nothing is remembered against its path.
    Released { path: PathBuf },
    /// The daemon opened it, but its layout (tensor names, shapes, dtypes, adapter settings)
    /// differs from the window's. `layout` fingerprints its own layout; `reason` names the
    /// first difference and both files.
    Mismatched { path: PathBuf, sig: Identity, layout: u64, reason: String },
    /// Opening it ran out of file descriptors: sewa's own limit (`ours`, EMFILE) or the
    /// system's (ENFILE). Not a verdict on the file. `step` is parsed from its name.
    OutOfDescriptors { path: PathBuf, sig: Identity, step: Option<u64>, ours: bool },
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Open and validate this candidate, then report `Loaded` or `Rejected`.
    Load { path: PathBuf, sig: Identity },
    /// Drop this member (unmap it).
    Evict { path: PathBuf },
    /// Log one line naming the file and the reason; the window remembers it.
    Quarantine { path: PathBuf, reason: String },
    /// The membership changed enough: run the selector.
    Reselect,
    /// The run's layout changed (`by`, the newest of `SWITCH_AFTER` checkpoints that agree with
    /// each other, differs from `against`, the window's newest member, for `reason`): the
    /// `superseded` members (and those evicted earlier) are let go, remembered as skipped, and
    /// the new layout's checkpoints are loaded again (`Load` actions follow). Log it once, loudly.
    Relayout { by: PathBuf, against: PathBuf, reason: String, superseded: Vec<PathBuf> },
    /// For lack of file descriptors the window now holds at most `members` (fewer than its
    /// size); the oldest was evicted to make room for a newer checkpoint. Log it loudly.
    Shrunk { members: usize },
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Rejection {
    pub path: PathBuf,
    pub reason: String,
    pub incomplete: bool,
    /// Not a checkpoint to average: not model weights, or a copy of a member (`last.pt`).
    pub skipped: bool,
    /// The path was rejected for the same reason before it last changed (a file rewritten in
    /// place on every save, such as `last.pt`): worth no new warning.
    #[serde(skip)]
    pub repeated: bool,
    #[serde(skip)]
    sig: Identity,
}

#[derive(Debug)]
pub struct Window {
    size: usize,
    every: usize,
    /// Sorted by (step, path).
    members: Vec<Member>,
    loading: BTreeMap<PathBuf, Identity>,
    rejected: BTreeMap<PathBuf, Rejection>,
    /// Members trimmed as the oldest: the signature they had and the step they showed.
    evicted: BTreeMap<PathBuf, (Identity, u64)>,
    new_since_select: usize,
    /// Checkpoints refused for another layout since the last one that agreed.
    challengers: Challengers,
    /// How many members the file-descriptor limit lets the window hold, once it was reached
    /// (until the next resize: a config reload).
    cap: Option<usize>,
}

impl Window {
    pub fn new(size: usize, every: usize) -> Self {
        Window {
            size: size.max(1),
            every: every.max(1),
            members: Vec::new(),
            loading: BTreeMap::new(),
            rejected: BTreeMap::new(),
            evicted: BTreeMap::new(),
            new_since_select: 0,
            challengers: Challengers::default(),
            cap: None,
        }
    }

    /// How many members it keeps: its size, or fewer where file descriptors ran out.
    fn limit(&self) -> usize {
        self.cap.map_or(self.size, |cap| cap.min(self.size)).max(1)
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }

    pub fn rejected(&self) -> impl Iterator<Item = &Rejection> {
        self.rejected.values()
    }

    /// What selectors see.
    pub fn summaries(&self) -> Vec<MemberSummary> {
        let s = self.members.iter().map(|m| MemberSummary {
            path: m.path.clone(),
            step: Some(m.step),
            metric: m.metric,
        });
        s.collect()
    }

    /// New limits after a config reload; surplus oldest members are evicted.
    pub fn resize(&mut self, size: usize, every: usize) -> Vec<Action> {
        self.size = size.max(1);
        self.every = every.max(1);
        self.cap = None; // a reload may come with a raised limit: try the full size again
        let mut actions = self.trim();
        actions.push(Action::Reselect);
        actions
    }

    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        match event {
            Event::Settled { path, sig, step } => self.on_settled(path, sig, step),
            Event::Loaded(member) => self.on_loaded(member),
            Event::Rejected { path, sig, reason, incomplete, skipped } => {
                self.loading.remove(&path);
                self.challengers.forget(&path);
                let mut actions = self.remove_member(&path);
                actions.extend(self.reject(path, sig, reason, incomplete, skipped));
                actions
            }
            Event::Gone { path } => {
                self.challengers.forget(&path);
                self.rejected.remove(&path);
                self.evicted.remove(&path);
                self.loading.remove(&path);
                Vec::new()
            }
            Event::Released { path } => self.remove_member(&path),
            Event::Invalidated { path, reason } => {
                let sig = self.members.iter().find(|m| m.path == path).map(|m| m.sig);
                let mut actions = self.remove_member(&path);
                if let Some(sig) = sig {
                    actions.extend(self.reject(path, sig, reason, false, false));
                }
                actions
            }
            Event::Mismatched { path, sig, layout, reason } => {
                self.on_mismatched(Challenger { path, sig, layout, reason })
            }
            Event::OutOfDescriptors { path, sig, step, ours } => {
                self.on_out_of_descriptors(path, sig, step, ours)
            }
        }
    }

    fn on_settled(&mut self, path: PathBuf, sig: Identity, step: Option<u64>) -> Vec<Action> {
        if self.rejected.get(&path).is_some_and(|r| r.sig == sig)
            || self.members.iter().any(|m| m.path == path && m.sig == sig)
            || self.loading.get(&path) == Some(&sig)
        {
            return Vec::new(); // nothing new about it
        }
        // A rejection is kept while its path is retried, so that the same reason again is
        // known to be a repeat (see `reject`); a successful load removes it.
        // An unchanged evicted checkpoint is judged by the step it showed when loaded.
        let shown = self.evicted.get(&path).filter(|(was, _)| *was == sig).map(|(_, s)| *s);
        let step = step.or(shown);
        let full = self.members.len() >= self.limit();
        if let (Some(step), Some(oldest), true) = (step, self.members.first(), full) {
            // Members are ordered by (step, path): this is where trim() would evict it.
            let older = (step, &path) < (oldest.step, &oldest.path);
            let replaces_member = self.members.iter().any(|m| m.path == path);
            if older && !replaces_member {
                return Vec::new(); // older than the whole late window
            }
        }
        self.evicted.remove(&path);
        self.loading.insert(path.clone(), sig);
        vec![Action::Load { path, sig }]
    }

    fn on_loaded(&mut self, member: Member) -> Vec<Action> {
        if self.loading.get(&member.path) != Some(&member.sig) {
            // A newer version was settled meanwhile; its own load will report.
            return Vec::new();
        }
        self.loading.remove(&member.path);
        if let Some(original) = self.copy_of(&member) {
            let reason = copy_reason(&original, member.step);
            let mut actions = self.remove_member(&member.path);
            actions.extend(self.reject(member.path, member.sig, reason, false, true));
            return actions;
        }
        self.rejected.remove(&member.path);
        self.challengers.clear(); // it agrees with the window: the run has not moved on
        let mut actions = self.remove_member(&member.path);
        actions.extend(self.drop_copies_of(&member));
        let key = (member.step, member.path.clone());
        let at = self.members.partition_point(|m| (m.step, m.path.clone()) < key);
        let path = member.path.clone();
        self.members.insert(at, member);
        actions.extend(self.trim());
        if self.members.iter().any(|m| m.path == path) {
            self.new_since_select += 1;
            if self.new_since_select >= self.every {
                self.new_since_select = 0;
                actions.push(Action::Reselect);
            }
        }
        actions
    }

    /// A checkpoint of another layout: quarantined, unless it makes `SWITCH_AFTER` in a row of
    /// one layout, which is then the run as it is now (see `layout.rs`).
    fn on_mismatched(&mut self, c: Challenger) -> Vec<Action> {
        if self.loading.get(&c.path) != Some(&c.sig) {
            return Vec::new(); // a newer version was settled meanwhile; its own load reports
        }
        self.loading.remove(&c.path);
        let mut actions = self.remove_member(&c.path);
        actions.extend(self.reject(c.path.clone(), c.sig, c.reason.clone(), false, false));
        let against = self.members.last().map(|m| m.path.clone());
        if let (Some(group), Some(against)) = (self.challengers.note(c), against) {
            actions.extend(self.relayout(group, against));
        }
        actions
    }

    /// Let the window's layout go for `group`'s: every member, and every checkpoint evicted
    /// before as too old, is remembered as superseded (not loaded again unless it changes),
    /// and `group` is loaded again, now against an empty window.
    fn relayout(&mut self, group: Vec<Challenger>, against: PathBuf) -> Vec<Action> {
        let Some(newest) = group.last() else { return Vec::new() };
        let (by, reason) = (newest.path.clone(), newest.reason.clone());
        let superseded: Vec<Member> = self.members.drain(..).collect();
        let why = format!(
            "superseded: the run's checkpoints changed layout ({} and {} checkpoint(s) before it              agree with each other, not with this one)",
            text::path(by.file_name().map_or(&*by, Path::new)),
            group.len() - 1
        );
        let mut actions = vec![Action::Relayout {
            by,
            against,
            reason,
            superseded: superseded.iter().map(|m| m.path.clone()).collect(),
        }];
        actions.extend(superseded.iter().map(|m| Action::Evict { path: m.path.clone() }));
        let old = superseded.into_iter().map(|m| (m.path, m.sig));
        let old_evicted = std::mem::take(&mut self.evicted).into_iter().map(|(p, (s, _))| (p, s));
        for (path, sig) in old.chain(old_evicted) {
            let r = Rejection {
                path: path.clone(),
                reason: why.clone(),
                incomplete: false,
                skipped: true,
                repeated: false,
                sig,
            };
            self.rejected.insert(path, r);
        }
        actions.push(Action::Reselect);
        self.new_since_select = 0;
        for c in group {
            self.rejected.remove(&c.path);
            self.loading.insert(c.path.clone(), c.sig);
            actions.push(Action::Load { path: c.path, sig: c.sig });
        }
        actions
    }

    /// A load ran out of file descriptors. Nothing is remembered against the file: the next
    /// rescan loads it again. When sewa's own limit ran out, the window keeps one member fewer
    /// than it held from now on (the newest, the file among them when it is newer than the
    /// oldest member): room for it, and a member's worth of descriptors to spare for what else
    /// needs some (a publication, the next open). Older files are then not even loaded.
    fn on_out_of_descriptors(
        &mut self,
        path: PathBuf,
        sig: Identity,
        step: Option<u64>,
        ours: bool,
    ) -> Vec<Action> {
        if self.loading.get(&path) != Some(&sig) {
            return Vec::new();
        }
        self.loading.remove(&path);
        let Some(oldest) = self.members.first() else { return Vec::new() };
        if !ours {
            return Vec::new(); // the system's table: evicting our members would not help it
        }
        let newer = step.is_some_and(|s| (s, &path) > (oldest.step, &oldest.path));
        let held = self.members.len();
        let keep = held.saturating_sub(1).max(1);
        self.cap = Some(keep);
        let stay = if newer { keep - 1 } else { keep };
        let mut actions = vec![Action::Shrunk { members: keep }];
        for m in self.members.drain(..held - stay).collect::<Vec<_>>() {
            self.evicted.insert(m.path.clone(), (m.sig, m.step));
            actions.push(Action::Evict { path: m.path });
        }
        if newer {
            self.loading.insert(path.clone(), sig);
            actions.push(Action::Load { path, sig });
        }
        actions
    }

    /// Remember a rejection and ask for it to be reported.
    fn reject(
        &mut self,
        path: PathBuf,
        sig: Identity,
        reason: String,
        incomplete: bool,
        skipped: bool,
    ) -> Vec<Action> {
        let repeated = self.rejected.get(&path).is_some_and(|r| r.reason == reason);
        let r = Rejection {
            path: path.clone(),
            reason: reason.clone(),
            incomplete,
            skipped,
            repeated,
            sig,
        };
        self.rejected.insert(path.clone(), r);
        vec![Action::Quarantine { path, reason }]
    }

    /// The member `m` is a copy of, if it is one: `m`'s name has no step (`last.pt`,
    /// `last.ckpt`: aliases rewritten on every save, whose step comes from their contents)
    /// and another member is at the same step. Averaging both would count that step twice.
    fn copy_of(&self, m: &Member) -> Option<PathBuf> {
        if step_of(&m.path).is_some() {
            return None;
        }
        let same = self.members.iter().find(|o| o.step == m.step && o.path != m.path)?;
        Some(same.path.clone())
    }

    /// Members that are copies of `m` (aliases at `m`'s step, admitted before `m` arrived):
    /// dropped and remembered as skipped, so they are not loaded again until they change.
    fn drop_copies_of(&mut self, m: &Member) -> Vec<Action> {
        if step_of(&m.path).is_none() {
            return Vec::new();
        }
        let copies: Vec<Member> = self
            .members
            .iter()
            .filter(|o| o.step == m.step && o.path != m.path && step_of(&o.path).is_none())
            .cloned()
            .collect();
        let mut actions = Vec::new();
        for c in copies {
            actions.extend(self.remove_member(&c.path));
            actions.extend(self.reject(c.path, c.sig, copy_reason(&m.path, m.step), false, true));
        }
        actions
    }

    /// Evict the oldest members beyond `size`, remembering them.
    fn trim(&mut self) -> Vec<Action> {
        let extra = self.members.len().saturating_sub(self.limit());
        let gone: Vec<Member> = self.members.drain(..extra).collect();
        let mut actions = Vec::new();
        for m in gone {
            self.evicted.insert(m.path.clone(), (m.sig, m.step));
            actions.push(Action::Evict { path: m.path });
        }
        actions
    }

    /// Remove `path` if it is a member: evict it and reselect (the selection used it).
    fn remove_member(&mut self, path: &PathBuf) -> Vec<Action> {
        match self.members.iter().position(|m| &m.path == path) {
            Some(i) => {
                self.members.remove(i);
                vec![Action::Evict { path: path.clone() }, Action::Reselect]
            }
            None => Vec::new(),
        }
    }
}

fn copy_reason(original: &Path, step: u64) -> String {
    let name = original.file_name().map_or(original, Path::new);
    format!(
        "a copy of {} (both hold step {step}; a name without a step is an alias)",
        text::path(name)
    )
}

#[cfg(test)]
mod tests;
