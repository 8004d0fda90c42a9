//! The daemon's blocking half: settled candidates → window actions (load, evict, quarantine)
//! → selection → running average → publish → status. Runs on a blocking thread, one batch at
//! a time; owns the opened members and the accumulator. Never returns an error for bad input:
//! it quarantines, records and carries on. A panic while handling one checkpoint quarantines
//! that checkpoint. As it works it beats `progress` (the systemd watchdog's evidence).

use std::collections::BTreeMap;
use std::panic::UnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, error, info, info_span, warn};

use super::accept::{self, Acceptance};
use super::load::{self, Refusal};
use super::loudness::{Level, Loudness};
use super::output::{self, LastPublished, PublishedInput};
use super::policy::{self, Candidate, Rules, Verdict};
use super::progress::{self, Beating, Progress, disk_bytes, stall_bound};
use super::{panics, status_view};
use crate::accumulate::Accumulator;
use crate::checkpoint::{self, Checkpoint, Identity};
use crate::config::{Config, Policy};
use crate::error::{Error, Result};
use crate::objective::Objective;
use crate::select::{self, Memory, ModelContext, Selection, WindowView};
use crate::status::{OnDisk, PublishStatus, QuarantineStatus, SelectionStatus, Status};
use crate::text;
use crate::watch::{Filter, Settled};
use crate::window::{Action, Event, Member, Window};

pub struct Pipeline {
    pub cfg: Config,
    pub window: Window,
    open: BTreeMap<PathBuf, Arc<Checkpoint>>,
    acc: Accumulator,
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
}

impl Pipeline {
    pub fn new(cfg: Config) -> Pipeline {
        let window = Window::new(cfg.window.size.get(), cfg.select.every.get());
        let acc = Accumulator::new(cfg.runtime.recompute_every.get());
        let last = output::read_last(&cfg);
        let status = Status {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").into(),
            state: "starting".into(),
            started_at: crate::timestamp::now(),
            dir: cfg.watch.dir.clone(),
            out: cfg.publish.out.clone(),
            method: cfg.select.method.name().into(),
            ..Status::default()
        };
        let stall = stall_bound(&cfg);
        Pipeline {
            cfg,
            window,
            open: BTreeMap::new(),
            acc,
            last,
            status,
            weights: BTreeMap::new(),
            reselect: false,
            objective: None,
            memory: Memory::default(),
            acceptance: Acceptance::default(),
            hook: Default::default(),
            progress: Arc::new(Progress::new(stall)),
            stall,
            loudness: Loudness::default(),
        }
    }

    /// A new config (SIGHUP): keep the window where compatible, recompute the average.
    pub fn reload(&mut self, cfg: Config) {
        if cfg.watch != self.cfg.watch {
            // Another directory or pattern: the old members are not candidates any more.
            self.window = Window::new(cfg.window.size.get(), cfg.select.every.get());
            self.open.clear();
        }
        let actions = self.window.resize(cfg.window.size.get(), cfg.select.every.get());
        self.acc = Accumulator::new(cfg.runtime.recompute_every.get());
        self.status.dir = cfg.watch.dir.clone();
        self.status.out = cfg.publish.out.clone();
        self.status.method = cfg.select.method.name().into();
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
        self.beat(self.window_bytes());
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
        if self.reselect && self.enough_members() {
            self.reselect = false;
            self.beat(self.window_bytes());
            self.check_members();
            if let Err(e) = self.select_and_publish() {
                // Only a publish that renamed its model in but not its manifest changes the output.
                if crate::publish::is_partly_published(&e) {
                    error!(error = %e, "publish failed half-way: the new model is out, its manifest is not");
                } else {
                    error!(error = %e, "selection/publish failed; the previous output stays");
                }
                self.status.push_error(e.to_string());
            }
        }
        self.write_status();
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

    /// Drop members whose file was rewritten in place (before reading them again).
    fn check_members(&mut self) {
        let stale: Vec<PathBuf> =
            self.open.iter().filter(|(_, c)| !trusted(c)).map(|(p, _)| p.clone()).collect();
        for path in stale {
            let reason = "rewritten in place while in the window (dropped before reading)".into();
            let actions = self.window.handle(Event::Invalidated { path, reason });
            self.apply(actions);
        }
    }

    fn apply(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Load { path, sig } => self.load(path, sig),
                Action::Evict { path } => {
                    debug!(path = %text::path(&path), "evicted from the window");
                    self.open.remove(&path);
                }
                Action::Quarantine { path, reason } => self.report_rejection(&path, &reason),
                Action::Reselect => self.reselect = true,
            }
        }
    }

    /// Log a rejection as loudly as `Loudness` decides; only warnings count as quarantined.
    fn report_rejection(&mut self, path: &Path, reason: &str) {
        let Some(r) = self.window.rejected().find(|r| r.path == path) else { return };
        let (incomplete, skipped) = (r.incomplete, r.skipped);
        let report = self.loudness.judge(r);
        let hint = report.hint.unwrap_or_default();
        let path = text::path(path);
        match report.level {
            Level::Warn => {
                warn!(%path, %reason, %hint, "quarantined");
                self.status.counters.quarantined += 1;
            }
            Level::Info if incomplete => {
                info!(%path, %reason, "not complete yet; waiting for it to change")
            }
            Level::Info => info!(
                files = %text::escape(&report.files), %reason, %hint,
                "skipping files like this, which are not checkpoints to average; more are logged at debug level"
            ),
            Level::Debug if skipped => debug!(%path, %reason, "skipped"),
            Level::Debug => debug!(%path, %reason, "rejected again for the same reason"),
        }
    }

    fn load(&mut self, path: PathBuf, sig: Identity) {
        let span =
            info_span!("checkpoint", step = tracing::field::Empty, path = %text::path(&path));
        let _enter = span.enter();
        self.beat(disk_bytes(&path));
        let reference = self.open.values().next().map(|c| c.tensors().to_vec());
        let (watch, metric) = (&self.cfg.watch, &self.cfg.select.metric);
        // Unwind-safe: the loader keeps no state and only reads its arguments (a path, the
        // watch config, a copy of the window's schema); what it opens lives in its own frames and
        // is dropped while unwinding. The window and `self` change only after it returns.
        let loaded = guarded(|| load::load(&path, watch, metric, reference.as_deref()));
        self.admit(path, sig, &span, loaded);
    }

    /// Carry out a load's outcome: a member (if the window keeps it) or a quarantine.
    fn admit(&mut self, path: PathBuf, sig: Identity, span: &tracing::Span, loaded: Loaded) {
        match loaded {
            Ok((ckpt, step, metric)) => {
                span.record("step", step);
                let member = Member { path: path.clone(), sig, step, metric };
                let actions = self.window.handle(Event::Loaded(member));
                self.apply(actions);
                // Not admitted: older than the window, or a copy of a member (reported above).
                if self.window.members().iter().any(|m| m.path == path && m.sig == sig) {
                    info!(tensors = ckpt.tensors().len(), bytes = ckpt.total_bytes(), "loaded");
                    self.status.counters.loaded += 1;
                    self.loudness.loaded(&path);
                    self.open.insert(path, Arc::new(ckpt));
                }
            }
            Err(refusal) => {
                let (reason, incomplete) = (refusal.reason, refusal.incomplete);
                let skipped = refusal.not_weights;
                let event = Event::Rejected { path, sig, reason, incomplete, skipped };
                let actions = self.window.handle(event);
                self.apply(actions);
            }
        }
    }

    fn select_and_publish(&mut self) -> Result<()> {
        let t0 = Instant::now();
        let summaries = self.window.summaries();
        let ckpts: Vec<Arc<Checkpoint>> = summaries
            .iter()
            .map(|m| self.open.get(&m.path).cloned().ok_or_else(|| missing(&m.path)))
            .collect::<Result<_>>()?;
        let refs: Vec<&Checkpoint> = ckpts.iter().map(|c| c.as_ref()).collect();
        let view = WindowView { members: &summaries, checkpoints: &refs };
        let selection = self.run_selector(&view).inspect_err(|_| {
            // Nothing is published from a failed selection (e.g. a non-finite loss).
            self.status.counters.failed_selections += 1;
        })?;
        self.status.counters.selections += 1;
        let paired = summaries.iter().map(|m| m.path.clone()).zip(selection.weights.clone());
        self.weights = paired.collect();
        let inputs = published_inputs(&summaries, &ckpts, &selection);
        let mut selection = selection;
        let newest = summaries.last().and_then(|m| m.step);
        let Some(go) = self.verdict(&mut selection, &refs, &inputs, newest)? else {
            return Ok(());
        };
        let members: Vec<(Arc<Checkpoint>, f64)> =
            ckpts.into_iter().zip(selection.weights.iter().copied()).collect();
        let before = self.status.counters.publishes;
        self.publish(selection, members, inputs, t0, go.note)?;
        if go.acceptance.is_some() && self.status.counters.publishes > before {
            self.acceptance.now_published(go.acceptance);
        }
        Ok(())
    }

    /// Whether `selection` replaces the published model (`policy`): None when it does not
    /// (recorded in the status), else why it does when the rules usually hold it back, and its
    /// loss on the acceptance split when that judged it.
    fn verdict(
        &mut self,
        selection: &mut Selection,
        refs: &[&Checkpoint],
        inputs: &[PublishedInput],
        newest_step: Option<u64>,
    ) -> Result<Option<Go>> {
        let (judged, published, split) = match self.judge(selection, refs, inputs) {
            Ok(j) => j,
            Err(e) => {
                self.record_selection(selection, false, format!("not published: {e}"));
                return Err(e);
            }
        };
        let loss = selection.loss;
        let c = Candidate { inputs, loss, judged, published, split, newest_step };
        let max_age_steps = self.cfg.publish.max_age_steps.map(|n| n.0);
        let rules = Rules { policy: self.cfg.publish.policy, max_age_steps };
        let filter = Filter::new(&self.cfg);
        let available = |i: &PublishedInput| still_candidate(&filter, i) && on_disk(i);
        match policy::decide(rules, self.last.as_ref(), &c, available) {
            Verdict::Skip(skip) => {
                info!(why = %selection.why, %skip, "selection not published");
                self.record_selection(selection, false, skip);
                Ok(None)
            }
            Verdict::Publish { note } => {
                if let Some(note) = &note {
                    info!(why = %selection.why, %note, "publishing");
                }
                Ok(Some(Go { note, acceptance: judged.filter(|_| split == ACCEPTANCE) }))
            }
        }
    }

    /// The losses `policy = "best"` compares and on what split: on `[objective]
    /// acceptance_data` when one is configured (evaluated here, counted apart in the
    /// selection's details as `oracle_calls_acceptance`), else the selection's own loss and
    /// the published one's. Nothing is evaluated for a selection that is the published one.
    fn judge(
        &mut self,
        selection: &mut Selection,
        refs: &[&Checkpoint],
        inputs: &[PublishedInput],
    ) -> Result<(Option<f64>, Option<f64>, &'static str)> {
        let plain = (selection.loss, self.last.as_ref().and_then(|l| l.loss), "selection data");
        let same = self.last.as_ref().is_some_and(|l| l.same_as(inputs));
        if self.cfg.publish.policy != Policy::Best || same {
            return Ok(plain);
        }
        let Some(oc) = self.cfg.objective.clone().filter(|o| o.has_acceptance()) else {
            return Ok(plain);
        };
        let base_dir = self.cfg.base_dir();
        let setting = accept::Setting {
            objective: &oc,
            base_dir: &base_dir,
            out: &self.cfg.publish.out,
            progress: &self.progress,
            allowed: self.allowed(self.window_bytes()),
        };
        let j = self.acceptance.judge(&setting, refs, &selection.weights)?;
        let d = &mut selection.details;
        d.acceptance_loss = Some(j.candidate);
        d.acceptance_published_loss = j.published;
        d.oracle_calls_acceptance = Some(j.calls);
        Ok((Some(j.candidate), j.published, ACCEPTANCE))
    }

    /// Update the running average to `members` and publish it with its manifest.
    fn publish(
        &mut self,
        selection: Selection,
        members: Vec<(Arc<Checkpoint>, f64)>,
        inputs: Vec<PublishedInput>,
        t0: Instant,
        note: Option<String>,
    ) -> Result<()> {
        self.beat(self.window_bytes());
        let t_avg = Instant::now();
        let report = match self.acc.update(&members, trusted) {
            Ok(r) => r,
            Err(e) if e.is_bad_input() => return self.drop_bad_member(e),
            Err(e) => return Err(e),
        };
        let publish = &self.cfg.publish;
        let tensors = self.acc.output(publish.dtype, publish.int_policy, publish.dtype_overflow)?;
        let average_ms = t_avg.elapsed().as_millis() as u64;
        let window = self.window.members();
        let with_ckpts = window.iter().zip(&members).map(|(m, (c, w))| (m, c, *w)).collect();
        let prov = output::Provenanced { selection: &selection, members: with_ckpts, report };
        self.beat(self.window_bytes());
        self.progress.set_publishing(true);
        let published = output::publish(&self.cfg, tensors, &prov);
        self.progress.set_publishing(false);
        let published = published?;
        self.hook.run(&self.cfg.publish.on_publish, &published.path, &published.manifest_path);
        let millis = t0.elapsed().as_millis() as u64;
        let (reads, exact) = (report.reads, report.exact);
        info!(why = %selection.why, reads, exact, average_ms, millis, "published");
        self.status.counters.publishes += 1;
        self.status.last_publish = Some(PublishStatus {
            at: crate::timestamp::now(),
            path: published.path,
            manifest: published.manifest_path,
            members: inputs.len(),
            reads,
            exact,
            average_ms,
            millis,
        });
        let outcome = note.map_or("published".into(), |n| format!("published: {n}"));
        self.record_selection(&selection, true, outcome);
        self.last = Some(LastPublished {
            inputs,
            loss: selection.loss,
            method: selection.method,
            why: selection.why,
            at: crate::timestamp::now(),
        });
        Ok(())
    }

    /// The configured selector; model-based ones get the objective (built on first use).
    fn run_selector(&mut self, view: &WindowView<'_>) -> Result<Selection> {
        if !self.cfg.select.method.needs_objective() {
            return select::run(&self.cfg.select, view, None);
        }
        if self.objective.is_none() {
            self.beat(0); // an evaluator start is bounded by its startup_timeout_s
            let path = self.cfg.source.clone().unwrap_or_else(|| PathBuf::from("config"));
            let oc = self.cfg.objective.as_ref();
            let oc = oc.ok_or_else(|| Error::config(&path, "the selector needs an [objective]"))?;
            self.objective = Some(oc.build(&self.cfg.base_dir())?);
        }
        let allowed = self.allowed(self.window_bytes());
        let inner = self.objective.as_deref_mut().expect("just built");
        let mut objective = Beating { inner, progress: &self.progress, allowed };
        let sewa = &self.cfg.select.sewa;
        let ctx = ModelContext { objective: &mut objective, sewa, memory: &mut self.memory };
        select::run(&self.cfg.select, view, Some(ctx))
    }

    /// A member turned out unreadable while averaging: quarantine it and try again next batch.
    fn drop_bad_member(&mut self, e: Error) -> Result<()> {
        warn!(error = %e, "member failed while averaging");
        self.status.push_error(e.to_string());
        if let Error::BadInput { path, msg } = e {
            let actions = self.window.handle(Event::Invalidated { path, reason: msg });
            self.apply(actions);
        }
        self.acc.reset();
        Ok(())
    }

    fn record_selection(&mut self, sel: &Selection, published: bool, outcome: String) {
        self.status.last_selection = Some(SelectionStatus {
            at: crate::timestamp::now(),
            method: sel.method.clone(),
            why: sel.why.clone(),
            loss: sel.loss,
            acceptance_loss: sel.details.acceptance_loss,
            published,
            outcome,
        });
    }

    /// Record a fatal-for-this-step problem (watch errors, reload failures) in the status.
    pub fn note_error(&mut self, msg: String) {
        self.status.push_error(msg);
        self.write_status();
    }

    pub fn set_state(&mut self, state: &str) {
        self.status.state = state.into();
        self.write_status();
    }

    /// The pipeline cannot go on (a panic outside one checkpoint's work): say so in the status.
    pub fn record_failure(&mut self, msg: &str) {
        self.status.push_error(msg);
        self.set_state("failed");
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
        let path = self.cfg.status_file();
        if let Err(e) = self.status.write(&path) {
            warn!(error = %e, "cannot write the status file");
        }
    }
}

/// Whether a published input is still a candidate of the watched directory.
fn still_candidate(filter: &Filter, input: &PublishedInput) -> bool {
    filter.candidate(&input.path).is_some_and(|top| top == input.path)
}

/// Whether a published input is still on disk as it was averaged (same identity).
fn on_disk(input: &PublishedInput) -> bool {
    OnDisk::check(&input.path, input.identity.as_ref()) == OnDisk::Present
}

/// A selection the policy lets through.
struct Go {
    /// Why, when the rules usually hold such a selection back.
    note: Option<String>,
    /// Its loss on the acceptance split, when that judged it.
    acceptance: Option<f64>,
}

/// The selection's inputs with a non-zero weight, in window order (as the manifest lists
/// them), with each member's own loss when the selector recorded it.
fn published_inputs(
    summaries: &[select::MemberSummary],
    ckpts: &[Arc<Checkpoint>],
    selection: &Selection,
) -> Vec<PublishedInput> {
    let own = selection.details.member_losses.as_deref().unwrap_or_default();
    (summaries.iter().zip(ckpts).zip(&selection.weights))
        .enumerate()
        .filter(|(_, (_, w))| **w > 0.0)
        .map(|(i, ((m, c), w))| PublishedInput {
            path: m.path.clone(),
            step: m.step,
            identity: Some(*c.identity()),
            weight: *w,
            loss: own.get(i).copied(),
        })
        .collect()
}

/// The split `judge` names when it judged on `[objective] acceptance_data`.
const ACCEPTANCE: &str = "acceptance data";

type Loaded = std::result::Result<(Checkpoint, u64, Option<f64>), Refusal>;

/// Run one checkpoint's load; a panic in it (a bug in sewa or a library) becomes that
/// checkpoint's refusal, so the daemon quarantines it and carries on instead of dying on it
/// at every restart.
fn guarded(load: impl FnOnce() -> Loaded + UnwindSafe) -> Loaded {
    panics::catch(load).unwrap_or_else(|msg| {
        Err(Refusal {
            reason: format!("sewa panicked reading it (a bug in sewa, please report it): {msg}"),
            incomplete: false,
            not_weights: false,
        })
    })
}

fn missing(path: &Path) -> Error {
    Error::Internal(format!("{}: window member has no open checkpoint", path.display()))
}

/// Whether a checkpoint may still be read (not rewritten in place since it was opened).
fn trusted(c: &Checkpoint) -> bool {
    c.still_valid()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_disk_means_the_same_file_version_is_still_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("step_5.safetensors");
        std::fs::write(&path, b"version one").unwrap();
        let identity = Some(Identity::of(&path).unwrap());
        let (step, weight) = (Some(5), 1.0);
        let input = PublishedInput { path: path.clone(), step, identity, weight, loss: None };
        assert!(on_disk(&input));
        let replacement = dir.path().join("new");
        std::fs::write(&replacement, b"version two, longer").unwrap();
        std::fs::rename(&replacement, &path).unwrap();
        assert!(!on_disk(&input), "replaced by rename");
        std::fs::remove_file(&path).unwrap();
        assert!(!on_disk(&input), "deleted");
    }

    fn pipeline(dir: &Path) -> Pipeline {
        let text = format!(
            "[watch]\ndir = {:?}\n[publish]\nout = {:?}\n",
            dir.join("runs"),
            dir.join("out.safetensors")
        );
        Pipeline::new(Config::parse(&text, &dir.join("sewa.toml")).unwrap())
    }

    #[test]
    fn a_panic_while_loading_quarantines_that_checkpoint_with_the_message() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = pipeline(dir.path());
        let path = dir.path().join("runs/modèle_é.safetensors");
        let sig = Identity { dev: 1, ino: 2, size: 3, mtime_ns: 4, members: 0 };
        let loaded = guarded(|| -> Loaded { panic!("byte index 13 is not a char boundary") });
        p.admit(path.clone(), sig, &tracing::Span::none(), loaded);
        let q: Vec<_> = p.window.rejected().collect();
        assert_eq!(q.len(), 1);
        assert_eq!(q[0].path, path);
        assert!(q[0].reason.contains("panicked") && q[0].reason.contains("char boundary"));
        assert!(!q[0].incomplete, "a panic is not 'still being written'");
        assert_eq!(p.status.counters.quarantined, 1);
        assert!(p.window.members().is_empty());
    }
}
