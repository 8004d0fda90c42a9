//! Staging directories left by a sewa that could not clean up (kill -9, OOM, power loss):
//! found and removed when the next evaluator's staging directory is made beside them. A
//! directory is ours and stale only when all of this holds: its name is
//! `sewa-eval-<pid>-<random>`, it is a real directory (not a symlink) owned by our user, it holds
//! the marker sewa writes (`.sewa-staging`: the pid and that process's start time), and no
//! process with that pid and start time runs (a reused pid has another start time). Anything
//! else — other users' directories, a live sewa's, older unmarked ones — is left alone.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Name prefix of every staging directory.
pub const PREFIX: &str = "sewa-eval-";
/// The marker file inside each, holding `pid start_time`.
pub const MARKER: &str = ".sewa-staging";

/// This process's marker text.
pub fn marker() -> String {
    let pid = std::process::id();
    format!("{pid} {}\n", start_time(pid).unwrap_or(0))
}

/// The start time of process `pid` in clock ticks since boot (`/proc/PID/stat` field 22), or
/// `None` when no such process runs (or /proc is not mounted).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
    let close = stat.iter().rposition(|b| *b == b')')?;
    // Fields after the command name start at field 3 (state); field 22 is the 20th of them.
    String::from_utf8_lossy(&stat[close + 1..]).split_ascii_whitespace().nth(19)?.parse().ok()
}

/// Remove the stale staging directories in `parent` (see the module header); `own` is the
/// directory just made there, whose owner is "our user". Returns what was removed, with bytes.
pub fn clean(parent: &Path, own: &Path) -> Vec<(std::path::PathBuf, u64)> {
    let Ok(me) = std::fs::symlink_metadata(own) else { return Vec::new() };
    if !Path::new("/proc/self/stat").exists() {
        return Vec::new(); // cannot tell a live sewa from a dead one
    }
    let Ok(entries) = std::fs::read_dir(parent) else { return Vec::new() };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if path == own || !is_stale(&path, &e.file_name().to_string_lossy(), me.uid()) {
            continue;
        }
        let bytes = size(&path);
        match std::fs::remove_dir_all(&path) {
            Ok(()) => removed.push((path, bytes)),
            Err(err) => tracing::warn!(dir = %path.display(), error = %err,
                "cannot remove a stale staging directory"),
        }
    }
    removed
}

fn is_stale(path: &Path, name: &str, uid: u32) -> bool {
    let Some(pid) = name_pid(name) else { return false };
    let ours = std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir() && m.uid() == uid);
    let Some(text) = ours.then(|| std::fs::read_to_string(path.join(MARKER)).ok()).flatten() else {
        return false;
    };
    let mut fields = text.split_ascii_whitespace().map(|f| f.parse::<u64>().ok());
    let (Some(Some(marked_pid)), Some(Some(marked_start))) = (fields.next(), fields.next()) else {
        return false;
    };
    marked_pid == u64::from(pid) && start_time(pid).is_none_or(|now| now != marked_start)
}

/// The pid in `sewa-eval-<pid>-<random>`.
fn name_pid(name: &str) -> Option<u32> {
    let (pid, rest) = name.strip_prefix(PREFIX)?.split_once('-')?;
    (!rest.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())).then(|| pid.parse().ok())?
}

/// Bytes of the regular files directly in `dir` (staging holds no subdirectories).
fn size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_marked_directories_of_dead_processes_of_ours_are_stale() {
        assert_eq!(name_pid("sewa-eval-123-AbC"), Some(123));
        for bad in ["sewa-eval-AbCdEf", "sewa-eval-123-", "sewa-eval--x", "other-123-x"] {
            assert_eq!(name_pid(bad), None, "{bad}");
        }
        let parent = tempfile::tempdir().unwrap();
        let own = parent.path().join(format!("{PREFIX}{}-own", std::process::id()));
        std::fs::create_dir(&own).unwrap();
        // A pid no process has (above the kernel's maximum), marked: stale.
        let dead = parent.path().join(format!("{PREFIX}4194999-x"));
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(dead.join(MARKER), "4194999 5\n").unwrap();
        std::fs::write(dead.join("member-1.safetensors"), [0u8; 100]).unwrap();
        // Unmarked, or marked by this live process: kept.
        let unmarked = parent.path().join(format!("{PREFIX}4194998-x"));
        std::fs::create_dir(&unmarked).unwrap();
        let live = parent.path().join(format!("{PREFIX}{}-y", std::process::id()));
        std::fs::create_dir(&live).unwrap();
        std::fs::write(live.join(MARKER), marker()).unwrap();
        // Our pid with another start time: a reused pid, so stale.
        let reused = parent.path().join(format!("{PREFIX}{}-z", std::process::id()));
        std::fs::create_dir(&reused).unwrap();
        std::fs::write(reused.join(MARKER), format!("{} 1\n", std::process::id())).unwrap();
        let mut removed = clean(parent.path(), &own);
        removed.sort();
        let marker_len = format!("{} 1\n", std::process::id()).len() as u64;
        let mut want = vec![(dead.clone(), 110), (reused.clone(), marker_len)];
        want.sort();
        assert_eq!(removed, want);
        assert!(!dead.exists() && !reused.exists());
        assert!(unmarked.exists() && live.exists() && own.exists());
    }
}
