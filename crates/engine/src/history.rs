//! The run's publication history: one JSON line per publication of `sewa watch`, in a file
//! beside the status file (`status.json` → `status.history.jsonl`), so `sewa report --history`
//! can draw the whole run after the fact. The status file and the manifest hold only the
//! current publication; this file is the only record of the earlier ones.
//!
//! Bounded and append-only: each publication appends one line (written whole, then fsync'd);
//! once the file passes `MAX_HISTORY_BYTES` it is rewritten atomically (temp file, fsync,
//! rename) keeping the newest lines that fit in half of it. A crash mid-append can leave one
//! torn last line: `read` skips it, counted, like any other line that does not parse. This
//! module records and reads; the daemon decides when, `report` draws.

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use rustix::fs::OFlags;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, WithPath};
use crate::manifest::SelectedBy;
use crate::select::Selection;
use crate::window::Member;

/// Past this size the file is cut to its newest lines fitting in half of it (at 1 KiB a
/// publication, the last ~2000 publications stay).
pub const MAX_HISTORY_BYTES: u64 = 4 << 20;
/// Largest file `read` accepts: sewa's own stay under `MAX_HISTORY_BYTES` plus one line.
const MAX_READ_BYTES: u64 = MAX_HISTORY_BYTES + MAX_LINE_BYTES as u64;
/// Longest line written or read. A line over it is written without its `window` losses (or
/// not at all), and read as a bad line.
pub const MAX_LINE_BYTES: usize = 256 << 10;
/// Losses and weights beyond this are not recorded or drawn (plot ranges must stay finite).
const PLOTTABLE: f64 = 1e150;

/// One publication.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// When it was published (RFC 3339).
    pub at: String,
    /// Training step of the window's newest member at the time.
    pub step: Option<u64>,
    pub method: SelectedBy,
    /// The selection's loss on the selection data (the published average's loss).
    pub loss: Option<f64>,
    /// The members averaged (non-zero weight), in window order.
    pub members: Vec<EntryMember>,
    /// Each window member's own loss, when the selector recorded it.
    #[serde(default)]
    pub window: Vec<StepLoss>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EntryMember {
    #[serde(with = "crate::path_json")]
    pub path: PathBuf,
    pub step: u64,
    pub weight: f64,
    pub loss: Option<f64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepLoss {
    pub step: u64,
    pub loss: f64,
}

fn plottable(x: f64) -> bool {
    x.is_finite() && x.abs() <= PLOTTABLE
}

impl Entry {
    /// The entry for publishing `selection` over `window` (the same order as its weights).
    pub fn of(selection: &Selection, window: &[Member], at: String) -> Entry {
        let own = selection.details.member_losses.as_deref().unwrap_or_default();
        let own = |i: usize| own.get(i).copied().filter(|l| plottable(*l));
        let chosen =
            window.iter().zip(&selection.weights).enumerate().filter(|(_, (_, w))| **w > 0.0);
        let members = chosen.map(|(i, (m, w))| EntryMember {
            path: m.path.clone(),
            step: m.step,
            weight: *w,
            loss: own(i),
        });
        let window_losses = window
            .iter()
            .enumerate()
            .filter_map(|(i, m)| own(i).map(|loss| StepLoss { step: m.step, loss }));
        Entry {
            at,
            step: window.iter().map(|m| m.step).max(),
            method: selection.method.into(),
            loss: selection.loss.filter(|l| plottable(*l)),
            members: members.collect(),
            window: window_losses.collect(),
        }
    }

    /// Whether every number in it can be drawn (a hand-edited file may hold 1e300).
    fn plottable(&self) -> bool {
        let members = self
            .members
            .iter()
            .all(|m| plottable(m.weight) && m.weight >= 0.0 && m.loss.is_none_or(plottable));
        members && self.loss.is_none_or(plottable) && self.window.iter().all(|w| plottable(w.loss))
    }

    /// The entry as one line, newline included: without the window's losses when whole it
    /// would pass `MAX_LINE_BYTES`; None when even that does.
    fn line(&self) -> Option<Vec<u8>> {
        let encode = |e: &Entry| {
            let mut line = serde_json::to_vec(e).ok()?;
            line.push(b'\n');
            Some(line).filter(|l| l.len() <= MAX_LINE_BYTES)
        };
        encode(self).or_else(|| encode(&Entry { window: Vec::new(), ..self.clone() }))
    }
}

/// The history file that goes with `status_file`: `status.json` → `status.history.jsonl`.
pub fn beside(status_file: &Path) -> PathBuf {
    let stem = status_file.file_stem().unwrap_or_else(|| "status".as_ref());
    let mut name = stem.to_os_string();
    name.push(".history.jsonl");
    status_file.with_file_name(name)
}

/// Append `entry` to the history at `path` (created if absent; anything but a regular file is
/// refused, a symlink included), then cut the file if it passed `MAX_HISTORY_BYTES`.
pub fn append(path: &Path, entry: &Entry) -> Result<()> {
    let line = entry.line().ok_or_else(|| {
        let why = format!("a publication of {} members does not fit one line", entry.members.len());
        Error::bad_input(path, format!("{why} of {MAX_LINE_BYTES} bytes; not recorded"))
    })?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_path(dir)?;
    }
    // O_NONBLOCK: a FIFO put in its place must not hang the daemon; O_NOFOLLOW: nor may a
    // symlink send the write elsewhere.
    let flags = OFlags::NONBLOCK | OFlags::NOFOLLOW | OFlags::NOCTTY;
    let mut file = File::options()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o644)
        .custom_flags(flags.bits() as i32)
        .open(path)
        .with_path(path)?;
    let meta = file.metadata().with_path(path)?;
    if !meta.file_type().is_file() {
        return Err(Error::bad_input(path, "not a regular file; the history is not recorded"));
    }
    // A torn last line (a crash mid-append) is ended first, so it costs itself, not this one.
    let mut last = [0u8];
    let torn = meta.len() > 0
        && file.read_at(&mut last, meta.len() - 1).with_path(path)? == 1
        && last[0] != b'\n';
    if torn {
        file.write_all(b"\n").with_path(path)?;
    }
    file.write_all(&line).with_path(path)?;
    file.sync_data().with_path(path)?;
    let len = file.metadata().with_path(path)?.len();
    if len > MAX_HISTORY_BYTES {
        cut(path, &file, len)?;
    }
    Ok(())
}

/// Rewrite the file atomically with its newest whole lines that fit in half the bound. Only
/// that tail is read (and the byte before it, to tell whether it starts a line), so a file
/// grown far past the bound by someone else is cut all the same.
fn cut(path: &Path, file: &File, len: u64) -> Result<()> {
    let budget = MAX_HISTORY_BYTES / 2;
    let from = len.saturating_sub(budget + 1);
    let mut tail = vec![0; (len - from) as usize];
    file.read_exact_at(&mut tail, from).with_path(path)?;
    let kept = newest_lines(&tail, budget as usize);
    crate::publish::write_atomic(path, |f, p| f.write_all(kept).with_path(p))
}

/// The longest suffix of `bytes` made of whole lines and at most `budget` bytes long.
fn newest_lines(bytes: &[u8], budget: usize) -> &[u8] {
    let start = bytes.len().saturating_sub(budget);
    let tail = &bytes[start..];
    if start == 0 || bytes[start - 1] == b'\n' {
        return tail;
    }
    // The cut fell inside a line: start after its end.
    match tail.iter().position(|b| *b == b'\n') {
        Some(i) => &tail[i + 1..],
        None => &[],
    }
}

/// What `read` found.
#[derive(Debug, Default)]
pub struct History {
    /// Publications, oldest first.
    pub entries: Vec<Entry>,
    /// Lines skipped: torn, not UTF-8, not an entry, too long, or numbers that cannot be drawn.
    pub skipped: usize,
    /// The first skipped line's number (from 1) and why.
    pub first_skipped: Option<(usize, String)>,
}

/// Read a history file: a regular file of at most `MAX_READ_BYTES` (never a FIFO, never
/// without end); a line that is not an entry is skipped and counted, never an error.
pub fn read(path: &Path) -> Result<History> {
    let bytes = crate::config::read_small(path, MAX_READ_BYTES)
        .map_err(|why| Error::bad_input(path, why))?;
    Ok(parse(&bytes))
}

/// `read` without the file.
pub fn parse(bytes: &[u8]) -> History {
    let mut h = History::default();
    for (n, line) in bytes.split(|b| *b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let entry = if line.len() > MAX_LINE_BYTES {
            Err(format!("longer than {MAX_LINE_BYTES} bytes"))
        } else {
            serde_json::from_slice::<Entry>(line).map_err(|e| e.to_string()).and_then(|e| {
                if e.plottable() { Ok(e) } else { Err("a number too large to draw".into()) }
            })
        };
        match entry {
            Ok(e) => h.entries.push(e),
            Err(why) => {
                h.skipped += 1;
                h.first_skipped.get_or_insert((n + 1, why));
            }
        }
    }
    h
}

#[cfg(test)]
mod tests;
