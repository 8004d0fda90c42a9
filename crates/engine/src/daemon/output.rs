//! Handing the average of a selection to the shared publisher (`publish::publish_tensors`,
//! the same atomic path and manifest record as `sewa average`): from the running average, or
//! streamed from the members like `sewa average` does; and reading back what was published last
//! (restart: the window is rebuilt from the directory, the published selection from its
//! manifest). This module owns only the daemon's additions to the manifest.

use std::path::PathBuf;
use std::sync::Arc;

use crate::average::running::{OutputOptions, RunningAverage, UpdateReport};
use crate::average::{AverageOptions, AveragePlan, PlanSource, TensorSource};
use crate::config::Config;
use crate::error::Result;
use crate::manifest::{AverageRecord, Manifest, Provenance};
use crate::publish::{self, PublishOptions, Published, SideFiles};
use crate::select::Selection;
use crate::window::Member;
use sewa_checkpoint::{Checkpoint, Identity};

/// What the last manifest says was published.
#[derive(Clone, Debug, Default)]
pub struct LastPublished {
    /// Every input with a non-zero weight, in window order.
    pub inputs: Vec<PublishedInput>,
    pub loss: Option<f64>,
    /// The selection's method and one-line reason (for the status file).
    pub method: String,
    pub why: String,
    /// When it was published (RFC 3339).
    pub at: String,
}

/// One published input: which file version went in, with what weight.
#[derive(Clone, Debug, PartialEq)]
pub struct PublishedInput {
    pub path: PathBuf,
    pub step: Option<u64>,
    /// The checkpoint's identity when it was averaged (None: a manifest without one).
    pub identity: Option<Identity>,
    pub weight: f64,
    /// The member's own loss on the selection data, when the selector recorded it.
    pub loss: Option<f64>,
}

impl LastPublished {
    /// True when `inputs` is this publication again: same paths, steps, file versions and
    /// weights. A member rewritten in place or replaced by rename at the same path is a new
    /// input; an input of unknown identity is never the same.
    pub fn same_as(&self, inputs: &[PublishedInput]) -> bool {
        let same = |a: &PublishedInput, b: &PublishedInput| {
            a.path == b.path
                && a.step == b.step
                && a.identity.is_some()
                && a.identity == b.identity
                && (a.weight - b.weight).abs() < 1e-9
        };
        self.inputs.len() == inputs.len() && self.inputs.iter().zip(inputs).all(|(a, b)| same(a, b))
    }

    /// The published input with the highest step.
    pub fn newest(&self) -> Option<&PublishedInput> {
        self.inputs.iter().filter(|i| i.step.is_some()).max_by_key(|i| i.step)
    }
}

/// Read the manifest of the published output, if there is a readable one.
pub fn read_last(cfg: &Config) -> Option<LastPublished> {
    let text = std::fs::read(crate::publish::manifest_path(&cfg.publish.out)).ok()?;
    let m: Manifest = serde_json::from_slice(&text).ok()?;
    let losses = recorded_member_losses(&m.selection.details);
    let inputs = m.inputs.into_iter().filter(|i| i.weight > 0.0).map(|i| PublishedInput {
        loss: losses.iter().find(|(p, s, _)| *p == i.path && *s == i.step).map(|x| x.2),
        path: i.path,
        step: i.step,
        identity: i.identity,
        weight: i.weight,
    });
    Some(LastPublished {
        inputs: inputs.collect(),
        loss: m.selection.loss,
        method: m.selection.method,
        why: m.selection.why,
        at: m.finished,
    })
}

/// (path, step, own loss) of the window members a model-based selection recorded losses for
/// (`details.members` and `details.member_losses`, both in window order).
pub fn recorded_member_losses(details: &serde_json::Value) -> Vec<(PathBuf, Option<u64>, f64)> {
    let (Some(members), Some(losses)) =
        (details["members"].as_array(), details["member_losses"].as_array())
    else {
        return Vec::new();
    };
    let each = members.iter().zip(losses).filter_map(|(m, l)| {
        let path = PathBuf::from(m["path"].as_str()?);
        Some((path, m["step"].as_u64(), l.as_f64()?))
    });
    each.collect()
}

/// How the published average was made: the running average (updated by `reads` checkpoint
/// reads, incrementally or by exact recompute), or the selected members streamed through the
/// kernel (when the running average does not fit `[runtime] memory_budget`).
pub enum Averaged<'a> {
    Running(&'a RunningAverage, UpdateReport),
    Streamed,
}

/// The selection and its window members, for the manifest.
pub struct Provenanced<'a> {
    pub selection: &'a Selection,
    /// Window members with their opened checkpoints and weights, in window order.
    pub members: Vec<(&'a Member, &'a Arc<Checkpoint>, f64)>,
    /// The HF side files for a directory output (`daemon::sides` chose them).
    pub side: Option<&'a SideFiles>,
}

/// Publish the average of the selected members at `[publish] out`, manifest last, under the
/// output's lock (taken at start-up; taken here, and the new output's leftovers cleaned,
/// after a reload moved `[publish] out`).
pub fn publish(cfg: &Config, averaged: Averaged<'_>, p: &Provenanced<'_>) -> Result<Published> {
    let out = &cfg.publish.out;
    let lock = publish::hold(out)?;
    if lock.newly_taken {
        for done in publish::recover(&lock) {
            tracing::warn!(%done, "cleaned up after an interrupted publish");
        }
    }
    let selected: Vec<_> = p.members.iter().filter(|m| m.2 > 0.0).collect();
    let inputs = selected.iter().map(|(m, c, w)| (c.as_ref(), Some(m.step), *w));
    let publish = &cfg.publish;
    let mut record = AverageRecord {
        dtype: publish.dtype.to_string(),
        int_policy: publish.int_policy.to_string(),
        dtype_overflow: publish.dtype_overflow.to_string(),
        ..AverageRecord::new(inputs)
    };
    let opts = PublishOptions::default();
    let (note, plan);
    let mut source: Box<dyn TensorSource + '_> = match averaged {
        Averaged::Running(avg, report) => {
            let how = if report.exact { "by exact recompute" } else { "incrementally" };
            note = format!("running average updated {how} ({} checkpoint reads)", report.reads);
            record.int_source = avg.int_source(publish.int_policy).map(|c| c.path().into());
            let out = OutputOptions {
                dtype: publish.dtype,
                int_policy: publish.int_policy,
                overflow: publish.dtype_overflow,
            };
            Box::new(avg.source(out)?)
        }
        Averaged::Streamed => {
            note = format!("the {} selected members streamed through the kernel", selected.len());
            let ckpts = selected.iter().map(|m| m.1.as_ref()).collect();
            let weights: Vec<f64> = selected.iter().map(|m| m.2).collect();
            let opts = AverageOptions {
                dtype: publish.dtype,
                int_policy: publish.int_policy,
                overflow: publish.dtype_overflow,
                threads: cfg.runtime.threads.get(),
            };
            plan = AveragePlan::new(ckpts, Some(&weights), opts)?;
            record.int_source = plan.int_source().map(|c| c.path().into());
            Box::new(PlanSource::new(&plan))
        }
    };
    record.outputs = source.tensors().to_vec();
    let mut manifest = Manifest::new(record, out.clone(), Provenance::from(p.selection));
    let window: Vec<String> = p
        .members
        .iter()
        .map(|(m, _, w)| format!("{} (step {}, weight {w:.6})", m.path.display(), m.step))
        .collect();
    manifest.notes.push(format!(
        "sewa watch: window of {} members: {}; {note}",
        p.members.len(),
        window.join(", "),
    ));
    if let Some(side) = p.side.filter(|s| !s.files.is_empty() && !s.source.is_dir()) {
        manifest.notes.push(format!(
            "side files from {}, read when it was admitted (it has been deleted since)",
            side.source.display()
        ));
    }
    publish::publish_tensors(source.as_mut(), manifest, p.side, out, &opts, &mut |_| {})
}
