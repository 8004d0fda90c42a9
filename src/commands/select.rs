//! Model-based selection driven by a config file, for one-shot commands (`average --select`,
//! `report --config`): the file is read once by `Config::load_selection` (the daemon's parse and
//! rules); here the objective is built and the selector run once (the method name is parsed
//! into a `Method` first). The daemon runs the same selectors through
//! `select::run_remembering`, keeping warm starts and member losses between selections.

use std::path::Path;

use sewa_checkpoint::Checkpoint;
use sewa_engine::config::{Config, SelectionConfig};
use sewa_engine::error::{Error, Result};
use sewa_engine::objective::build_objective;
use sewa_engine::select::{Options, Selection, model_based, run_model_based_with};

/// The config file named by `--config`, read for a selection (`--select` needs one).
pub fn load(config: Option<&Path>) -> Result<SelectionConfig> {
    let path = config.ok_or_else(|| Error::Usage("--select needs --config".into()))?;
    Config::load_selection(path)
}

/// Run `method` with `k` over `members` using the objective configured in `cfg`.
pub fn run(
    cfg: &SelectionConfig,
    method: &str,
    k: usize,
    members: &[&Checkpoint],
) -> Result<Selection> {
    let method = model_based(method)?;
    super::interrupt::stop_evaluators_on_signal();
    let mut objective = build_objective(&cfg.objective, &cfg.base_dir)?;
    let s = &cfg.select;
    let opts = Options { sewa: &s.sewa, soup: &s.soup, twa: &s.twa };
    let (sel, _) = run_model_based_with(method, k, members, objective.as_mut(), opts, None)?;
    tracing::info!("{}", sel.why);
    Ok(sel)
}
