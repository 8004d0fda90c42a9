//! File descriptors. sewa keeps every window member's files open (an open file pins its data
//! through trainer rotation and in-place rewrites), so a window of sharded checkpoints needs
//! `size × files per member` descriptors: 20 checkpoints of 8 shards are 160, DCP windows of
//! 64-rank checkpoints over 1,000 — more than the usual soft limit of 1,024 or a service's
//! default. At start-up the soft `RLIMIT_NOFILE` is raised to the hard limit (`raise`);
//! `judge` (pure) estimates what the window needs against it, for `check-config` and
//! `watch`. What the window does when descriptors run out anyway is `window.rs`'s decision.

use std::path::Path;

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Descriptors a full window should leave for everything else: the watcher, logs, the status
/// file, a publication's files, the evaluator's pipes, a checkpoint being opened.
pub const RESERVE: u64 = 64;

/// What sewa needs besides its members at the very least (standard streams, the runtime, the
/// watcher, the output lock, a publication's few files): below this beside one checkpoint,
/// nothing can work.
pub const MINIMUM: u64 = 16;

/// The most the soft limit is raised to when the hard limit is unlimited (Linux's default
/// `fs.nr_open`: setting more fails).
const UNLIMITED_CAP: u64 = 1 << 20;

/// The process's limit on open files (`u64::MAX`: unlimited).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    pub soft: u64,
    pub hard: u64,
}

/// The limit now.
pub fn current() -> Limit {
    let r = getrlimit(Resource::Nofile);
    Limit { soft: r.current.unwrap_or(u64::MAX), hard: r.maximum.unwrap_or(u64::MAX) }
}

/// Raise the soft limit to the hard one (nothing is called when they are equal, as under the
/// shipped unit's `LimitNOFILE=`). Returns the limit in force and, if raising failed, why
/// (sewa then runs with the soft limit it was given).
pub fn raise() -> (Limit, Option<String>) {
    let now = current();
    let target = now.hard.min(UNLIMITED_CAP).max(now.soft);
    if now.soft >= target {
        return (now, None);
    }
    let new = Rlimit { current: Some(target), maximum: (now.hard != u64::MAX).then_some(now.hard) };
    match setrlimit(Resource::Nofile, new) {
        Ok(()) => (current(), None),
        Err(e) => (now, Some(format!("cannot raise the soft limit on open files: {e}"))),
    }
}

/// What the window's need looks like against a limit.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Fine,
    /// The full window will not fit: it will hold fewer members (said in the message).
    Tight(String),
    /// Not even one member fits beside the reserve.
    Impossible(String),
}

/// Judge a window of `size` members of `files` files each against `limit` (what `raise`
/// leaves: the hard limit, which sewa can reach on its own).
pub fn judge(size: u64, files: u64, limit: Limit) -> Verdict {
    let files = files.max(1);
    let room = limit.soft.max(limit.hard);
    let need = size.saturating_mul(files).saturating_add(RESERVE);
    if need <= room {
        return Verdict::Fine;
    }
    let fit = room.saturating_sub(MINIMUM) / files;
    let advice = format!(
        "raise the limit on open files to at least {need} (systemd: LimitNOFILE={need}; shell: \
         ulimit -n {need})"
    );
    if fit == 0 {
        return Verdict::Impossible(format!(
            "one checkpoint holds {files} files, and with the {MINIMUM} descriptors sewa needs \
             besides, the limit on open files ({room}) leaves room for none: {advice}"
        ));
    }
    Verdict::Tight(format!(
        "a window of {size} checkpoints of {files} files needs about {need} file descriptors, \
         the limit is {room}: the window will hold about {fit} members; {advice}"
    ))
}

/// How many files a checkpoint holds open, estimated from a candidate on disk: a file is one;
/// a directory counts its regular files that hold weights (shards, rank files; not the
/// config, tokenizer or optimizer files it also has, which sewa does not keep open).
pub fn files_of(candidate: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(candidate) else { return 1 };
    let weights = entries.filter_map(|e| e.ok()).filter(|e| {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let weightish =
            [".safetensors", ".distcp", "model.bin", "model_states.pt", "optim_states.pt"]
                .iter()
                .any(|s| name.ends_with(s));
        weightish && e.file_type().is_ok_and(|t| t.is_file())
    });
    (weights.count() as u64).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judges_the_window_against_the_limit() {
        let limit = |soft, hard| Limit { soft, hard };
        assert_eq!(judge(20, 8, limit(1024, 1024)), Verdict::Fine);
        // The hard limit counts: sewa raises its soft limit to it.
        assert_eq!(judge(20, 8, limit(64, 4096)), Verdict::Fine);
        let Verdict::Tight(msg) = judge(20, 8, limit(64, 64)) else { panic!() };
        assert!(msg.contains("about 6 members") && msg.contains("LimitNOFILE=224"), "{msg}");
        let Verdict::Impossible(msg) = judge(4, 120, limit(64, 128)) else { panic!() };
        assert!(msg.contains("120 files"), "{msg}");
        assert!(matches!(judge(4, 112, limit(64, 128)), Verdict::Tight(_)), "one fits");
        assert_eq!(judge(u64::MAX, u64::MAX, limit(u64::MAX, u64::MAX)), Verdict::Fine);
    }

    #[test]
    fn raising_reaches_the_hard_limit_and_never_lowers() {
        let (after, err) = raise();
        assert!(err.is_none(), "{err:?}");
        assert!(after.soft >= after.hard.min(UNLIMITED_CAP), "{after:?}");
        assert_eq!(raise().0, after, "a second raise changes nothing");
    }

    #[test]
    fn counts_the_weight_files_of_a_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("checkpoint-8");
        std::fs::create_dir(&d).unwrap();
        for n in ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"] {
            std::fs::write(d.join(n), b"").unwrap();
        }
        for n in ["config.json", "optimizer.pt", "model.safetensors.index.json"] {
            std::fs::write(d.join(n), b"").unwrap();
        }
        assert_eq!(files_of(&d), 2);
        assert_eq!(files_of(&d.join("config.json")), 1);
    }
}
