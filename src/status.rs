//! The daemon's status file: what is in the window, what was selected and published last,
//! what is quarantined and the recent errors. Written atomically (temp file, rename) so
//! `sewa status` and monitoring never read half of it; `render` formats it for people.
//! This module only records; the daemon decides what goes in.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, WithPath};
use crate::text;

/// Recent errors kept in the file.
const MAX_ERRORS: usize = 20;
/// Skipped files listed by `render` (optimizer files pile up beside checkpoints).
const SKIPPED_SHOWN: usize = 5;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub version: String,
    /// starting | watching | stopping | stopped
    pub state: String,
    pub started_at: String,
    pub updated_at: String,
    #[serde(with = "crate::manifest::path_json")]
    pub dir: PathBuf,
    #[serde(with = "crate::manifest::path_json")]
    pub out: PathBuf,
    pub method: String,
    pub members: Vec<MemberStatus>,
    pub last_selection: Option<SelectionStatus>,
    pub last_publish: Option<PublishStatus>,
    pub quarantined: Vec<QuarantineStatus>,
    pub errors: Vec<ErrorStatus>,
    pub counters: Counters,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemberStatus {
    #[serde(with = "crate::manifest::path_json")]
    pub path: PathBuf,
    pub step: u64,
    pub metric: Option<f64>,
    /// Weight in the last selection.
    pub weight: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SelectionStatus {
    pub at: String,
    pub method: String,
    pub why: String,
    pub loss: Option<f64>,
    /// Published, or why not.
    pub outcome: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PublishStatus {
    pub at: String,
    #[serde(with = "crate::manifest::path_json")]
    pub path: PathBuf,
    #[serde(with = "crate::manifest::path_json")]
    pub manifest: PathBuf,
    pub members: usize,
    /// Checkpoints read to update the running average (incremental updates read few).
    pub reads: usize,
    pub exact: bool,
    /// Updating the running average and producing the output tensors.
    #[serde(default)]
    pub average_ms: u64,
    /// Selection, averaging and the durable publish together.
    pub millis: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QuarantineStatus {
    #[serde(with = "crate::manifest::path_json")]
    pub path: PathBuf,
    pub reason: String,
    pub incomplete: bool,
    /// Not a checkpoint to average (optimizer state, a copy such as last.pt): not counted.
    #[serde(default)]
    pub skipped: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorStatus {
    pub at: String,
    pub message: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Counters {
    pub loaded: u64,
    pub quarantined: u64,
    pub selections: u64,
    /// Selections that failed (e.g. a non-finite loss); nothing was published from them.
    #[serde(default)]
    pub failed_selections: u64,
    pub publishes: u64,
    pub rescans: u64,
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

impl Status {
    pub fn push_error(&mut self, message: impl Into<String>) {
        self.errors.push(ErrorStatus { at: now_rfc3339(), message: message.into() });
        let extra = self.errors.len().saturating_sub(MAX_ERRORS);
        self.errors.drain(..extra);
    }

    /// Write to `path` atomically: a temp file in the same directory, then rename.
    pub fn write(&mut self, path: &Path) -> Result<()> {
        self.updated_at = now_rfc3339();
        let json = serde_json::to_vec_pretty(self).map_err(|e| Error::Internal(e.to_string()))?;
        write_atomic(path, &json)
    }

    pub fn read(path: &Path) -> Result<Status> {
        let text = std::fs::read(path).with_path(path)?;
        serde_json::from_slice(&text)
            .map_err(|e| Error::bad_input(path, format!("not a sewa status file: {e}")))
    }
}

/// Temp file beside `path`, then rename over it (no fsync: status is advisory).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_path(dir)?;
    let mut tmp = tempfile::Builder::new().prefix(".tmp-status").tempfile_in(dir).with_path(dir)?;
    tmp.write_all(bytes).with_path(tmp.path())?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// The status as a short report for people (`sewa status`). Paths and reasons come from
/// checkpoint files (and the file itself may have been edited): they print escaped.
pub fn render(s: &Status) -> String {
    let mut o = String::new();
    let _ =
        writeln!(o, "sewa {} (pid {}) — {}, updated {}", s.version, s.pid, s.state, s.updated_at);
    let _ = writeln!(o, "watching {}  →  {}", s.dir.display(), s.out.display());
    let _ = writeln!(o, "\nwindow: {} members, method {}", s.members.len(), s.method);
    for m in &s.members {
        let metric = m.metric.map(|v| format!("  metric {v:.6}")).unwrap_or_default();
        let _ = writeln!(
            o,
            "  step {:>8}  weight {:.4}  {}{metric}",
            m.step,
            m.weight,
            text::path(&m.path)
        );
    }
    if let Some(sel) = &s.last_selection {
        let loss = sel.loss.map(|l| format!(", loss {l:.6}")).unwrap_or_default();
        let _ = writeln!(o, "\nlast selection {}: {}{loss} — {}", sel.at, sel.why, sel.outcome);
    }
    match &s.last_publish {
        Some(p) => {
            let how = if p.exact { "exact" } else { "incremental" };
            let _ = writeln!(
                o,
                "last publish {}: {} ({} members, {how}, {} reads, {} ms of which averaging {} ms)",
                p.at,
                p.path.display(),
                p.members,
                p.reads,
                p.millis,
                p.average_ms
            );
        }
        None => o.push_str("nothing published yet\n"),
    }
    let (skipped, quarantined): (Vec<_>, Vec<_>) = s.quarantined.iter().partition(|q| q.skipped);
    if !quarantined.is_empty() {
        let _ = writeln!(o, "\nquarantined ({}):", quarantined.len());
        for q in &quarantined {
            let _ = writeln!(o, "  {}: {}", text::path(&q.path), text::escape(&q.reason));
        }
    }
    if !skipped.is_empty() {
        let _ = writeln!(o, "\nskipped, not checkpoints to average ({}):", skipped.len());
        for q in skipped.iter().take(SKIPPED_SHOWN) {
            let _ = writeln!(o, "  {}: {}", text::path(&q.path), text::escape(&q.reason));
        }
        if skipped.len() > SKIPPED_SHOWN {
            let _ = writeln!(o, "  ... and {} more", skipped.len() - SKIPPED_SHOWN);
        }
    }
    if !s.errors.is_empty() {
        let _ = writeln!(o, "\nrecent errors:");
        for e in s.errors.iter().rev().take(5) {
            let _ = writeln!(o, "  {} {}", e.at, text::escape_lines(&e.message));
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_is_atomic_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/status.json");
        let mut s = Status { state: "watching".into(), ..Status::default() };
        for i in 0..30 {
            s.push_error(format!("e{i}"));
        }
        s.write(&path).unwrap();
        let back = Status::read(&path).unwrap();
        assert_eq!(back.errors.len(), MAX_ERRORS);
        assert_eq!(back.errors.last().unwrap().message, "e29");
        assert!(render(&back).contains("watching"));
        let leftovers = std::fs::read_dir(path.parent().unwrap()).unwrap().count();
        assert_eq!(leftovers, 1, "no temp file left behind");
    }

    #[test]
    fn non_utf8_paths_are_written_losslessly() {
        use std::os::unix::ffi::OsStringExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.json");
        let odd =
            PathBuf::from(std::ffi::OsString::from_vec(b"runs/step_\xff.safetensors".to_vec()));
        let member = MemberStatus { path: odd.clone(), step: 1, metric: None, weight: 1.0 };
        let mut s = Status { members: vec![member], out: odd.clone(), ..Status::default() };
        s.write(&path).unwrap();
        let back = Status::read(&path).unwrap();
        assert_eq!((back.members[0].path.clone(), back.out), (odd.clone(), odd));
    }
}
