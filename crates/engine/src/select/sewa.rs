//! SeWA: learn Bernoulli selection probabilities s = σ(θ) over the window by stochastic gradient
//! through binary-concrete (Gumbel-sigmoid) relaxed masks, keep Σ s = k by projection, take the
//! top-k, then polish with gradient-ranked swaps. Forward-only objectives use a score-function
//! (REINFORCE, leave-one-out baseline) estimator on hard samples instead. Deterministic for a
//! seed. Where a selection's logits start (warm from the previous window, or cold) is `warm`'s;
//! this module decides only when a warm start is stuck. It reads members only through the
//! `Oracle`; it writes nothing.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use super::mask::{Adam, argmax, estimator, project, relaxed_mask, sigmoid, top_k};
use super::oracle::Oracle;
use super::search::Found;
use super::warm::{self, SewaState};
use crate::error::{Error, Result};

pub use super::config::{Estimator, SewaConfig, Strategy};

/// One concrete-relaxation gradient estimate of E[F] w.r.t. θ; returns (grad, mean loss).
fn concrete_grad(
    oracle: &mut Oracle,
    theta: &[f64],
    tau: f64,
    samples: usize,
    rng: &mut ChaCha8Rng,
) -> Result<(Vec<f64>, f64)> {
    let n = theta.len();
    let (mut grad, mut mean) = (vec![0.0; n], 0.0);
    for _ in 0..samples {
        let m = relaxed_mask(theta, tau, rng);
        let ev = oracle.soft(&m, true)?;
        let d =
            ev.mask_grad.ok_or_else(|| Error::Selection("objective gave no gradient".into()))?;
        for i in 0..n {
            grad[i] += d[i] * m[i] * (1.0 - m[i]) / tau / samples as f64;
        }
        mean += ev.loss / samples as f64;
    }
    Ok((grad, mean))
}

/// One score-function estimate on hard Bernoulli samples with a leave-one-out baseline.
fn reinforce_grad(
    oracle: &mut Oracle,
    theta: &[f64],
    samples: usize,
    rng: &mut ChaCha8Rng,
) -> Result<(Vec<f64>, f64)> {
    let s: Vec<f64> = theta.iter().map(|t| sigmoid(*t)).collect();
    let mut draws = Vec::with_capacity(samples);
    for _ in 0..samples {
        let mut b: Vec<usize> = (0..s.len()).filter(|&i| rng.random::<f64>() < s[i]).collect();
        if b.is_empty() {
            b.push(argmax(&s));
        }
        let loss = oracle.subset(&b)?;
        draws.push((b, loss));
    }
    let total: f64 = draws.iter().map(|d| d.1).sum();
    let mut grad = vec![0.0; s.len()];
    for (b, loss) in &draws {
        let base = if samples > 1 { (total - loss) / (samples - 1) as f64 } else { *loss };
        let mut hard = vec![0.0; s.len()];
        b.iter().for_each(|&i| hard[i] = 1.0);
        for i in 0..s.len() {
            grad[i] += (loss - base) * (hard[i] - s[i]) / samples as f64;
        }
    }
    Ok((grad, total / samples as f64))
}

/// Run SeWA over the oracle's window (members ordered by step, oldest first). `keys` identify
/// members for warm starts; `seed` holds calls already made on the window (the guard's), which
/// the surrogate strategy uses as data. A warm start is kept only if it does at least as well as the
/// previous selection did and as the average of the k newest members; otherwise it is stuck
/// on old members (a chosen member left, and the logits of the rest describe the old window),
/// it is abandoned and the selection restarts cold. Its calls still count in `oracle_calls`.
pub fn run(
    oracle: &mut Oracle,
    keys: &[super::warm::MemberKey],
    k: usize,
    cfg: &SewaConfig,
    warm: Option<&SewaState>,
) -> Result<(Found, SewaState)> {
    let n = keys.len();
    let estimator = estimator(oracle, cfg)?;
    let start = warm::start(keys, k, cfg, warm);
    let mut cold = start.cold;
    let mut run = attempt(oracle, start.theta, cold.is_none(), k, estimator, cfg)?;
    let mut abandoned = serde_json::Value::Null;
    if cold.is_none() && k < n {
        let previous = warm.and_then(|w| w.loss).filter(|l| l.is_finite());
        if let Some(why) = stuck(oracle, run.loss, k, previous)? {
            tracing::info!(%why, "restarting the selection cold");
            abandoned = json!({ "loss": run.loss, "set": run.set, "oracle_calls": run.calls });
            run = attempt(oracle, warm::flat(n, k), false, k, estimator, cfg)?;
            cold = Some(why);
        }
    }
    let warm_runs = match (&cold, warm) {
        (None, Some(w)) => w.warm_runs + 1,
        _ => 0,
    };
    let mut details = run.details;
    details["strategy"] = json!(Strategy::Direct);
    details["estimator"] = json!(estimator);
    details["warm"] = json!(cold.is_none());
    details["cold_reason"] = json!(cold);
    details["abandoned_warm_start"] = abandoned;
    let state = SewaState {
        keys: keys.to_vec(),
        theta: run.theta,
        warm_runs,
        loss: Some(run.loss),
        points: Vec::new(),
        errors: Vec::new(),
    };
    Ok((Found { set: run.set, loss: run.loss, weights: None, details }, state))
}

/// Why a warm result with `loss` is stuck, if it is: worse than the previous selection's loss
/// or than the k newest members' average (one more oracle call, unless cached).
fn stuck(
    oracle: &mut Oracle,
    loss: f64,
    k: usize,
    previous: Option<f64>,
) -> Result<Option<String>> {
    let n = oracle.blend.len();
    let newest: Vec<usize> = (n - k..n).collect();
    let lawa = oracle.subset(&newest)?;
    let why = match previous {
        Some(p) if loss > p && p <= lawa => format!("the previous selection's {p:.6}"),
        _ if loss > lawa => format!("the newest {k} members' {lawa:.6}"),
        _ => return Ok(None),
    };
    Ok(Some(format!("warm start stuck: its loss {loss:.6} is worse than {why}")))
}

/// One optimisation from `theta`, then top-k and polishing.
struct Attempt {
    theta: Vec<f64>,
    set: Vec<usize>,
    loss: f64,
    /// Oracle calls this attempt made.
    calls: usize,
    details: serde_json::Value,
}

fn attempt(
    oracle: &mut Oracle,
    mut theta: Vec<f64>,
    is_warm: bool,
    k: usize,
    estimator: Estimator,
    cfg: &SewaConfig,
) -> Result<Attempt> {
    let n = theta.len();
    let iters = match (k >= n, is_warm) {
        (true, _) => 0,
        (false, true) => cfg.warm_iterations,
        (false, false) => cfg.iterations,
    };
    let calls0 = oracle.calls;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut adam = Adam::new(n, cfg.lr);
    let mut trace = Vec::with_capacity(iters);
    for t in 0..iters {
        let (g, mean) = match estimator {
            Estimator::Reinforce => reinforce_grad(oracle, &theta, cfg.samples, &mut rng)?,
            _ => concrete_grad(oracle, &theta, cfg.tau(t, iters), cfg.samples, &mut rng)?,
        };
        adam.step(&mut theta, &g);
        project(&mut theta, k);
        trace.push(mean);
    }
    let optimise_calls = oracle.calls - calls0;
    let probs: Vec<f64> = theta.iter().map(|t| sigmoid(*t)).collect();
    let start = top_k(&probs, k);
    let use_grad = estimator == Estimator::Concrete;
    let (set, loss, start_loss, rounds) = polish(oracle, start.clone(), &probs, cfg, use_grad)?;
    let calls = oracle.calls - calls0;
    let details = json!({
        "iterations": iters,
        "probabilities": probs,
        "top_k": start,
        "top_k_loss": start_loss,
        "polish_changed": set != start,
        "polish_rounds": rounds,
        "oracle_calls_optimise": optimise_calls,
        "oracle_calls_polish": calls - optimise_calls,
        "mean_sample_loss": trace,
    });
    Ok(Attempt { theta, set, loss, calls, details })
}

/// Swap local search from `set`: each round ranks (out, in) pairs by the first-order predicted
/// change ∂F/∂m_in − ∂F/∂m_out (or by probabilities without gradients), tries the best
/// `polish_tries`, and moves on the first that lowers the loss. Stops when a round finds none.
/// Returns (set, loss, loss of the starting set, rounds).
fn polish(
    oracle: &mut Oracle,
    mut set: Vec<usize>,
    probs: &[f64],
    cfg: &SewaConfig,
    use_grad: bool,
) -> Result<(Vec<usize>, f64, f64, usize)> {
    let eval = |o: &mut Oracle, s: &[usize]| -> Result<(f64, Vec<f64>)> {
        if use_grad {
            o.subset_with_mask_grad(s)
        } else {
            Ok((o.subset(s)?, probs.iter().map(|p| -p).collect()))
        }
    };
    let (mut loss, mut score) = eval(oracle, &set)?;
    let start_loss = loss;
    let n = probs.len();
    let mut rounds = 0;
    while cfg.polish && set.len() < n && rounds < 4 * n {
        rounds += 1;
        let mut pairs: Vec<(f64, usize, usize)> = Vec::new();
        for &out in &set {
            for inn in (0..n).filter(|i| !set.contains(i)) {
                pairs.push((score[inn] - score[out], out, inn));
            }
        }
        pairs.sort_by(|a, b| a.0.total_cmp(&b.0).then((a.1, a.2).cmp(&(b.1, b.2))));
        let mut moved = false;
        for &(_, out, inn) in pairs.iter().take(cfg.polish_tries) {
            let mut cand: Vec<usize> =
                set.iter().map(|&i| if i == out { inn } else { i }).collect();
            cand.sort_unstable();
            let (l, sc) = eval(oracle, &cand)?;
            if l < loss {
                (set, loss, score, moved) = (cand, l, sc, true);
                break;
            }
        }
        if !moved {
            break;
        }
    }
    Ok((set, loss, start_loss, rounds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projection_hits_k() {
        let mut th = vec![3.0, -1.0, 0.5, 0.0, -4.0];
        project(&mut th, 2);
        let s: f64 = th.iter().map(|t| sigmoid(*t)).sum();
        assert!((s - 2.0).abs() < 1e-9, "{s}");
    }

    #[test]
    fn defaults_pass_check_and_unknown_keys_fail() {
        SewaConfig::default().check(std::path::Path::new("x")).unwrap();
        let e = toml::from_str::<SewaConfig>("samples = 2\nbogus = 1").unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
    }
}
