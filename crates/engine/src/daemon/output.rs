//! Handing the average of a selection to the shared publisher (`publish::publish_tensors`,
//! the same atomic path and manifest record as `sewa average`): from the running average, or
//! streamed from the members like `sewa average` does; and reading back what was published last
//! (restart: the window is rebuilt from the directory, the published selection from its
//! manifest). This module owns only the daemon's additions to the manifest.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;

use crate::average::running::{OutputOptions, RunningAverage, UpdateReport};
use crate::average::{AverageOptions, AveragePlan, PlanSource, TensorSource};
use crate::config::Config;
use crate::error::Result;
use crate::manifest::{AverageRecord, Manifest, Provenance, SelectedBy};
use crate::publish::{self, PublishOptions, Published, SideFiles};
use crate::select::{Details, Selection};
use crate::window::Member;
use sewa_checkpoint::{Checkpoint, Identity};

/// What the last manifest says was published.
#[derive(Clone, Debug, Default)]
pub struct LastPublished {
    /// Every input with a non-zero weight, in window order.
    pub inputs: Vec<PublishedInput>,
    pub loss: Option<f64>,
    /// The selection's method and one-line reason (for the status file).
    pub method: SelectedBy,
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
/// (`details.members` and `details.member_losses`, both in window order), read through the
/// typed `Details` (paths decoded losslessly); none when the details do not have that shape.
pub fn recorded_member_losses(details: &serde_json::Value) -> Vec<(PathBuf, Option<u64>, f64)> {
    let Ok(Details { members: Some(members), member_losses: Some(losses), .. }) =
        Details::deserialize(details)
    else {
        return Vec::new();
    };
    let each = members.into_iter().zip(losses).filter(|(_, l)| l.is_finite());
    each.map(|(m, l)| (m.path, m.step, l)).collect()
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
        dtype: publish.dtype,
        int_policy: publish.int_policy,
        dtype_overflow: publish.dtype_overflow,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::OnDisk;
    use std::os::unix::ffi::OsStringExt;

    /// Member losses are read back through the typed `Details`: a member whose name is not
    /// UTF-8 (written as `{"bytes_hex": …}`) keeps its loss.
    #[test]
    fn recorded_member_losses_read_non_utf8_paths_too() {
        let odd = PathBuf::from(std::ffi::OsString::from_vec(b"runs/step_\xff".to_vec()));
        let members = vec![
            crate::select::MemberRecord { path: "runs/step_1".into(), step: Some(1) },
            crate::select::MemberRecord { path: odd.clone(), step: Some(2) },
        ];
        let details = Details {
            members: Some(members),
            member_losses: Some(vec![0.5, 0.25]),
            ..Details::default()
        };
        let got = recorded_member_losses(&details.json());
        assert_eq!(got, vec![("runs/step_1".into(), Some(1), 0.5), (odd, Some(2), 0.25)]);
        assert!(recorded_member_losses(&serde_json::json!({"members": 3})).is_empty());
        assert!(recorded_member_losses(&serde_json::Value::Null).is_empty());
    }

    /// A manifest from a sewa whose directory digest came from `DefaultHasher` (any other
    /// `identity.members` than today's): it still reads, and the input counts as another file
    /// version — republished, shown as changed — never an error.
    #[test]
    fn a_directory_identity_from_the_old_hash_reads_as_a_new_version() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("checkpoint-5");
        std::fs::create_dir(&ckpt).unwrap();
        std::fs::write(ckpt.join("model.safetensors"), b"weights").unwrap();
        std::fs::write(ckpt.join("trainer_state.json"), b"{}").unwrap();
        let now = Identity::of(&ckpt).unwrap();
        let old = Identity { members: 0x9e37_79b9_7f4a_7c15, ..now };
        let out = dir.path().join("out.safetensors");
        let text = format!("[watch]\ndir = {:?}\n[publish]\nout = {out:?}\n", dir.path());
        let cfg = Config::parse(&text, &dir.path().join("sewa.toml")).unwrap();
        let manifest = serde_json::json!({
            "sewa_version": "0.1.0", "output": out, "layout": "file", "files": [],
            "tensor_bytes": 0, "tensors": 0,
            "inputs": [{"path": ckpt, "step": 5, "bytes": 7, "format": "hf-dir", "weight": 1.0,
                        "identity": old}],
            "weights": [1.0],
            "selection": {"method": "lawa", "why": "last 1", "loss": null, "details": {}},
            "dtype": "keep", "int_policy": "latest", "int_source": null, "renamed_keys": [],
            "side_files": [], "started": "t", "finished": "t", "wall_time_s": 0.0, "notes": []
        });
        std::fs::write(publish::manifest_path(&out), manifest.to_string()).unwrap();
        let last = read_last(&cfg).expect("the old manifest reads");
        assert_eq!(last.method, SelectedBy::Method(crate::select::Method::Lawa));
        let again = PublishedInput {
            path: ckpt.clone(),
            step: Some(5),
            identity: Some(now),
            weight: 1.0,
            loss: None,
        };
        assert!(!last.same_as(&[again]), "another file version: published again");
        assert_eq!(OnDisk::check(&ckpt, last.inputs[0].identity.as_ref()), OnDisk::Changed);
    }
}
