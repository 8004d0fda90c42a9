//! `sewa report`: get a selection — read from a JSON file (a `Selection`, a manifest), or made
//! now with `--config` through `commands::select` — and hand it to `report` to draw; with
//! `--history`, read a `sewa watch` run's publication history and hand it to `report::history`.

use crate::cli::ReportArgs;
use sewa_checkpoint::{Checkpoint, OpenOptions};
use sewa_engine::config::Config;
use sewa_engine::error::{Error, Result, WithPath};
use sewa_engine::history;
use sewa_engine::report::{Window, draw};

/// Read the selection (or make one with `--config`), write `args.out`.
pub fn run(args: &ReportArgs) -> Result<()> {
    if args.history {
        return run_history(args);
    }
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

/// `--history`: the history beside `--config`'s status file, or the one file given.
fn run_history(args: &ReportArgs) -> Result<()> {
    let path = match (&args.config, args.inputs.as_slice()) {
        (Some(config), []) => history::beside(&Config::load(config)?.status_file()),
        (None, [path]) => path.clone(),
        _ => {
            let why = "report --history takes either --config FILE or one history file";
            return Err(Error::Usage(why.into()));
        }
    };
    let h = history::read(&path)?;
    if let Some((line, why)) = &h.first_skipped {
        eprintln!("{}: skipped {} bad lines (line {line}: {why})", path.display(), h.skipped);
    }
    let svg = sewa_engine::report::history::draw(&h.entries)
        .map_err(|why| Error::bad_input(&path, why))?;
    std::fs::write(&args.out, svg).with_path(&args.out)?;
    eprintln!("wrote {} ({} publications)", args.out.display(), h.entries.len());
    Ok(())
}
