//! Which layout (tensor names, shapes, dtypes; a LoRA adapter's settings) the window holds
//! when checkpoints disagree, as a pure record of the disagreeing ones. The first checkpoint
//! admitted sets the layout, but must not fix it forever: a stale file of another model left in
//! the directory at start-up would otherwise make every checkpoint of the real run be
//! quarantined. The rule: checkpoints that disagree with the window but agree with each other,
//! `SWITCH_AFTER` of them in a row (no checkpoint agreeing with the window admitted between
//! them), are the run as it is now; their layout wins. A single stray file of another model
//! stays quarantined. The window (`super`) carries out the switch; this module only counts.

use std::path::PathBuf;

use sewa_checkpoint::Identity;

/// How many checkpoints of one other layout in a row make the window change layout.
pub const SWITCH_AFTER: usize = 2;

/// A checkpoint refused because its layout differs from the window's.
#[derive(Clone, Debug, PartialEq)]
pub struct Challenger {
    pub path: PathBuf,
    pub sig: Identity,
    /// A fingerprint of its layout: equal for checkpoints that could be averaged together.
    pub layout: u64,
    /// Why it was refused (the first difference, naming both files).
    pub reason: String,
}

/// The disagreeing checkpoints seen since the last one that agreed with the window.
#[derive(Debug, Default)]
pub struct Challengers {
    seen: Vec<Challenger>,
}

impl Challengers {
    /// A checkpoint agreeing with the window was admitted: the disagreeing ones before it were
    /// strays, not the run moving on (they stay quarantined).
    pub fn clear(&mut self) {
        self.seen.clear();
    }

    /// `path` is gone or changed: it no longer counts.
    pub fn forget(&mut self, path: &PathBuf) {
        self.seen.retain(|c| &c.path != path);
    }

    /// Record `c`. Returns the group whose layout now wins (`c` last), when `c` makes
    /// `SWITCH_AFTER` of its layout in a row; the record then starts afresh.
    pub fn note(&mut self, c: Challenger) -> Option<Vec<Challenger>> {
        self.forget(&c.path);
        let layout = c.layout;
        self.seen.push(c);
        if self.seen.iter().filter(|o| o.layout == layout).count() < SWITCH_AFTER {
            return None;
        }
        let group = std::mem::take(&mut self.seen).into_iter().filter(|o| o.layout == layout);
        Some(group.collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, layout: u64) -> Challenger {
        let sig = Identity { dev: 1, ino: layout, size: 1, mtime_ns: 1, members: 0 };
        Challenger { path: name.into(), sig, layout, reason: String::new() }
    }

    fn names(g: &[Challenger]) -> Vec<&str> {
        g.iter().map(|c| c.path.to_str().unwrap()).collect()
    }

    #[test]
    fn two_of_one_layout_in_a_row_win_and_a_stray_does_not() {
        let mut cs = Challengers::default();
        assert_eq!(cs.note(c("a", 7)), None);
        assert_eq!(cs.note(c("x", 9)), None, "another layout is not a second vote");
        let won = cs.note(c("b", 7)).expect("two of layout 7");
        assert_eq!(names(&won), ["a", "b"]);
        assert_eq!(cs.note(c("x2", 9)), None, "the record started afresh");
    }

    #[test]
    fn an_agreeing_checkpoint_between_them_breaks_the_row_and_a_file_counts_once() {
        let mut cs = Challengers::default();
        cs.note(c("a", 7));
        cs.clear();
        assert_eq!(cs.note(c("b", 7)), None);
        assert_eq!(cs.note(c("b", 7)), None, "the same file again is not a second checkpoint");
        cs.forget(&PathBuf::from("b"));
        assert_eq!(cs.note(c("d", 7)), None);
    }
}
