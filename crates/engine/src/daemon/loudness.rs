//! How loudly a rejected candidate is reported, decided without I/O. A run directory holds
//! more than checkpoints (`optim_500.pt`, `last.pt` rewritten on every save): a warning per
//! such file per save buries the one that matters. So: broken checkpoints warn once per
//! change of reason; files that are not checkpoints to average get one info line per name
//! pattern (`optim_*.pt`), then debug; and each of those lines can show the `[watch] pattern`
//! that would select only the checkpoints loaded so far. The pipeline logs what this decides.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::window::Rejection;

/// Distinct name patterns remembered (names come from the run directory; a hostile writer
/// could make every one distinct). Beyond it, new skipped patterns are only logged at debug.
const MAX_PATTERNS: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// A checkpoint that should have loaded: counted as quarantined.
    Warn,
    /// Not complete yet, or the first skipped file of its name pattern.
    Info,
    Debug,
}

/// What to log for one rejection.
#[derive(Debug, PartialEq)]
pub struct Report {
    pub level: Level,
    /// The rejected name's pattern (`optim_*.pt`), for the skip line.
    pub files: String,
    /// `set [watch] pattern = "ckpt_*.pt" ...`, when the loaded checkpoints suggest one that
    /// the rejected name does not match.
    pub hint: Option<String>,
}

#[derive(Debug, Default)]
pub struct Loudness {
    /// Patterns of skipped files already announced at info level.
    announced: BTreeSet<String>,
    /// Pattern → checkpoints loaded with a name of that pattern.
    loaded: BTreeMap<String, u64>,
}

impl Loudness {
    /// A checkpoint was admitted to the window.
    pub fn loaded(&mut self, path: &Path) {
        let p = name_pattern(&file_name(path));
        if self.loaded.len() < MAX_PATTERNS || self.loaded.contains_key(&p) {
            *self.loaded.entry(p).or_default() += 1;
        }
    }

    /// How to report rejection `r`.
    pub fn judge(&mut self, r: &Rejection) -> Report {
        let name = file_name(&r.path);
        let files = name_pattern(&name);
        let level = if r.repeated {
            Level::Debug
        } else if r.incomplete {
            Level::Info
        } else if r.skipped {
            let room = self.announced.len() < MAX_PATTERNS;
            if room && self.announced.insert(files.clone()) { Level::Info } else { Level::Debug }
        } else {
            Level::Warn
        };
        let hint = (level != Level::Debug && !r.incomplete).then(|| self.hint(&name)).flatten();
        Report { level, files, hint }
    }

    /// The pattern of most loaded checkpoints, as a config line, unless `name` matches it.
    fn hint(&self, name: &str) -> Option<String> {
        let (best, _) = self.loaded.iter().max_by_key(|(p, n)| (**n, std::cmp::Reverse(*p)))?;
        let matches = glob::Pattern::new(best).is_ok_and(|g| g.matches(name));
        (!matches).then(|| {
            format!(
                "set [watch] pattern = {best:?} to watch only files named like the checkpoints \
                 loaded so far"
            )
        })
    }
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// A glob matching `name` and its siblings from other steps: each run of digits becomes `*`
/// (`ckpt_500.pt` → `ckpt_*.pt`, `epoch=3-step=500.ckpt` → `epoch=*-step=*.ckpt`); glob
/// metacharacters in the rest are escaped, so the pattern matches only such names.
pub fn name_pattern(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut literal = String::new();
    let mut in_digits = false;
    for c in name.chars() {
        if c.is_ascii_digit() {
            if !in_digits {
                out.push_str(&glob::Pattern::escape(&std::mem::take(&mut literal)));
                out.push('*');
                in_digits = true;
            }
        } else {
            literal.push(c);
            in_digits = false;
        }
    }
    out.push_str(&glob::Pattern::escape(&literal));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::{Action, Event, Window};
    use sewa_checkpoint::Identity;
    use std::path::PathBuf;

    #[test]
    fn name_patterns() {
        let table = [
            ("ckpt_500.pt", "ckpt_*.pt"),
            ("optim_0000500.pt", "optim_*.pt"),
            ("epoch=3-step=500.ckpt", "epoch=*-step=*.ckpt"),
            ("checkpoint-500", "checkpoint-*"),
            ("last.pt", "last.pt"),
            ("a[1]?.pt", "a[[]*[]][?].pt"),
            ("é12", "é*"),
        ];
        for (name, want) in table {
            assert_eq!(name_pattern(name), want, "{name}");
            let g = glob::Pattern::new(want).unwrap();
            assert!(g.matches(name), "{want} must match {name}");
        }
    }

    /// Rejections as the window records them, for `judge`.
    fn rejection(w: &mut Window, name: &str, n: u64, reason: &str, skipped: bool) -> Rejection {
        let path = PathBuf::from(name);
        let sig = Identity { dev: 1, ino: 1, size: n, mtime_ns: n as i128, members: 0 };
        let a = w.handle(Event::Settled { path: path.clone(), sig, step: None });
        assert_eq!(a, vec![Action::Load { path: path.clone(), sig }]);
        let reason = reason.to_string();
        w.handle(Event::Rejected { path: path.clone(), sig, reason, incomplete: false, skipped });
        w.rejected().find(|r| r.path == path).unwrap().clone()
    }

    #[test]
    fn skipped_files_get_one_info_line_per_pattern_and_a_pattern_hint() {
        let (mut w, mut l) = (Window::new(4, 1), Loudness::default());
        for s in [100, 200, 300] {
            l.loaded(Path::new(&format!("runs/ckpt_{s}.pt")));
        }
        l.loaded(Path::new("runs/model.safetensors"));
        let levels: Vec<Report> = (1..=10)
            .map(|s| l.judge(&rejection(&mut w, &format!("optim_{s}.pt"), s, "optimizer", true)))
            .collect();
        assert_eq!(levels[0].level, Level::Info);
        assert_eq!(levels[0].files, "optim_*.pt");
        let hint = levels[0].hint.as_deref().unwrap();
        assert!(hint.contains("pattern = \"ckpt_*.pt\""), "{hint}");
        assert!(levels[1..].iter().all(|r| r.level == Level::Debug && r.hint.is_none()));
        let other = l.judge(&rejection(&mut w, "rng_state_1.pth", 1, "no floats", true));
        assert_eq!(other.level, Level::Info, "another pattern gets its own line");
    }

    /// `last.pt` rewritten in place changes identity on every save: the same reason again is
    /// a repeat (debug), a new reason warns again.
    #[test]
    fn a_file_rejected_again_for_the_same_reason_warns_once() {
        let (mut w, mut l) = (Window::new(4, 1), Loudness::default());
        l.loaded(Path::new("ckpt_1.pt"));
        let first = l.judge(&rejection(&mut w, "last.pt", 1, "no step", false));
        assert_eq!(first.level, Level::Warn);
        assert!(first.hint.unwrap().contains("\"ckpt_*.pt\""));
        for n in 2..6 {
            let again = l.judge(&rejection(&mut w, "last.pt", n, "no step", false));
            assert_eq!(again.level, Level::Debug, "save {n}");
        }
        let changed = l.judge(&rejection(&mut w, "last.pt", 9, "NaN in w", false));
        assert_eq!(changed.level, Level::Warn);
        let broken = l.judge(&rejection(&mut w, "ckpt_7.pt", 7, "truncated", false));
        assert_eq!((broken.level, broken.hint), (Level::Warn, None), "matches the pattern");
    }
}
