//! The rolling window, as pure decisions: events in (a candidate settled, a load succeeded or
//! failed, a member vanished or was rewritten), actions out (load, evict, quarantine,
//! reselect). It keeps the last `size` valid checkpoints by training step and remembers every
//! rejected candidate with its signature so it is never retried until it changes.
//! This module opens no files and holds no tensors: the daemon carries out the actions.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::select::MemberSummary;
use crate::watch::Sig;

/// One admitted checkpoint, as the window sees it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Member {
    pub path: PathBuf,
    pub sig: Sig,
    pub step: u64,
    pub metric: Option<f64>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The settler found `path` quiet; `step` is parsed from its name when it has one.
    Settled { path: PathBuf, sig: Sig, step: Option<u64> },
    /// The daemon opened and validated it.
    Loaded(Member),
    /// The daemon could not use it. `incomplete` means "not finished yet" (no marker, no zip
    /// end record): logged quietly, retried when it changes, like any rejection.
    Rejected { path: PathBuf, sig: Sig, reason: String, incomplete: bool },
    /// The path no longer exists (rotation). Members stay: their open file pins the data.
    Gone { path: PathBuf },
    /// A member's bytes can no longer be trusted (rewritten in place since it was opened).
    Invalidated { path: PathBuf, reason: String },
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Open and validate this candidate, then report `Loaded` or `Rejected`.
    Load { path: PathBuf, sig: Sig },
    /// Drop this member (unmap it).
    Evict { path: PathBuf },
    /// Log one line naming the file and the reason; the window remembers it.
    Quarantine { path: PathBuf, reason: String },
    /// The membership changed enough: run the selector.
    Reselect,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Rejection {
    pub path: PathBuf,
    pub reason: String,
    pub incomplete: bool,
    #[serde(skip)]
    sig: Sig,
}

#[derive(Debug)]
pub struct Window {
    size: usize,
    every: usize,
    /// Sorted by (step, path).
    members: Vec<Member>,
    loading: BTreeMap<PathBuf, Sig>,
    rejected: BTreeMap<PathBuf, Rejection>,
    new_since_select: usize,
}

impl Window {
    pub fn new(size: usize, every: usize) -> Self {
        Window {
            size: size.max(1),
            every: every.max(1),
            members: Vec::new(),
            loading: BTreeMap::new(),
            rejected: BTreeMap::new(),
            new_since_select: 0,
        }
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
        let mut actions = self.trim();
        actions.push(Action::Reselect);
        actions
    }

    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        match event {
            Event::Settled { path, sig, step } => self.on_settled(path, sig, step),
            Event::Loaded(member) => self.on_loaded(member),
            Event::Rejected { path, sig, reason, incomplete } => {
                self.loading.remove(&path);
                let mut actions = self.remove_member(&path);
                let r = Rejection { path: path.clone(), reason: reason.clone(), incomplete, sig };
                self.rejected.insert(path.clone(), r);
                actions.push(Action::Quarantine { path, reason });
                actions
            }
            Event::Gone { path } => {
                self.rejected.remove(&path);
                self.loading.remove(&path);
                Vec::new()
            }
            Event::Invalidated { path, reason } => {
                let sig = self.members.iter().find(|m| m.path == path).map(|m| m.sig);
                let mut actions = self.remove_member(&path);
                if let Some(sig) = sig {
                    let r = Rejection {
                        path: path.clone(),
                        reason: reason.clone(),
                        incomplete: false,
                        sig,
                    };
                    self.rejected.insert(path.clone(), r);
                    actions.push(Action::Quarantine { path, reason });
                }
                actions
            }
        }
    }

    fn on_settled(&mut self, path: PathBuf, sig: Sig, step: Option<u64>) -> Vec<Action> {
        if self.rejected.get(&path).is_some_and(|r| r.sig == sig)
            || self.members.iter().any(|m| m.path == path && m.sig == sig)
            || self.loading.get(&path) == Some(&sig)
        {
            return Vec::new(); // nothing new about it
        }
        self.rejected.remove(&path);
        if let (Some(step), true) = (step, self.members.len() >= self.size) {
            let oldest = self.members.first().map(|m| m.step).unwrap_or(0);
            let replaces_member = self.members.iter().any(|m| m.path == path);
            if step < oldest && !replaces_member {
                return Vec::new(); // older than the whole late window
            }
        }
        self.loading.insert(path.clone(), sig);
        vec![Action::Load { path, sig }]
    }

    fn on_loaded(&mut self, member: Member) -> Vec<Action> {
        if self.loading.get(&member.path) != Some(&member.sig) {
            // A newer version was settled meanwhile; its own load will report.
            return Vec::new();
        }
        self.loading.remove(&member.path);
        let mut actions = self.remove_member(&member.path);
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

    /// Evict the oldest members beyond `size`.
    fn trim(&mut self) -> Vec<Action> {
        let extra = self.members.len().saturating_sub(self.size);
        let gone = self.members.drain(..extra);
        gone.map(|m| Action::Evict { path: m.path }).collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sig(n: u64) -> Sig {
        Sig { dev: 1, ino: n, size: n, mtime_ns: n as i128, files: 0 }
    }

    fn p(step: u64) -> PathBuf {
        PathBuf::from(format!("step_{step}.safetensors"))
    }

    /// Settle and load `step` successfully; returns the actions of the load.
    fn admit(w: &mut Window, step: u64, s: Sig) -> Vec<Action> {
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

    #[test]
    fn stale_load_is_discarded() {
        let mut w = Window::new(3, 1);
        w.handle(Event::Settled { path: p(1), sig: sig(1), step: Some(1) });
        w.handle(Event::Settled { path: p(1), sig: sig(2), step: Some(1) });
        let a = w.handle(Event::Loaded(Member { path: p(1), sig: sig(1), step: 1, metric: None }));
        assert!(a.is_empty());
        assert!(w.members().is_empty());
    }
}
