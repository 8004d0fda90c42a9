//! Selectors: given the window, decide which members to average and with what weights.
//! Fixed rules (uniform, lawa, ema, best-metric) need only a summary of the window; model-based
//! ones (greedy, exhaustive, random, sewa) also read the members' weights and call an
//! `Objective`. Selectors never touch files other than through `Checkpoint` views.

use std::path::PathBuf;

/// What a selector knows about one window member without reading its weights.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MemberSummary {
    pub path: PathBuf,
    pub step: Option<u64>,
    /// Metric read from the checkpoint (safetensors metadata or trainer_state.json), if any.
    pub metric: Option<f64>,
}

/// A selector's answer. `weights` has one entry per window member (zeros for unselected),
/// non-negative, summing to 1.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Selection {
    pub method: String,
    pub weights: Vec<f64>,
    /// Human-readable reason, e.g. "last 5 of 20 by step".
    pub why: String,
    /// Loss of the hard selection on the selection data, when an objective was used.
    pub loss: Option<f64>,
    /// Method-specific report: probabilities, iterations, oracle calls, wall time...
    pub details: serde_json::Value,
}

impl Selection {
    /// Indices of members with a non-zero weight.
    pub fn members(&self) -> Vec<usize> {
        self.weights.iter().enumerate().filter(|(_, w)| **w > 0.0).map(|(i, _)| i).collect()
    }
}

pub mod rules;

use crate::checkpoint::Checkpoint;
use crate::config::{Method, SelectConfig};
use crate::error::{Error, Result};
use crate::objective::Objective;

/// What a selector sees of the window: summaries (oldest first, by step) and, for model-based
/// selectors, the opened members in the same order.
pub struct WindowView<'a> {
    pub members: &'a [MemberSummary],
    pub checkpoints: &'a [&'a Checkpoint],
}

/// The one entry point the daemon uses: run the configured selector on the window.
/// Model-based methods get the objective (`None` when none is configured).
pub fn run(
    cfg: &SelectConfig,
    view: &WindowView<'_>,
    objective: Option<&mut dyn Objective>,
) -> Result<Selection> {
    let k = cfg.k.get();
    match cfg.method {
        Method::Uniform => rules::uniform(view.members),
        Method::Lawa => rules::lawa(view.members, k),
        Method::Ema => rules::ema(view.members, cfg.ema_decay.0),
        Method::BestMetric => rules::best_metric(view.members, k, &cfg.metric, cfg.metric_mode),
        Method::Greedy | Method::Exhaustive | Method::Random | Method::Sewa => {
            let _ = objective;
            Err(Error::Internal(format!(
                "selector {:?} is not available in this build",
                cfg.method.name()
            )))
        }
    }
}
