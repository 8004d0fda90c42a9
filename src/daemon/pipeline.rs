//! The daemon's blocking half: settled candidates → window actions (load, evict, quarantine)
//! → selection → running average → publish → status. Runs on a blocking thread, one batch at
//! a time; owns the opened members and the accumulator. Never returns an error for bad input:
//! it quarantines, records and carries on.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tracing::{debug, error, info, info_span, warn};

use super::load;
use super::output::{self, LastPublished};
use crate::accumulate::Accumulator;
use crate::checkpoint::{self, Checkpoint};
use crate::config::{Config, Policy};
use crate::error::{Error, Result};
use crate::objective::Objective;
use crate::select::{self, ModelContext, Selection, SewaState, WindowView};
use crate::status::{self, MemberStatus, PublishStatus, QuarantineStatus, SelectionStatus, Status};
use crate::watch::{Settled, Sig};
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
    /// SeWA's state from the previous selection (warm start).
    warm: Option<SewaState>,
    /// `[publish] on_publish`, run after each publication.
    hook: super::hook::Hook,
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
            started_at: status::now_rfc3339(),
            dir: cfg.watch.dir.clone(),
            out: cfg.publish.out.clone(),
            method: cfg.select.method.name().into(),
            ..Status::default()
        };
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
            warm: None,
            hook: Default::default(),
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
        }
        if cfg.objective != self.cfg.objective || cfg.select != self.cfg.select {
            self.objective = None;
            self.warm = None;
        }
        self.cfg = cfg;
        self.apply(actions);
        self.finish();
    }

    /// Process one batch of settled candidates, then reselect/publish if the window asks.
    pub fn step(&mut self, batch: Vec<Settled>) {
        self.check_members();
        // Newest first: at start-up a full window is built without loading older candidates.
        let mut events: Vec<Event> = batch
            .into_iter()
            .map(|s| match s {
                Settled::Ready(path, sig) => {
                    let step =
                        path.file_name().and_then(|n| n.to_str()).and_then(checkpoint::parse_step);
                    Event::Settled { path, sig, step }
                }
                Settled::Gone(path) => Event::Gone { path },
            })
            .collect();
        events.sort_by_key(|e| {
            std::cmp::Reverse(match e {
                Event::Settled { step, .. } => step.unwrap_or(u64::MAX),
                _ => u64::MAX,
            })
        });
        for event in events {
            let actions = self.window.handle(event);
            self.apply(actions);
        }
        self.finish();
    }

    /// Reselect if asked, then write the status file.
    fn finish(&mut self) {
        if std::mem::take(&mut self.reselect) && !self.window.members().is_empty() {
            self.check_members();
            if let Err(e) = self.select_and_publish() {
                error!(error = %e, "selection/publish failed; the previous output stays");
                self.status.push_error(e.to_string());
            }
        }
        self.write_status();
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
                    debug!(path = %path.display(), "evicted from the window");
                    self.open.remove(&path);
                }
                Action::Quarantine { path, reason } => {
                    let q = self.window.rejected().find(|r| r.path == path);
                    if q.is_some_and(|r| r.incomplete) {
                        info!(path = %path.display(), %reason, "not complete yet; waiting for it to change");
                    } else {
                        warn!(path = %path.display(), %reason, "quarantined");
                        self.status.counters.quarantined += 1;
                    }
                }
                Action::Reselect => self.reselect = true,
            }
        }
    }

    fn load(&mut self, path: PathBuf, sig: Sig) {
        let span = info_span!("checkpoint", step = tracing::field::Empty, path = %path.display());
        let _enter = span.enter();
        let reference = self.open.values().next().map(|c| c.tensors().to_vec());
        let (marker, metric) = (&self.cfg.watch.marker, &self.cfg.select.metric);
        match load::load(&path, marker, metric, reference.as_deref()) {
            Ok((ckpt, step, metric)) => {
                span.record("step", step);
                info!(tensors = ckpt.tensors().len(), bytes = ckpt.total_bytes(), "loaded");
                self.status.counters.loaded += 1;
                let member = Member { path: path.clone(), sig, step, metric };
                let actions = self.window.handle(Event::Loaded(member));
                self.apply(actions);
                if self.window.members().iter().any(|m| m.path == path && m.sig == sig) {
                    self.open.insert(path, Arc::new(ckpt));
                }
            }
            Err(refusal) => {
                let (reason, incomplete) = (refusal.reason, refusal.incomplete);
                let actions = self.window.handle(Event::Rejected { path, sig, reason, incomplete });
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
        let selection = self.run_selector(&view)?;
        self.status.counters.selections += 1;
        let paired = summaries.iter().map(|m| m.path.clone()).zip(selection.weights.clone());
        let paired: Vec<(PathBuf, f64)> = paired.collect();
        self.weights = paired.iter().cloned().collect();
        // Window order (by step), as the manifest lists them.
        let inputs: Vec<(PathBuf, f64)> = paired.into_iter().filter(|(_, w)| *w > 0.0).collect();
        if let Some(skip) =
            skip_reason(self.cfg.publish.policy, self.last.as_ref(), &selection, &inputs)
        {
            info!(why = %selection.why, %skip, "selection not published");
            self.record_selection(&selection, skip);
            return Ok(());
        }
        let members: Vec<(Arc<Checkpoint>, f64)> =
            ckpts.into_iter().zip(selection.weights.iter().copied()).collect();
        self.publish(selection, members, inputs, t0)
    }

    /// Update the running average to `members` and publish it with its manifest.
    fn publish(
        &mut self,
        selection: Selection,
        members: Vec<(Arc<Checkpoint>, f64)>,
        inputs: Vec<(PathBuf, f64)>,
        t0: Instant,
    ) -> Result<()> {
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
        let published = output::publish(&self.cfg, tensors, &prov)?;
        self.hook.run(&self.cfg.publish.on_publish, &published.path, &published.manifest_path);
        let millis = t0.elapsed().as_millis() as u64;
        let (reads, exact) = (report.reads, report.exact);
        info!(why = %selection.why, reads, exact, average_ms, millis, "published");
        self.status.counters.publishes += 1;
        self.status.last_publish = Some(PublishStatus {
            at: status::now_rfc3339(),
            path: published.path,
            manifest: published.manifest_path,
            members: inputs.len(),
            reads,
            exact,
            average_ms,
            millis,
        });
        self.record_selection(&selection, "published".into());
        self.last = Some(LastPublished { inputs, loss: selection.loss });

        Ok(())
    }

    /// The configured selector; model-based ones get the objective (built on first use).
    fn run_selector(&mut self, view: &WindowView<'_>) -> Result<Selection> {
        if !self.cfg.select.method.needs_objective() {
            return select::run(&self.cfg.select, view, None);
        }
        let path = self.cfg.source.clone().unwrap_or_else(|| PathBuf::from("config"));
        let sewa = self.cfg.sewa_config(&path)?;
        if self.objective.is_none() {
            let oc = self.cfg.objective_config(&path)?;
            let oc = oc.ok_or_else(|| Error::config(&path, "the selector needs an [objective]"))?;
            self.objective = Some(oc.build(&self.cfg.base_dir())?);
        }
        let objective = self.objective.as_deref_mut().expect("just built");
        let ctx = ModelContext { objective, sewa: &sewa, warm: &mut self.warm };
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

    fn record_selection(&mut self, sel: &Selection, outcome: String) {
        self.status.last_selection = Some(SelectionStatus {
            at: status::now_rfc3339(),
            method: sel.method.clone(),
            why: sel.why.clone(),
            loss: sel.loss,
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

    pub fn write_status(&mut self) {
        let members = self.window.members().iter().map(|m| MemberStatus {
            path: m.path.clone(),
            step: m.step,
            metric: m.metric,
            weight: self.weights.get(&m.path).copied().unwrap_or(0.0),
        });
        self.status.members = members.collect();
        let q = self.window.rejected().map(|r| QuarantineStatus {
            path: r.path.clone(),
            reason: r.reason.clone(),
            incomplete: r.incomplete,
        });
        self.status.quarantined = q.collect();
        let path = self.cfg.status_file();
        if let Err(e) = self.status.write(&path) {
            warn!(error = %e, "cannot write the status file");
        }
    }
}

/// Why a selection should not replace the published one, if it should not: it is the same
/// (members and weights), or with `policy = "best"` its loss does not beat the published loss.
fn skip_reason(
    policy: Policy,
    last: Option<&LastPublished>,
    selection: &Selection,
    inputs: &[(PathBuf, f64)],
) -> Option<String> {
    let last = last?;
    if last.same_as(inputs) {
        return Some("same members and weights as the published average".into());
    }
    if let (Policy::Best, Some(new), Some(old)) = (policy, selection.loss, last.loss)
        && new >= old
    {
        return Some(format!("policy best: loss {new:.6} does not beat {old:.6}"));
    }
    None
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

    fn sel(loss: Option<f64>) -> Selection {
        let details = serde_json::Value::Null;
        Selection {
            method: "sewa".into(),
            weights: vec![0.5, 0.5],
            why: String::new(),
            loss,
            details,
        }
    }

    #[test]
    fn best_policy_never_replaces_a_better_published_model() {
        let a = vec![(PathBuf::from("a"), 0.5), (PathBuf::from("b"), 0.5)];
        let b = vec![(PathBuf::from("b"), 0.5), (PathBuf::from("c"), 0.5)];
        let last = LastPublished { inputs: a.clone(), loss: Some(0.30) };
        assert!(skip_reason(Policy::Best, None, &sel(Some(9.0)), &b).is_none(), "first publish");
        assert!(skip_reason(Policy::Latest, Some(&last), &sel(Some(0.2)), &a).is_some(), "same");
        assert!(skip_reason(Policy::Best, Some(&last), &sel(Some(0.31)), &b).is_some(), "worse");
        assert!(skip_reason(Policy::Best, Some(&last), &sel(Some(0.30)), &b).is_some(), "tie");
        assert!(skip_reason(Policy::Best, Some(&last), &sel(Some(0.29)), &b).is_none(), "better");
        assert!(skip_reason(Policy::Latest, Some(&last), &sel(Some(0.9)), &b).is_none(), "latest");
    }
}
