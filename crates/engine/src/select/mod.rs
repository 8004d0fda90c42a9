//! Selectors: given the window, decide which members to average and with what weights.
//! Fixed rules (uniform, lawa, ema, best-metric, wsm, weights) need only a summary of the window; model-based
//! ones (greedy, exhaustive, random, sewa, soup, twa) also read the members' weights and call
//! an `Objective`. Selectors never touch files other than through `Checkpoint` views.

use std::path::PathBuf;

/// What a selector knows about one window member without reading its weights.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MemberSummary {
    pub path: PathBuf,
    pub step: Option<u64>,
    /// Metric read from the checkpoint (safetensors metadata or trainer_state.json), if any.
    pub metric: Option<f64>,
}

/// A selector's answer. `weights` has one entry per window member (zeros for unselected),
/// non-negative, summing to 1.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Selection {
    pub method: Method,
    pub weights: Vec<f64>,
    /// Human-readable reason, e.g. "last 5 of 20 by step".
    pub why: String,
    /// Loss of the hard selection on the selection data, when an objective was used.
    pub loss: Option<f64>,
    /// Method-specific report: probabilities, iterations, oracle calls, wall time...
    pub details: Details,
}

impl Selection {
    /// Indices of members with a non-zero weight.
    pub fn members(&self) -> Vec<usize> {
        self.weights.iter().enumerate().filter(|(_, w)| **w > 0.0).map(|(i, _)| i).collect()
    }
}

pub mod blend;
pub mod config;
pub mod details;
pub mod guard;
mod mask;
pub mod memory;
pub mod oracle;
pub mod quadfit;
pub mod search;
pub mod sewa;
pub mod soup;
pub mod surrogate;
pub mod twa;
pub mod warm;
pub mod wsm;

pub use config::{Method, MetricMode, SelectConfig};
pub use config::{SoupConfig, TwaConfig};
pub use details::{Details, MemberRecord};
pub use memory::Memory;
pub use sewa::{SewaConfig, Strategy};
pub use warm::{MemberKey, SewaState};
pub use wsm::WsmShape;

use crate::error::{Error, Result};
use crate::objective::Objective;
use sewa_checkpoint::Checkpoint;

/// Model-based methods, in the order their names are listed in errors.
pub const MODEL_BASED: [Method; 6] =
    [Method::Sewa, Method::Greedy, Method::Exhaustive, Method::Random, Method::Soup, Method::Twa];

/// The options of every model-based method.
#[derive(Clone, Copy)]
pub struct Options<'a> {
    pub sewa: &'a SewaConfig,
    pub soup: &'a SoupConfig,
    pub twa: &'a TwaConfig,
}

impl<'a> Options<'a> {
    /// SeWA's options with the other methods' defaults.
    pub fn sewa(sewa: &'a SewaConfig) -> Options<'a> {
        static SOUP: std::sync::LazyLock<SoupConfig> = std::sync::LazyLock::new(Default::default);
        static TWA: std::sync::LazyLock<TwaConfig> = std::sync::LazyLock::new(Default::default);
        Options { sewa, soup: &SOUP, twa: &TWA }
    }
}

/// The model-based method a command line or request names, parsed once at the edge; anything
/// else is a usage error listing the methods.
pub fn model_based(name: &str) -> Result<Method> {
    MODEL_BASED.into_iter().find(|m| m.name() == name).ok_or_else(|| {
        let names: Vec<&str> = MODEL_BASED.iter().map(|m| m.name()).collect();
        Error::Usage(format!("unknown model-based method {name:?}: expected one of {names:?}"))
    })
}

/// Run a model-based selector (`MODEL_BASED`: sewa, greedy, exhaustive, random, soup, twa)
/// once over the window `members` (ordered by step) with `objective`. `k` is clamped to the
/// window size. `warm` is the state a previous SeWA run returned; the returned state is `Some`
/// only for `sewa`.
/// Every member is first checked against the objective (errors name the member).
pub fn run_model_based(
    method: Method,
    k: usize,
    members: &[&Checkpoint],
    objective: &mut dyn Objective,
    cfg: &SewaConfig,
    warm: Option<&SewaState>,
) -> Result<(Selection, Option<SewaState>)> {
    run_model_based_with(method, k, members, objective, Options::sewa(cfg), warm)
}

/// `run_model_based` with every method's options.
pub fn run_model_based_with(
    method: Method,
    k: usize,
    members: &[&Checkpoint],
    objective: &mut dyn Objective,
    opts: Options<'_>,
    warm: Option<&SewaState>,
) -> Result<(Selection, Option<SewaState>)> {
    let mut memory = Memory::default();
    memory.sewa = warm.cloned();
    let selection = run_configured(method, k, members, objective, opts, &mut memory)?;
    Ok((selection, memory.sewa.filter(|_| method == Method::Sewa)))
}

/// `run_model_based` for a process that selects again and again (the daemon): SeWA warm-starts
/// from `memory`, members' own losses seen in earlier selections are not computed again, and
/// `memory` is updated for the next call.
pub fn run_remembering(
    method: Method,
    k: usize,
    members: &[&Checkpoint],
    objective: &mut dyn Objective,
    cfg: &SewaConfig,
    memory: &mut Memory,
) -> Result<Selection> {
    run_configured(method, k, members, objective, Options::sewa(cfg), memory)
}

/// `run_remembering` with every method's options. Members' own losses are computed once per
/// member and objective (`Memory`): first, when the method uses them (greedy's ranking, the
/// surrogate's vertices; then they count in its `oracle_calls`), else afterwards for the report
/// (`oracle_calls_report`).
pub fn run_configured(
    method: Method,
    k: usize,
    members: &[&Checkpoint],
    objective: &mut dyn Objective,
    opts: Options<'_>,
    memory: &mut Memory,
) -> Result<Selection> {
    if !method.needs_objective() {
        let method = method.name();
        return Err(Error::Usage(format!("{method}: not a model-based method")));
    }
    if members.is_empty() || k == 0 {
        return Err(Error::Usage(format!("{method}: need k >= 1 and a non-empty window")));
    }
    let k = k.min(members.len());
    for m in members {
        objective.check(m)?;
    }
    let cfg = opts.sewa;
    let started = std::time::Instant::now();
    let keys: Vec<MemberKey> = members.iter().map(|m| member_key(m)).collect();
    let mut oracle = oracle::Oracle::new(blend::Blend::new(members)?, objective);
    let surrogate = method == Method::Sewa && cfg.strategy == Strategy::Surrogate;
    // The surrogate takes the guard's calls as data, with gradients when it can use them.
    let grad_data = surrogate && mask::estimator(&oracle, cfg)? == sewa::Estimator::Concrete;
    let uses_own = method == Method::Greedy || (surrogate && !grad_data);
    let mut own = None;
    if uses_own {
        own = Some(memory.member_losses(&mut oracle, members)?);
    }
    let before_guard = oracle.calls;
    let (checked, seed) = if cfg.guard {
        let known = memory.sewa.as_ref().map(|s| s.carried(&keys)).unwrap_or_default();
        let rules = guard::rules(members.len(), k, &known);
        guard::check(&mut oracle, rules, &known, grad_data)?
    } else {
        (Vec::new(), Vec::new())
    };
    let guard_calls = oracle.calls - before_guard;
    let found = match method {
        Method::Sewa => {
            let warm = memory.sewa.as_ref();
            let (f, s) = match cfg.strategy {
                Strategy::Surrogate => surrogate::run(&mut oracle, &keys, k, cfg, warm, seed)?,
                Strategy::Direct => sewa::run(&mut oracle, &keys, k, cfg, warm)?,
            };
            memory.sewa = Some(s);
            f
        }
        Method::Greedy => search::greedy(&mut oracle)?,
        Method::Exhaustive => search::exhaustive(&mut oracle, k, cfg.exhaustive_limit)?,
        Method::Random => search::random(&mut oracle, k, cfg.seed)?,
        Method::Soup => soup::run(&mut oracle, opts.soup)?,
        Method::Twa => twa::run(&mut oracle, opts.twa)?,
        Method::Uniform
        | Method::Lawa
        | Method::Ema
        | Method::BestMetric
        | Method::Wsm
        | Method::Weights => {
            unreachable!("rule-based methods were refused above")
        }
    };
    let (found, verdict) = guard::judge(found, &checked);
    let wall = started.elapsed().as_secs_f64();
    let calls = oracle.calls;
    let mut selection = to_selection(method, members, &found, calls, wall, &oracle.describe());
    if let Some(v) = verdict {
        if v.winner != "method" {
            tracing::info!(
                rule = %v.winner, rule_loss = v.best_rule_loss, method_loss = v.method_loss,
                "{method}: a fixed rule verified better than the method's answer; publishing the rule"
            );
            selection.why = format!(
                "{} (guard: {} beat the method's {:.5})",
                selection.why, v.winner, v.method_loss
            );
        }
        selection.details.extra.insert("guard".into(), serde_json::json!(v));
        selection.details.extra.insert("oracle_calls_guard".into(), serde_json::json!(guard_calls));
    }
    let d = &mut selection.details;
    let mut report_calls = 0;
    if own.is_none() && cfg.member_losses {
        let before = oracle.calls;
        own = Some(memory.member_losses(&mut oracle, members)?);
        report_calls = oracle.calls - before;
    }
    d.oracle_calls_report = Some(report_calls);
    if let Some(own) = own {
        d.member_losses = Some(own.losses);
        d.member_losses_computed = Some(own.computed);
        d.member_losses_remembered = Some(own.remembered);
    }
    Ok(selection)
}

/// Identity of a member across windows (warm starts): its path and step.
pub fn member_key(c: &Checkpoint) -> MemberKey {
    MemberKey { path: c.path().to_path_buf(), step: c.step() }
}

fn to_selection(
    method: Method,
    members: &[&Checkpoint],
    found: &search::Found,
    calls: usize,
    wall: f64,
    objective: &str,
) -> Selection {
    let weights = found.weights.clone().unwrap_or_else(|| {
        let mut weights = vec![0.0; members.len()];
        let w = 1.0 / found.set.len() as f64;
        found.set.iter().for_each(|&i| weights[i] = w);
        weights
    });
    let list: Vec<MemberRecord> = members
        .iter()
        .map(|m| MemberRecord { path: m.path().to_path_buf(), step: m.step() })
        .collect();
    let mut details = Details::default();
    details.merge(found.details.clone());
    details.chosen = Some(found.set.clone());
    details.loss = Some(found.loss).filter(|l| l.is_finite());
    details.oracle_calls = Some(calls);
    details.wall_seconds = Some(wall);
    details.objective = Some(objective.to_string());
    details.members = Some(list);
    let names: Vec<String> = found
        .set
        .iter()
        .map(|&i| members[i].step().map_or(format!("#{i}"), |s| format!("step {s}")))
        .collect();
    Selection {
        method,
        weights,
        why: format!(
            "{method}: {} of {} ({}), loss {:.5}, {calls} oracle calls, {:.2}s",
            found.set.len(),
            members.len(),
            names.join(", "),
            found.loss,
            wall
        ),
        loss: Some(found.loss),
        details,
    }
}

pub mod rules;

/// What a selector sees of the window: summaries (oldest first, by step) and, for model-based
/// selectors, the opened members in the same order.
pub struct WindowView<'a> {
    pub members: &'a [MemberSummary],
    pub checkpoints: &'a [&'a Checkpoint],
}

/// What model-based selectors need beside the window: the loss oracle, SeWA's options and
/// what earlier selections left (warm start, members' losses; updated in place).
pub struct ModelContext<'a> {
    pub objective: &'a mut dyn Objective,
    pub memory: &'a mut Memory,
}

/// The one entry point the daemon uses: run the configured selector on the window.
/// Model-based methods need `model` (the daemon builds it from `[objective]`).
pub fn run(
    cfg: &SelectConfig,
    view: &WindowView<'_>,
    model: Option<ModelContext<'_>>,
) -> Result<Selection> {
    let k = cfg.k.get();
    match cfg.method {
        Method::Uniform => rules::uniform(view.members),
        Method::Lawa => rules::lawa(view.members, k),
        Method::Ema => rules::ema(view.members, cfg.ema_decay.0),
        Method::BestMetric => rules::best_metric(view.members, k, &cfg.metric, cfg.metric_mode),
        Method::Wsm => rules::wsm(view.members, k, cfg.wsm_shape),
        Method::Weights => {
            let given = cfg.weights.as_deref().ok_or_else(|| {
                Error::Internal("method \"weights\" without [select] weights".into())
            })?;
            rules::weights(view.members, given)
        }
        Method::Greedy
        | Method::Exhaustive
        | Method::Random
        | Method::Sewa
        | Method::Soup
        | Method::Twa => {
            let m = model.ok_or_else(|| {
                let name = cfg.method.name();
                Error::Internal(format!("selector {name:?} needs an [objective]"))
            })?;
            let opts = Options { sewa: &cfg.sewa, soup: &cfg.soup, twa: &cfg.twa };
            run_configured(cfg.method, k, view.checkpoints, m.objective, opts, m.memory)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_based_names_parse_once_and_others_are_a_usage_error() {
        for m in MODEL_BASED {
            assert_eq!(model_based(m.name()).unwrap(), m);
        }
        for bad in ["lawa", "SEWA", ""] {
            let e = model_based(bad).unwrap_err();
            assert!(matches!(e, Error::Usage(_)), "{bad:?}: {e}");
            let text = e.to_string();
            assert!(text.contains("sewa") && text.contains("random"), "lists the methods: {text}");
        }
    }

    /// Two members whose non-UTF-8 names print alike are different members for warm starts.
    #[test]
    fn member_keys_tell_apart_names_that_print_alike() {
        use std::os::unix::ffi::OsStringExt;
        let name = |b: &[u8]| std::path::PathBuf::from(std::ffi::OsString::from_vec(b.to_vec()));
        let (a, b) = (name(b"runs/step_\xff"), name(b"runs/step_\xfe"));
        assert_eq!(a.display().to_string(), b.display().to_string());
        let ckpt = |p: &std::path::Path| {
            let w = ("w".to_string(), sewa_checkpoint::DType::F32, vec![1], vec![0u8; 4]);
            Checkpoint::from_memory(p, Some(5), vec![w]).unwrap()
        };
        assert_ne!(member_key(&ckpt(&a)), member_key(&ckpt(&b)));
        assert_eq!(member_key(&ckpt(&a)), member_key(&ckpt(&a)));
    }
}
