//! `sewa demo`: a self-contained run that trains a small MLP on a noisy synthetic task, writing
//! checkpoints into a directory while the real `sewa watch` pipeline runs on it in-process
//! (SeWA selection, "best so far" publishing); then compares every selector on the final window
//! (held-out loss, test accuracy, selection cost). No downloads. Deterministic for a seed: the
//! trainer waits for the watcher after each checkpoint, so no run depends on timing.
//! Training lives in `task`; the watcher in `watcher`; the comparison table in `table`.
//! The command's entry (flags in, `--json` out) is the `sewa` binary's `commands::demo`.

mod table;
pub mod task;
mod watcher;

pub use table::Row;
pub use watcher::{History, Publication};

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result, WithPath};
use crate::objective::data::{Targets, write_dataset};
use crate::objective::{Activation, Objective, ObjectiveConfig};
use crate::select::{Selection, SewaConfig};
use sewa_checkpoint::{Checkpoint, OpenOptions};
use table::Scorer;

/// What to run: where, and the window, k and seed.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Directory for checkpoints and outputs (default: a new one under the temp dir, kept).
    pub dir: Option<PathBuf>,
    /// Members averaged by the k-subset methods.
    pub k: usize,
    /// Window size (the last N checkpoints).
    pub window: usize,
    /// Seed for the task, the training run and the selectors.
    pub seed: u64,
}

/// What one demo run produced (tests compare two runs of one seed).
pub struct Outcome {
    pub rows: Vec<Row>,
    /// What the in-process watcher published, after which checkpoint, and its last status.
    pub history: History,
    /// The table's SeWA row: a cold start on the final window.
    pub table_sewa: Selection,
    /// The final lines printed: what the watcher published, when, and its last selection.
    pub summary: String,
}

/// The demo with the task and training knobs given (tests use a shorter run).
pub fn run_with(args: &DemoOptions, spec: &task::TaskSpec) -> Result<Outcome> {
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
    refuse_earlier_run(&dir)?;
    std::fs::create_dir_all(&ckpt_dir).with_path(&ckpt_dir)?;
    let data = spec.generate();
    let sel_path = dir.join("selection.safetensors");
    let (x, y) = (&data.selection.x, Targets::Classes(&data.selection.y));
    write_dataset(&sel_path, x, spec.features, y)?;
    let (history, config_path) = train_watched(&dir, &ckpt_dir, args, spec, &data)?;
    let cfg = ObjectiveConfig::builtin(sel_path);
    let mut objective = cfg.build(&dir)?;
    let test_x = Tensor::from_slice(&data.test.x, (data.test.y.len(), spec.features), &Device::Cpu)
        .map_err(|e| Error::Internal(format!("candle: {e}")))?;
    let members = open_window(&ckpt_dir, args.window)?;
    let scorer = Scorer { test_x, test_y: &data.test.y, activation: Activation::Relu };
    let sewa_cfg = SewaConfig { seed: args.seed, ..SewaConfig::default() };
    let (rows, sewa) = table::rows(&members, objective.as_mut(), &scorer, args.k, &sewa_cfg)?;
    println!("{}", table::render(&rows, members.len(), args.k));
    warm_vs_cold(&ckpt_dir, args, objective.as_mut(), &sewa_cfg)?;
    let summary = watcher_summary(&history, &config_path, &sewa);
    print!("{summary}");
    Ok(Outcome { rows, history, table_sewa: sewa, summary })
}

/// An earlier run's checkpoints would fill the watcher's window before training starts (and
/// its published model would be the baseline to beat): the demo needs a fresh directory.
fn refuse_earlier_run(dir: &Path) -> Result<()> {
    for sub in ["checkpoints", "published"] {
        let path = dir.join(sub);
        let used = std::fs::read_dir(&path).is_ok_and(|mut d| d.next().is_some());
        if used {
            return Err(Error::Usage(format!(
                "demo: {} holds an earlier run's files; give a new directory or remove them",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Train into `ckpt_dir` with `sewa watch` running on it; after each checkpoint, training waits
/// until the watcher has selected over it. Returns what the watcher did and its config file.
fn train_watched(
    dir: &Path,
    ckpt_dir: &Path,
    args: &DemoOptions,
    spec: &task::TaskSpec,
    data: &task::Task,
) -> Result<(History, PathBuf)> {
    let sidecar = watcher::Sidecar::start(dir, ckpt_dir, args.window, args.k, args.seed)?;
    let t0 = Instant::now();
    let mut history = History::default();
    let written = spec.train(data, ckpt_dir, |p, step| {
        tracing::debug!(path = %p.display(), "saved");
        sidecar.admit(step, &mut history)
    })?;
    eprintln!(
        "trained {} steps, wrote {} checkpoints to {} in {:.1}s; after each one, training waited \
         until `sewa watch` had selected over it, so a seed always gives the same run",
        spec.steps,
        written.len(),
        ckpt_dir.display(),
        t0.elapsed().as_secs_f64()
    );
    let config_path = sidecar.config_path.clone();
    sidecar.stop()?;
    Ok((history, config_path))
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
    Ok(paths[start..]
        .iter()
        .map(|p| Checkpoint::open(p, &OpenOptions::default()))
        .collect::<sewa_checkpoint::Result<_>>()?)
}

/// Re-selection after the window slides by two checkpoints: cold versus warm oracle calls.
fn warm_vs_cold(
    dir: &Path,
    args: &DemoOptions,
    objective: &mut dyn Objective,
    cfg: &SewaConfig,
) -> Result<()> {
    let all = open_window(dir, args.window + 2)?;
    if all.len() < args.window + 2 {
        return Ok(());
    }
    let before: Vec<&Checkpoint> = all[..args.window].iter().collect();
    let after: Vec<&Checkpoint> = all[2..].iter().collect();
    use crate::select::{Memory, Method, run_model_based, run_remembering};
    // Warm as the daemon runs it: member losses and the survivors' surrogate data are kept.
    let mut memory = Memory::default();
    run_remembering(Method::Sewa, args.k, &before, objective, cfg, &mut memory)?;
    let (cold, _) = run_model_based(Method::Sewa, args.k, &after, objective, cfg, None)?;
    let warm = run_remembering(Method::Sewa, args.k, &after, objective, cfg, &mut memory)?;
    let calls = |s: &crate::select::Selection| s.details.total_calls();
    let secs = |s: &crate::select::Selection| s.details.wall_seconds.unwrap_or(0.0);
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

/// What the in-process `sewa watch` published while the model trained, and when; how its last
/// selection compares with the table's SeWA row. The demo's final lines.
fn watcher_summary(history: &History, config: &Path, table_sewa: &Selection) -> String {
    let mut o = String::new();
    let Some(status) = &history.last else { return o };
    let c = &status.counters;
    let _ = writeln!(
        o,
        "sewa watch (in-process, config {}): {} checkpoints loaded, {} selections, {} publications \
         (policy best: a selection is published only when its held-out loss beats the published \
         model's)",
        config.display(),
        c.loaded,
        c.selections,
        c.publishes
    );
    let when: Vec<String> = history
        .publications
        .iter()
        .map(|p| format!("{} ({:.4})", p.after_step, p.loss.unwrap_or(f64::NAN)))
        .collect();
    if !when.is_empty() {
        let _ = writeln!(o, "published after steps (held-out loss): {}", when.join(", "));
    }
    match (history.publications.last(), &status.last_publish) {
        (Some(p), Some(out)) => {
            let _ = writeln!(
                o,
                "published model: selection {} of {}, made when step {} arrived: steps {}, \
                 held-out loss {:.4}",
                p.selection,
                c.selections,
                p.after_step,
                steps_text(&p.steps),
                p.loss.unwrap_or(f64::NAN)
            );
            let _ = writeln!(o, "  model:    {}", out.path.display());
            let _ = writeln!(o, "  manifest: {}", out.manifest.display());
            let m = out.manifest.display();
            let _ = writeln!(o, "  draw its window: sewa report {m} --out window.svg");
        }
        _ => {
            let _ = writeln!(o, "the watcher published nothing (see {})", status.out.display());
        }
    }
    let Some(last) = &status.last_selection else { return o };
    let _ = writeln!(o, "the watcher's last selection: {} — {}", last.summary.why, last.outcome);
    // Same members, same objective and data: the losses agree exactly when the subsets are the
    // same (up to the status file's JSON round trip).
    let table = "the table's SeWA row (a cold start on the same final window)";
    if same_loss(last.summary.loss, table_sewa.loss) {
        let _ = writeln!(o, "{table} chose the same subset");
    } else {
        let _ = writeln!(o, "{table} chose another subset: {}", table_sewa.why);
    }
    o
}

/// Whether two selection losses are the same number, allowing for a JSON round trip.
pub fn same_loss(a: Option<f64>, b: Option<f64>) -> bool {
    matches!((a, b), (Some(a), Some(b)) if (a - b).abs() <= 1e-12 * b.abs().max(1.0))
}

fn steps_text(steps: &[u64]) -> String {
    let s: Vec<String> = steps.iter().map(|s| s.to_string()).collect();
    s.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_with_an_earlier_run_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        refuse_earlier_run(dir.path()).unwrap();
        std::fs::create_dir(dir.path().join("checkpoints")).unwrap();
        refuse_earlier_run(dir.path()).unwrap();
        std::fs::write(dir.path().join("checkpoints/step_000060.safetensors"), b"x").unwrap();
        let e = refuse_earlier_run(dir.path()).unwrap_err().to_string();
        assert!(e.contains("earlier run") && e.contains("new directory"), "{e}");
    }
}
