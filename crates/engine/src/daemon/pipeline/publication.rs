//! A selection's way out: run the selector over the window, ask the policy whether it
//! replaces the published model (judged on the acceptance split when configured), average
//! (running average or streamed) and publish, then record what happened in the status.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tracing::{info, warn};

use super::super::accept;
use super::super::output::{self, LastPublished, PublishedInput};
use super::super::policy::{self, Candidate, Rules, Split, Verdict};
use super::super::progress::Beating;
use super::super::tensorboard::Point;
use super::{Pipeline, trusted};
use crate::average::running::{RunningAverage, UpdateReport};
use crate::config::Policy;
use crate::error::{Error, Result};
use crate::publish::SideFiles;
use crate::select::{self, ModelContext, Selection, WindowView};
use crate::status::{OnDisk, PublishStatus, SelectionStatus, SelectionSummary};
use crate::watch::Filter;
use crate::window::{Event, Member};
use sewa_checkpoint::Checkpoint;

impl Pipeline {
    pub(super) fn select_and_publish(&mut self) -> Result<()> {
        let t0 = Instant::now();
        let summaries = self.window.summaries();
        let ckpts: Vec<Arc<Checkpoint>> = summaries
            .iter()
            .map(|m| self.open.get(&m.path).cloned().ok_or_else(|| missing(&m.path)))
            .collect::<Result<_>>()?;
        let refs: Vec<&Checkpoint> = ckpts.iter().map(|c| c.as_ref()).collect();
        let view = WindowView { members: &summaries, checkpoints: &refs };
        let selection = self.run_selector(&view);
        let spent = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.status.counters.selection_ms = self.status.counters.selection_ms.saturating_add(spent);
        let selection = selection.inspect_err(|_| {
            // Nothing is published from a failed selection (e.g. a non-finite loss).
            self.status.counters.failed_selections += 1;
        })?;
        self.status.counters.selections += 1;
        self.status.counters.oracle_calls += selection.details.total_calls() as u64;
        let paired = summaries.iter().map(|m| m.path.clone()).zip(selection.weights.clone());
        self.weights = paired.collect();
        let point = self.board.as_ref().map(|_| point(&selection, &summaries));
        let settled = self.settle(selection, &summaries, ckpts, t0);
        if let (Some(board), Some(mut point)) = (self.board.as_mut(), point) {
            // The model published now: this selection's, or the one the policy kept.
            point.published_loss = self.last.as_ref().and_then(|l| l.loss);
            board.write(&point);
        }
        settled
    }

    /// A made selection's way out: the policy's verdict, then the average and its publication.
    fn settle(
        &mut self,
        selection: Selection,
        summaries: &[select::MemberSummary],
        ckpts: Vec<Arc<Checkpoint>>,
        t0: Instant,
    ) -> Result<()> {
        let refs: Vec<&Checkpoint> = ckpts.iter().map(|c| c.as_ref()).collect();
        let inputs = published_inputs(summaries, &ckpts, &selection);
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
        let own = selection.details.member_losses.clone().unwrap_or_default();
        let member_losses = &own;
        let c = Candidate { inputs, loss, judged, published, split, newest_step, member_losses };
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
            Verdict::Implausible(why) => {
                // An evaluator error: logged, counted and retried like one.
                self.status.counters.failed_selections += 1;
                self.record_selection(selection, false, format!("not published: {why}"));
                let who = self.cfg.objective.as_ref().map_or("objective".into(), |o| o.describe());
                Err(Error::Evaluator(format!("{who}: {why}")))
            }
            Verdict::Publish { note } => {
                if let Some(note) = &note {
                    info!(why = %selection.why, %note, "publishing");
                }
                Ok(Some(Go { note, acceptance: judged.filter(|_| split == Split::Acceptance) }))
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
    ) -> Result<(Option<f64>, Option<f64>, Split)> {
        let plain = (selection.loss, self.last.as_ref().and_then(|l| l.loss), Split::Selection);
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
        self.status.counters.oracle_calls += j.calls as u64;
        let d = &mut selection.details;
        d.acceptance_loss = Some(j.candidate);
        d.acceptance_published_loss = j.published;
        d.oracle_calls_acceptance = Some(j.calls);
        Ok((Some(j.candidate), j.published, Split::Acceptance))
    }

    /// Average `members` (in the running average when it fits the budget, else streamed from
    /// their files) and publish the result with its manifest.
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
        let schema = members.iter().find(|m| m.1 > 0.0).map(|m| m.0.tensors()).unwrap_or(&[]);
        let keep = RunningAverage::fits(schema, self.budget);
        let report = if keep {
            match self.running.update(&members, trusted) {
                Ok(r) => Some(r),
                Err(e) if e.is_bad_input() => return self.drop_bad_member(e),
                Err(e) => return Err(e),
            }
        } else {
            self.running.reset(); // nothing model-sized is held between publications
            None
        };
        let average_ms = t_avg.elapsed().as_millis() as u64;
        let window = self.window.members();
        let side = self.side_files(window, &members)?;
        let with_ckpts = window.iter().zip(&members).map(|(m, (c, w))| (m, c, *w)).collect();
        let prov = output::Provenanced {
            selection: &selection,
            members: with_ckpts,
            side: side.as_deref(),
        };
        let averaged = match report {
            Some(r) => output::Averaged::Running(&self.running, r),
            None => output::Averaged::Streamed,
        };
        self.beat(self.window_bytes());
        self.progress.set_publishing(true);
        let published = output::publish(&self.cfg, averaged, &prov);
        self.progress.set_publishing(false);
        let published = match published {
            Err(e) if e.is_bad_input() && report.is_none() => return self.drop_bad_member(e),
            other => other?,
        };
        let report = report.unwrap_or(UpdateReport { reads: inputs.len(), exact: true });
        self.hook.run(&self.cfg.publish.on_publish, &published.path, &published.manifest_path);
        let millis = t0.elapsed().as_millis() as u64;
        let (reads, exact) = (report.reads, report.exact);
        info!(why = %selection.why, reads, exact, average_ms, millis, "published");
        self.status.counters.publishes += 1;
        self.record_history(&selection);
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
            method: selection.method.into(),
            why: selection.why,
            at: crate::timestamp::now(),
        });
        Ok(())
    }

    /// The side files of a directory output, from the selected members (see `daemon::sides`).
    fn side_files(
        &self,
        window: &[Member],
        members: &[(Arc<Checkpoint>, f64)],
    ) -> Result<Option<Arc<SideFiles>>> {
        if crate::publish::is_file_output(&self.cfg.publish.out) {
            return Ok(None);
        }
        let selected = window.iter().zip(members).filter(|(_, (_, w))| *w > 0.0);
        let selected: Vec<(&Path, &Checkpoint)> =
            selected.map(|(m, (c, _))| (m.path.as_path(), c.as_ref())).collect();
        self.sides.for_publish(&selected)
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
        let ctx = ModelContext { objective: &mut objective, memory: &mut self.memory };
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
        self.running.reset();
        Ok(())
    }

    fn record_selection(&mut self, sel: &Selection, published: bool, outcome: String) {
        let summary = SelectionSummary {
            at: crate::timestamp::now(),
            method: sel.method.into(),
            why: sel.why.clone(),
            loss: sel.loss,
            acceptance_loss: sel.details.acceptance_loss,
        };
        self.status.last_selection = Some(SelectionStatus { summary, published, outcome });
    }
}

/// A selection's figures for `[publish] tensorboard_dir`, at the window's newest step (the
/// published loss is filled in once the policy has spoken).
fn point(selection: &Selection, summaries: &[select::MemberSummary]) -> Point {
    let newest =
        (summaries.iter().enumerate()).max_by_key(|(_, m)| m.step).map(|(i, m)| (i, m.step));
    let own = selection.details.member_losses.as_deref().unwrap_or_default();
    Point {
        step: newest.and_then(|(_, s)| s).unwrap_or(0),
        selection_loss: selection.loss,
        published_loss: None,
        newest_member_loss: newest.and_then(|(i, _)| own.get(i).copied()),
        oracle_calls: selection.details.total_calls() as u64,
        k: selection.members().len() as u64,
        window: summaries.len() as u64,
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

fn missing(path: &Path) -> Error {
    Error::Internal(format!("{}: window member has no open checkpoint", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sewa_checkpoint::Identity;

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
}
