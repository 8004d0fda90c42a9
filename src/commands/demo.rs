//! `sewa demo`: run the demo engine (`demo`) for the flags' seed, then write its table rows as
//! JSON when `--json` asks. The engine prints the table and the watcher's summary itself.

use crate::cli::DemoArgs;
use sewa_engine::demo::{self, DemoOptions, Row, task::TaskSpec};
use sewa_engine::error::{Error, Result, WithPath};

/// Run the demo with the default task for `args.seed`. Returns the table's rows.
pub fn run(args: &DemoArgs) -> Result<Vec<Row>> {
    let spec = TaskSpec { seed: args.seed, ..Default::default() };
    let options =
        DemoOptions { dir: args.dir.clone(), k: args.k, window: args.window, seed: args.seed };
    let rows = demo::run_with(&options, &spec)?.rows;
    if let Some(p) = &args.json {
        let text =
            serde_json::to_string_pretty(&rows).map_err(|e| Error::Internal(e.to_string()))?;
        std::fs::write(p, text).with_path(p)?;
    }
    Ok(rows)
}
