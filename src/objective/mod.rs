//! The loss oracle selectors optimise: loss (and optionally its gradient with respect to the
//! weights) at a candidate average. Where the model lives is hidden behind `Objective`:
//! in-process candle models (`builtin`) or an external evaluator process (`command`).
//! This module does not choose checkpoints or write outputs.

pub mod config;
pub mod data;
pub mod mlp;

pub use config::{Activation, LossKind, ObjectiveConfig};
pub use mlp::MlpObjective;

use crate::checkpoint::Checkpoint;
use crate::error::Result;

pub mod command;

/// One floating tensor of a candidate average (or of a gradient), in f32, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Floating tensors of a model, sorted by name. Integer/bool buffers are not part of it.
pub type Params = Vec<NamedTensor>;

/// What one oracle call returns.
#[derive(Clone, Debug)]
pub struct Evaluation {
    pub loss: f64,
    /// dLoss/dw, same names, shapes and order as the `Params` evaluated. `None` when not asked
    /// for or not supported.
    pub grad: Option<Params>,
}

/// A loss oracle. Each `evaluate` call counts as one oracle call in reports.
pub trait Objective: Send {
    /// Loss at `params`; with `want_grad`, also the gradient (if `supports_grad`).
    fn evaluate(&mut self, params: &Params, want_grad: bool) -> Result<Evaluation>;
    /// Whether `evaluate` can return gradients (else selectors use forward-only estimators).
    fn supports_grad(&self) -> bool;
    /// Short description for manifests and logs, e.g. "builtin mlp, cross_entropy, 2000 rows".
    fn describe(&self) -> String;
    /// Whether this checkpoint's tensors fit the model and data; the error names the
    /// checkpoint and what does not fit. Selectors call it on every member before optimising.
    fn check(&self, _ckpt: &Checkpoint) -> Result<()> {
        Ok(())
    }
}
