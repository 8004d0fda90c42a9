//! `sewa demo`: a self-contained run that trains a small MLP on a noisy synthetic task, writing
//! checkpoints into a directory while the real `sewa watch` pipeline runs on it in-process
//! (SeWA selection, "best so far" publishing); then compares every selector on the final window
//! (held-out loss, test accuracy, selection cost). No downloads.
//! Training lives in `task`; the watcher in `watcher`; the comparison table in `table`.

mod table;
pub mod task;
mod watcher;

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};

use crate::checkpoint::{Checkpoint, OpenOptions};
use crate::error::{Error, Result, WithPath};
use crate::objective::data::{Targets, write_dataset};
use crate::objective::{Activation, LossKind, Objective, ObjectiveConfig};
use crate::select::SewaConfig;
use table::{Row, Scorer};

/// `sewa demo` flags.
#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {
    /// Directory for checkpoints and outputs (default: a new one under the temp dir, kept).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Write the table rows as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Members averaged by the k-subset methods.
    #[arg(long, default_value_t = 5)]
    pub k: usize,
    /// Window size (the last N checkpoints).
    #[arg(long, default_value_t = 20)]
    pub window: usize,
    /// Seed for the task, the training run and the selectors.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Run the demo and print the table. Returns the rows (tests and `--json` use them).
pub fn run(args: &DemoArgs) -> Result<Vec<Row>> {
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_path(d)?;
            d.clone()
        }
        None => tempfile::Builder::new()
            .prefix("sewa-demo-")
            .tempdir()
            .map_err(|e| Error::io(std::env::temp_dir(), e))?
            .keep(),
    };
    let ckpt_dir = dir.join("checkpoints");
    std::fs::create_dir_all(&ckpt_dir).with_path(&ckpt_dir)?;
    let spec = task::TaskSpec { seed: args.seed, ..Default::default() };
    let data = spec.generate();
    let sel_path = dir.join("selection.safetensors");
    write_dataset(
        &sel_path,
        &data.selection.x,
        spec.features,
        Targets::Classes(&data.selection.y),
    )?;
    let sidecar = watcher::Sidecar::start(&dir, &ckpt_dir, args.window, args.k, args.seed)?;
    let t0 = Instant::now();
    let written =
        spec.train(&data, &ckpt_dir, |p| tracing::debug!(path = %p.display(), "saved"))?;
    eprintln!(
        "trained {} steps, wrote {} checkpoints to {} in {:.1}s while `sewa watch` ran on it",
        spec.steps,
        written.len(),
        ckpt_dir.display(),
        t0.elapsed().as_secs_f64()
    );
    let last_step = (spec.steps / spec.save_every * spec.save_every) as u64;
    let status = sidecar.wait_for_step(last_step, std::time::Duration::from_secs(120))?;
    let config_path = sidecar.config_path.clone();
    sidecar.stop()?;
    let cfg = ObjectiveConfig {
        kind: Default::default(),
        model: Default::default(),
        data: sel_path.clone(),
        activation: Activation::Relu,
        loss: LossKind::CrossEntropy,
        batch: None,
        ..Default::default()
    };
    let mut objective = cfg.build(&dir)?;
    let test_x = Tensor::from_slice(&data.test.x, (data.test.y.len(), spec.features), &Device::Cpu)
        .map_err(|e| Error::Internal(format!("candle: {e}")))?;
    let members = open_window(&ckpt_dir, args.window)?;
    let scorer = Scorer { test_x, test_y: &data.test.y, activation: Activation::Relu };
    let sewa_cfg = SewaConfig { seed: args.seed, ..SewaConfig::default() };
    let (rows, sewa) = table::rows(&members, objective.as_mut(), &scorer, args.k, &sewa_cfg)?;
    println!("{}", table::render(&rows, members.len(), args.k));
    warm_vs_cold(&ckpt_dir, args, objective.as_mut(), &sewa_cfg)?;
    print_watcher(&status, &config_path, &sewa);
    if let Some(p) = &args.json {
        let text =
            serde_json::to_string_pretty(&rows).map_err(|e| Error::Internal(e.to_string()))?;
        std::fs::write(p, text).with_path(p)?;
    }
    Ok(rows)
}

/// The last `window` checkpoints in `dir`, ordered by step.
fn open_window(dir: &Path, window: usize) -> Result<Vec<Checkpoint>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_path(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    paths.sort();
    let start = paths.len().saturating_sub(window);
    paths[start..].iter().map(|p| Checkpoint::open(p, &OpenOptions::default())).collect()
}

/// Re-selection after the window slides by two checkpoints: cold versus warm oracle calls.
fn warm_vs_cold(
    dir: &Path,
    args: &DemoArgs,
    objective: &mut dyn Objective,
    cfg: &SewaConfig,
) -> Result<()> {
    let all = open_window(dir, args.window + 2)?;
    if all.len() < args.window + 2 {
        return Ok(());
    }
    let before: Vec<&Checkpoint> = all[..args.window].iter().collect();
    let after: Vec<&Checkpoint> = all[2..].iter().collect();
    let run = crate::select::run_model_based;
    let (_, state) = run("sewa", args.k, &before, objective, cfg, None)?;
    let (cold, _) = run("sewa", args.k, &after, objective, cfg, None)?;
    let (warm, _) = run("sewa", args.k, &after, objective, cfg, state.as_ref())?;
    let calls = |s: &crate::select::Selection| s.details["oracle_calls"].as_u64().unwrap_or(0);
    let secs = |s: &crate::select::Selection| s.details["wall_seconds"].as_f64().unwrap_or(0.0);
    println!(
        "re-selection after 2 new checkpoints: cold {} oracle calls ({:.2}s, loss {:.4}), \
         warm {} ({:.0}% of cold, {:.2}s, loss {:.4})",
        calls(&cold),
        secs(&cold),
        cold.loss.unwrap_or(f64::NAN),
        calls(&warm),
        100.0 * calls(&warm) as f64 / calls(&cold).max(1) as f64,
        secs(&warm),
        warm.loss.unwrap_or(f64::NAN)
    );
    Ok(())
}

/// What the in-process `sewa watch` published while the model trained.
fn print_watcher(
    status: &crate::status::Status,
    config: &Path,
    table_sewa: &crate::select::Selection,
) {
    let c = &status.counters;
    println!(
        "sewa watch (in-process, config {}): {} checkpoints loaded, {} selections, {} publications \
         (policy best: only when the held-out loss improved)",
        config.display(),
        c.loaded,
        c.selections,
        c.publishes
    );
    match &status.last_publish {
        Some(p) => {
            println!("published model: {}", p.path.display());
            println!("manifest:        {}", p.manifest.display());
            println!("draw the window: sewa report {} --out window.svg", p.manifest.display());
        }
        None => println!("the watcher published nothing (see {})", status.out.display()),
    }
    if let (Some(sel), Some(loss)) = (&status.last_selection, table_sewa.loss) {
        println!(
            "last selection by the watcher: {} (loss {:.4}; the table's SeWA k: {loss:.4})",
            sel.why,
            sel.loss.unwrap_or(f64::NAN)
        );
    }
}
