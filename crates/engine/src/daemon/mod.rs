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
mod metrics;
mod output;
mod panics;
mod pipeline;
mod policy;
mod progress;
mod restart;
mod sides;
mod status_view;
mod tensorboard;

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
///
/// The async worker only waits: every file-system call (the output's lock, stats of
/// candidates, rescans, starting a watcher, status writes) runs on the blocking pool, so a
/// hung `stat` on a network file system never holds signals (SIGTERM is answered at once,
/// abandoning the stuck call) and the watchdog is fed only while work finishes.
pub async fn run(cfg: Config, opts: RunOptions, shutdown: impl Future<Output = ()>) -> Result<()> {
    tokio::pin!(shutdown);
    let mut sighup = hangup_stream(opts.reload.is_some())?;
    let (tx, mut rx) = mpsc::channel(HINT_QUEUE);
    let (endpoint, _server) = match metrics_endpoint(&cfg).await {
        Some((endpoint, task)) => (Some(endpoint), Some(Aborting(task))),
        None => (None, None),
    };
    let started = off_worker(move || start_pipeline(cfg, endpoint), &mut shutdown).await?;
    let Some(started) = started else { return Ok(()) };
    // Held for the life of the process.
    let (_lock, mut pipeline) = started?;
    // Fed from its own task: a long batch keeps the service alive, a stuck one does not.
    let _watchdog = watchdog_period(opts.systemd).map(|period| {
        Aborting(tokio::spawn(progress::feed_watchdog(pipeline.progress.clone(), period)))
    });
    let Some(p) = wait_for_dir(pipeline, opts.systemd, &mut shutdown).await? else {
        return Ok(());
    };
    pipeline = p;
    let start = {
        let cfg = pipeline.cfg.clone();
        off_worker(move || Front::start(&cfg, tx), &mut shutdown).await?
    };
    let Some(start) = start else { return stopped(pipeline).await };
    let mut front = start?;
    let mut rescan_every = interval(rescan_period(&pipeline.cfg));
    let Some(p) = run_job(pipeline, |p| p.set_state(State::Watching), &mut shutdown).await? else {
        return Ok(());
    };
    pipeline = p;
    let mut work = Work { rescans: vec!["start-up".into()], ..Work::default() };
    let Some((f, report)) = front_job(front, work, &mut shutdown).await? else {
        return stopped(pipeline).await;
    };
    front = f;
    // What the start-up scan counted and found wrong reaches the pipeline (the status file)
    // with the first trip's report; its candidates wait out their quiet period in the settler.
    let mut carried = report;
    info!(dir = %front.filter.dir().display(), "watching");
    notify(opts.systemd, &[sd_notify::NotifyState::Ready]);
    loop {
        pipeline.alive();
        work = Work::default();
        let next = [front.settler.next_deadline(), pipeline.retry_at()].into_iter().flatten().min();
        let wake = next.map(Instant::from_std);
        let wake = wake.unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        let mut hangup = false;
        if carried.is_empty() {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(hint) = rx.recv() => {
                    work.hints.push(hint);
                    while work.hints.len() < HINT_BATCH && let Ok(h) = rx.try_recv() {
                        work.hints.push(h);
                    }
                }
                _ = tokio::time::sleep_until(wake) => {}
                _ = rescan_every.tick() => work.rescans.push("periodic".into()),
                Some(()) = sighup.recv() => hangup = true,
            }
        }
        if hangup && let Some(reload) = opts.reload.as_ref() {
            let Some(built) = rebuild(reload, front.tx.clone(), &mut shutdown).await else { break };
            match built {
                Err(e) => {
                    error!(error = %e, "reload failed; keeping the running configuration");
                    carried.errors.push(format!("reload failed: {e}"));
                }
                Ok((_, Err(e))) => {
                    error!(error = %e, "reload refused; keeping the running configuration");
                    carried.errors.push(format!("reload refused: {e}"));
                }
                Ok((new, Ok(started))) => {
                    let source = new.source.as_deref().unwrap_or(std::path::Path::new("?"));
                    let dir = new.watch.dir.display();
                    info!(config = %source.display(), %dir, "configuration reloaded");
                    let waiting = restart::needs_restart(&pipeline.cfg, &new);
                    if !waiting.is_empty() {
                        let keys = waiting.join(", ");
                        warn!(keys = %keys, "changed keys that apply only after a restart: {keys}");
                    }
                    if new.watch.rescan_s != pipeline.cfg.watch.rescan_s {
                        rescan_every = interval(rescan_period(&new));
                    }
                    // The old watcher stops as it is dropped: on the blocking pool, as its
                    // thread is joined.
                    let old = std::mem::replace(&mut front, started);
                    drop(tokio::task::spawn_blocking(move || drop(old)));
                    // Selection, evaluator start-up and publishing run on the blocking side,
                    // as batches do.
                    let Some(p) = run_job(pipeline, move |p| p.reload(new), &mut shutdown).await?
                    else {
                        return Ok(()); // stopped mid-reload; the output is old or new
                    };
                    pipeline = p;
                    work.rescans.push("config reload".into());
                }
            }
        }
        if front.watch.overflowed.swap(false, Ordering::Relaxed) {
            work.rescans.push("hint queue full".into());
        }
        let Some((f, report)) = front_job(front, work, &mut shutdown).await? else { break };
        front = f;
        carried.absorb(report);
        let done = std::mem::take(&mut carried);
        pipeline.status.counters.rescans += done.rescans;
        // A selection that failed for a passing reason (the evaluator) is tried again once its
        // backoff is over, whether or not a new checkpoint came.
        let step = !done.batch.is_empty() || pipeline.retry_due(std::time::Instant::now());
        if !step && done.errors.is_empty() {
            continue;
        }
        let job = move |p: &mut Pipeline| {
            for e in done.errors {
                p.note_error(e);
            }
            if step {
                p.step(done.batch);
            }
        };
        pipeline = match run_job(pipeline, job, &mut shutdown).await? {
            Some(p) => p,
            None => return Ok(()), // stopped mid-batch; the output is old or new
        };
        if step {
            let members = pipeline.window.members().len();
            let publishes = pipeline.status.counters.publishes;
            let status = format!("{members} members, {publishes} published");
            notify(opts.systemd, &[sd_notify::NotifyState::Status(&status)]);
        }
    }
    info!("stopping");
    notify(opts.systemd, &[sd_notify::NotifyState::Stopping]);
    stopped(pipeline).await
}

/// Hints taken from the queue at once, for one trip to the blocking pool.
const HINT_BATCH: usize = 256;

/// The output's lock, then the pipeline (it reads the published manifest) with its first
/// status file — `sewa status` answers "starting" from here on, not "no status file" — and the
/// clean-up after an interrupted publish. On the blocking pool: all of it touches files.
fn start_pipeline(
    cfg: Config,
    metrics: Option<metrics::Endpoint>,
) -> Result<(crate::publish::OutputLock, Pipeline)> {
    let lock = hold_output(&cfg)?;
    let wanted = cfg.runtime.metrics_addr.map(|a| a.0);
    let mut pipeline = Pipeline::new(cfg);
    if let (Some(addr), None) = (wanted, &metrics) {
        pipeline.status.push_error(format!("[runtime] metrics_addr {addr}: cannot listen"));
    }
    pipeline.set_metrics(metrics);
    pipeline.write_status();
    if recover_output(&lock) {
        pipeline.reread_published(); // the recovery may have completed the output's manifest
    }
    Ok((lock, pipeline))
}

/// `[runtime] metrics_addr`: the endpoint bound and served (a tokio task), before the pipeline
/// starts so the status names its address. A bind failure (the port is taken) is logged and
/// the daemon runs without it: figures are not worth stopping the averaging for.
async fn metrics_endpoint(
    cfg: &Config,
) -> Option<(metrics::Endpoint, tokio::task::JoinHandle<()>)> {
    let addr = cfg.runtime.metrics_addr?.0;
    match metrics::serve(addr).await {
        Ok(served) => Some(served),
        Err(e) => {
            error!(error = %e, %addr, "[runtime] metrics_addr: cannot listen; no metrics endpoint");
            None
        }
    }
}

/// The status file says "stopping" while the pipeline's evaluators stop, then "stopped" (on the
/// blocking pool, waited for at most `SHUTDOWN_GRACE`: a hung file system or evaluator must not
/// hold the exit; evaluators still running then are ended at exit).
async fn stopped(mut pipeline: Pipeline) -> Result<()> {
    let write = tokio::task::spawn_blocking(move || pipeline.stop());
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, write).await;
    Ok(())
}

/// `[watch] rescan_s` as the timer's period.
fn rescan_period(cfg: &Config) -> Duration {
    Duration::from_secs(cfg.watch.rescan_s.0)
}

/// Run blocking file-system `work` on the blocking pool. `None`: a shutdown came first (the
/// work, if stuck, is left behind; it changes nothing the daemon still needs).
async fn off_worker<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
    shutdown: &mut Pin<&mut impl Future<Output = ()>>,
) -> Result<Option<T>> {
    let task = tokio::task::spawn_blocking(work);
    tokio::select! {
        done = task => done.map(Some).map_err(panicked),
        _ = shutdown.as_mut() => Ok(None),
    }
}

/// What the front end does in one trip to the blocking pool, in this order: hints as they
/// came, rescans, then the settler's poll (which stats candidates whose quiet period is over).
#[derive(Default)]
struct Work {
    hints: Vec<Hint>,
    rescans: Vec<String>,
}

/// What that trip found, for the pipeline: rescans done, errors for the status file, settled
/// candidates.
#[derive(Default)]
struct Report {
    rescans: u64,
    errors: Vec<String>,
    batch: Vec<watch::Settled>,
}

impl Report {
    fn is_empty(&self) -> bool {
        self.rescans == 0 && self.errors.is_empty() && self.batch.is_empty()
    }

    fn absorb(&mut self, other: Report) {
        self.rescans += other.rescans;
        self.errors.extend(other.errors);
        self.batch.extend(other.batch);
    }
}

/// Run `work` with the front end on the blocking pool and hand both back; `None` on shutdown.
async fn front_job(
    mut front: Front,
    work: Work,
    shutdown: &mut Pin<&mut impl Future<Output = ()>>,
) -> Result<Option<(Front, Report)>> {
    off_worker(
        move || {
            let report = front.run(work);
            (front, report)
        },
        shutdown,
    )
    .await
}

/// Wait for `[watch] dir` to exist: the sidecar may start before the trainer creates it.
/// Logged once; the status file and systemd (READY, so a start timeout does not kill the wait)
/// say so, the watchdog stays fed. A SIGHUP meanwhile is applied once the wait is over.
/// `None`: shutdown came first. The directory is looked at on the blocking pool.
async fn wait_for_dir(
    p: Pipeline,
    systemd: bool,
    shutdown: &mut Pin<&mut impl Future<Output = ()>>,
) -> Result<Option<Pipeline>> {
    let dir = p.cfg.watch.dir.clone();
    let look = |dir: &std::path::Path| {
        let dir = dir.to_path_buf();
        move || std::fs::metadata(&dir).map(|m| m.is_dir())
    };
    match off_worker(look(&dir), shutdown).await? {
        None => return Ok(None),
        Some(Ok(true)) => return Ok(Some(p)),
        Some(_) => {}
    }
    info!(dir = %dir.display(), "waiting for the watched directory to appear");
    let Some(p) = run_job(p, |p| p.set_state(State::WaitingForDir), shutdown).await? else {
        return Ok(None);
    };
    let status = format!("waiting for {}", dir.display());
    notify(systemd, &[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(&status)]);
    let mut pause = DIR_POLL_FIRST;
    loop {
        p.alive();
        tokio::select! {
            _ = shutdown.as_mut() => return stopped(p).await.map(|()| None),
            _ = tokio::time::sleep(pause) => {}
        }
        match off_worker(look(&dir), shutdown).await? {
            None => return stopped(p).await.map(|()| None),
            Some(Ok(true)) => {
                info!(dir = %dir.display(), "the watched directory appeared");
                return Ok(Some(p));
            }
            Some(Ok(false)) => {
                let msg = format!("[watch] dir {} appeared but is not a directory", dir.display());
                return Err(Error::config(p.cfg.source.as_deref().unwrap_or(&dir), msg));
            }
            Some(Err(_)) => pause = (pause * 2).min(DIR_POLL_MAX),
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

/// SIGHUP: build the configuration again, and start its watcher (a new watcher must start
/// before anything changes), on a blocking thread — it reads the config file and runs the
/// start-up checks on disk, and a slow file (NFS, a FIFO swapped in) must not hold the async
/// worker, which answers SIGTERM. `None`: a shutdown came first (the build, if stuck, is left
/// behind; it changes nothing).
async fn rebuild(
    reload: &Reload,
    tx: mpsc::Sender<Hint>,
    shutdown: &mut Pin<&mut impl Future<Output = ()>>,
) -> Option<Result<(Config, Result<Front>)>> {
    let build = reload.clone();
    let work = move || {
        build().map(|cfg| {
            let front = Front::start(&cfg, tx);
            (cfg, front)
        })
    };
    match off_worker(work, shutdown).await {
        Ok(Some(built)) => Some(built),
        Ok(None) => None,
        Err(e) => {
            Some(Err(Error::Internal(format!("the configuration could not be rebuilt: {e}"))))
        }
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
    let (gate, status_file) = (p.status_gate.clone(), p.cfg.status_file());
    let task = tokio::task::spawn_blocking(move || contain(p, job));
    tokio::pin!(task);
    tokio::select! {
        done = &mut task => done.map_err(panicked)?.map(Some),
        _ = shutdown.as_mut() => {
            if progress.publishing() {
                info!("stopping: waiting for the in-flight publish");
                if let Ok(Ok(Ok(mut p))) = tokio::time::timeout(SHUTDOWN_GRACE, &mut task).await {
                    p.stop();
                    return Ok(None);
                }
            } else {
                info!("stopping: abandoning the work in progress (nothing is being published)");
            }
            // The pipeline stays on its thread, with its evaluators (the caller stops them,
            // then calls `settle_stopped`): say "stopping" for it, and let it write no more.
            let close = tokio::task::spawn_blocking(move || gate.close(&status_file, State::Stopping));
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, close).await;
            Ok(None)
        }
    }
}

/// After `run` returned and the caller stopped the evaluators an abandoned pipeline left
/// (`objective::command::stop_all`): a status file still saying "stopping" says "stopped".
pub fn settle_stopped(status_file: &std::path::Path) {
    if let Ok(mut status) = crate::status::Status::read(status_file)
        && status.state == State::Stopping
    {
        status.state = State::Stopped;
        if let Err(e) = status.write(status_file) {
            warn!(error = %e, "cannot write the status file");
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

    /// One trip's work, in order (see [`Work`]); runs on the blocking pool.
    fn run(&mut self, work: Work) -> Report {
        let mut report = Report::default();
        for hint in work.hints {
            self.on_hint(hint, &mut report);
        }
        for why in work.rescans {
            self.rescan(&mut report, &why);
        }
        report.batch = self.settler.poll(std::time::Instant::now(), Identity::stat);
        report
    }

    fn on_hint(&mut self, hint: Hint, report: &mut Report) {
        match hint {
            Hint::Candidate(path) => {
                self.follow(&path);
                let sig = Identity::stat(&path);
                self.settler.hint(path, sig, std::time::Instant::now());
            }
            Hint::Rescan(why) => {
                warn!(%why, "rescanning");
                report.errors.push(why.clone());
                self.rescan(report, &why);
            }
        }
    }

    /// Hint every current candidate (the settler waits out the quiet period for each).
    fn rescan(&mut self, report: &mut Report, why: &str) {
        report.rescans += 1;
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
                report.errors.push(e.to_string());
            }
        }
    }

    /// Watch a candidate directory's files; without the watch, rescans still find them.
    fn follow(&mut self, path: &std::path::Path) {
        if let Err(e) = self.watch.follow(path) {
            warn!(error = %e, "candidate directory not watched; rescans will see its files");
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
mod tests;
