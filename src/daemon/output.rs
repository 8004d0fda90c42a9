//! Handing the running average to the shared publisher (`publish::publish_tensors`, the same
//! atomic path and manifest as `sewa average`), and reading back what was published last
//! (restart: the window is rebuilt from the directory, the published selection from its
//! manifest). This module owns only the daemon's additions to the manifest.

use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::Arc;

use crate::accumulate::{OutTensor, UpdateReport};
use crate::average::{AverageOptions, AveragePlan, IntPolicy, OutDType};
use crate::checkpoint::{Checkpoint, Identity, TensorMeta};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::manifest::{InputRecord, Manifest, Provenance, format_name};
use crate::publish::{self, PublishOptions, Published, TensorSource};
use crate::select::Selection;
use crate::window::Member;

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

/// The selected members and how the running average was updated, for the manifest.
pub struct Provenanced<'a> {
    pub selection: &'a Selection,
    /// Window members with their opened checkpoints and weights, in window order.
    pub members: Vec<(&'a Member, &'a Arc<Checkpoint>, f64)>,
    pub report: UpdateReport,
}

/// Publish the averaged `tensors` at `[publish] out`, manifest last, under the output's lock
/// (taken at start-up; taken here, and the new output's leftovers cleaned, after a reload
/// moved `[publish] out`).
pub fn publish(cfg: &Config, tensors: Vec<OutTensor>, p: &Provenanced<'_>) -> Result<Published> {
    let out = &cfg.publish.out;
    let lock = publish::hold(out)?;
    if lock.newly_taken {
        for done in publish::recover(&lock) {
            tracing::warn!(%done, "cleaned up after an interrupted publish");
        }
    }
    let latest = p.members.iter().rev().find(|m| m.2 > 0.0).map(|m| m.0.step);
    // The average is already in the output dtype; held as a checkpoint so the manifest record
    // and the publisher read it like any input, without another pass over the data.
    let average = Checkpoint::from_memory(out.clone(), latest, tensors)?;
    let opts = AverageOptions {
        dtype: OutDType::Keep,
        int_policy: IntPolicy::Latest,
        // Already converted, so nothing can overflow here; recorded in the manifest.
        overflow: cfg.publish.dtype_overflow,
        threads: cfg.runtime.threads.get(),
    };
    let plan = AveragePlan::new(vec![&average], None, opts)?;
    let mut manifest = Manifest::new(&plan, out.clone(), Provenance::from(p.selection));
    record_members(&mut manifest, cfg, p);
    // Side files (config.json, tokenizer...) from the newest selected member that has them.
    let side = p.members.iter().rev().filter(|m| m.2 > 0.0).find_map(|m| m.1.side_dir());
    let mut source = MemorySource(&average);
    let opts = PublishOptions::default();
    publish::publish_tensors(&mut source, manifest, side, out, &opts, &mut |_| {})
}

/// The running average's output tensors, handed to the publisher without a copy.
struct MemorySource<'a>(&'a Checkpoint);

impl TensorSource for MemorySource<'_> {
    fn tensors(&self) -> &[TensorMeta] {
        self.0.tensors()
    }

    fn tensor_bytes(&mut self, index: usize) -> Result<&[u8]> {
        let ckpt: &Checkpoint = self.0;
        match ckpt.data(&ckpt.tensors()[index].name)? {
            Cow::Borrowed(bytes) => Ok(bytes),
            Cow::Owned(_) => Err(Error::Internal("in-memory tensor was copied".into())),
        }
    }
}

fn record_members(m: &mut Manifest, cfg: &Config, p: &Provenanced<'_>) {
    let selected: Vec<_> = p.members.iter().filter(|x| x.2 > 0.0).collect();
    m.inputs = selected
        .iter()
        .map(|(member, ckpt, w)| InputRecord {
            path: member.path.clone(),
            step: Some(member.step),
            bytes: ckpt.total_bytes(),
            format: format_name(ckpt.format()),
            weight: *w,
            identity: Some(*ckpt.identity()),
        })
        .collect();
    m.weights = selected.iter().map(|x| x.2).collect();
    m.dtype = cfg.publish.dtype.to_string();
    m.int_policy = cfg.publish.int_policy.to_string();
    let int_from = match cfg.publish.int_policy {
        IntPolicy::First => selected.first(),
        _ => selected.last(),
    };
    m.int_source = m.int_source.as_ref().and(int_from.map(|x| x.0.path.clone()));
    let window: Vec<String> = p
        .members
        .iter()
        .map(|(m, _, w)| format!("{} (step {}, weight {w:.6})", m.path.display(), m.step))
        .collect();
    m.notes.push(format!(
        "sewa watch: window of {} members: {}; running average updated {} ({} checkpoint reads)",
        p.members.len(),
        window.join(", "),
        if p.report.exact { "by exact recompute" } else { "incrementally" },
        p.report.reads
    ));
}
