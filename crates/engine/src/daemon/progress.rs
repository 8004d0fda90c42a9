//! Whether the pipeline is making progress, for the systemd watchdog. The blocking pipeline
//! (and the async loop between batches) call `beat(allowed)` as they work: "alive now, and the
//! next beat comes within `allowed`". A task independent of the batch feeds the watchdog only
//! while the last promise holds, so a long selection keeps the service alive while a pipeline
//! stuck in one call (a blocked `open()`, an evaluator that never answers) stops the pings and
//! systemd restarts sewa. This module owns what counts as progress: the promise, how long a
//! unit of work may take (`stall_bound`, `allowance`), the objective wrapper that makes every
//! evaluator call a beat, and the watchdog feeder.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing::{error, info};

use crate::config::Config;
use crate::error::Result;
use crate::objective::config::{Kind, ObjectiveConfig};
use crate::objective::{Evaluation, MixEvaluation, Objective, Params};
use sewa_checkpoint::Checkpoint;

/// Added to the evaluator's own timeout for the default `[runtime] stall_s`.
const STALL_MARGIN: Duration = Duration::from_secs(60);
/// Slowest read or write rate (bytes/s) a healthy host is assumed to sustain: a unit of work
/// over N bytes may take `stall_s + N / IO_FLOOR` before it counts as stuck.
const IO_FLOOR: u64 = 25 << 20;

/// The pipeline's last promise of progress, shared by the blocking and the async side.
#[derive(Debug)]
pub struct Progress {
    start: Instant,
    /// Milliseconds after `start` by which the next beat is due. One atomic, so a reader never
    /// sees the time of one beat with the allowance of another.
    due_ms: AtomicU64,
    /// A publish is renaming files into place: a shutdown gives it a grace period.
    publishing: AtomicBool,
}

impl Progress {
    pub fn new(allowed: Duration) -> Progress {
        let p = Progress {
            start: Instant::now(),
            due_ms: AtomicU64::new(0),
            publishing: AtomicBool::new(false),
        };
        p.beat(allowed);
        p
    }

    /// Alive now; the next beat comes within `allowed`.
    pub fn beat(&self, allowed: Duration) {
        self.beat_at(Instant::now(), allowed);
    }

    fn beat_at(&self, now: Instant, allowed: Duration) {
        let allowed = u64::try_from(allowed.as_millis()).unwrap_or(u64::MAX);
        self.due_ms.store(self.ms(now).saturating_add(allowed), Ordering::Relaxed);
    }

    /// How long the due beat is overdue at `now`; `None` while the promise holds.
    pub fn overdue(&self, now: Instant) -> Option<Duration> {
        let late = self.ms(now).checked_sub(self.due_ms.load(Ordering::Relaxed))?;
        (late > 0).then(|| Duration::from_millis(late))
    }

    pub fn set_publishing(&self, on: bool) {
        self.publishing.store(on, Ordering::Relaxed);
    }

    pub fn publishing(&self) -> bool {
        self.publishing.load(Ordering::Relaxed)
    }

    fn ms(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.start).as_millis()).unwrap_or(u64::MAX)
    }
}

/// How long one unit of pipeline work may run before the pipeline counts as stuck (and the
/// watchdog is no longer fed): `[runtime] stall_s`, else 60 s plus, with an external
/// evaluator, the longer of its `timeout_s` and `startup_timeout_s` (one call or one start is
/// one unit of work, bounded by its own timeout). Work over checkpoint data gets
/// `bytes / IO_FLOOR` seconds more (`allowance`).
pub fn stall_bound(cfg: &Config) -> Duration {
    if let Some(s) = cfg.runtime.stall_s {
        return Duration::from_secs(s.0);
    }
    let evaluator = match &cfg.objective {
        Some(ObjectiveConfig { kind: Kind::Command(e), .. }) => {
            let c = e.command_config(Path::new("."));
            Duration::try_from_secs_f64(c.timeout_s.max(c.startup_timeout_s))
                .unwrap_or(Duration::MAX)
        }
        _ => Duration::ZERO,
    };
    STALL_MARGIN.saturating_add(evaluator)
}

/// About how many bytes loading `path` reads: its size, or for a checkpoint directory the
/// sizes of the files directly in it (entries' symlinks not followed).
pub fn disk_bytes(path: &Path) -> u64 {
    let Ok(meta) = std::fs::metadata(path) else { return 0 };
    if !meta.is_dir() {
        return meta.len();
    }
    let Ok(entries) = std::fs::read_dir(path) else { return 0 };
    let files = entries.flatten().filter_map(|e| e.metadata().ok()).filter(|m| m.is_file());
    files.map(|m| m.len()).sum()
}

/// How long a unit of work over about `bytes` of checkpoint data may take.
pub fn allowance(stall: Duration, bytes: u64) -> Duration {
    stall.saturating_add(Duration::from_secs(bytes / IO_FLOOR))
}

/// The objective, beating the progress promise around every call: a selection of many
/// evaluator calls is progress, one call that never returns is not.
pub struct Beating<'a> {
    pub inner: &'a mut dyn Objective,
    pub progress: &'a Progress,
    pub allowed: Duration,
}

impl Objective for Beating<'_> {
    fn evaluate(&mut self, params: &Params, want_grad: bool) -> Result<Evaluation> {
        self.progress.beat(self.allowed);
        let result = self.inner.evaluate(params, want_grad);
        self.progress.beat(self.allowed);
        result
    }

    fn supports_grad(&self) -> bool {
        self.inner.supports_grad()
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn check(&self, ckpt: &Checkpoint) -> Result<()> {
        self.inner.check(ckpt)
    }

    fn mixes(&self) -> bool {
        self.inner.mixes()
    }

    fn members_dtype(&mut self, dtype: Option<sewa_checkpoint::DType>) {
        self.inner.members_dtype(dtype)
    }

    fn retry_after(&self) -> Option<Duration> {
        self.inner.retry_after()
    }

    fn evaluate_mix(
        &mut self,
        members: &[&Checkpoint],
        alpha: &[f64],
        want_grad: bool,
    ) -> Result<MixEvaluation> {
        self.progress.beat(self.allowed);
        let result = self.inner.evaluate_mix(members, alpha, want_grad);
        self.progress.beat(self.allowed);
        result
    }
}

/// Send WATCHDOG=1 every `period` while `progress` holds its promise; once it does not, say so
/// (log and STATUS) and stop feeding, so systemd's WatchdogSec restarts sewa. Runs until
/// aborted, independent of the loop that waits on a batch.
pub async fn feed_watchdog(progress: Arc<Progress>, period: Duration) {
    let mut tick = super::interval(period);
    let mut stalled = false;
    loop {
        tick.tick().await;
        match progress.overdue(Instant::now()) {
            None => {
                if std::mem::take(&mut stalled) {
                    info!("the pipeline is making progress again; feeding the watchdog");
                }
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
            }
            Some(late) if !stalled => {
                stalled = true;
                error!(
                    late_s = late.as_secs_f64(),
                    "the pipeline is stuck (no progress within [runtime] stall_s); no longer \
                     feeding the systemd watchdog, so systemd restarts sewa"
                );
                let status = "stalled: no pipeline progress within [runtime] stall_s";
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Status(status)]);
            }
            Some(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_beat_holds_for_its_allowance_and_the_latest_beat_wins() {
        let p = Progress::new(Duration::from_secs(1));
        let t0 = p.start;
        p.beat_at(t0, Duration::from_secs(2));
        assert_eq!(p.overdue(t0 + Duration::from_millis(1999)), None);
        assert_eq!(p.overdue(t0 + Duration::from_secs(3)), Some(Duration::from_secs(1)));
        // A later beat with a shorter allowance replaces the longer promise.
        p.beat_at(t0 + Duration::from_secs(3), Duration::from_millis(100));
        assert_eq!(p.overdue(t0 + Duration::from_millis(3050)), None);
        assert!(p.overdue(t0 + Duration::from_millis(3200)).is_some());
        // A huge allowance saturates instead of wrapping into "overdue".
        p.beat_at(t0, Duration::MAX);
        assert_eq!(p.overdue(t0 + Duration::from_secs(86_400 * 365)), None);
    }
}
