//! `sewa watch`: the pipeline loop, read top to bottom. Hints from the watcher feed the settler;
//! settled candidates go, in batches, to the blocking `Pipeline` (load → window → select →
//! average → publish → status), once the watched directory exists (it is waited for). Around
//! it: rescans (start, overflow, errors, slow timer), SIGHUP reload (also run on the blocking
//! side), systemd notifications with a watchdog fed from its own task while the pipeline makes
//! progress (`progress`), a panic policy
//! (`contain`) and a shutdown that never leaves a torn output.
//! Only I/O orchestration lives here; decisions are in `watch::settler`, `window`, `select`.

mod accept;
mod budget;
pub mod descriptors;
mod disk;
mod hook;
mod load;
mod loudness;
mod output;
mod panics;
mod pipeline;
mod policy;
mod progress;
mod sides;
mod status_view;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{error, info, warn};

pub use output::{LastPublished, PublishedInput, read_last};
pub use pipeline::Pipeline;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::status::State;
use crate::watch::{self, Filter, Hint, Settler};
use sewa_checkpoint::Identity;

/// How long a shutdown waits for a publish in flight before leaving (the output is old or
/// new either way: publishing renames a complete file into place). Other work is abandoned.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(4);
/// While waiting for the watched directory to appear: the first poll interval, doubled up to
/// the last (a trainer started right after sewa is seen quickly, a late one costs little).
const DIR_POLL_FIRST: Duration = Duration::from_millis(100);
const DIR_POLL_MAX: Duration = Duration::from_secs(2);
/// Hints queued between the notify thread and the loop; beyond it, hints are dropped and a
/// rescan is scheduled.
const HINT_QUEUE: usize = 4096;

/// Builds the configuration again on SIGHUP: the config file with the command line's
/// overrides applied and checked, so an override (`--dir`) survives every reload. It runs on a
/// blocking thread (it reads files), so it is shared with that thread.
pub type Reload = std::sync::Arc<dyn Fn() -> Result<Config> + Send + Sync>;

/// Set by the `sewa` binary's own SIGHUP handler, installed first thing in `main` (SIGHUP's
/// default action kills, and the daemon's handler exists only once the runtime runs): a
/// SIGHUP that arrived before the daemon could handle it. Read once the daemon's handler is
/// installed, and answered with one reload, so it is neither fatal nor lost.
pub static EARLY_HANGUP: AtomicBool = AtomicBool::new(false);

/// Options of one daemon run.
#[derive(Default)]
pub struct RunOptions {
    /// How SIGHUP re-reads the configuration (None: no reload, e.g. in-process use).
    pub reload: Option<Reload>,
    /// Talk to systemd (READY, STATUS, WATCHDOG) when NOTIFY_SOCKET is set.
    pub systemd: bool,
}

/// Watch, select and publish until `shutdown` resolves. Errors only for fatal problems
/// (the watcher cannot start, the pipeline panicked); bad checkpoints never stop it.
pub async fn run(cfg: Config, opts: RunOptions, shutdown: impl Future<Output = ()>) -> Result<()> {
    tokio::pin!(shutdown);
    let lock = hold_output(&cfg)?;
    let mut sighup = hangup_stream(opts.reload.is_some())?;
    let (tx, mut rx) = mpsc::channel(HINT_QUEUE);
    let mut pipeline = Pipeline::new(cfg);
    // Before anything slow (cleaning up after an interrupted publish, starting the watcher,
    // the first scan): `sewa status` answers "starting" from here on, not "no status file".
    pipeline.write_status();
    if recover_output(&lock) {
        pipeline.reread_published(); // the recovery may have completed the output's manifest
    }
    // Fed from its own task: a long batch keeps the service alive, a stuck one does not.
    let _watchdog = watchdog_period(opts.systemd).map(|period| {
        Aborting(tokio::spawn(progress::feed_watchdog(pipeline.progress.clone(), period)))
    });
    if !wait_for_dir(&mut pipeline, opts.systemd, &mut shutdown).await? {
        pipeline.set_state(State::Stopped);
        return Ok(());
    }
    let mut front = Front::start(&pipeline.cfg, tx)?;
    let mut rescan_every = interval(Duration::from_secs(pipeline.cfg.watch.rescan_s.0));
    pipeline.set_state(State::Watching);
    front.rescan(&mut pipeline, "start-up");
    info!(dir = %front.filter.dir().display(), "watching");
    notify(opts.systemd, &[sd_notify::NotifyState::Ready]);
    loop {
        pipeline.alive();
        let next = [front.settler.next_deadline(), pipeline.retry_at()].into_iter().flatten().min();
        let wake = next.map(Instant::from_std);
        let wake = wake.unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        let mut hangup = false;
        tokio::select! {
            _ = &mut shutdown => break,
            Some(hint) = rx.recv() => front.on_hint(hint, &mut pipeline),
            _ = tokio::time::sleep_until(wake) => {}
            _ = rescan_every.tick() => front.rescan(&mut pipeline, "periodic"),
            Some(()) = sighup.recv() => hangup = true,
        }
        if hangup && let Some(reload) = opts.reload.as_ref() {
            let Some(built) = rebuild(reload, &mut shutdown).await else { break };
            if let Some(new) = front.reload(built, &mut pipeline) {
                // Selection, evaluator start-up and publishing run on the blocking side, as
                // batches do.
                let Some(p) = run_job(pipeline, move |p| p.reload(new), &mut shutdown).await?
                else {
                    return Ok(()); // stopped mid-reload; the output is old or new
                };
                pipeline = p;
                front.rescan(&mut pipeline, "config reload");
            }
        }
        if front.watch.overflowed.swap(false, Ordering::Relaxed) {
            front.rescan(&mut pipeline, "hint queue full");
        }
        let batch = front.settler.poll(std::time::Instant::now(), Identity::stat);
        // A selection that failed for a passing reason (the evaluator) is tried again once its
        // backoff is over, whether or not a new checkpoint came.
        if batch.is_empty() && !pipeline.retry_due(std::time::Instant::now()) {
            continue;
        }
        pipeline = match run_job(pipeline, move |p| p.step(batch), &mut shutdown).await? {
            Some(p) => p,
            None => return Ok(()), // stopped mid-batch; the output is old or new
        };
        let members = pipeline.window.members().len();
        let status = format!("{members} members, {} published", pipeline.status.counters.publishes);
        notify(opts.systemd, &[sd_notify::NotifyState::Status(&status)]);
    }
    info!("stopping");
    notify(opts.systemd, &[sd_notify::NotifyState::Stopping]);
    pipeline.stop();
    Ok(())
}

/// Wait for `[watch] dir` to exist: the sidecar may start before the trainer creates it.
/// Logged once; the status file and systemd (READY, so a start timeout does not kill the wait)
/// say so, the watchdog stays fed. A SIGHUP meanwhile is applied once the wait is over.
/// `false`: shutdown came first.
async fn wait_for_dir(
    p: &mut Pipeline,
    systemd: bool,
    shutdown: &mut Pin<&mut impl Future<Output = ()>>,
) -> Result<bool> {
    let dir = p.cfg.watch.dir.clone();
    if dir.is_dir() {
        return Ok(true);
    }
    info!(dir = %dir.display(), "waiting for the watched directory to appear");
    p.set_state(State::WaitingForDir);
    let status = format!("waiting for {}", dir.display());
    notify(systemd, &[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(&status)]);
    let mut pause = DIR_POLL_FIRST;
    loop {
        p.alive();
        tokio::select! {
            _ = shutdown.as_mut() => return Ok(false),
            _ = tokio::time::sleep(pause) => {}
        }
        match std::fs::metadata(&dir) {
            Ok(m) if m.is_dir() => {
                info!(dir = %dir.display(), "the watched directory appeared");
                return Ok(true);
            }
            Ok(_) => {
                let msg = format!("[watch] dir {} appeared but is not a directory", dir.display());
                return Err(Error::config(p.cfg.source.as_deref().unwrap_or(&dir), msg));
            }
            Err(_) => pause = (pause * 2).min(DIR_POLL_MAX),
        }
    }
}

/// Take the output's lock for the life of the process (a second daemon or a `sewa average` on
/// the same output is refused: a config error, which systemd does not restart). The status
/// file is written only once it is held: it is the running daemon's, not a refused second's.
fn hold_output(cfg: &Config) -> Result<crate::publish::OutputLock> {
    crate::publish::hold(&cfg.publish.out).map_err(|e| match (e, &cfg.source) {
        (Error::Usage(msg), Some(path)) => Error::config(path, msg),
        (e, _) => e,
    })
}

/// Clean up what a previous run killed mid-publish (OOM, SIGKILL) left of the output; whether
/// anything was done.
fn recover_output(lock: &crate::publish::OutputLock) -> bool {
    let done = crate::publish::recover(lock);
    for done in &done {
        warn!(%done, "cleaned up after an interrupted publish");
    }
    !done.is_empty()
}

/// SIGHUP: build the configuration again on a blocking thread — it reads the config file and
/// runs the start-up checks on disk, and a slow file (NFS, a FIFO swapped in) must not hold
/// the async worker, which answers SIGTERM. `None`: a shutdown came first (the build, if
/// stuck, is left behind; it changes nothing).
async fn rebuild(
    reload: &Reload,
    shutdown: &mut Pin<&mut impl Future<Output = ()>>,
) -> Option<Result<Config>> {
    let build = reload.clone();
    let task = tokio::task::spawn_blocking(move || build());
    tokio::select! {
        built = task => Some(built.unwrap_or_else(|e| {
            Err(Error::Internal(format!("the configuration could not be rebuilt: {e}")))
        })),
        _ = shutdown.as_mut() => None,
    }
}

/// Run `job` on the pipeline on a blocking thread, so loads, selections, evaluator start-up
/// and publishing never hold the async worker (signals, hints, the watchdog task). On shutdown
/// a publish in flight gets a grace period and other work is abandoned: `None` either way.
async fn run_job(
    p: Pipeline,
    job: impl FnOnce(&mut Pipeline) + Send + 'static,
    shutdown: &mut Pin<&mut impl Future<Output = ()>>,
) -> Result<Option<Pipeline>> {
    let progress = p.progress.clone();
    let task = tokio::task::spawn_blocking(move || contain(p, job));
    tokio::pin!(task);
    tokio::select! {
        done = &mut task => done.map_err(panicked)?.map(Some),
        _ = shutdown.as_mut() => {
            if progress.publishing() {
                info!("stopping: waiting for the in-flight publish");
                if let Ok(Ok(Ok(mut p))) = tokio::time::timeout(SHUTDOWN_GRACE, task).await {
                    p.stop();
                }
            } else {
                info!("stopping: abandoning the work in progress (nothing is being published)");
            }
            Ok(None)
        }
    }
}

/// Run `job`. One checkpoint's panics are caught where it is loaded; a panic anywhere else
/// (selection, averaging, publishing) leaves the pipeline's state suspect, so the daemon stops
/// with the message, noted in the status file first. Publishing renames complete files into
/// place, so the last complete publication stays; the service manager restarts sewa.
fn contain(mut p: Pipeline, job: impl FnOnce(&mut Pipeline)) -> Result<Pipeline> {
    // AssertUnwindSafe: after a panic `p` is only used to write the status file, then dropped.
    match panics::catch(AssertUnwindSafe(|| job(&mut p))) {
        Ok(()) => Ok(p),
        Err(msg) => {
            let msg = format!(
                "the pipeline panicked (a bug in sewa, please report it): {msg}; the last \
                 complete publication stays at {}; stopping",
                p.cfg.publish.out.display()
            );
            let _ = panics::catch(AssertUnwindSafe(|| p.record_failure(&msg)));
            Err(Error::Internal(msg))
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
                self.follow(&path);
                let sig = Identity::stat(&path);
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
                self.watch.prune(&paths);
                let now = std::time::Instant::now();
                for path in paths {
                    self.follow(&path);
                    let sig = Identity::stat(&path);
                    self.settler.hint(path, sig, now);
                }
                tracing::debug!(%why, dirs = self.watch.followed(), "rescan");
            }
            Err(e) => {
                error!(error = %e, %why, "rescan failed");
                p.note_error(e.to_string());
            }
        }
    }

    /// Watch a candidate directory's files; without the watch, rescans still find them.
    fn follow(&mut self, path: &std::path::Path) {
        if let Err(e) = self.watch.follow(path) {
            warn!(error = %e, "candidate directory not watched; rescans will see its files");
        }
    }

    /// SIGHUP, with the configuration built again: a new watcher must start before anything
    /// changes. Returns the configuration for the pipeline to take on.
    fn reload(&mut self, built: Result<Config>, p: &mut Pipeline) -> Option<Config> {
        let new = match built {
            Ok(new) => new,
            Err(e) => {
                error!(error = %e, "reload failed; keeping the running configuration");
                p.note_error(format!("reload failed: {e}"));
                return None;
            }
        };
        let source = new.source.as_deref().unwrap_or(std::path::Path::new("?"));
        info!(config = %source.display(), dir = %new.watch.dir.display(), "configuration reloaded");
        match Front::start(&new, self.tx.clone()) {
            Ok(front) => {
                *self = front;
                Some(new)
            }
            Err(e) => {
                error!(error = %e, "reload refused; keeping the running configuration");
                p.note_error(format!("reload refused: {e}"));
                None
            }
        }
    }
}

/// Aborts its task when dropped (the watchdog feeder must not outlive `run`).
struct Aborting(tokio::task::JoinHandle<()>);

impl Drop for Aborting {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn hangup_stream(enabled: bool) -> Result<mpsc::Receiver<()>> {
    let (tx, rx) = mpsc::channel(1);
    if enabled {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup =
            signal(SignalKind::hangup()).map_err(|e| Error::Internal(format!("SIGHUP: {e}")))?;
        if EARLY_HANGUP.swap(false, Ordering::SeqCst) {
            info!("a SIGHUP came during start-up: reloading the configuration");
            let _ = tx.try_send(());
        }
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

/// Half the systemd watchdog period, when systemd asks for a watchdog.
fn watchdog_period(systemd: bool) -> Option<Duration> {
    let mut usec = 0u64;
    let on = systemd && sd_notify::watchdog_enabled(false, &mut usec) && usec > 0;
    on.then(|| Duration::from_micros(usec / 2))
}

fn notify(enabled: bool, state: &[sd_notify::NotifyState<'_>]) {
    if enabled {
        let _ = sd_notify::notify(false, state);
    }
}

fn panicked(e: tokio::task::JoinError) -> Error {
    Error::Internal(format!("the pipeline thread failed: {e}"))
}

/// A future that resolves on SIGTERM or SIGINT (for the CLI; in-process users pass their
/// own). The handlers are installed here, when it is called (inside the runtime), not when the
/// future is first polled: the daemon logs before its first wait, and a SIGTERM sent on seeing
/// that line used to find no handler and kill it with the default action.
pub fn termination() -> Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let fail = |e: std::io::Error| Error::Internal(format!("cannot handle SIGTERM/SIGINT: {e}"));
    let mut term = signal(SignalKind::terminate()).map_err(fail)?;
    let mut int = signal(SignalKind::interrupt()).map_err(fail)?;
    Ok(async move {
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(dir: &std::path::Path) -> Pipeline {
        let out = dir.join("out/model.safetensors");
        let text = format!("[watch]\ndir = {dir:?}\n[publish]\nout = {out:?}\n");
        let cfg = Config::parse(&text, &dir.join("sewa.toml")).unwrap();
        std::fs::create_dir_all(cfg.status_file().parent().unwrap()).unwrap();
        Pipeline::new(cfg)
    }

    #[test]
    fn a_panic_outside_one_checkpoint_stops_with_its_message_recorded_in_the_status() {
        let dir = tempfile::tempdir().unwrap();
        let p = pipeline(dir.path());
        let status_file = p.cfg.status_file();
        let err = contain(p, |_| panic!("index out of bounds: the len is 2 but the index is 7"));
        let msg = err.err().expect("a panic is an error").to_string();
        assert!(msg.contains("index out of bounds") && msg.contains("bug"), "{msg}");
        assert!(msg.contains("out/model.safetensors"), "names what stays published: {msg}");
        let status = crate::status::Status::read(&status_file).unwrap();
        assert_eq!(status.state, State::Failed);
        assert!(status.errors.iter().any(|e| e.message.contains("index out of bounds")));
        // A job that returns hands the pipeline back.
        let p = contain(pipeline(dir.path()), |p| p.set_state(State::Watching)).unwrap();
        assert_eq!(p.status.state, State::Watching);
    }
}
