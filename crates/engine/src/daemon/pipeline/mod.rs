//! The daemon's blocking half: settled candidates → window actions (load, evict, quarantine;
//! `intake.rs`) → selection → average → publish (`publication.rs`) → status. Runs on a
//! blocking thread, one batch at a time; owns the opened members and the running average. Never returns an error for bad input:
//! it quarantines, records and carries on. A panic while handling one checkpoint quarantines
//! that checkpoint. As it works it beats `progress` (the systemd watchdog's evidence).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::accept::Acceptance;
use super::loudness::Loudness;
use super::metrics::{Endpoint, Feed, Snapshot};
use super::output::{self, LastPublished};
use super::progress::{self, Progress, stall_bound};
use super::sides::Sides;
use super::tensorboard::Board;
use super::{disk, panics, status_view};
use crate::average::running::RunningAverage;
use crate::config::Config;
use crate::error::Error;
use crate::objective::Objective;
use crate::select::Memory;
use crate::status::{QuarantineStatus, State, Status};
use crate::watch::Settled;
use crate::window::{Event, Window};
use sewa_checkpoint::{self as checkpoint, Checkpoint};

pub struct Pipeline {
    pub cfg: Config,
    pub window: Window,
    open: BTreeMap<PathBuf, Arc<Checkpoint>>,
    /// The members' HF side files, read at admission for a directory output.
    sides: Sides,
    /// Kept between publications when it fits `budget` (else every publication streams).
    running: RunningAverage,
    /// `[runtime] memory_budget` in bytes.
    budget: u64,
    last: Option<LastPublished>,
    pub status: Status,
    /// Weights of the last selection, by member path (for the status file).
    weights: BTreeMap<PathBuf, f64>,
    reselect: bool,
    /// Loss oracle of model-based selectors, built on first use (and again after a reload).
    objective: Option<Box<dyn Objective>>,
    /// What earlier selections left for the next (SeWA warm start, members' losses).
    memory: Memory,
    /// `[objective] acceptance_data`: the split `policy = "best"` judges on, when configured.
    acceptance: Acceptance,
    /// `[publish] on_publish`, run after each publication.
    hook: super::hook::Hook,
    /// The promise of progress the watchdog task reads (see `progress`).
    pub progress: Arc<Progress>,
    /// How long one unit of work may take before the pipeline counts as stuck.
    stall: Duration,
    /// How loudly rejections are logged (one warning per reason, one line per skipped pattern).
    loudness: Loudness,
    /// A selection that failed for a passing reason, to be tried again (see `retry_delay`).
    retry: Retry,
    /// `[publish] tensorboard_dir`: each selection's scalars (None: off).
    board: Option<Board>,
    /// `[runtime] metrics_addr`: the endpoint's copy of the status figures (None: off).
    metrics: Option<Feed>,
    /// Closed when the daemon stops while this pipeline is still busy on an abandoned thread:
    /// from then on only the stopping daemon writes the status file (see `StatusGate`).
    pub status_gate: StatusGate,
}

/// Who may write the status file. A daemon that stops mid-selection leaves the pipeline on the
/// blocking pool, where it may still write "watching" at any moment; the stopping daemon closes
/// the gate (waiting out a write in progress) and writes "stopped" last, so the file never says
/// a stopped daemon is watching.
#[derive(Clone, Debug, Default)]
pub struct StatusGate(Arc<std::sync::Mutex<bool>>);

impl StatusGate {
    /// Run `write` unless the gate is closed; writes are serialised with `close`.
    fn write(&self, write: impl FnOnce()) {
        let closed = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !*closed {
            write();
        }
    }

    /// Close the gate, then record `state` in the status file at `path` (the abandoned
    /// pipeline's last written status, with the state changed).
    pub fn close(&self, path: &std::path::Path, state: State) {
        let mut closed = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *closed = true;
        match Status::read(path) {
            Ok(mut status) => {
                status.state = state;
                if let Err(e) = status.write(path) {
                    warn!(error = %e, "cannot write the status file");
                }
            }
            Err(e) => warn!(error = %e, "cannot read the status file to mark it stopped"),
        }
    }
}

/// When a failed selection is tried again without waiting for a new checkpoint.
#[derive(Debug, Default)]
struct Retry {
    at: Option<Instant>,
    /// Failed selections in a row (the backoff doubles with each).
    failures: u32,
}

/// The first wait before a failed selection is tried again, doubled after each further
/// failure up to `RETRY_MAX`: a broken evaluator costs a few attempts an hour, not a loop.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// Whether a failed selection may succeed unchanged later: the evaluator failed (crashed, timed
/// out, answered nonsense: it is restarted after its backoff) or I/O did (a full disk the
/// guard frees). Other failures (an empty window, no metric, a non-finite loss of a fixed
/// rule) repeat until the window changes, so they wait for the next checkpoint.
fn retryable(e: &Error) -> bool {
    matches!(e, Error::Evaluator(_) | Error::Io { .. })
}

/// How long to wait after the `failures`-th failed selection in a row: the pipeline's own
/// backoff, never shorter than what the evaluator still waits before its restart.
fn retry_delay(failures: u32, evaluator: Option<Duration>) -> Duration {
    let doubled = RETRY_FIRST.saturating_mul(1 << failures.clamp(1, 16).saturating_sub(1));
    doubled.min(RETRY_MAX).max(evaluator.unwrap_or_default())
}

impl Pipeline {
    pub fn new(cfg: Config) -> Pipeline {
        let window = Window::new(cfg.window.size.get(), cfg.select.every.get());
        let running = RunningAverage::new(cfg.runtime.recompute_every.get());
        let budget = super::budget::resolve(cfg.runtime.memory_budget);
        info!(bytes = budget, "memory budget");
        let last = output::read_last(&cfg);
        let status = Status {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").into(),
            state: State::Starting,
            started_at: crate::timestamp::now(),
            dir: cfg.watch.dir.clone(),
            out: cfg.publish.out.clone(),
            method: cfg.select.method.into(),
            ..Status::default()
        };
        let stall = stall_bound(&cfg);
        let board = cfg.publish.tensorboard_dir.clone().map(Board::new);
        Pipeline {
            cfg,
            window,
            open: BTreeMap::new(),
            sides: Sides::default(),
            running,
            budget,
            last,
            status,
            weights: BTreeMap::new(),
            reselect: false,
            objective: None,
            memory: Memory::default(),
            acceptance: Acceptance::default(),
            hook: Default::default(),
            progress: Arc::new(Progress::new(stall)),
            status_gate: StatusGate::default(),
            stall,
            loudness: Loudness::default(),
            retry: Retry::default(),
            board,
            metrics: None,
        }
    }

    /// The metrics endpoint the status figures are fed to (named in the status file).
    pub(super) fn set_metrics(&mut self, endpoint: Option<Endpoint>) {
        self.status.metrics_addr = endpoint.as_ref().map(|e| e.addr.to_string());
        self.metrics = endpoint.map(|e| e.feed);
    }

    /// Read the published output's manifest again (after a start-up recovery completed it).
    pub fn reread_published(&mut self) {
        self.last = output::read_last(&self.cfg);
    }

    /// When a failed selection is to be tried again, if one is.
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry.at
    }

    /// Whether a failed selection is due to be tried again (`step` does it).
    pub fn retry_due(&self, now: Instant) -> bool {
        self.retry.at.is_some_and(|at| now >= at)
    }

    /// A new config (SIGHUP): keep the window where compatible, recompute the average.
    pub fn reload(&mut self, cfg: Config) {
        if cfg.watch != self.cfg.watch {
            // Another directory or pattern: the old members are not candidates any more.
            self.window = Window::new(cfg.window.size.get(), cfg.select.every.get());
            self.open.clear();
            self.sides.clear();
        }
        if crate::publish::is_file_output(&cfg.publish.out) {
            self.sides.clear(); // a file output has no side files
        }
        let actions = self.window.resize(cfg.window.size.get(), cfg.select.every.get());
        self.running = RunningAverage::new(cfg.runtime.recompute_every.get());
        self.budget = super::budget::resolve(cfg.runtime.memory_budget);
        self.status.dir = cfg.watch.dir.clone();
        self.status.out = cfg.publish.out.clone();
        self.status.method = cfg.select.method.name().into();
        if cfg.publish.tensorboard_dir.as_deref() != self.board.as_ref().map(|b| b.dir()) {
            self.board = cfg.publish.tensorboard_dir.clone().map(Board::new);
        }
        if cfg.publish != self.cfg.publish {
            self.last = output::read_last(&cfg);
            self.acceptance.now_published(None); // another output: judged again from its file
        }
        self.stall = stall_bound(&cfg);
        if cfg.objective != self.cfg.objective || cfg.select != self.cfg.select {
            self.progress.beat(self.stall); // dropping an evaluator waits for it to exit
            self.objective = None;
            self.memory = Memory::default();
            self.acceptance.reset();
        }
        self.cfg = cfg;
        self.apply(actions);
        self.finish();
    }

    /// Process one batch of settled candidates, then reselect/publish if the window asks.
    pub fn step(&mut self, batch: Vec<Settled>) {
        if self.retry_due(Instant::now()) {
            self.retry.at = None;
            self.reselect = true;
        }
        self.beat(self.window_bytes());
        self.guard_disk();
        self.check_members();
        // Newest first: at start-up a full window is built without loading older candidates.
        // Names without a step last: a copy such as last.pt then meets its original, and a
        // refusal's hint can name the pattern of the checkpoints loaded before it.
        let mut events: Vec<Event> = batch
            .into_iter()
            .map(|s| match s {
                Settled::Ready(path, sig) => {
                    // A name the step parser chokes on gets no step here; its load (guarded
                    // below) quarantines it with the panic message.
                    let step = panics::catch(|| checkpoint::step_of(&path));
                    Event::Settled { path, sig, step: step.unwrap_or(None) }
                }
                Settled::Gone(path) => Event::Gone { path },
            })
            .collect();
        events.sort_by_key(|e| {
            std::cmp::Reverse(match e {
                Event::Settled { step, .. } => (false, *step),
                _ => (true, None),
            })
        });
        for event in events {
            let actions = self.window.handle(event);
            self.apply(actions);
        }
        self.finish();
    }

    /// Reselect if asked and the window holds enough members, then write the status file.
    fn finish(&mut self) {
        self.guard_disk(); // a publication writes: make the room first
        if self.reselect && self.enough_members() {
            self.reselect = false;
            self.beat(self.window_bytes());
            self.check_members();
            match self.select_and_publish() {
                Ok(()) => self.retry = Retry::default(),
                Err(e) => {
                    // Only a publish that renamed its model in but not its manifest changes
                    // the output.
                    if crate::publish::is_partly_published(&e) {
                        error!(error = %e, "publish failed half-way: the new model is out, its manifest is not");
                    } else {
                        error!(error = %e, "selection/publish failed; the previous output stays");
                    }
                    self.status.push_error(e.to_string());
                    self.schedule_retry(&e);
                }
            }
        }
        self.write_status();
    }

    /// After a failed selection: try it again after the backoff when the failure may pass
    /// (`retryable`), else wait for the window to change.
    fn schedule_retry(&mut self, e: &Error) {
        if !retryable(e) {
            self.retry = Retry::default();
            return;
        }
        self.retry.failures = self.retry.failures.saturating_add(1);
        let evaluator = self.objective.as_ref().and_then(|o| o.retry_after());
        let delay = retry_delay(self.retry.failures, evaluator);
        self.retry.at = Some(Instant::now() + delay);
        info!(retry_in = ?delay, "the selection is tried again after this wait");
    }

    /// Whether the window holds `[select] min_members`; if not, the reselection waits (it stays
    /// asked for) and the status says why.
    fn enough_members(&mut self) -> bool {
        let (have, need) = (self.window.members().len(), self.cfg.select.min_members().max(1));
        if have >= need {
            self.status.waiting = None;
            return true;
        }
        let why = format!(
            "selection waits for {need} window members ([select] min_members), {have} so far"
        );
        if self.status.waiting.as_ref() != Some(&why) {
            info!(have, need, "{why}");
        }
        self.status.waiting = Some(why);
        false
    }

    /// Record a fatal-for-this-step problem (watch errors, reload failures) in the status.
    pub fn note_error(&mut self, msg: String) {
        self.status.push_error(msg);
        self.write_status();
    }

    pub fn set_state(&mut self, state: State) {
        self.status.state = state;
        self.write_status();
    }

    /// A shutdown: the status says "stopping" while the evaluators (selection and acceptance)
    /// are stopped — each a process group given its grace period, which can take seconds —
    /// then "stopped".
    pub fn stop(&mut self) {
        self.set_state(State::Stopping);
        self.objective = None;
        self.acceptance.reset();
        self.set_state(State::Stopped);
    }

    /// The pipeline cannot go on (a panic outside one checkpoint's work): say so in the status.
    pub fn record_failure(&mut self, msg: &str) {
        self.status.push_error(msg);
        self.set_state(State::Failed);
    }

    /// How long the next unit of work (over about `bytes` of checkpoint data) may take.
    fn allowed(&self, bytes: u64) -> Duration {
        progress::allowance(self.stall, bytes)
    }

    fn beat(&self, bytes: u64) {
        self.progress.beat(self.allowed(bytes));
    }

    /// The async loop is alive between jobs (it beats for the pipeline while it holds it).
    pub fn alive(&self) {
        self.beat(0);
    }

    /// Bytes of the open window members (what an average or a selection streams at most).
    fn window_bytes(&self) -> u64 {
        self.open.values().map(|c| c.total_bytes()).sum()
    }

    pub fn write_status(&mut self) {
        let (window, last) = (self.window.members(), self.last.as_ref());
        self.status.members = status_view::members(window, &self.open, &self.weights, last);
        let acceptance = self.acceptance.published_loss();
        self.status.published = status_view::published(last, window, &self.open, acceptance);
        let q = self.window.rejected().map(|r| QuarantineStatus {
            path: r.path.clone(),
            reason: r.reason.clone(),
            incomplete: r.incomplete,
            skipped: r.skipped,
        });
        self.status.quarantined = q.collect();
        let held = disk::holdings(self.window.members(), &self.open, &self.running.held());
        self.status.disk = disk::status(&self.cfg.window, &self.cfg.watch.dir, &held);
        if let Some(feed) = &self.metrics {
            // Never blocks: the channel keeps the newest value, readers copy it out. Before
            // the file (whose write waits on fsync): the endpoint never lags the status file.
            feed.send_replace(Snapshot::of(&self.status));
        }
        let path = self.cfg.status_file();
        self.status_gate.write(|| {
            if let Err(e) = self.status.write(&path) {
                warn!(error = %e, "cannot write the status file");
            }
        });
    }
}

/// Whether a checkpoint may still be read (not rewritten in place since it was opened).
fn trusted(c: &Checkpoint) -> bool {
    c.still_valid()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_selection_is_retried_after_a_doubling_backoff_never_before_the_evaluator() {
        let s = Duration::from_secs;
        assert_eq!(retry_delay(1, None), s(1));
        assert_eq!(retry_delay(2, None), s(2));
        assert_eq!(retry_delay(4, None), s(8));
        assert_eq!(retry_delay(7, None), s(60), "capped");
        assert_eq!(retry_delay(u32::MAX, None), s(60), "no overflow");
        assert_eq!(retry_delay(1, Some(s(30))), s(30), "the evaluator restarts later");
        assert_eq!(retry_delay(3, Some(Duration::from_millis(500))), s(4));
        let evaluator =
            Error::Evaluator("python3 eval.py: evaluator exited (exit status: 1)".into());
        assert!(retryable(&evaluator));
        assert!(retryable(&Error::io("/out", std::io::Error::from_raw_os_error(28))));
        assert!(!retryable(&Error::Selection("no member has metric eval_loss".into())));
    }

    /// An objective that, when dropped (its evaluator stopped), notes the state the status
    /// file holds at that moment.
    struct Observer {
        status_file: PathBuf,
        seen: Arc<std::sync::Mutex<Option<State>>>,
    }

    impl Objective for Observer {
        fn evaluate(
            &mut self,
            _: &crate::objective::Params,
            _: bool,
        ) -> crate::error::Result<crate::objective::Evaluation> {
            Err(Error::Internal("not evaluated in this test".into()))
        }
        fn supports_grad(&self) -> bool {
            false
        }
        fn describe(&self) -> String {
            "observer".into()
        }
    }

    impl Drop for Observer {
        fn drop(&mut self) {
            let state = Status::read(&self.status_file).map(|s| s.state).ok();
            if let Ok(mut seen) = self.seen.lock() {
                *seen = state;
            }
        }
    }

    /// The documented "stopping" is what the status file says while the evaluators are being
    /// stopped at shutdown; "stopped" once they are.
    #[test]
    fn the_status_says_stopping_while_the_evaluators_stop_then_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out/model.safetensors");
        let text = format!("[watch]\ndir = {:?}\n[publish]\nout = {out:?}\n", dir.path());
        let cfg = Config::parse(&text, &dir.path().join("sewa.toml")).unwrap();
        let mut p = Pipeline::new(cfg);
        let status_file = p.cfg.status_file();
        std::fs::create_dir_all(status_file.parent().unwrap()).unwrap();
        p.set_state(State::Watching);
        let seen = Arc::new(std::sync::Mutex::new(None));
        p.objective =
            Some(Box::new(Observer { status_file: status_file.clone(), seen: seen.clone() }));
        p.stop();
        assert_eq!(*seen.lock().unwrap(), Some(State::Stopping));
        assert_eq!(Status::read(&status_file).unwrap().state, State::Stopped);
    }
}

mod history;
mod intake;
mod publication;
