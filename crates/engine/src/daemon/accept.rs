//! `[objective] acceptance_data` (or `acceptance_command`) under `policy = "best"`: the
//! candidate's and the published model's losses on a held-out split the selection did not
//! optimise, so that "better than the published model" is not judged on the data the selection
//! was fitted to. Owns the acceptance objective (built on first use) and the published model's
//! acceptance loss once known; counts its objective calls apart from the selection's. It
//! decides nothing (see `policy`).

use std::path::Path;
use std::time::Duration;

use tracing::warn;

use super::progress::{Beating, Progress};
use crate::error::{Error, Result};
use crate::objective::{Objective, ObjectiveConfig};
use crate::select::blend::Blend;
use sewa_checkpoint::text;
use sewa_checkpoint::{Checkpoint, OpenOptions};

/// The acceptance objective and what it said about the published model.
#[derive(Default)]
pub struct Acceptance {
    objective: Option<Box<dyn Objective>>,
    /// The published model's loss on the acceptance split, once computed.
    published: Option<f64>,
}

/// Both losses on the acceptance split, and the objective calls they cost.
#[derive(Clone, Copy, Debug)]
pub struct Judged {
    pub candidate: f64,
    /// None: the published output could not be read or does not fit the objective.
    pub published: Option<f64>,
    pub calls: usize,
}

/// Where the acceptance objective is built and how its calls feed the watchdog.
pub struct Setting<'a> {
    pub objective: &'a ObjectiveConfig,
    /// The config file's directory (relative data paths start there).
    pub base_dir: &'a Path,
    /// `[publish] out`: the published model, read when its loss is not known yet.
    pub out: &'a Path,
    pub progress: &'a Progress,
    pub allowed: Duration,
}

impl Acceptance {
    /// Forget the objective and the published loss (a reload changed what they depend on).
    pub fn reset(&mut self) {
        *self = Acceptance::default();
    }

    /// The published model's acceptance loss, if known.
    pub fn published_loss(&self) -> Option<f64> {
        self.published
    }

    /// A new publication: its acceptance loss is the candidate's that was just judged.
    pub fn now_published(&mut self, loss: Option<f64>) {
        self.published = loss;
    }

    /// The candidate `Σ weights_i members_i` and the published model on the acceptance split.
    /// The published model's loss is computed once (from the published file, e.g. after a
    /// restart) and then remembered until the next publication.
    pub fn judge(
        &mut self,
        s: &Setting<'_>,
        members: &[&Checkpoint],
        weights: &[f64],
    ) -> Result<Judged> {
        if self.objective.is_none() {
            s.progress.beat(s.allowed); // an evaluator start is bounded by its own timeout
            self.objective = s.objective.build_acceptance(s.base_dir)?;
        }
        let Some(inner) = self.objective.as_deref_mut() else {
            return Err(crate::error::Error::Internal("no acceptance objective configured".into()));
        };
        let mut objective = Beating { inner, progress: s.progress, allowed: s.allowed };
        let candidate = loss_of(members, weights, &mut objective)?;
        let mut calls = 1;
        if self.published.is_none() {
            self.published = match published_model(s.out, &objective) {
                Some(ckpt) => {
                    calls += 1;
                    Some(loss_of(&[&ckpt], &[1.0], &mut objective)?)
                }
                None => None,
            };
        }
        Ok(Judged { candidate, published: self.published, calls })
    }
}

/// The published output as a checkpoint the objective can evaluate; None (logged) when there
/// is none or it does not fit (then any finite acceptance loss replaces it).
fn published_model(out: &Path, objective: &dyn Objective) -> Option<Checkpoint> {
    if !out.exists() {
        return None;
    }
    let opened = Checkpoint::open(out, &OpenOptions::default()).map_err(Error::from);
    match opened.and_then(|c| objective.check(&c).map(|()| c)) {
        Ok(c) => Some(c),
        Err(e) => {
            warn!(out = %text::path(out), error = %e, "cannot judge the published model on the \
                  acceptance data; the next selection with a finite loss replaces it");
            None
        }
    }
}

/// One objective call: the loss of the average of `members` with `weights` (zeros skipped).
pub fn loss_of(
    members: &[&Checkpoint],
    weights: &[f64],
    objective: &mut dyn Objective,
) -> Result<f64> {
    let (chosen, w): (Vec<&Checkpoint>, Vec<f64>) =
        members.iter().zip(weights).filter(|(_, w)| **w > 0.0).map(|(m, w)| (*m, *w)).unzip();
    for m in &chosen {
        objective.check(m)?;
    }
    let blend = Blend::new(&chosen)?;
    let mut point = blend.zeros();
    blend.mix(&w, &mut point)?;
    Ok(objective.evaluate(&point, false)?.loss)
}
