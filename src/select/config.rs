//! `[select]`: which selector runs and its parameters. Owned by the selectors (the config
//! file's parser only embeds it), so that `select` never imports `config`.

use std::fmt;

use serde::Deserialize;

use super::{SewaConfig, SoupConfig, TwaConfig};
use crate::checked::{Positive, UnitOpen};

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    Uniform,
    Lawa,
    Ema,
    BestMetric,
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
    pub fn name(self) -> &'static str {
        match self {
            Method::Uniform => "uniform",
            Method::Lawa => "lawa",
            Method::Ema => "ema",
            Method::BestMetric => "best-metric",
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
    /// soup's k only bounds how many it keeps) or grow their own set (greedy).
    pub fn min_members(&self) -> usize {
        if let Some(n) = self.min_members {
            return n.get();
        }
        match self.method {
            Method::Uniform | Method::Ema | Method::Greedy | Method::Soup | Method::Twa => 1,
            _ => self.k.get(),
        }
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
fn default_metric() -> String {
    "eval_loss".to_string()
}
fn default_metric_mode() -> MetricMode {
    MetricMode::Min
}
