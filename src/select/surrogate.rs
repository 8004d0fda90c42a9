//! SeWA's oracle-efficient strategy (`strategy = "surrogate"`, the default): every oracle call —
//! the members' own losses, one gradient call at the window's uniform mixture, then the
//! verification of candidate hard masks — is a data point for a quadratic surrogate of the loss
//! over mixing weights (`quadfit`). The mask is searched on the surrogate (the binary-concrete
//! relaxation of SeWA, and every k-subset when there are at most `exhaustive_limit`), real
//! calls verify its best few unverified hard masks, and the loop stops when no mask — none of the
//! swaps of the best verified one either — is predicted to beat the best verified loss by more
//! than `surrogate_tolerance`, or at the call budget. Forward-only objectives use the same loop
//! with losses alone. Warm starts carry the data points of surviving members (`warm`).

use std::collections::HashMap;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use super::oracle::Oracle;
use super::quadfit::{FitOptions, Model, Point, fit};
use super::search::{Found, choose};
use super::sewa::{Adam, Estimator, SewaConfig, project, relaxed_mask, sigmoid, top_k};
use super::warm::{self, SewaState};
use crate::error::Result;

/// Tensor groups with their own curvature in the surrogate (gradient objectives).
const MAX_GROUPS: usize = 8;
/// Largest window whose surrogate fits a full residual (K(K+1)/2 unknowns).
const MAX_RESIDUAL_WINDOW: usize = 40;
/// Relaxed-mask iterations and samples on the surrogate (free: no oracle call).
const RELAXED_ITERS: usize = 300;
const RELAXED_SAMPLES: usize = 8;

/// What one selection measured, beside its data points.
struct Search {
    points: Vec<Point>,
    /// Verified hard masks: sorted set → (loss, what the surrogate predicted before).
    verified: HashMap<Vec<usize>, (f64, Option<f64>)>,
    use_grad: bool,
    optimise_calls: usize,
    verify_calls: usize,
    /// (predicted, actual) of the masks verified, in order.
    recent: Vec<(f64, f64)>,
}

impl Search {
    /// The carried points (hard masks among them count as verified) and the vertices: each
    /// member's own loss, which `select::run_configured` fetched (remembered or computed)
    /// before this runs, so these lookups are free.
    fn new(oracle: &mut Oracle, carried: Vec<Point>, k: usize, use_grad: bool) -> Result<Self> {
        let verified =
            carried.iter().filter_map(|p| Some((hard_mask(p, k)?, (p.loss, None)))).collect();
        let mut s = Search {
            points: carried,
            verified,
            use_grad,
            optimise_calls: 0,
            verify_calls: 0,
            recent: Vec::new(),
        };
        let n = oracle.blend.len();
        for i in 0..n {
            let loss = oracle.subset(&[i])?;
            let mut alpha = vec![0.0; n];
            alpha[i] = 1.0;
            s.points.push(Point { alpha, loss, grad: Vec::new() });
        }
        Ok(s)
    }

    /// Largest |predicted − actual| over the last `last` verified masks (0 before any).
    fn prediction_error(&self, last: usize) -> f64 {
        let recent = self.recent.iter().rev().take(last);
        recent.map(|(p, l)| (p - l).abs()).fold(0.0, f64::max)
    }

    fn best(&self) -> Option<(Vec<usize>, f64)> {
        let all = self.verified.iter().map(|(s, v)| (s, v.0));
        let best = all.min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(b.0)));
        best.map(|(s, l)| (s.clone(), l))
    }

    /// One real call at `alpha` (with gradient when the objective gives one); a data point.
    fn call(&mut self, oracle: &mut Oracle, alpha: &[f64]) -> Result<f64> {
        let ev = oracle.soft(alpha, self.use_grad)?;
        // The oracle's mask gradient is ⟨G, w_i − w(α)⟩ / Σα.
        let total: f64 = alpha.iter().filter(|a| **a > 0.0).sum();
        let grad = match ev.mask_grad {
            Some(g) if self.use_grad => g.into_iter().map(|x| Some(x * total)).collect(),
            _ => Vec::new(),
        };
        self.points.push(Point { alpha: alpha.to_vec(), loss: ev.loss, grad });
        Ok(ev.loss)
    }

    fn verify(&mut self, oracle: &mut Oracle, set: &[usize], predicted: f64) -> Result<()> {
        let n = oracle.blend.len();
        let mut alpha = vec![0.0; n];
        set.iter().for_each(|&i| alpha[i] = 1.0 / set.len() as f64);
        let loss = self.call(oracle, &alpha)?;
        self.verify_calls += 1;
        self.verified.insert(set.to_vec(), (loss, Some(predicted)));
        if predicted.is_finite() {
            self.recent.push((predicted, loss));
        }
        Ok(())
    }
}

/// Sorted set of the members a point mixes uniformly, if it is a hard mask of size `k`.
fn hard_mask(p: &Point, k: usize) -> Option<Vec<usize>> {
    let set: Vec<usize> = (0..p.alpha.len()).filter(|&i| p.alpha[i] > 0.0).collect();
    let w = 1.0 / k as f64;
    let uniform = p.alpha.iter().all(|a| *a == 0.0 || (a - w).abs() < 1e-12);
    (set.len() == k && uniform).then_some(set)
}

/// What stays fixed through one selection's refits.
struct Setting<'c> {
    n: usize,
    k: usize,
    cfg: &'c SewaConfig,
    dist: Vec<Vec<Vec<f64>>>,
    opts: FitOptions,
    budget: usize,
}

/// Run the surrogate strategy over the oracle's window; see the module header.
pub fn run(
    oracle: &mut Oracle,
    keys: &[String],
    k: usize,
    cfg: &SewaConfig,
    warm_state: Option<&SewaState>,
) -> Result<(Found, SewaState)> {
    let n = keys.len();
    let estimator = super::sewa::estimator(oracle, cfg)?;
    let use_grad = estimator == Estimator::Concrete;
    let start = warm::start(keys, k, cfg, warm_state);
    let carried = match (&start.cold, warm_state) {
        (None, Some(w)) => w.carried(keys),
        _ => Vec::new(),
    };
    let carried_points = carried.len();
    let mut s = Search::new(oracle, carried, k, use_grad)?;
    let set = Setting {
        n,
        k,
        cfg,
        dist: oracle.blend.distances(if use_grad { MAX_GROUPS } else { 1 })?,
        opts: FitOptions {
            ridge: cfg.surrogate_ridge,
            residual: n <= MAX_RESIDUAL_WINDOW,
            grad_scale: 1.0 / k as f64,
        },
        budget: if cfg.surrogate_max_calls == 0 { 2 * n } else { cfg.surrogate_max_calls },
    };
    if k >= n {
        s.verify(oracle, &(0..n).collect::<Vec<_>>(), f64::NAN)?;
    } else if !s.points.iter().any(mixed) {
        // Nothing beyond vertices: one call at the uniform mixture gives every slope.
        s.call(oracle, &vec![1.0 / n as f64; n])?;
        s.optimise_calls += 1;
    }
    let (model, theta, rounds) = refine(oracle, &mut s, &set, start.theta)?;
    let (chosen, loss) = match s.best() {
        Some(b) => b,
        None => {
            // Budget spent before any verification: verify the surrogate's best.
            let top = top_k(&theta.iter().map(|t| sigmoid(*t)).collect::<Vec<_>>(), k);
            s.verify(oracle, &top, model.subset(&top))?;
            s.best().expect("just verified")
        }
    };
    let predicted = s.verified.get(&chosen).and_then(|v| v.1).filter(|p| p.is_finite());
    let probs: Vec<f64> = theta.iter().map(|t| sigmoid(*t)).collect();
    let details = json!({
        "strategy": "surrogate",
        "estimator": estimator,
        "warm": start.cold.is_none(),
        "cold_reason": start.cold,
        "probabilities": probs,
        "surrogate_predicted_loss": predicted,
        "surrogate_model_loss": model.subset(&chosen),
        "surrogate_rounds": rounds,
        "surrogate_points": s.points.len(),
        "surrogate_points_carried": carried_points,
        "surrogate_curvature": model.curvature,
        "verified_masks": s.verified.len(),
        "oracle_calls_optimise": s.optimise_calls,
        "oracle_calls_verify": s.verify_calls,
    });
    let warm_runs = match (&start.cold, warm_state) {
        (None, Some(w)) => w.warm_runs + 1,
        _ => 0,
    };
    // Vertex points are not kept: members' own losses live in `Memory`.
    let kept: Vec<Point> = s.points.into_iter().filter(mixed).collect();
    let state =
        SewaState { keys: keys.to_vec(), theta, warm_runs, loss: Some(loss), points: Vec::new() }
            .with_points(kept);
    Ok((Found { set: chosen, loss, weights: None, details }, state))
}

/// Refit, search the surrogate, verify its best unverified masks; until none is predicted to
/// beat the best verified one by the tolerance, or the budget is spent. Returns the last model,
/// the relaxation's logits and the rounds run.
fn refine(
    oracle: &mut Oracle,
    s: &mut Search,
    set: &Setting,
    theta0: Vec<f64>,
) -> Result<(Model, Vec<f64>, usize)> {
    let cfg = set.cfg;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut rounds = 0;
    loop {
        rounds += 1;
        let model = fit(set.n, &s.points, &set.dist, &set.opts);
        let theta = relaxed(&model, theta0.clone(), set.k, cfg, &mut rng);
        let best = s.best();
        let cands = candidates(&model, set.k, cfg, &theta, best.as_ref().map(|b| &b.0));
        // While the model still mispredicts the masks it proposed, a mask predicted slightly
        // worse than the best verified one may be better: widen the margin by that error.
        let err = s.prediction_error(2 * cfg.surrogate_batch);
        let worth = |pred: f64| match &best {
            Some((b, loss)) => {
                let tol = cfg.surrogate_tolerance * loss.abs().max(1e-12);
                let margin = if err > tol { err } else { -tol };
                pred < model.subset(b) + margin
            }
            None => true,
        };
        let todo: Vec<(Vec<usize>, f64)> = cands
            .into_iter()
            .filter(|(c, p)| !s.verified.contains_key(c) && worth(*p))
            .take(cfg.surrogate_batch)
            .collect();
        if todo.is_empty() || oracle.calls >= set.budget {
            return Ok((model, theta, rounds));
        }
        for (c, pred) in todo {
            if oracle.calls >= set.budget {
                break;
            }
            s.verify(oracle, &c, pred)?;
        }
    }
}

/// Whether a point mixes more than one member (not a vertex).
fn mixed(p: &Point) -> bool {
    p.alpha.iter().filter(|a| **a > 0.0).count() > 1
}

/// SeWA's binary-concrete relaxation on the surrogate: Adam on θ with Σσ(θ) = k, through
/// ∂F̂(m/Σm)/∂m_i = (∇F̂_i − ∇F̂·α)/Σm. Free: no oracle call.
fn relaxed(
    model: &Model,
    mut theta: Vec<f64>,
    k: usize,
    cfg: &SewaConfig,
    rng: &mut ChaCha8Rng,
) -> Vec<f64> {
    let n = theta.len();
    if k >= n {
        return theta;
    }
    let mut adam = Adam::new(n, cfg.lr);
    for t in 0..RELAXED_ITERS {
        let tau = cfg.tau(t, RELAXED_ITERS);
        let mut grad = vec![0.0; n];
        for _ in 0..RELAXED_SAMPLES {
            let m = relaxed_mask(&theta, tau, rng);
            let total: f64 = m.iter().sum::<f64>().max(1e-12);
            let alpha: Vec<f64> = m.iter().map(|x| x / total).collect();
            let g = model.grad(&alpha);
            let ga: f64 = g.iter().zip(&alpha).map(|(g, a)| g * a).sum();
            for i in 0..n {
                let dm = (g[i] - ga) / total;
                grad[i] += dm * m[i] * (1.0 - m[i]) / tau / RELAXED_SAMPLES as f64;
            }
        }
        adam.step(&mut theta, &grad);
        project(&mut theta, k);
    }
    theta
}

/// The surrogate's best hard masks of size k, best first: every k-subset when there are at
/// most `exhaustive_limit`, else local optima under swaps from the relaxation's top-k and from
/// the best verified mask, with that mask's swaps.
fn candidates(
    model: &Model,
    k: usize,
    cfg: &SewaConfig,
    theta: &[f64],
    best: Option<&Vec<usize>>,
) -> Vec<(Vec<usize>, f64)> {
    let n = theta.len();
    let keep = 4 * cfg.surrogate_batch + 8;
    let mut out: Vec<(Vec<usize>, f64)> = Vec::new();
    if choose(n, k) <= cfg.exhaustive_limit {
        let mut idx: Vec<usize> = (0..k).collect();
        loop {
            out.push((idx.clone(), model.subset(&idx)));
            if out.len() > 4 * keep {
                shrink(&mut out, keep);
            }
            let Some(p) = (0..k).rev().find(|&p| idx[p] < n - k + p) else { break };
            idx[p] += 1;
            for q in p + 1..k {
                idx[q] = idx[q - 1] + 1;
            }
        }
    } else {
        let probs: Vec<f64> = theta.iter().map(|t| sigmoid(*t)).collect();
        let mut starts = vec![top_k(&probs, k)];
        starts.extend(best.cloned());
        for start in starts {
            let local = descend(model, start);
            out.extend(all_swaps(&local, n).into_iter().map(|s| {
                let p = model.subset(&s);
                (s, p)
            }));
            let p = model.subset(&local);
            out.push((local, p));
        }
    }
    if let Some(b) = best {
        out.extend(all_swaps(b, n).into_iter().map(|s| {
            let p = model.subset(&s);
            (s, p)
        }));
    }
    shrink(&mut out, keep);
    out
}

/// Sort by prediction (ties by set), drop duplicates, keep the first `keep`.
fn shrink(out: &mut Vec<(Vec<usize>, f64)>, keep: usize) {
    out.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    out.dedup_by(|a, b| a.0 == b.0);
    out.truncate(keep);
}

/// Best-improvement swap descent on the surrogate.
fn descend(model: &Model, mut set: Vec<usize>) -> Vec<usize> {
    let n = model.u.len();
    let mut f = model.subset(&set);
    for _ in 0..4 * n {
        let mut best: Option<(f64, Vec<usize>)> = None;
        for cand in all_swaps(&set, n) {
            let fc = model.subset(&cand);
            if fc < f && best.as_ref().is_none_or(|b| fc < b.0) {
                best = Some((fc, cand));
            }
        }
        match best {
            Some((fc, c)) => (f, set) = (fc, c),
            None => break,
        }
    }
    set
}

/// Every set one swap away from `set` within a window of `n`, sorted.
fn all_swaps(set: &[usize], n: usize) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    for &o in set {
        for i in (0..n).filter(|i| !set.contains(i)) {
            let mut c: Vec<usize> = set.iter().map(|&x| if x == o { i } else { x }).collect();
            c.sort_unstable();
            out.push(c);
        }
    }
    out
}
