//! `sewa watch`: the pipeline loop, read top to bottom. Hints from the watcher feed the settler;
//! settled candidates go, in batches, to the blocking `Pipeline` (load → window → select →
//! average → publish → status). Around it: rescans (start, overflow, errors, slow timer),
//! SIGHUP reload, systemd notifications and a shutdown that never leaves a torn output.
//! Only I/O orchestration lives here; decisions are in `watch::settler`, `window`, `select`.

mod hook;
mod load;
mod loudness;
mod output;
mod pipeline;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{error, info, warn};

pub use output::{LastPublished, read_last};
pub use pipeline::Pipeline;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::watch::{self, Filter, Hint, Settler, Sig};

/// How long a shutdown waits for an in-flight publish before leaving (the output is old or
/// new either way: publishing renames a complete file into place).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(4);
/// Hints queued between the notify thread and the loop; beyond it, hints are dropped and a
/// rescan is scheduled.
const HINT_QUEUE: usize = 4096;

/// Options of one daemon run.
#[derive(Default)]
pub struct RunOptions {
    /// Config file to re-read on SIGHUP (None: no reload, e.g. in-process use).
    pub config_path: Option<PathBuf>,
    /// Talk to systemd (READY, STATUS, WATCHDOG) when NOTIFY_SOCKET is set.
    pub systemd: bool,
}

/// Watch, select and publish until `shutdown` resolves. Errors only for fatal problems
/// (the watcher cannot start, a blocking task panicked); bad checkpoints never stop it.
pub async fn run(cfg: Config, opts: RunOptions, shutdown: impl Future<Output = ()>) -> Result<()> {
    tokio::pin!(shutdown);
    claim_output(&cfg, &opts)?;
    let mut sighup = hangup_stream(opts.config_path.is_some())?;
    let (tx, mut rx) = mpsc::channel(HINT_QUEUE);
    let mut front = Front::start(&cfg, tx)?;
    let mut rescan_every = interval(Duration::from_secs(cfg.watch.rescan_s.0));
    let mut watchdog = interval(watchdog_period(opts.systemd));
    let mut pipeline = Pipeline::new(cfg);
    pipeline.set_state("watching");
    front.rescan(&mut pipeline, "start-up");
    info!(dir = %front.filter.dir().display(), "watching");
    notify(opts.systemd, &[sd_notify::NotifyState::Ready]);
    loop {
        let wake = front.settler.next_deadline().map(Instant::from_std);
        let wake = wake.unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        tokio::select! {
            _ = &mut shutdown => break,
            Some(hint) = rx.recv() => front.on_hint(hint, &mut pipeline),
            _ = tokio::time::sleep_until(wake) => {}
            _ = rescan_every.tick() => front.rescan(&mut pipeline, "periodic"),
            _ = watchdog.tick() => notify(opts.systemd, &[sd_notify::NotifyState::Watchdog]),
            Some(()) = sighup.recv() => front.reload(opts.config_path.as_deref(), &mut pipeline),
        }
        if front.watch.overflowed.swap(false, Ordering::Relaxed) {
            front.rescan(&mut pipeline, "hint queue full");
        }
        let batch = front.settler.poll(std::time::Instant::now(), Sig::of);
        if batch.is_empty() {
            continue;
        }
        pipeline = match run_batch(pipeline, batch, &mut shutdown).await? {
            Some(p) => p,
            None => return Ok(()), // stopped mid-batch; the output is old or new
        };
        let members = pipeline.window.members().len();
        let status = format!("{members} members, {} published", pipeline.status.counters.publishes);
        notify(opts.systemd, &[sd_notify::NotifyState::Status(&status)]);
    }
    info!("stopping");
    notify(opts.systemd, &[sd_notify::NotifyState::Stopping]);
    pipeline.set_state("stopped");
    Ok(())
}

/// Take the output's lock for the life of the process (a second daemon or a `sewa average` on
/// the same output is refused: a config error, which systemd does not restart), then clean up
/// what a previous run killed mid-publish (OOM, SIGKILL) left of the output.
fn claim_output(cfg: &Config, opts: &RunOptions) -> Result<()> {
    let lock =
        crate::publish::hold(&cfg.publish.out).map_err(|e| match (e, &opts.config_path) {
            (Error::Usage(msg), Some(path)) => Error::config(path, msg),
            (e, _) => e,
        })?;
    for done in crate::publish::recover(&lock) {
        warn!(%done, "cleaned up after an interrupted publish");
    }
    Ok(())
}

/// Run one batch on a blocking thread. On shutdown, give an in-flight publish a grace period
/// and return `None`.
async fn run_batch(
    mut p: Pipeline,
    batch: Vec<watch::Settled>,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<Option<Pipeline>> {
    let job = tokio::task::spawn_blocking(move || {
        p.step(batch);
        p
    });
    tokio::pin!(job);
    tokio::select! {
        done = &mut job => Ok(Some(done.map_err(panicked)?)),
        _ = shutdown.as_mut() => {
            info!("stopping: waiting for the in-flight publish");
            if let Ok(Ok(mut p)) = tokio::time::timeout(SHUTDOWN_GRACE, job).await {
                p.set_state("stopped");
            }
            Ok(None)
        }
    }
}

/// The async half's state: which entries are candidates, the running watcher and the settler.
struct Front {
    filter: Filter,
    watch: watch::Watch,
    settler: Settler,
    tx: mpsc::Sender<Hint>,
}

impl Front {
    fn start(cfg: &Config, tx: mpsc::Sender<Hint>) -> Result<Front> {
        let filter = Filter::new(cfg);
        let watch = watch::start(filter.clone(), cfg.watch.poll_interval_ms, tx.clone())?;
        let settler = Settler::new(Duration::from_millis(cfg.watch.quiet_ms));
        Ok(Front { filter, watch, settler, tx })
    }

    fn on_hint(&mut self, hint: Hint, p: &mut Pipeline) {
        match hint {
            Hint::Candidate(path) => {
                let sig = Sig::of(&path);
                self.settler.hint(path, sig, std::time::Instant::now());
            }
            Hint::Rescan(why) => {
                warn!(%why, "rescanning");
                p.note_error(why.clone());
                self.rescan(p, &why);
            }
        }
    }

    /// Hint every current candidate (the settler waits out the quiet period for each).
    fn rescan(&mut self, p: &mut Pipeline, why: &str) {
        p.status.counters.rescans += 1;
        match self.filter.scan() {
            Ok(paths) => {
                let now = std::time::Instant::now();
                for path in paths {
                    let sig = Sig::of(&path);
                    self.settler.hint(path, sig, now);
                }
                tracing::debug!(%why, "rescan");
            }
            Err(e) => {
                error!(error = %e, %why, "rescan failed");
                p.note_error(e.to_string());
            }
        }
    }

    /// SIGHUP: re-read the config; a new watcher must start before anything changes.
    fn reload(&mut self, path: Option<&std::path::Path>, p: &mut Pipeline) {
        let Some(new) = reload(path, p) else { return };
        match Front::start(&new, self.tx.clone()) {
            Ok(front) => {
                *self = front;
                p.reload(new);
                self.rescan(p, "config reload");
            }
            Err(e) => {
                error!(error = %e, "reload refused; keeping the running configuration");
                p.note_error(format!("reload refused: {e}"));
            }
        }
    }
}

/// Re-read the config; on error keep the old one and say so.
fn reload(path: Option<&std::path::Path>, p: &mut Pipeline) -> Option<Config> {
    let path = path?;
    match Config::load(path) {
        Ok(new) => {
            info!(config = %path.display(), "configuration reloaded");
            Some(new)
        }
        Err(e) => {
            error!(error = %e, "reload failed; keeping the running configuration");
            p.note_error(format!("reload failed: {e}"));
            None
        }
    }
}

fn hangup_stream(enabled: bool) -> Result<mpsc::Receiver<()>> {
    let (tx, rx) = mpsc::channel(1);
    if enabled {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup =
            signal(SignalKind::hangup()).map_err(|e| Error::Internal(format!("SIGHUP: {e}")))?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                let _ = tx.try_send(());
            }
        });
    } else {
        std::mem::forget(tx); // keep the channel open so recv() pends forever
    }
    Ok(rx)
}

fn interval(period: Duration) -> tokio::time::Interval {
    let mut i = tokio::time::interval_at(Instant::now() + period, period);
    i.set_missed_tick_behavior(MissedTickBehavior::Delay);
    i
}

/// Half the systemd watchdog period, or a day when there is none.
fn watchdog_period(systemd: bool) -> Duration {
    let mut usec = 0u64;
    if systemd && sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        Duration::from_micros(usec / 2)
    } else {
        Duration::from_secs(86_400)
    }
}

fn notify(enabled: bool, state: &[sd_notify::NotifyState<'_>]) {
    if enabled {
        let _ = sd_notify::notify(false, state);
    }
}

fn panicked(e: tokio::task::JoinError) -> Error {
    Error::Internal(format!("the pipeline thread failed: {e}"))
}

/// Resolves on SIGTERM or SIGINT (for the CLI; in-process users pass their own future).
pub async fn termination() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
        }
        _ => std::future::pending().await,
    }
}
