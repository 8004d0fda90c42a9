//! `sewa check-config`: everything `sewa watch` checks before it starts (the config's rules,
//! then `startup`'s checks on disk), a one-line summary naming only the keys the chosen method
//! uses, and with `--objective` a trial of the loss oracle: start it, one evaluation (with
//! gradient when it has one) on a checkpoint from the watched directory, timed.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::cli::CheckConfigArgs;
use sewa_checkpoint::{Checkpoint, OpenOptions};
use sewa_engine::config::Config;
use sewa_engine::error::{Error, Result};
use sewa_engine::objective::ObjectiveConfig;
use sewa_engine::objective::build_objective;
use sewa_engine::objective::config::Kind;
use sewa_engine::select::blend::Blend;
use sewa_engine::select::oracle::Oracle;
use sewa_engine::select::{Method, Strategy};

/// The report for a valid config (exit 0); a config `watch` would refuse is an error (78).
pub fn run(args: &CheckConfigArgs) -> Result<String> {
    let cfg = Config::load(&args.file)?;
    let notes = super::startup::check(&cfg, &args.file)?;
    let mut text = format!("{}: ok — {}", args.file.display(), summary(&cfg));
    for note in cfg.notes.iter().chain(&notes) {
        text.push_str(&format!("\nnote: {note}"));
    }
    if args.objective {
        text.push('\n');
        text.push_str(&try_objective(&cfg, &args.file)?);
    }
    Ok(text)
}

/// What the daemon will do, with the keys the method reads and no others.
pub fn summary(c: &Config) -> String {
    let s = &c.select;
    let k = s.k.0;
    let method = match s.method {
        Method::Uniform | Method::Greedy => s.method.name().to_string(),
        Method::Lawa => format!("lawa k={k}"),
        Method::Ema => format!("ema ema_decay={}", s.ema_decay.0),
        Method::Wsm => format!("wsm k={k} wsm_shape={}", s.wsm_shape),
        Method::Weights => format!("weights {:?}", s.weights.as_deref().unwrap_or_default()),
        Method::BestMetric => {
            let mode = format!("{:?}", s.metric_mode).to_ascii_lowercase();
            format!("best-metric k={k} metric={:?} metric_mode={mode}", s.metric)
        }
        Method::Exhaustive => {
            format!("exhaustive k={k} exhaustive_limit={}", s.sewa.exhaustive_limit)
        }
        Method::Random => format!("random k={k} seed={}", s.sewa.seed),
        Method::Soup => {
            let sparse = s.soup.k.map_or(String::new(), |k| format!(" k={k}"));
            format!("soup iterations={} lr={}{sparse}", s.soup.iterations, s.soup.lr)
        }
        Method::Twa => format!("twa iterations={} step={}", s.twa.iterations, s.twa.step),
        // The knobs of the strategy that runs: the surrogate's call budget by default.
        Method::Sewa if s.sewa.strategy == Strategy::Surrogate => {
            let w = &s.sewa;
            format!(
                "sewa k={k} strategy=surrogate surrogate_max_calls={} surrogate_batch={} \
                 guard={} seed={}",
                w.surrogate_max_calls, w.surrogate_batch, w.guard, w.seed
            )
        }
        Method::Sewa => {
            let w = &s.sewa;
            let estimator = format!("{:?}", w.estimator).to_ascii_lowercase();
            format!(
                "sewa k={k} strategy=direct estimator={estimator} samples={} iterations={} \
                 guard={} seed={}",
                w.samples, w.iterations, w.guard, w.seed
            )
        }
    };
    let every = if s.every.0 > 1 { format!(" every={}", s.every.0) } else { String::new() };
    let objective = match (&c.objective, s.method.needs_objective()) {
        (Some(o), true) => format!(", objective {}", describe(o)),
        _ => String::new(),
    };
    format!(
        "watch {} ({}), window {}, {method}{every}{objective}, publish {} ({:?})",
        c.watch.dir.display(),
        c.watch.pattern.0.as_str(),
        c.window.size.0,
        c.publish.out.display(),
        c.publish.policy
    )
}

fn describe(o: &ObjectiveConfig) -> String {
    match &o.kind {
        Kind::Builtin(b) => format!("builtin {}", b.data.display()),
        Kind::Command(e) => format!("command {:?}", e.command.join(" ")),
    }
}

/// Start the objective, then one evaluation on the first checkpoint in `[watch] dir` (by
/// name) that opens; both timed. Failures are errors with the evaluator's own words.
fn try_objective(cfg: &Config, file: &Path) -> Result<String> {
    let oc = cfg.objective.as_ref().ok_or_else(|| {
        Error::config(file, "--objective: this config has no [objective] table to try")
    })?;
    let ckpt = first_checkpoint(cfg)?;
    let t0 = Instant::now();
    super::interrupt::stop_evaluators_on_signal();
    let mut objective = build_objective(oc, &sewa_engine::config::config_dir(file))?;
    let startup_ms = ms(t0);
    objective.check(&ckpt)?;
    let mut oracle = Oracle::new(Blend::new(&[&ckpt])?, objective.as_mut());
    let grad = oracle.supports_grad();
    let t1 = Instant::now();
    let ev = oracle.soft(&[1.0], grad)?;
    let eval_ms = ms(t1);
    let what = if grad {
        "one evaluation with gradient"
    } else {
        "one forward-only evaluation (no gradients: sewa uses estimator = \"reinforce\")"
    };
    Ok(format!(
        "objective: {} ready in {startup_ms:.1} ms; {what} on {} in {eval_ms:.1} ms \
         (loss {:.6})",
        oracle.describe(),
        ckpt.path().display(),
        ev.loss
    ))
}

/// The first entry of the watched directory, by name, that `watch` would take and that opens.
fn first_checkpoint(cfg: &Config) -> Result<Checkpoint> {
    let dir = &cfg.watch.dir;
    let none = |why: String| {
        Error::Usage(format!(
            "--objective needs a checkpoint to evaluate: {why} in [watch] dir {}",
            dir.display()
        ))
    };
    if !dir.is_dir() {
        return Err(none("there is nothing yet".into()));
    }
    let mut candidates: Vec<PathBuf> = sewa_engine::watch::Filter::new(cfg).scan()?;
    candidates.sort();
    let mut refused = Vec::new();
    for path in &candidates {
        match Checkpoint::open(path, &OpenOptions::default()) {
            Ok(c) => return Ok(c),
            Err(e) => refused.push(e.to_string()),
        }
    }
    match refused.first() {
        None => Err(none(format!("no entry matches pattern {:?}", cfg.watch.pattern.0.as_str()))),
        Some(first) => Err(none(format!("none of {} candidates opens ({first})", refused.len()))),
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary_of(select: &str) -> String {
        let text = format!(
            "[watch]\ndir = \"r\"\n[publish]\nout = \"o.safetensors\"\n[select]\n{select}\n\
             [objective]\ndata = \"d.safetensors\"\n"
        );
        summary(&Config::parse(&text, Path::new("t.toml")).unwrap())
    }

    /// `k=5` used to be printed for every method, those that ignore k included.
    #[test]
    fn the_summary_names_only_the_keys_the_method_uses() {
        let cases = [
            ("method = \"uniform\"", ", uniform,", &["k=", "decay", "metric"][..]),
            ("method = \"lawa\"", "lawa k=5,", &["decay", "metric"]),
            ("method = \"ema\"", "ema ema_decay=0.9,", &["k=", "metric"]),
            (
                "method = \"wsm\"\nwsm_shape = \"minus-sqrt\"",
                "wsm k=5 wsm_shape=minus-sqrt,",
                &["decay"],
            ),
            ("method = \"weights\"\nweights = [1, 3]", "weights [1.0, 3.0],", &["k=", "decay"]),
            (
                "method = \"best-metric\"\nk = 3",
                "best-metric k=3 metric=\"eval_loss\" metric_mode=min",
                &["decay"],
            ),
            ("method = \"greedy\"", "greedy, objective builtin d.safetensors", &["k="]),
            ("method = \"exhaustive\"", "exhaustive k=5 exhaustive_limit=20000", &["decay"]),
            ("method = \"random\"", "random k=5 seed=0", &["decay"]),
            (
                "method = \"sewa\"\nevery = 2",
                "sewa k=5 strategy=surrogate surrogate_max_calls=",
                &["decay", "estimator", "samples"],
            ),
            (
                "method = \"sewa\"\n[select.sewa]\nstrategy = \"direct\"",
                "sewa k=5 strategy=direct estimator=auto samples=4",
                &["surrogate"],
            ),
        ];
        for (select, want, absent) in cases {
            let s = summary_of(select);
            assert!(s.contains(want), "{select}: {s}");
            for a in absent {
                assert!(!s.contains(a), "{select} prints {a}: {s}");
            }
        }
        assert!(summary_of("method = \"sewa\"\nevery = 2").contains("every=2"));
        assert!(!summary_of("method = \"lawa\"").contains("objective"), "lawa uses none");
    }
}
