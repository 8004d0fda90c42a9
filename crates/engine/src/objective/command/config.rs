//! `[objective]` keys for `kind = "command"` once resolved: the evaluator's program, its
//! timeouts (bounded: a week at most), environment, working and staging directories.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// The longest `timeout_s` / `startup_timeout_s` accepted: a week (larger values are typos, and
/// `Duration` cannot hold arbitrary floats).
const MAX_TIMEOUT_S: f64 = 7.0 * 86_400.0;

/// `[objective]` keys for `kind = "command"`.
#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CommandConfig {
    /// Program and arguments, e.g. `["python3", "eval.py"]`.
    pub command: Vec<String>,
    /// Longest a single request (or the handshake) may take before the evaluator is killed.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: f64,
    /// Longest the evaluator may take to start and answer the hello (imports, loading data).
    #[serde(default = "default_startup_timeout_s")]
    pub startup_timeout_s: f64,
    /// Extra environment variables for the evaluator.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory of the evaluator (default: sewa's).
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// Where candidate, gradient and member files are exchanged (default: /dev/shm, else the
    /// temp dir).
    #[serde(default)]
    pub staging_dir: Option<PathBuf>,
    /// Serving one command: a failure ends it, so no restart is announced (not a TOML key).
    #[serde(skip)]
    pub one_shot: bool,
}

/// `deserialize_with` for an optional `timeout_s` / `startup_timeout_s`: out of range is an
/// error at its line (`CommandConfig::check` repeats the rule for configs built in code).
pub fn opt_timeout_s<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<f64>, D::Error> {
    let v = f64::deserialize(d)?;
    if !(v.is_finite() && v > 0.0 && v <= MAX_TIMEOUT_S) {
        return Err(serde::de::Error::custom(timeout_range(v)));
    }
    Ok(Some(v))
}

fn timeout_range(v: f64) -> String {
    format!("{v} must be > 0 and at most {MAX_TIMEOUT_S} (a week)")
}

pub(crate) fn default_timeout_s() -> f64 {
    300.0
}

pub(crate) fn default_startup_timeout_s() -> f64 {
    120.0
}

impl CommandConfig {
    pub fn check(&self, config_path: &Path) -> Result<()> {
        if self.command.is_empty() || self.command[0].is_empty() {
            return Err(Error::config(config_path, "[objective] command must name a program"));
        }
        for (key, v) in
            [("timeout_s", self.timeout_s), ("startup_timeout_s", self.startup_timeout_s)]
        {
            if !(v.is_finite() && v > 0.0 && v <= MAX_TIMEOUT_S) {
                let msg = format!("[objective] {key} = {}", timeout_range(v));
                return Err(Error::config(config_path, msg));
            }
        }
        Ok(())
    }
}
