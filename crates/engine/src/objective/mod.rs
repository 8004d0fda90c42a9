//! The loss oracle selectors optimise: loss (and optionally its gradient with respect to the
//! weights) at a candidate average. Where the model lives is hidden behind `Objective`:
//! in-process candle models (`builtin`) or an external evaluator process (`command`).
//! An objective that holds the window's members itself (protocol 2 evaluators) is also asked
//! for mixtures by their weights (`evaluate_mix`): then no average is formed and no gradient
//! moves; it returns one number per member instead.
//! This module does not choose checkpoints or write outputs.

pub mod build;
pub mod config;
pub mod data;
pub mod mlp;

pub use build::{Lifetime, build_objective};
pub use config::{Activation, BuiltinConfig, EvaluatorConfig, LossKind, ObjectiveConfig};
pub use mlp::MlpObjective;

use crate::error::Result;
use sewa_checkpoint::Checkpoint;

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

/// What one mixing call returns (`Objective::evaluate_mix`).
#[derive(Clone, Debug)]
pub struct MixEvaluation {
    /// F(w(α)) with w(α) = Σ α_i w_i.
    pub loss: f64,
    /// ∂F/∂α_i = ⟨∇_w F(w(α)), w_i⟩ over the floating tensors, one per member in the order
    /// given. `None` when not asked for or not supported.
    pub member_dots: Option<Vec<f64>>,
}

/// A loss oracle. Each `evaluate` (or `evaluate_mix`) call counts as one oracle call in reports.
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
    /// Whether `evaluate_mix` works: the objective loads members itself and takes mixing
    /// weights, so selectors neither form averages nor stream gradient dot products.
    fn mixes(&self) -> bool {
        false
    }
    /// The members' common float dtype (`None`: mixed, or f32/f64), before the first call: an
    /// objective that ships candidates may send them in it (half the bytes of f32 for bf16).
    fn members_dtype(&mut self, _dtype: Option<sewa_checkpoint::DType>) {}
    /// After a failed call: how long until a call can be tried again (an evaluator process
    /// that failed is restarted only after its backoff); `None`: at once.
    fn retry_after(&self) -> Option<std::time::Duration> {
        None
    }
    /// Loss (and with `want_grad` the per-member dot products) at `Σ alpha_i w_i` over
    /// `members` (window order, oldest first; `alpha` ≥ 0 sums to 1). Only when `mixes()`.
    fn evaluate_mix(
        &mut self,
        _members: &[&Checkpoint],
        _alpha: &[f64],
        _want_grad: bool,
    ) -> Result<MixEvaluation> {
        Err(crate::error::Error::Internal(format!(
            "{} does not evaluate mixtures of members",
            self.describe()
        )))
    }
}
