//! `[select]`, `[select.sewa]`, `[select.soup]` and `[select.twa]`: which selector runs and its
//! parameters. Owned by the selectors (the config file's parser only embeds them), so that
//! `select` never imports `config`.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::wsm::WsmShape;
use crate::checked::{Positive, UnitOpen};
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    Uniform,
    Lawa,
    Ema,
    BestMetric,
    Wsm,
    Weights,
    Greedy,
    Exhaustive,
    Random,
    Sewa,
    Soup,
    Twa,
}

impl Method {
    /// Selectors that need an `[objective]` (and so produce a loss).
    pub fn needs_objective(self) -> bool {
        matches!(
            self,
            Method::Greedy
                | Method::Exhaustive
                | Method::Random
                | Method::Sewa
                | Method::Soup
                | Method::Twa
        )
    }
    /// Selectors that read `[select] k`, the number of members they average. The others
    /// average the whole window (uniform, ema), grow their own set (greedy), learn weights
    /// (soup, whose sparse k is `[select.soup]`'s; twa) or take one per weight (weights).
    pub fn uses_k(self) -> bool {
        matches!(
            self,
            Method::Lawa
                | Method::BestMetric
                | Method::Wsm
                | Method::Exhaustive
                | Method::Random
                | Method::Sewa
        )
    }
    pub fn name(self) -> &'static str {
        match self {
            Method::Uniform => "uniform",
            Method::Lawa => "lawa",
            Method::Ema => "ema",
            Method::BestMetric => "best-metric",
            Method::Wsm => "wsm",
            Method::Weights => "weights",
            Method::Greedy => "greedy",
            Method::Exhaustive => "exhaustive",
            Method::Random => "random",
            Method::Sewa => "sewa",
            Method::Soup => "soup",
            Method::Twa => "twa",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricMode {
    Min,
    Max,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SelectConfig {
    #[serde(default = "default_method")]
    pub method: Method,
    /// Members to average (lawa, best-metric, model-based selectors).
    #[serde(default = "default_k")]
    pub k: Positive,
    /// Re-select after this many new window members.
    #[serde(default = "default_every")]
    pub every: Positive,
    /// EMA decay per checkpoint, newest weight 1, the one before `decay`, ...
    #[serde(default = "default_ema_decay")]
    pub ema_decay: UnitOpen,
    /// `wsm`: the decay shape whose Megatron-LM merge coefficients weigh the last k members.
    #[serde(default = "default_wsm_shape")]
    pub wsm_shape: WsmShape,
    /// `weights`: one weight per member of the newest `weights.len()`, oldest first; checked
    /// (finite, ≥ 0, not all zero) at its line, normalised when used.
    #[serde(default, deserialize_with = "super::wsm::de_weights")]
    pub weights: Option<Vec<f64>>,
    /// Metric key for best-metric: safetensors `__metadata__` key or trainer_state.json field.
    #[serde(default = "default_metric")]
    pub metric: String,
    /// Whether smaller (min) or larger (max) metric values are better.
    #[serde(default = "default_metric_mode")]
    pub metric_mode: MetricMode,
    /// Window members needed before the first selection (see `min_members()` for the default).
    #[serde(default)]
    pub min_members: Option<Positive>,
    /// SeWA options (the type is the SeWA selector's); defaults when the table is absent.
    #[serde(default)]
    pub sewa: SewaConfig,
    /// `method = "soup"` options; defaults when the table is absent.
    #[serde(default)]
    pub soup: SoupConfig,
    /// `method = "twa"` options; defaults when the table is absent.
    #[serde(default)]
    pub twa: TwaConfig,
}

impl Default for SelectConfig {
    fn default() -> Self {
        SelectConfig {
            method: default_method(),
            k: default_k(),
            every: default_every(),
            ema_decay: default_ema_decay(),
            wsm_shape: default_wsm_shape(),
            weights: None,
            metric: default_metric(),
            metric_mode: default_metric_mode(),
            min_members: None,
            sewa: SewaConfig::default(),
            soup: SoupConfig::default(),
            twa: TwaConfig::default(),
        }
    }
}

impl SelectConfig {
    /// Window members needed before the daemon selects at all: `min_members`, or by default `k`
    /// for the methods that average k members (lawa, best-metric, sewa, exhaustive, random: an
    /// "average of the last 5" made of 1 checkpoint is that checkpoint under a false name) and 1
    /// for those that average whatever the window holds (uniform, ema, soup, twa: a sparse
    /// soup's k only bounds how many it keeps) or grow their own set (greedy); for `weights`,
    /// one member per weight.
    pub fn min_members(&self) -> usize {
        if let Some(n) = self.min_members {
            return n.get();
        }
        match (self.method, &self.weights) {
            (Method::Weights, Some(w)) => w.len(),
            _ if self.method.uses_k() => self.k.get(),
            _ => 1,
        }
    }

    /// The cross-key rules of `method = "weights"` against a window of `window_size`
    /// members (the config file's `Config::check` names the file).
    pub fn check_weights(&self, window_size: usize) -> std::result::Result<(), String> {
        if self.method != Method::Weights {
            return Ok(());
        }
        let Some(w) = &self.weights else {
            return Err("[select] method = \"weights\" needs `weights = [..]`: one weight per \
                        member, oldest first (e.g. weights = [1, 2, 3, 4] for the newest 4)"
                .into());
        };
        let n = w.len();
        if n > window_size {
            return Err(format!(
                "[select] weights has {n} entries but [window] size = {window_size}: give at \
                 most one weight per window member, or raise size"
            ));
        }
        if let Some(m) = self.min_members.filter(|m| m.get() < n) {
            return Err(format!(
                "[select] min_members = {} is fewer than the {n} members `weights` weighs: \
                 remove min_members or make it at least {n}",
                m.get()
            ));
        }
        Ok(())
    }
}

fn default_method() -> Method {
    Method::Lawa
}
fn default_k() -> Positive {
    Positive(5)
}
fn default_every() -> Positive {
    Positive(1)
}
fn default_ema_decay() -> UnitOpen {
    UnitOpen(0.9)
}
fn default_wsm_shape() -> WsmShape {
    // Megatron's weighted_merge.py `--merge-style` default.
    WsmShape::Linear
}
fn default_metric() -> String {
    "eval_loss".to_string()
}
fn default_metric_mode() -> MetricMode {
    MetricMode::Min
}

/// How ∂E[F]/∂θ is estimated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Estimator {
    /// `concrete` when the objective gives gradients, else `reinforce`. Never switches on its
    /// own: a gradient that is zero everywhere is an error (`Oracle`), not a reason to fall back.
    #[default]
    Auto,
    /// Relaxed masks and ∂F/∂m_i = ⟨G, w_i − w(m)⟩ / Σ m (needs gradients).
    Concrete,
    /// Hard Bernoulli samples, (F − baseline)(b_i − s_i) (forward-only).
    Reinforce,
}

/// How the mask is learned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Fit a surrogate of the loss over mixing weights from every oracle call, optimise the
    /// mask on it and spend real calls only to verify its best hard masks (`surrogate`).
    #[default]
    Surrogate,
    /// The paper's estimator: every relaxed-mask sample is an oracle call.
    Direct,
}

/// `[select.sewa]`. Every key is optional; `Default` documents the defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SewaConfig {
    pub strategy: Strategy,
    /// Surrogate: most objective calls of one selection, the guard's (and, for forward-only
    /// objectives, the members' own losses) included (0: 2K).
    pub surrogate_max_calls: usize,
    /// Surrogate: hard masks verified per refit.
    #[serde(deserialize_with = "crate::checked::de::at_least_one")]
    pub surrogate_batch: usize,
    /// Surrogate: stop when no mask is predicted to beat the best verified one by more than
    /// this fraction of its loss.
    #[serde(deserialize_with = "crate::checked::de::non_negative")]
    pub surrogate_tolerance: f64,
    /// Surrogate: ridge on the model's residual, relative to the data's scale.
    #[serde(deserialize_with = "crate::checked::de::positive")]
    pub surrogate_ridge: f64,
    /// Mask samples M per iteration (one oracle call each).
    #[serde(deserialize_with = "crate::checked::de::at_least_one")]
    pub samples: usize,
    /// Relaxation temperature τ at the first iteration.
    #[serde(deserialize_with = "crate::checked::de::positive")]
    pub temperature: f64,
    /// τ at the last iteration (geometric annealing); equal to `temperature` for none.
    #[serde(deserialize_with = "crate::checked::de::positive")]
    pub temperature_end: f64,
    /// Adam iterations of a cold start.
    #[serde(deserialize_with = "crate::checked::de::at_least_one")]
    pub iterations: usize,
    /// Adam iterations when warm-started from the previous window's θ.
    pub warm_iterations: usize,
    /// Start cold at least every `cold_every` selections (1: always; 0: only when a warm
    /// start is stuck, see `sewa::run`).
    pub cold_every: usize,
    /// Adam learning rate on θ (logits).
    #[serde(deserialize_with = "crate::checked::de::positive")]
    pub lr: f64,
    pub seed: u64,
    pub estimator: Estimator,
    /// Swap local search after top-k.
    pub polish: bool,
    /// Swaps tried per polishing round (best predicted first); each try is one oracle call.
    pub polish_tries: usize,
    /// Largest number of k-subsets `exhaustive` will evaluate.
    pub exhaustive_limit: u64,
    /// Also record each member's own loss (K forward calls, reported apart from the
    /// selection's cost as `oracle_calls_report`) so `sewa report` can draw them.
    pub member_losses: bool,
    /// Verify the fixed rules (contiguous runs of k, LAWA-k among them, the uniform window,
    /// EMAs) and never publish a model-based answer whose loss is worse than theirs
    /// (`select::guard`). Off only to study a method's raw answer.
    pub guard: bool,
}

impl Default for SewaConfig {
    fn default() -> Self {
        SewaConfig {
            strategy: Strategy::Surrogate,
            surrogate_max_calls: 0,
            surrogate_batch: 2,
            surrogate_tolerance: 1e-3,
            surrogate_ridge: 1e-2,
            samples: 4,
            temperature: 0.5,
            temperature_end: 0.2,
            iterations: 40,
            warm_iterations: 8,
            cold_every: 10,
            lr: 0.2,
            seed: 0,
            estimator: Estimator::Auto,
            polish: true,
            polish_tries: 6,
            exhaustive_limit: 20_000,
            member_losses: true,
            guard: true,
        }
    }
}

impl SewaConfig {
    /// What deserialisation cannot see (a config built in code, not parsed); `config_path`
    /// names the file in errors. Parsed tables already rejected these values at their line.
    pub fn check(&self, config_path: &Path) -> Result<()> {
        let bad = |m: &str| Err(Error::config(config_path, format!("[select.sewa] {m}")));
        let pos = |x: f64| x.is_finite() && x > 0.0;
        if self.samples == 0 {
            return bad("samples must be at least 1");
        }
        if !pos(self.temperature) || !pos(self.temperature_end) {
            return bad("temperature and temperature_end must be positive numbers");
        }
        if !pos(self.lr) {
            return bad("lr must be a positive number");
        }
        if self.iterations == 0 {
            return bad("iterations must be at least 1");
        }
        if self.surrogate_batch == 0 {
            return bad("surrogate_batch must be at least 1");
        }
        if !(self.surrogate_tolerance.is_finite() && self.surrogate_tolerance >= 0.0) {
            return bad("surrogate_tolerance must be a non-negative number");
        }
        if !pos(self.surrogate_ridge) {
            return bad("surrogate_ridge must be a positive number");
        }
        Ok(())
    }

    pub(super) fn tau(&self, t: usize, iters: usize) -> f64 {
        let frac = if iters > 1 { t as f64 / (iters - 1) as f64 } else { 1.0 };
        self.temperature * (self.temperature_end / self.temperature).powf(frac)
    }
}

/// `[select.soup]`. Every key is optional.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SoupConfig {
    /// Adam steps over all members (one gradient call each).
    #[serde(deserialize_with = "crate::checked::de::at_least_one")]
    pub iterations: usize,
    /// Adam learning rate on the logits.
    #[serde(deserialize_with = "crate::checked::de::positive")]
    pub lr: f64,
    /// Sparse soup: keep the k largest weights and re-optimise them (absent: every member).
    #[serde(deserialize_with = "crate::checked::de::opt_at_least_one")]
    pub k: Option<usize>,
    /// Adam steps after sparsifying.
    pub sparse_iterations: usize,
}

impl Default for SoupConfig {
    fn default() -> Self {
        SoupConfig { iterations: 16, lr: 0.3, k: None, sparse_iterations: 8 }
    }
}

/// `[select.twa]`. Every key is optional.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TwaConfig {
    /// Oracle calls (each a loss and gradient).
    #[serde(deserialize_with = "crate::checked::de::at_least_one")]
    pub iterations: usize,
    /// First step, as the largest change of one coefficient.
    #[serde(deserialize_with = "crate::checked::de::positive")]
    pub step: f64,
}

impl Default for TwaConfig {
    fn default() -> Self {
        TwaConfig { iterations: 16, step: 0.25 }
    }
}
