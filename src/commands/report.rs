//! `sewa report`: get a selection — read from a JSON file (a `Selection`, a manifest), or made
//! now with `--config` through `commands::select` — and hand it to `report` to draw.

use crate::cli::ReportArgs;
use sewa_checkpoint::{Checkpoint, OpenOptions};
use sewa_engine::error::{Error, Result, WithPath};
use sewa_engine::report::{Window, draw};

/// Read the selection (or make one with `--config`), write `args.out`.
pub fn run(args: &ReportArgs) -> Result<()> {
    let (v, source) = match &args.config {
        Some(config) => {
            let opened = super::open_all(&args.inputs, &OpenOptions::default())?;
            let mut members: Vec<&Checkpoint> = opened.iter().collect();
            members.sort_by_key(|c| c.step());
            let cfg = super::select::load(Some(config))?;
            let sel = super::select::run(&cfg, &args.select, args.k, &members)?;
            (serde_json::to_value(&sel).map_err(|e| Error::Internal(e.to_string()))?, config)
        }
        None => {
            let [input] = args.inputs.as_slice() else {
                return Err(Error::Usage("report takes one selection JSON (or --config)".into()));
            };
            let text = std::fs::read_to_string(input).with_path(input)?;
            let v = serde_json::from_str(&text)
                .map_err(|e| Error::bad_input(input, format!("not JSON: {e}")))?;
            (v, input)
        }
    };
    let w = Window::from_json(&v).map_err(|m| Error::bad_input(source, m))?;
    draw(&w, &args.out)?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
