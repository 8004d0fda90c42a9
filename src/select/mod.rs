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
