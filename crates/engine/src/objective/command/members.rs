//! Protocol 2's view of the window from sewa's side: which members the running evaluator holds
//! (by the identity of their files, so a path rewritten in place is a new member) and under
//! which ids, and what to add and remove to match the members a selection asks about. Pure
//! decisions; the caller sends the `members` message and writes staging copies.

use std::path::PathBuf;

use sewa_checkpoint::{Checkpoint, Identity};

/// A member as the evaluator knows it: the path and the identity of its files when added.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberKey {
    pub path: PathBuf,
    pub identity: Identity,
}

impl MemberKey {
    pub fn of(c: &Checkpoint) -> MemberKey {
        MemberKey { path: c.path().to_path_buf(), identity: *c.identity() }
    }
}

/// The members one evaluator process holds, in the order they were added.
#[derive(Default)]
pub struct Held {
    members: Vec<(MemberKey, String)>,
}

/// What to change so the evaluator holds exactly the wanted members.
#[derive(Debug, PartialEq, Eq)]
pub struct Change {
    /// Indices into the wanted members that the evaluator does not hold yet.
    pub add: Vec<usize>,
    /// Ids it holds that are not wanted.
    pub remove: Vec<String>,
}

impl Held {
    pub fn id_of(&self, key: &MemberKey) -> Option<&str> {
        self.members.iter().find(|(k, _)| k == key).map(|(_, id)| id.as_str())
    }

    pub fn change(&self, wanted: &[MemberKey]) -> Change {
        let add = (0..wanted.len()).filter(|&i| self.id_of(&wanted[i]).is_none()).collect();
        let remove = self
            .members
            .iter()
            .filter(|(k, _)| !wanted.contains(k))
            .map(|(_, id)| id.clone())
            .collect();
        Change { add, remove }
    }

    /// Record a change the evaluator acknowledged; `added` pairs keys with their new ids.
    pub fn apply(&mut self, added: Vec<(MemberKey, String)>, removed: &[String]) {
        self.members.retain(|(_, id)| !removed.contains(id));
        self.members.extend(added);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(p: &str) -> MemberKey {
        MemberKey { path: p.into(), identity: Identity::none() }
    }

    #[test]
    fn a_sliding_window_adds_the_new_member_and_removes_the_old() {
        let mut held = Held::default();
        let first = [key("a"), key("b")];
        let c = held.change(&first);
        assert_eq!(c, Change { add: vec![0, 1], remove: vec![] });
        held.apply(vec![(key("a"), "1".into()), (key("b"), "2".into())], &[]);
        assert_eq!(held.change(&first), Change { add: vec![], remove: vec![] });
        let slid = [key("b"), key("c")];
        let c = held.change(&slid);
        assert_eq!(c, Change { add: vec![1], remove: vec!["1".into()] });
        held.apply(vec![(key("c"), "3".into())], &c.remove);
        assert_eq!(held.id_of(&key("b")), Some("2"));
        assert_eq!(held.id_of(&key("c")), Some("3"));
        assert_eq!(held.id_of(&key("a")), None);
    }
}
