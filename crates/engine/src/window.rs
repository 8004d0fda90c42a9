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
mod tests {
    use super::*;

    fn sig(n: u64) -> Identity {
        Identity { dev: 1, ino: n, size: n, mtime_ns: n as i128, members: 0 }
    }

    fn p(step: u64) -> PathBuf {
        PathBuf::from(format!("step_{step}.safetensors"))
    }

    /// Settle and load `step` successfully; returns the actions of the load.
    fn admit(w: &mut Window, step: u64, s: Identity) -> Vec<Action> {
        let a = w.handle(Event::Settled { path: p(step), sig: s, step: Some(step) });
        assert_eq!(a, vec![Action::Load { path: p(step), sig: s }]);
        w.handle(Event::Loaded(Member { path: p(step), sig: s, step, metric: None }))
    }

    fn steps(w: &Window) -> Vec<u64> {
        w.members().iter().map(|m| m.step).collect()
    }

    #[test]
    fn keeps_the_last_size_by_step_whatever_the_arrival_order() {
        let mut w = Window::new(3, 1);
        for step in [300, 100, 500, 200, 400] {
            admit(&mut w, step, sig(step));
        }
        assert_eq!(steps(&w), vec![300, 400, 500]);
        // Older than the full window: not even loaded.
        assert!(w.handle(Event::Settled { path: p(50), sig: sig(50), step: Some(50) }).is_empty());
    }

    #[test]
    fn eviction_and_reselect_every() {
        let mut w = Window::new(2, 2);
        assert_eq!(admit(&mut w, 1, sig(1)), vec![]);
        assert_eq!(admit(&mut w, 2, sig(2)), vec![Action::Reselect]);
        let a = admit(&mut w, 3, sig(3));
        assert_eq!(a, vec![Action::Evict { path: p(1) }]);
        let a = admit(&mut w, 4, sig(4));
        assert_eq!(a, vec![Action::Evict { path: p(2) }, Action::Reselect]);
    }

    #[test]
    fn rejected_is_not_retried_until_it_changes() {
        let mut w = Window::new(3, 1);
        w.handle(Event::Settled { path: p(1), sig: sig(1), step: Some(1) });
        let reason = "tensor w: NaN at element 3".to_string();
        let a = w.handle(Event::Rejected {
            path: p(1),
            sig: sig(1),
            reason: reason.clone(),
            incomplete: false,
            skipped: false,
        });
        assert_eq!(a, vec![Action::Quarantine { path: p(1), reason }]);
        assert!(w.handle(Event::Settled { path: p(1), sig: sig(1), step: Some(1) }).is_empty());
        let a = w.handle(Event::Settled { path: p(1), sig: sig(11), step: Some(1) });
        assert_eq!(a, vec![Action::Load { path: p(1), sig: sig(11) }]);
    }

    #[test]
    fn rotation_keeps_members_and_forgets_rejections() {
        let mut w = Window::new(3, 1);
        admit(&mut w, 1, sig(1));
        assert!(w.handle(Event::Gone { path: p(1) }).is_empty());
        assert_eq!(steps(&w), vec![1], "an open member survives deletion of its path");
    }

    #[test]
    fn a_released_member_leaves_and_asks_for_a_reselection_and_its_path_can_come_back() {
        let mut w = Window::new(3, 1);
        admit(&mut w, 1, sig(1));
        admit(&mut w, 2, sig(2));
        let a = w.handle(Event::Released { path: p(1) });
        assert_eq!(a, vec![Action::Evict { path: p(1) }, Action::Reselect]);
        assert_eq!(steps(&w), vec![2]);
        assert!(w.rejected().next().is_none(), "a release is not a quarantine");
        assert!(w.handle(Event::Released { path: p(1) }).is_empty(), "not a member any more");
        // A new file at that path is a new candidate.
        admit(&mut w, 1, sig(11));
        assert_eq!(steps(&w), vec![1, 2]);
    }

    #[test]
    fn rewritten_member_is_reloaded_and_invalidated_member_dropped() {
        let mut w = Window::new(3, 1);
        admit(&mut w, 1, sig(1));
        admit(&mut w, 2, sig(2));
        // Same path, new content: load the new version; the old one goes when it is loaded.
        let a = w.handle(Event::Settled { path: p(2), sig: sig(22), step: Some(2) });
        assert_eq!(a, vec![Action::Load { path: p(2), sig: sig(22) }]);
        let a = w.handle(Event::Loaded(Member { path: p(2), sig: sig(22), step: 2, metric: None }));
        assert_eq!(a[0], Action::Evict { path: p(2) });
        assert_eq!(w.members()[1].sig, sig(22));
        // In-place rewrite caught by still_valid(): dropped and quarantined at that signature.
        let a = w.handle(Event::Invalidated { path: p(1), reason: "rewritten".into() });
        assert!(a.contains(&Action::Evict { path: p(1) }) && a.contains(&Action::Reselect));
        assert_eq!(steps(&w), vec![2]);
        assert!(w.handle(Event::Settled { path: p(1), sig: sig(1), step: Some(1) }).is_empty());
    }

    /// Settle `path` (no step in its name) and load it, showing `step` from its metadata.
    fn admit_stepless(w: &mut Window, path: &str, s: Identity, step: u64) -> Vec<Action> {
        let path = PathBuf::from(path);
        let a = w.handle(Event::Settled { path: path.clone(), sig: s, step: None });
        assert_eq!(a, vec![Action::Load { path: path.clone(), sig: s }], "first settle loads");
        w.handle(Event::Loaded(Member { path, sig: s, step, metric: None }))
    }

    #[test]
    fn evicted_stepless_checkpoint_is_not_reloaded_by_rescans() {
        let mut w = Window::new(2, 1);
        admit(&mut w, 5, sig(5));
        admit(&mut w, 6, sig(6));
        // `model.safetensors` shows step 1 only once opened: loaded, then evicted at once.
        let a = admit_stepless(&mut w, "model.safetensors", sig(100), 1);
        assert_eq!(a, vec![Action::Evict { path: PathBuf::from("model.safetensors") }]);
        // Every rescan settles it again, unchanged: no second open, NaN scan and eviction.
        for _ in 0..3 {
            let again =
                Event::Settled { path: "model.safetensors".into(), sig: sig(100), step: None };
            assert_eq!(w.handle(again), vec![], "reloaded an evicted checkpoint");
        }
        // Changed on disk: it may hold a newer step now, so it is loaded again.
        let changed =
            Event::Settled { path: "model.safetensors".into(), sig: sig(101), step: None };
        assert_eq!(w.handle(changed).len(), 1);
    }

    #[test]
    fn evicted_checkpoint_refills_the_window_when_room_opens_and_is_forgotten_when_gone() {
        let mut w = Window::new(2, 1);
        admit_stepless(&mut w, "old.safetensors", sig(100), 1);
        admit(&mut w, 5, sig(5));
        admit(&mut w, 6, sig(6));
        assert_eq!(steps(&w), vec![5, 6]);
        let again = || Event::Settled { path: "old.safetensors".into(), sig: sig(100), step: None };
        assert_eq!(w.handle(again()), vec![]);
        // Step 6 turns out rewritten: the window has room, the evicted one may come back.
        w.handle(Event::Invalidated { path: p(6), reason: "rewritten".into() });
        let a = w.handle(again());
        assert_eq!(a, vec![Action::Load { path: "old.safetensors".into(), sig: sig(100) }]);
        // Deleted and recreated with the same signature: nothing is remembered about it.
        let mut w = Window::new(1, 1);
        admit(&mut w, 5, sig(5));
        admit_stepless(&mut w, "old.safetensors", sig(100), 1);
        w.handle(Event::Gone { path: "old.safetensors".into() });
        assert_eq!(w.handle(again()).len(), 1);
    }

    #[test]
    fn same_step_under_two_names_is_not_reloaded_forever() {
        let mut w = Window::new(1, 1);
        let named =
            |path: &str, s: u64| Event::Settled { path: path.into(), sig: sig(s), step: Some(5) };
        w.handle(named("b_step_5.safetensors", 1));
        let m = Member { path: "b_step_5.safetensors".into(), sig: sig(1), step: 5, metric: None };
        w.handle(Event::Loaded(m));
        // "a_step_5" sorts before "b_step_5": trim() would evict it, so it is not loaded.
        assert_eq!(w.handle(named("a_step_5.safetensors", 2)), vec![]);
    }

    #[test]
    fn stale_load_is_discarded() {
        let mut w = Window::new(3, 1);
        w.handle(Event::Settled { path: p(1), sig: sig(1), step: Some(1) });
        w.handle(Event::Settled { path: p(1), sig: sig(2), step: Some(1) });
        let a = w.handle(Event::Loaded(Member { path: p(1), sig: sig(1), step: 1, metric: None }));
        assert!(a.is_empty());
        assert!(w.members().is_empty());
    }

    fn load(w: &mut Window, name: &str, s: Identity, step: u64) -> Vec<Action> {
        let path = PathBuf::from(name);
        let a = w.handle(Event::Settled { path: path.clone(), sig: s, step: step_of(&path) });
        assert_eq!(a, vec![Action::Load { path: path.clone(), sig: s }]);
        w.handle(Event::Loaded(Member { path, sig: s, step, metric: None }))
    }

    fn names(w: &Window) -> Vec<String> {
        w.members().iter().map(|m| m.path.display().to_string()).collect()
    }

    /// `last.pt` holding `{"model": sd, "step": 2}` is the step-2 checkpoint again: averaging
    /// both would count step 2 twice, whichever of the two arrives first.
    #[test]
    fn an_alias_without_a_step_in_its_name_is_not_a_second_member() {
        let mut w = Window::new(4, 1);
        load(&mut w, "ckpt_1.pt", sig(1), 1);
        load(&mut w, "ckpt_2.pt", sig(2), 2);
        let a = load(&mut w, "last.pt", sig(20), 2);
        assert!(
            matches!(&a[..], [Action::Quarantine { reason, .. }] if reason.contains("ckpt_2.pt"))
        );
        let r = w.rejected().find(|r| r.path == Path::new("last.pt")).unwrap();
        assert!(r.skipped && !r.repeated);
        assert_eq!(names(&w), ["ckpt_1.pt", "ckpt_2.pt"]);
        // Rewritten for step 3 before ckpt_3.pt arrives: a member until its original comes.
        load(&mut w, "last.pt", sig(30), 3);
        assert_eq!(names(&w), ["ckpt_1.pt", "ckpt_2.pt", "last.pt"]);
        assert!(w.rejected().next().is_none(), "a successful load clears the rejection");
        let a = load(&mut w, "ckpt_3.pt", sig(3), 3);
        assert!(a.contains(&Action::Evict { path: PathBuf::from("last.pt") }), "{a:?}");
        assert_eq!(names(&w), ["ckpt_1.pt", "ckpt_2.pt", "ckpt_3.pt"]);
        assert!(w.rejected().any(|r| r.path == Path::new("last.pt") && r.skipped));
        // Unchanged, it is not loaded again.
        let settled = Event::Settled { path: "last.pt".into(), sig: sig(30), step: None };
        assert!(w.handle(settled).is_empty());
        // Two names with steps at one step are both kept (not aliases: e.g. model and EMA).
        load(&mut w, "ema_3.pt", sig(33), 3);
        assert_eq!(names(&w).len(), 4);
    }

    #[test]
    fn the_same_reason_after_a_rewrite_is_a_repeat() {
        let mut w = Window::new(3, 1);
        let reject = |w: &mut Window, n: u64, reason: &str| {
            let path = PathBuf::from("last.pt");
            w.handle(Event::Settled { path: path.clone(), sig: sig(n), step: None });
            let reason = reason.to_string();
            let (incomplete, skipped) = (false, false);
            w.handle(Event::Rejected { path, sig: sig(n), reason, incomplete, skipped });
            w.rejected().next().unwrap().repeated
        };
        assert!(!reject(&mut w, 1, "no step"));
        assert!(reject(&mut w, 2, "no step"), "rewritten in place, same problem");
        assert!(!reject(&mut w, 3, "NaN"));
        w.handle(Event::Gone { path: "last.pt".into() });
        assert!(!reject(&mut w, 4, "NaN"), "deleted and written again: news");
    }
    /// Settle `step` and report it as of another layout than the window's.
    fn mismatch(w: &mut Window, step: u64, layout: u64) -> Vec<Action> {
        let a = w.handle(Event::Settled { path: p(step), sig: sig(step), step: Some(step) });
        assert_eq!(a, vec![Action::Load { path: p(step), sig: sig(step) }]);
        let reason = format!("tensor w: shape [4] here but [8] in {}", p(1).display());
        w.handle(Event::Mismatched { path: p(step), sig: sig(step), layout, reason })
    }

    fn loads(a: &[Action]) -> Vec<PathBuf> {
        let paths = a.iter().filter_map(|a| match a {
            Action::Load { path, .. } => Some(path.clone()),
            _ => None,
        });
        paths.collect()
    }

    /// Issue 19 item 7: a stale file of another model present at start-up must not make the
    /// real run's checkpoints be quarantined forever.
    #[test]
    fn the_newest_consistent_checkpoints_win_over_a_stale_layout_reported_once() {
        let mut w = Window::new(4, 1);
        admit(&mut w, 1, sig(1)); // the stale file, alone at start-up
        let a = mismatch(&mut w, 10, 77);
        assert!(matches!(&a[..], [Action::Quarantine { path, .. }] if path == &p(10)), "{a:?}");
        let a = mismatch(&mut w, 20, 77);
        let relayouts: Vec<_> = a.iter().filter(|a| matches!(a, Action::Relayout { .. })).collect();
        assert_eq!(relayouts.len(), 1, "reported once: {a:?}");
        let Action::Relayout { by, against, superseded, reason } = relayouts[0] else {
            unreachable!()
        };
        assert_eq!((by, against), (&p(20), &p(1)), "names both files");
        assert_eq!(superseded, &[p(1)]);
        assert!(reason.contains("shape"));
        assert!(a.contains(&Action::Evict { path: p(1) }) && a.contains(&Action::Reselect));
        assert_eq!(loads(&a), [p(10), p(20)], "the new layout's checkpoints are loaded again");
        assert!(w.members().is_empty());
        for step in [10, 20] {
            let m = Member { path: p(step), sig: sig(step), step, metric: None };
            w.handle(Event::Loaded(m));
        }
        assert_eq!(steps(&w), [10, 20]);
        assert!(w.rejected().all(|r| r.path == p(1) && r.skipped), "only the stale one, skipped");
        // A rescan does not bring the stale file back while it is unchanged.
        assert!(w.handle(Event::Settled { path: p(1), sig: sig(1), step: Some(1) }).is_empty());
        admit(&mut w, 30, sig(30));
        assert_eq!(steps(&w), [10, 20, 30]);
    }

    #[test]
    fn a_stray_checkpoint_of_another_model_stays_quarantined() {
        let mut w = Window::new(4, 1);
        admit(&mut w, 1, sig(1));
        admit(&mut w, 2, sig(2));
        let a = mismatch(&mut w, 3, 77);
        assert!(matches!(&a[..], [Action::Quarantine { .. }]), "{a:?}");
        admit(&mut w, 4, sig(4)); // the run goes on in its own layout
        let a = mismatch(&mut w, 5, 77);
        assert!(matches!(&a[..], [Action::Quarantine { .. }]), "not in a row: {a:?}");
        // Two strays of different layouts are not a run either.
        let a = mismatch(&mut w, 6, 88);
        assert!(matches!(&a[..], [Action::Quarantine { .. }]), "{a:?}");
        assert_eq!(steps(&w), [1, 2, 4]);
    }

    #[test]
    fn superseded_checkpoints_evicted_earlier_are_not_loaded_back() {
        let mut w = Window::new(1, 1);
        admit(&mut w, 1, sig(1));
        admit(&mut w, 2, sig(2)); // step 1 evicted as too old
        mismatch(&mut w, 10, 77);
        let a = mismatch(&mut w, 20, 77);
        assert_eq!(loads(&a), [p(10), p(20)]);
        for step in [10, 20] {
            let m = Member { path: p(step), sig: sig(step), step, metric: None };
            w.handle(Event::Loaded(m));
        }
        assert_eq!(steps(&w), [20]);
        w.handle(Event::Invalidated { path: p(20), reason: "rewritten".into() });
        // Room in the window, but steps 1 and 2 have the old layout: not loaded again.
        for step in [1, 2] {
            let again = Event::Settled { path: p(step), sig: sig(step), step: Some(step) };
            assert!(w.handle(again).is_empty(), "step {step} came back");
        }
    }

    fn out_of_fds(w: &mut Window, step: u64, ours: bool) -> Vec<Action> {
        let a = w.handle(Event::Settled { path: p(step), sig: sig(step), step: Some(step) });
        assert_eq!(a, vec![Action::Load { path: p(step), sig: sig(step) }]);
        w.handle(Event::OutOfDescriptors { path: p(step), sig: sig(step), step: Some(step), ours })
    }

    /// Issue 19 item 6: running out of descriptors is no verdict on a file.
    #[test]
    fn out_of_descriptors_is_retried_never_quarantined_and_the_oldest_makes_room() {
        let mut w = Window::new(8, 1);
        for step in [1, 2, 3] {
            admit(&mut w, step, sig(step));
        }
        // The system's table is full: nothing to gain from evicting; retried at the next scan.
        assert!(out_of_fds(&mut w, 4, false).is_empty());
        assert!(w.rejected().next().is_none(), "never quarantined");
        // Our own limit: the oldest members make room for the newcomer and a member's worth
        // of descriptors to spare; the window keeps one fewer than it held from now on.
        let a = out_of_fds(&mut w, 4, true);
        assert_eq!(
            a,
            vec![
                Action::Shrunk { members: 2 },
                Action::Evict { path: p(1) },
                Action::Evict { path: p(2) },
                Action::Load { path: p(4), sig: sig(4) }
            ]
        );
        w.handle(Event::Loaded(Member { path: p(4), sig: sig(4), step: 4, metric: None }));
        assert_eq!(steps(&w), [3, 4]);
        admit(&mut w, 5, sig(5));
        assert_eq!(steps(&w), [4, 5], "held at what the limit allowed");
        // The evicted one is not reloaded by rescans while the capped window is full.
        assert!(w.handle(Event::Settled { path: p(1), sig: sig(1), step: Some(1) }).is_empty());
        // A reload lifts the cap.
        w.resize(8, 1);
        admit(&mut w, 6, sig(6));
        assert_eq!(steps(&w), [4, 5, 6]);
        assert!(w.rejected().next().is_none());
    }

    #[test]
    fn out_of_descriptors_for_an_older_or_stepless_file_keeps_the_newest_members() {
        let mut w = Window::new(8, 1);
        for step in [5, 6, 7] {
            admit(&mut w, step, sig(step));
        }
        // Older than every member: not loaded, and one member fewer to spare descriptors.
        let a = out_of_fds(&mut w, 4, true);
        assert_eq!(a, vec![Action::Shrunk { members: 2 }, Action::Evict { path: p(5) }]);
        assert_eq!(steps(&w), [6, 7]);
        // Older than the capped, full window: not even loaded again.
        assert!(w.handle(Event::Settled { path: p(4), sig: sig(4), step: Some(4) }).is_empty());
        let path = PathBuf::from("last.pt");
        w.handle(Event::Settled { path: path.clone(), sig: sig(9), step: None });
        let e = Event::OutOfDescriptors { path: path.clone(), sig: sig(9), step: None, ours: true };
        assert_eq!(w.handle(e), vec![Action::Shrunk { members: 1 }, Action::Evict { path: p(6) }]);
        assert_eq!(steps(&w), [7], "never below one member");
        assert!(w.rejected().next().is_none(), "never quarantined");
        // Retried when settled again (no rejection remembered).
        let again = Event::Settled { path, sig: sig(9), step: None };
        assert_eq!(w.handle(again).len(), 1);
    }
}
