//! The evaluator's stderr relayed to sewa's log: one INFO line per line it prints (target
//! `sewa::evaluator`), a carriage-return progress bar as its last state only and at DEBUG (a
//! bar per evaluation would bury the log; `RUST_LOG=sewa::evaluator=debug` shows them), at
//! most a burst then a steady rate of lines and bytes (`Limiter`, pure: time passed in) with a
//! summary of what was left out, and its last lines kept whole for error messages. An
//! evaluator printing in a loop cannot fill the journal or the disk.

use super::lines::read_line;
use std::collections::VecDeque;
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const STDERR_LINES_KEPT: usize = 20;
/// Longest stderr line kept (longer ones are cut: they are for people to read).
const MAX_STDERR_LINE: usize = 64 << 10;

/// Lines logged in a burst, then per second.
const BURST_LINES: f64 = 200.0;
const LINES_PER_S: f64 = 20.0;
/// Bytes logged in a burst, then per second.
const BURST_BYTES: f64 = 256.0 * 1024.0;
const BYTES_PER_S: f64 = 32.0 * 1024.0;
/// While lines are being left out, how often to say how many.
const SUMMARY_EVERY: Duration = Duration::from_secs(10);

/// The last stderr lines of the current process, shared with its reader thread.
pub type Tail = Arc<Mutex<VecDeque<String>>>;

/// Lines and bytes left out since the last summary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Suppressed {
    pub lines: u64,
    pub bytes: u64,
}

/// Two token buckets (lines, bytes): a line is logged when both hold enough.
pub struct Limiter {
    lines: f64,
    bytes: f64,
    last: Instant,
    suppressed: Suppressed,
    last_summary: Instant,
}

/// What to do with one line: log it or not, and a summary of earlier left-out lines to log
/// first, when one is due.
#[derive(Debug, PartialEq, Eq)]
pub struct Verdict {
    pub log: bool,
    pub summary: Option<Suppressed>,
}

impl Limiter {
    pub fn new(now: Instant) -> Limiter {
        Limiter {
            lines: BURST_LINES,
            bytes: BURST_BYTES,
            last: now,
            suppressed: Suppressed::default(),
            last_summary: now,
        }
    }

    /// A line of `len` bytes arrives at `now`.
    pub fn admit(&mut self, now: Instant, len: usize) -> Verdict {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.lines = (self.lines + dt * LINES_PER_S).min(BURST_LINES);
        self.bytes = (self.bytes + dt * BYTES_PER_S).min(BURST_BYTES);
        // A line longer than the byte burst is logged when the bucket is full (it is already
        // cut to MAX_STDERR_LINE), so it is not starved forever.
        let cost = (len as f64).min(BURST_BYTES);
        let log = self.lines >= 1.0 && self.bytes >= cost;
        if log {
            self.lines -= 1.0;
            self.bytes -= cost;
        } else {
            self.suppressed.lines += 1;
            self.suppressed.bytes += len as u64;
        }
        // Said when lines flow again, and every SUMMARY_EVERY during a long flood.
        let due = log || now.saturating_duration_since(self.last_summary) >= SUMMARY_EVERY;
        let summary = (due && self.suppressed.lines > 0).then(|| self.take_summary(now));
        Verdict { log, summary }
    }

    /// At end of stream: what was left out and not yet said.
    pub fn finish(&mut self, now: Instant) -> Option<Suppressed> {
        (self.suppressed.lines > 0).then(|| self.take_summary(now))
    }

    fn take_summary(&mut self, now: Instant) -> Suppressed {
        self.last_summary = now;
        std::mem::take(&mut self.suppressed)
    }
}

fn log_summary(s: Suppressed) {
    tracing::warn!(
        target: "sewa::evaluator",
        "{} lines / {} bytes of evaluator stderr suppressed (rate limit: {BURST_LINES} lines \
         then {LINES_PER_S} per second); its last {STDERR_LINES_KEPT} lines still reach error \
         messages",
        s.lines,
        s.bytes
    );
}

/// Relay `stderr` to the log and keep its last lines in `tail`; the returned receiver
/// disconnects once the pipe reached EOF and every line is in `tail`.
pub fn relay(stderr: std::process::ChildStderr, tail: Tail) -> Receiver<()> {
    let (eof_tx, eof_rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        let _eof = eof_tx; // dropped after the last line is stored
        let mut reader = std::io::BufReader::new(stderr);
        let mut limiter = Limiter::new(Instant::now());
        while let Ok(Some(read)) = read_line(&mut reader, MAX_STDERR_LINE, true) {
            let line = String::from_utf8_lossy(&read.bytes).into_owned();
            let verdict = limiter.admit(Instant::now(), read.bytes.len());
            if let Some(s) = verdict.summary {
                log_summary(s);
            }
            if verdict.log && read.redrawn {
                tracing::debug!(target: "sewa::evaluator", "{line}");
            } else if verdict.log {
                tracing::info!(target: "sewa::evaluator", "{line}");
            }
            if let Ok(mut t) = tail.lock() {
                if t.len() == STDERR_LINES_KEPT {
                    t.pop_front();
                }
                t.push_back(line);
            }
        }
        if let Some(s) = limiter.finish(Instant::now()) {
            log_summary(s);
        }
    });
    eof_rx
}

#[cfg(test)]
mod tests {
    use super::super::lines::read_bounded;
    use super::*;
    use std::io::BufReader;

    fn segments(text: &[u8], cap: usize) -> Vec<(String, bool)> {
        let mut r = BufReader::with_capacity(cap, text); // lines span several buffer fills
        std::iter::from_fn(|| read_bounded(&mut r, 8, true).unwrap())
            .map(|(l, cut)| (String::from_utf8(l).unwrap(), cut))
            .collect()
    }

    #[test]
    fn a_redrawn_line_is_told_apart_from_a_plain_one() {
        let text = b"plain\n 10%\r 50%\r100%\na\r\n";
        let mut r = BufReader::with_capacity(2, &text[..]);
        let mut next = || read_line(&mut r, 64, true).unwrap().map(|l| (l.bytes, l.redrawn));
        assert_eq!(next(), Some((b"plain".to_vec(), false)));
        assert_eq!(next(), Some((b"100%".to_vec(), true)));
        assert_eq!(next(), Some((b"a".to_vec(), false)), "\\r\\n is a line end, not a redraw");
        assert_eq!(next(), None);
    }

    #[test]
    fn a_progress_bar_is_its_last_frame_and_crlf_is_a_line_end() {
        let text = b"a\r\n 10%\r 50%\r100%\nplain\n0123456789\r ok\nx\rlast";
        for cap in [1, 3, 4, 64] {
            let got = segments(text, cap);
            let want =
                [("a", false), ("100%", false), ("plain", false), (" ok", false), ("last", false)];
            let want: Vec<(String, bool)> = want.iter().map(|(s, c)| (s.to_string(), *c)).collect();
            assert_eq!(got, want, "buffer of {cap}");
        }
        assert_eq!(segments(b"0123456789abc\n", 4), vec![("01234567".to_string(), true)]);
        assert_eq!(segments(b"", 4), vec![]);
    }

    #[test]
    fn a_flood_is_cut_to_a_burst_then_a_steady_rate_and_summarised() {
        let t0 = Instant::now();
        let mut l = Limiter::new(t0);
        // 100,000 short lines within one second: the burst and one second's refill get through.
        let mut logged = 0u64;
        let mut said = Suppressed::default();
        for i in 0..100_000u64 {
            let now = t0 + Duration::from_micros(i * 10);
            let v = l.admit(now, 10);
            logged += v.log as u64;
            if let Some(s) = v.summary {
                said.lines += s.lines;
                said.bytes += s.bytes;
            }
        }
        assert!((200..=221).contains(&logged), "{logged} lines logged");
        if let Some(s) = l.finish(t0 + Duration::from_secs(1)) {
            said.lines += s.lines;
            said.bytes += s.bytes;
        }
        assert_eq!(said.lines, 100_000 - logged, "every left-out line is counted once");
        assert_eq!(said.bytes, said.lines * 10);
        // After a quiet minute the burst is back, and the first line says what was left out.
        let mut l = Limiter::new(t0);
        for _ in 0..300 {
            let _ = l.admit(t0, 10);
        }
        let later = l.admit(t0 + Duration::from_secs(60), 10);
        assert_eq!(
            later,
            Verdict { log: true, summary: Some(Suppressed { lines: 100, bytes: 1000 }) }
        );
        assert_eq!(l.finish(t0 + Duration::from_secs(61)), None);
    }

    #[test]
    fn bytes_are_limited_too_and_a_long_line_is_not_starved() {
        let t0 = Instant::now();
        let mut l = Limiter::new(t0);
        // 64 KiB lines: four fit the byte burst, then one per two seconds.
        let big = 64 << 10;
        let first: u64 = (0..10).map(|_| l.admit(t0, big).log as u64).sum();
        assert_eq!(first, 4);
        assert!(!l.admit(t0 + Duration::from_secs(1), big).log);
        assert!(l.admit(t0 + Duration::from_secs(3), big).log);
        let mut l = Limiter::new(t0);
        assert!(l.admit(t0, 10 << 20).log, "longer than the burst, logged when it is full");
    }
}
