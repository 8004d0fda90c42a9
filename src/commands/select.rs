//! Model-based selection driven by a config file, for one-shot commands (`average --select`,
//! `report --config`): read the file's `[objective]` and `[select.sewa]` tables, build the
//! objective, run the selector once. The daemon parses its config itself and calls
//! `select::run_model_based` directly.

use std::path::Path;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::objective::config::build_objective;
use crate::select::{Selection, SewaConfig, run_model_based};

/// Run `method` with `k` over `members` using the objective configured in `config`.
pub fn run(config: &Path, method: &str, k: usize, members: &[&Checkpoint]) -> Result<Selection> {
    let text = std::fs::read_to_string(config).map_err(|e| Error::io(config, e))?;
    let doc: toml::Value =
        toml::from_str(&text).map_err(|e| Error::config(config, format!("not TOML: {e}")))?;
    let table = doc.get("objective").ok_or_else(|| {
        Error::config(config, "no [objective] table: model-based selection needs one")
    })?;
    let mut objective = build_objective(table, config)?;
    let sewa = match doc.get("select").and_then(|s| s.get("sewa")) {
        Some(v) => SewaConfig::from_toml(v, config)?,
        None => SewaConfig::default(),
    };
    let (sel, _) = run_model_based(method, k, members, objective.as_mut(), &sewa, None)?;
    tracing::info!("{}", sel.why);
    Ok(sel)
}
