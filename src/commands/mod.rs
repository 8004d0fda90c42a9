//! Library side of each subcommand: turn parsed flags into a call on the engine and a result
//! for `main` to print. No flag definitions (see `cli`) and no process exit codes (see `main`).

pub mod average;
pub mod check;
pub mod demo;
pub mod flags;
pub mod inspect;
pub mod interrupt;
pub mod lora;
pub mod ranks;
pub mod report;
pub mod select;
pub mod startup;
pub mod watch;

use std::path::PathBuf;

use sewa_checkpoint::{Checkpoint, DeepSpeedWeights, OpenOptions};
use sewa_engine::error::Result;

/// Open options with `_orig_mod.` plus the user's extra prefixes, the state key if given and
/// which DeepSpeed weights to read.
pub fn open_options(
    strip_prefix: &[String],
    state_key: Option<&str>,
    deepspeed_weights: DeepSpeedWeights,
) -> OpenOptions {
    let mut opts = OpenOptions {
        state_key: state_key.map(str::to_string),
        deepspeed_weights,
        ..Default::default()
    };
    for p in strip_prefix {
        if !opts.strip_prefixes.contains(p) {
            opts.strip_prefixes.push(p.clone());
        }
    }
    opts
}

/// Open every input, failing on the first bad one (the error names it).
pub fn open_all(paths: &[PathBuf], opts: &OpenOptions) -> Result<Vec<Checkpoint>> {
    Ok(paths.iter().map(|p| Checkpoint::open(p, opts)).collect::<sewa_checkpoint::Result<_>>()?)
}
