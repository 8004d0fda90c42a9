//! Model-based selection driven by a config file, for one-shot commands (`average --select`,
//! `report --config`): read the file's `[objective]` and `[select.sewa]` tables, build the
//! objective, run the selector once (the method name is parsed into a `Method` first). The
//! daemon runs the same selectors through `select::run_remembering`, keeping warm starts and
//! member losses between selections.

use std::path::Path;

use serde::Deserialize;

use sewa_checkpoint::Checkpoint;
use sewa_engine::error::{Error, Result};
use sewa_engine::objective::ObjectiveConfig;
use sewa_engine::objective::config::build_objective;
use sewa_engine::select::{
    Options, Selection, SewaConfig, SoupConfig, TwaConfig, model_based, run_model_based_with,
};

/// The two tables a one-shot selection reads, typed in one pass (errors keep their line);
/// any other table (a full daemon config) is ignored here.
#[derive(Deserialize)]
struct SelectionTables {
    objective: Option<ObjectiveConfig>,
    #[serde(default)]
    select: SelectTable,
}

#[derive(Default, Deserialize)]
struct SelectTable {
    #[serde(default)]
    sewa: SewaConfig,
    #[serde(default)]
    soup: SoupConfig,
    #[serde(default)]
    twa: TwaConfig,
}

/// Run `method` with `k` over `members` using the objective configured in `config`.
pub fn run(config: &Path, method: &str, k: usize, members: &[&Checkpoint]) -> Result<Selection> {
    let method = model_based(method)?;
    let text = std::fs::read_to_string(config).map_err(|e| Error::io(config, e))?;
    let tables: SelectionTables = toml::from_str(&text)
        .map_err(|e| Error::config(config, e.to_string().trim_end().to_string()))?;
    let objective = tables.objective.ok_or_else(|| {
        Error::config(config, "no [objective] table: model-based selection needs one")
    })?;
    objective.check(config)?;
    tables.select.sewa.check(config)?;
    super::interrupt::stop_evaluators_on_signal();
    let mut objective = build_objective(&objective, &sewa_engine::config::config_dir(config))?;
    let t = &tables.select;
    let opts = Options { sewa: &t.sewa, soup: &t.soup, twa: &t.twa };
    let (sel, _) = run_model_based_with(method, k, members, objective.as_mut(), opts, None)?;
    tracing::info!("{}", sel.why);
    Ok(sel)
}
