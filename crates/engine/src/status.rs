//! The daemon's status file: what is in the window, what was selected and published last,
//! what is quarantined, the disk space sewa holds for deleted checkpoints, and the recent
//! errors. Written atomically (temp file, fsync, rename) so
//! `sewa status` and monitoring never read half of it; `render` formats it for people.
//! This module only records; the daemon decides what goes in.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, WithPath};
use crate::manifest::SelectedBy;
use crate::timestamp;
use sewa_checkpoint::Identity;
use sewa_checkpoint::text::{self, human_bytes};

/// Recent errors kept in the file.
const MAX_ERRORS: usize = 20;
/// Largest status file `read` accepts: sewa's own are KiBs (a line per window member and
/// quarantined file), so this only refuses what sewa did not write.
const MAX_STATUS_BYTES: u64 = 64 << 20;
/// Skipped files listed by `render` (optimizer files pile up beside checkpoints).
const SKIPPED_SHOWN: usize = 5;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub version: String,
    pub state: State,
    pub started_at: String,
    pub updated_at: String,
    #[serde(with = "crate::path_json")]
    pub dir: PathBuf,
    #[serde(with = "crate::path_json")]
    pub out: PathBuf,
    /// `[select] method`.
    pub method: SelectedBy,
    /// The window, oldest first.
    pub members: Vec<MemberStatus>,
    /// Why the daemon does not select yet (fewer members than `[select] min_members`).
    #[serde(default)]
    pub waiting: Option<String>,
    /// What the published output holds (from its manifest at start-up, then from each
    /// publication); its members may have left the window.
    #[serde(default)]
    pub published: Option<PublishedSelection>,
    /// The last selection, published or not (see its `outcome`).
    pub last_selection: Option<SelectionStatus>,
    pub last_publish: Option<PublishStatus>,
    pub quarantined: Vec<QuarantineStatus>,
    /// The run directory's filesystem and what sewa holds on it (absent: not measured).
    #[serde(default)]
    pub disk: Option<DiskStatus>,
    pub errors: Vec<ErrorStatus>,
    pub counters: Counters,
    /// Where the metrics endpoint (`[runtime] metrics_addr`) listens, as bound (port 0 is
    /// replaced by the port the system chose).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<String>,
}

/// What the daemon is doing, written as the strings the status file always held (monitoring
/// matches on them). A state this version does not know (a newer sewa's file) reads as `Other`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum State {
    /// From the first status write, before the watched directory is examined.
    #[default]
    Starting,
    /// `[watch] dir` does not exist yet.
    WaitingForDir,
    Watching,
    /// A shutdown was asked for: the pipeline's evaluators are being stopped.
    Stopping,
    Stopped,
    /// The pipeline panicked outside one checkpoint's work (see `errors`).
    Failed,
    Other(String),
}

impl State {
    pub fn name(&self) -> &str {
        match self {
            State::Starting => "starting",
            State::WaitingForDir => "waiting for the watched directory",
            State::Watching => "watching",
            State::Stopping => "stopping",
            State::Stopped => "stopped",
            State::Failed => "failed",
            State::Other(s) => s,
        }
    }
}

impl From<String> for State {
    fn from(s: String) -> State {
        let known = [
            State::Starting,
            State::WaitingForDir,
            State::Watching,
            State::Stopping,
            State::Stopped,
            State::Failed,
        ];
        known.into_iter().find(|k| k.name() == s).unwrap_or(State::Other(s))
    }
}

impl From<State> for String {
    fn from(s: State) -> String {
        s.name().to_string()
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemberStatus {
    #[serde(with = "crate::path_json")]
    pub path: PathBuf,
    pub step: u64,
    pub metric: Option<f64>,
    /// Weight in the last selection (published or not).
    pub weight: f64,
    /// Weight in the published average (0: not in it).
    #[serde(default)]
    pub published_weight: f64,
    /// Whether the file version this member holds is still at its path.
    #[serde(default)]
    pub on_disk: OnDisk,
    /// Bytes of this member's files that no path links to any more (deleted by rotation,
    /// renamed over) and that stay allocated while sewa holds them.
    #[serde(default)]
    pub held_bytes: u64,
}

/// The run directory's filesystem (`[watch] dir`) and the space sewa keeps allocated on it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskStatus {
    /// Free bytes for unprivileged writers such as the trainer.
    pub free_bytes: u64,
    pub total_bytes: u64,
    /// `[window] min_free_bytes` in force (configured, or the default computed from the
    /// filesystem and the newest checkpoint): below it, deleted members are released.
    pub min_free_bytes: u64,
    /// Bytes sewa keeps allocated for files deleted from disk: window members and inputs of
    /// the running average that already left the window.
    pub held_bytes: u64,
    /// `[window] keep_deleted`.
    pub keep_deleted: bool,
}

/// Whether the file version sewa holds is still at its path. A member whose file the trainer's
/// rotation unlinked stays usable while sewa holds it open, but it will not come back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDisk {
    #[default]
    Present,
    /// Nothing is at the path any more (deleted, e.g. by rotation).
    Deleted,
    /// Something else is at the path (replaced or rewritten since it was read), or it cannot
    /// be examined.
    Changed,
}

impl OnDisk {
    /// Compare what is at `path` now with the `identity` it had when read (one `stat`, or one
    /// per weight file of a directory). Without a recorded identity, only existence counts.
    pub fn check(path: &Path, identity: Option<&Identity>) -> OnDisk {
        match Identity::of(path) {
            Ok(now) if identity.is_none_or(|id| *id == now) => OnDisk::Present,
            Err(_) if std::fs::symlink_metadata(path).is_err() => OnDisk::Deleted,
            _ => OnDisk::Changed,
        }
    }

    /// The mark `render` prints after a path; `held`: bytes sewa keeps allocated for it.
    fn label(self, held: u64) -> String {
        let what = match self {
            OnDisk::Present => "",
            OnDisk::Deleted => "deleted from disk",
            OnDisk::Changed => "changed on disk",
        };
        match (what, held) {
            ("", 0) => String::new(),
            ("", _) => format!("  [sewa holds {} of deleted files]", human_bytes(held)),
            (_, 0) => format!("  [{what}]"),
            _ => format!("  [{what}, sewa holds {}]", human_bytes(held)),
        }
    }
}

/// What a selection was, for the published one and the last one alike (flattened into both:
/// the JSON keeps the fields at their level).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SelectionSummary {
    /// When it was made, or for the published one, published (RFC 3339).
    pub at: String,
    pub method: SelectedBy,
    pub why: String,
    /// Its loss on the selection data.
    pub loss: Option<f64>,
    /// Its loss on `[objective] acceptance_data`, when known.
    #[serde(default)]
    pub acceptance_loss: Option<f64>,
}

/// The selection the published output holds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PublishedSelection {
    #[serde(flatten)]
    pub summary: SelectionSummary,
    /// Inputs with a non-zero weight, oldest first.
    pub members: Vec<PublishedMember>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PublishedMember {
    #[serde(with = "crate::path_json")]
    pub path: PathBuf,
    pub step: Option<u64>,
    pub weight: f64,
    /// The member's own loss on the selection data, when the selector recorded it.
    pub loss: Option<f64>,
    /// Whether it is (this file version) still in the window.
    pub in_window: bool,
    pub on_disk: OnDisk,
}

/// The last selection.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SelectionStatus {
    #[serde(flatten)]
    pub summary: SelectionSummary,
    /// Whether it was published (then it is `published` too).
    #[serde(default)]
    pub published: bool,
    /// "published", or why not.
    pub outcome: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PublishStatus {
    pub at: String,
    #[serde(with = "crate::path_json")]
    pub path: PathBuf,
    #[serde(with = "crate::path_json")]
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
    #[serde(with = "crate::path_json")]
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
    /// Members released because their files were deleted (`[window] keep_deleted`,
    /// `min_free_bytes`).
    #[serde(default)]
    pub released: u64,
    /// Loads put off for lack of file descriptors (retried, never quarantined).
    #[serde(default)]
    pub deferred: u64,
    /// Times the run's checkpoints changed layout and the window followed them.
    #[serde(default)]
    pub relayouts: u64,
    /// Objective calls of every selection of this run (method, report and acceptance).
    #[serde(default)]
    pub oracle_calls: u64,
    /// Wall time of every selection of this run, in ms (with an evaluator, mostly its calls).
    #[serde(default)]
    pub selection_ms: u64,
}

impl Status {
    pub fn push_error(&mut self, message: impl Into<String>) {
        self.errors.push(ErrorStatus { at: timestamp::now(), message: message.into() });
        let extra = self.errors.len().saturating_sub(MAX_ERRORS);
        self.errors.drain(..extra);
    }

    /// Write to `path` atomically: a temp file in the same directory, fsync, then rename.
    pub fn write(&mut self, path: &Path) -> Result<()> {
        self.updated_at = timestamp::now();
        let json = serde_json::to_vec_pretty(self).map_err(|e| Error::Internal(e.to_string()))?;
        write_atomic(path, &json)
    }

    /// Read a status file (a regular file of at most `MAX_STATUS_BYTES`: `sewa status` must
    /// never hang on a FIFO or read `/dev/zero` without end).
    pub fn read(path: &Path) -> Result<Status> {
        let text = crate::config::read_small(path, MAX_STATUS_BYTES)
            .map_err(|why| Error::bad_input(path, why))?;
        serde_json::from_slice(&text)
            .map_err(|e| Error::bad_input(path, format!("not a sewa status file: {e}")))
    }
}

/// Create `path`'s directory, then write through the publisher's atomic writer (temp file,
/// fsync, rename, directory fsync), so a reader never sees half a status file.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_path(dir)?;
    crate::publish::write_atomic(path, |f, p| f.write_all(bytes).with_path(p))
}

/// The status as a short report for people (`sewa status`). Paths and reasons come from
/// checkpoint files (and the file itself may have been edited): they print escaped.
pub fn render(s: &Status) -> String {
    let mut o = String::new();
    let state = text::escape(s.state.name());
    let _ = writeln!(o, "sewa {} (pid {}) — {state}, updated {}", s.version, s.pid, s.updated_at);
    let _ = writeln!(o, "watching {}  →  {}", s.dir.display(), s.out.display());
    render_window(&mut o, s);
    render_disk(&mut o, s.disk.as_ref());
    render_published(&mut o, s.published.as_ref());
    let c = &s.counters;
    let _ = writeln!(
        o,
        "\nthis run: {} selections ({} failed), {} publishes, {} oracle calls, {:.1} s selecting",
        c.selections,
        c.failed_selections,
        c.publishes,
        c.oracle_calls,
        c.selection_ms as f64 / 1e3
    );
    if let Some(sel) = &s.last_selection {
        let (why, outcome) = (text::escape(&sel.summary.why), text::escape(&sel.outcome));
        let losses = losses(&sel.summary);
        let _ = writeln!(o, "\nlast selection {}: {why}{losses} — {outcome}", sel.summary.at);
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
        None if s.published.is_none() => o.push_str("nothing published yet\n"),
        None => {}
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

/// The window: each member's weight in the published average and in the last selection.
fn render_window(o: &mut String, s: &Status) {
    let method = text::escape(s.method.name());
    let _ = writeln!(o, "\nwindow: {} members, method {method}", s.members.len());
    if let Some(w) = &s.waiting {
        let _ = writeln!(o, "  {}", text::escape(w));
    }
    for m in &s.members {
        let metric = m.metric.map(|v| format!("  metric {v:.6}")).unwrap_or_default();
        let _ = writeln!(
            o,
            "  step {:>8}  published {:.4}  last selection {:.4}  {}{metric}{}",
            m.step,
            m.published_weight,
            m.weight,
            text::path(&m.path),
            m.on_disk.label(m.held_bytes)
        );
    }
}

/// Free space against `[window] min_free_bytes`, and what sewa holds for deleted files.
fn render_disk(o: &mut String, d: Option<&DiskStatus>) {
    let Some(d) = d else { return };
    let keep = if d.keep_deleted { "" } else { ", keep_deleted = false" };
    let _ = writeln!(
        o,
        "  disk: {} free (min_free_bytes {}{keep}); sewa holds {} of deleted checkpoints",
        human_bytes(d.free_bytes),
        human_bytes(d.min_free_bytes),
        human_bytes(d.held_bytes)
    );
}

/// ", loss L (A on the acceptance data)", with what is known.
fn losses(s: &SelectionSummary) -> String {
    let loss = s.loss.map(|l| format!(", loss {l:.6}")).unwrap_or_default();
    let acc = s.acceptance_loss.map(|l| format!(" ({l:.6} on the acceptance data)"));
    loss + &acc.unwrap_or_default()
}

/// The published selection, members that left the window included.
fn render_published(o: &mut String, p: Option<&PublishedSelection>) {
    let Some(p) = p else { return };
    let s = &p.summary;
    let (method, why, losses) = (text::escape(s.method.name()), text::escape(&s.why), losses(s));
    let _ = writeln!(o, "\npublished {} ({method}{losses}): {why}", s.at);
    for m in &p.members {
        let step = m.step.map_or("?".into(), |s| s.to_string());
        let loss = m.loss.map(|l| format!("  loss {l:.6}")).unwrap_or_default();
        let gone = if m.in_window { "" } else { "  [left the window]" };
        let _ = writeln!(
            o,
            "  step {step:>8}  weight {:.4}{loss}  {}{gone}{}",
            m.weight,
            text::path(&m.path),
            m.on_disk.label(0)
        );
    }
}

#[cfg(test)]
mod tests;
