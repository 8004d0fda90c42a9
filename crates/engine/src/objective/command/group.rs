//! Stopping an evaluator and everything it started. Each evaluator is started as the leader of
//! its own process group, which its children join unless they leave it on purpose (torchrun's
//! workers, a shell's commands, forked helpers), so sewa stops the group, not one pid: SIGTERM
//! to all of it, a bounded grace for it to leave, then SIGKILL.
//!
//! Also the process-wide register of what sewa must not leave behind — running groups and
//! staging directories — which `stop_all` ends when sewa exits while the objective that owns
//! them is still on an abandoned thread (a daemon stopping mid-selection), where no destructor
//! runs. After `stop_all` nothing new may start: a late spawn or staging directory is refused.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process_group, test_kill_process_group};

/// How long a group gets between SIGTERM and SIGKILL (torchrun forwards SIGTERM to its workers
/// and waits for them; a CUDA context takes a moment to tear down).
pub const GRACE: Duration = Duration::from_secs(2);
/// How long to wait after SIGKILL for the kernel to take the group down.
const AFTER_KILL: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_millis(20);

/// A process group sewa started (its id is its leader's pid).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Group(Pid);

impl Group {
    /// The group led by the child `pid` (started with `process_group(0)`).
    pub fn of_leader(pid: u32) -> Option<Group> {
        Pid::from_raw(i32::try_from(pid).ok()?).map(Group)
    }

    pub fn id(self) -> u32 {
        self.0.as_raw_nonzero().get() as u32
    }

    fn signal(self, sig: Signal) {
        // ESRCH: nobody left in the group, which is what we want.
        let _ = kill_process_group(self.0, sig);
    }

    /// Whether any live process of the group is left. Zombies do not count: an orphaned
    /// child that died stays a zombie in its group until its new parent reaps it, which a
    /// container's init may never do.
    pub fn alive(self) -> bool {
        match live_members(self.id()) {
            Some(n) => n > 0,
            // No /proc: the kernel's own answer (zombies included).
            None => test_kill_process_group(self.0).is_ok(),
        }
    }
}

/// Processes of group `pgid` that are not zombies, from /proc (`None` without /proc).
fn live_members(pgid: u32) -> Option<usize> {
    let entries = std::fs::read_dir("/proc").ok()?;
    let n = entries
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())))
        .filter_map(|e| std::fs::read(e.path().join("stat")).ok())
        .filter(|stat| stat_is_live_member(stat, pgid))
        .count();
    Some(n)
}

/// Whether a `/proc/PID/stat` line (`pid (comm) state ppid pgrp …`; comm may hold spaces and
/// parentheses, so fields are counted after the last `)`) is a live process of group `pgid`.
fn stat_is_live_member(stat: &[u8], pgid: u32) -> bool {
    let Some(close) = stat.iter().rposition(|b| *b == b')') else { return false };
    let rest = String::from_utf8_lossy(&stat[close + 1..]);
    let mut fields = rest.split_ascii_whitespace();
    let (Some(state), Some(_ppid), Some(pgrp)) = (fields.next(), fields.next(), fields.next())
    else {
        return false;
    };
    !matches!(state, "Z" | "X" | "x") && pgrp.parse::<u32>().is_ok_and(|g| g == pgid)
}

/// Stop `groups`: SIGTERM, wait up to `GRACE` until no live process of any group is left, then
/// SIGKILL what remains and wait (bounded) again. Returns whether everything was gone in time.
/// Reaping the leaders is the caller's (their exit statuses are theirs).
pub fn stop(groups: &[Group]) -> bool {
    let mut gone = || !groups.iter().any(|g| g.alive());
    if gone() {
        return true;
    }
    groups.iter().for_each(|g| g.signal(Signal::TERM));
    if wait_until(Instant::now() + GRACE, &mut gone) {
        return true;
    }
    groups.iter().for_each(|g| g.signal(Signal::KILL));
    wait_until(Instant::now() + AFTER_KILL, &mut gone)
}

fn wait_until(deadline: Instant, done: &mut impl FnMut() -> bool) -> bool {
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// What sewa holds that must not outlive it.
struct Register {
    groups: Vec<Group>,
    dirs: Vec<PathBuf>,
    closed: bool,
}

static LIVE: Mutex<Register> =
    Mutex::new(Register { groups: Vec::new(), dirs: Vec::new(), closed: false });

fn live() -> std::sync::MutexGuard<'static, Register> {
    // A panic while holding the lock leaves a plain list behind: still usable.
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Run `start` (which starts a group or creates a directory) under the register's lock and
/// record what it returns, so `stop_all` cannot miss something started concurrently. Refused
/// (`None`) once `stop_all` ran.
pub fn enlist<T>(start: impl FnOnce() -> T, what: impl FnOnce(&T) -> Enlisted) -> Option<T> {
    let mut reg = live();
    if reg.closed {
        return None;
    }
    let made = start();
    match what(&made) {
        Enlisted::Group(g) => reg.groups.push(g),
        Enlisted::Dir(d) => reg.dirs.push(d),
        Enlisted::Nothing => {}
    }
    Some(made)
}

/// What `enlist` records.
pub enum Enlisted {
    Group(Group),
    Dir(PathBuf),
    Nothing,
}

/// Forget a group its owner has stopped.
pub fn discharge_group(g: Group) {
    live().groups.retain(|x| *x != g);
}

/// Forget a directory its owner has removed.
pub fn discharge_dir(d: &Path) {
    live().dirs.retain(|x| x != d);
}

/// Stop every evaluator group still running and remove every staging directory still present,
/// then refuse new ones. For a process about to exit with an objective left on another thread
/// (`sewa watch` after its shutdown); their leaders are reaped by that thread or by sewa's exit.
pub fn stop_all() {
    let (groups, dirs) = {
        let mut reg = live();
        reg.closed = true;
        (std::mem::take(&mut reg.groups), std::mem::take(&mut reg.dirs))
    };
    if !stop(&groups) {
        tracing::warn!(groups = ?groups.iter().map(|g| g.id()).collect::<Vec<_>>(),
            "evaluator processes still running after SIGKILL");
    }
    for d in dirs {
        if let Err(e) = std::fs::remove_dir_all(&d)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %d.display(), error = %e, "cannot remove the staging directory");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_lines_are_read_after_the_command_name() {
        let line = b"4242 (python3 ) 1 (x)) S 1 777 777 0 -1 4194560";
        assert!(stat_is_live_member(line, 777));
        assert!(!stat_is_live_member(line, 1), "ppid is not the group");
        assert!(!stat_is_live_member(b"4243 (torchrun) Z 1 777 777 0", 777), "zombies are gone");
        assert!(!stat_is_live_member(b"garbage", 777));
        assert!(!stat_is_live_member(b"1 (a) S", 777));
    }
}
