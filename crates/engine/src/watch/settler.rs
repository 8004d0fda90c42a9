//! Quiet-period debouncing, as a plain struct with the clock passed in. A candidate settles once
//! it has had no hint for `quiet` AND its stat signature did not change across that period; a
//! candidate that disappears is reported gone. This module does no I/O: the caller passes the
//! signatures (see `Identity::stat`), so tests step a fake clock through every trainer's write style.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sewa_checkpoint::Identity;

/// What the settler concluded about one candidate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settled {
    /// Quiet and unchanged for the whole period: worth validating.
    Ready(PathBuf, Identity),
    /// It no longer exists (rotation, or a temp name renamed away).
    Gone(PathBuf),
}

#[derive(Debug)]
struct Pending {
    deadline: Instant,
    sig: Option<Identity>,
}

/// Per-candidate quiet timers.
#[derive(Debug)]
pub struct Settler {
    quiet: Duration,
    pending: BTreeMap<PathBuf, Pending>,
}

impl Settler {
    pub fn new(quiet: Duration) -> Self {
        Settler { quiet, pending: BTreeMap::new() }
    }

    /// Something happened to `path` at `now`; `sig` is its signature right now (None: missing).
    pub fn hint(&mut self, path: PathBuf, sig: Option<Identity>, now: Instant) {
        let deadline = now + self.quiet;
        self.pending.insert(path, Pending { deadline, sig });
    }

    /// The next time `poll` may have something to report.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.deadline).min()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Candidates whose quiet period is over. `stat` is asked only for those; a signature that
    /// moved since the hint re-arms the timer (a writer that makes no events, e.g. over NFS).
    pub fn poll(&mut self, now: Instant, stat: impl Fn(&Path) -> Option<Identity>) -> Vec<Settled> {
        let due: Vec<PathBuf> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = Vec::new();
        for path in due {
            let current = stat(&path);
            let pending = self.pending.get_mut(&path).expect("due key present");
            match current {
                None => {
                    self.pending.remove(&path);
                    out.push(Settled::Gone(path));
                }
                Some(s) if pending.sig == Some(s) => {
                    self.pending.remove(&path);
                    out.push(Settled::Ready(path, s));
                }
                Some(s) => {
                    pending.sig = Some(s);
                    pending.deadline = now + self.quiet;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    //! A fake file system (path → signature) and a stepped clock run every writer style.
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashMap;

    struct World {
        t0: Instant,
        now: Duration,
        files: RefCell<HashMap<PathBuf, Identity>>,
        settler: Settler,
        seen: Vec<Settled>,
    }

    fn sig(ino: u64, size: u64, mtime: i128, files: u64) -> Identity {
        Identity { dev: 1, ino, size, mtime_ns: mtime, members: files }
    }

    impl World {
        fn new() -> Self {
            World {
                t0: Instant::now(),
                now: Duration::ZERO,
                files: RefCell::new(HashMap::new()),
                settler: Settler::new(Duration::from_millis(200)),
                seen: Vec::new(),
            }
        }
        fn at(&self) -> Instant {
            self.t0 + self.now
        }
        /// The file system changes `path` and notify reports it (when `event`).
        fn write(&mut self, path: &str, s: Option<Identity>, event: bool) {
            let p = PathBuf::from(path);
            match s {
                Some(s) => self.files.borrow_mut().insert(p.clone(), s),
                None => self.files.borrow_mut().remove(&p),
            };
            if event {
                let cur = self.files.borrow().get(&p).copied();
                self.settler.hint(p, cur, self.at());
            }
        }
        /// Advance the clock in 10 ms ticks, polling like the daemon does.
        fn run(&mut self, ms: u64) {
            for _ in 0..ms / 10 {
                self.now += Duration::from_millis(10);
                let files = self.files.borrow().clone();
                let got = self.settler.poll(self.at(), |p| files.get(p).copied());
                self.seen.extend(got);
            }
        }
        fn ready(&self) -> Vec<String> {
            let names = self.seen.iter().filter_map(|s| match s {
                Settled::Ready(p, _) => Some(p.display().to_string()),
                Settled::Gone(_) => None,
            });
            names.collect()
        }
    }

    #[test]
    fn slow_in_place_write_settles_only_after_the_last_chunk() {
        let mut w = World::new();
        for chunk in 1..=10u64 {
            // torch.save in place: a chunk every 150 ms (< quiet), each with an event.
            w.write("ckpt_step_100.pt", Some(sig(7, chunk * 1000, chunk as i128, 0)), true);
            w.run(150);
            assert!(w.ready().is_empty(), "settled mid-write at chunk {chunk}");
        }
        w.run(300);
        assert_eq!(w.ready(), vec!["ckpt_step_100.pt"]);
    }

    #[test]
    fn writes_without_events_rearm_the_timer() {
        let mut w = World::new();
        w.write("a.pt", Some(sig(7, 10, 1, 0)), true);
        w.run(150);
        w.write("a.pt", Some(sig(7, 20, 2, 0)), false); // e.g. NFS: no event for this chunk
        w.run(100);
        assert!(w.ready().is_empty(), "a changed signature must re-arm");
        w.run(200);
        assert_eq!(w.ready(), vec!["a.pt"]);
    }

    #[test]
    fn temp_then_rename_settles_the_final_name_and_reports_the_temp_gone() {
        let mut w = World::new();
        // safetensors >= 0.8: sparse temp of full size, filled, renamed. The watcher drops temp
        // names before the settler, but a hint for one that is gone must come back as Gone.
        w.write(".tmpAbC", Some(sig(9, 4096, 1, 0)), true);
        w.run(50);
        w.write(".tmpAbC", None, true);
        w.write("model-300.safetensors", Some(sig(9, 4096, 1, 0)), true);
        w.run(250);
        assert_eq!(w.ready(), vec!["model-300.safetensors"]);
        assert!(w.seen.contains(&Settled::Gone(PathBuf::from(".tmpAbC"))));
    }

    #[test]
    fn rename_in_from_another_dir_is_a_single_event() {
        let mut w = World::new();
        // Lightning: only a moved-to event; the file is complete at once.
        w.write("epoch=0-step=50.ckpt", Some(sig(3, 999, 5, 0)), true);
        w.run(190);
        assert!(w.ready().is_empty());
        w.run(20);
        assert_eq!(w.ready(), vec!["epoch=0-step=50.ckpt"]);
    }

    #[test]
    fn hf_dir_written_file_by_file_settles_after_the_marker() {
        let mut w = World::new();
        let d = "checkpoint-500";
        let files = ["model.safetensors", "config.json", "optimizer.pt", "trainer_state.json"];
        for (i, _) in files.iter().enumerate() {
            // Each file maps to the top-level dir; its signature folds the files so far.
            w.write(d, Some(sig(4, 100 * (i as u64 + 1), i as i128, i as u64 + 1)), true);
            w.run(120);
        }
        assert!(w.ready().is_empty());
        w.run(200);
        assert_eq!(w.ready(), vec![d]);
        let Settled::Ready(_, s) = &w.seen[0] else { panic!() };
        assert_eq!(s.members, 4);
    }

    #[test]
    fn rotation_delete_reports_gone() {
        let mut w = World::new();
        w.write("checkpoint-100", Some(sig(4, 1, 1, 3)), true);
        w.run(300);
        w.write("checkpoint-100", None, true);
        w.run(300);
        assert_eq!(w.seen.last(), Some(&Settled::Gone(PathBuf::from("checkpoint-100"))));
        assert!(w.settler.is_empty());
    }
}
