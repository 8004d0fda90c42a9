//! SeWA's oracle-efficient strategy (`strategy = "surrogate"`, the default): every oracle call —
//! the guard's fixed rules (contiguous runs, the uniform window, EMAs: a spread of mixtures
//! across the window, with gradients), then the verification of candidate hard masks — is a
//! data point for a quadratic surrogate of the loss over mixing weights (`quadfit`). Members'
//! own losses are data only for forward-only objectives, which need them to pin the linear
//! term: with gradients they would anchor the model to single checkpoints, far from the k-member
//! averages it has to rank. The mask is searched on the surrogate (the binary-concrete
//! relaxation of SeWA, and every k-subset when there are at most `exhaustive_limit`), and real
//! calls verify, each round, its best few unverified hard masks (exploitation) and its best
//! mask unlike any verified one (exploration: the landscape has several local optima, and the
//! model is least reliable where it has no data). Every verification is first predicted, so
//! the model's out-of-sample error is measured; the loop stops when no mask is predicted to
//! beat the best verified loss by more than that error (or `surrogate_tolerance`, once the
//! model predicts well), or at the call budget. Warm starts carry the data points of surviving
//! members (`warm`).

use std::collections::HashMap;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use super::config::{Estimator, SewaConfig};
use super::mask::{Adam, estimator, project, relaxed_mask, sigmoid, top_k};
use super::oracle::Oracle;
use super::quadfit::{FitOptions, Model, Point, banded, fit};
use super::search::{Found, choose};
use super::warm::{self, SewaState};
use crate::error::Result;

/// Tensor groups with their own curvatures in the surrogate (gradient objectives).
const MAX_GROUPS: usize = 4;
/// Bands of step gaps with their own curvature (`quadfit::banded`): 1, 2–3, 4–7, 8+.
const MAX_BANDS: usize = 4;
/// Candidates the surrogate ranks per round (exploitation and exploration are drawn from them).
const POOL: usize = 64;
/// Prediction errors a warm start inherits (the newest).
const ERRORS_KEPT: usize = 8;
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
    /// The carried and seed points (hard masks among them count as verified) and, for
    /// forward-only objectives, the vertices: each member's own loss, which
    /// `select::run_configured` fetched (remembered or computed) before this runs, so these
    /// lookups are free.
    fn new(oracle: &mut Oracle, points: Vec<Point>, k: usize, use_grad: bool) -> Result<Self> {
        let verified =
            points.iter().filter_map(|p| Some((hard_mask(p, k)?, (p.loss, None)))).collect();
        let mut s = Search {
            points,
            verified,
            use_grad,
            optimise_calls: 0,
            verify_calls: 0,
            recent: Vec::new(),
        };
        let n = oracle.blend.len();
        for i in (0..n).filter(|_| !use_grad) {
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

    /// The model's out-of-sample error: every verified mask was predicted before its call.
    /// The first `inherited` errors came from earlier windows and are not reported again.
    fn out_of_sample(&self, inherited: usize) -> serde_json::Value {
        let own = &self.recent[inherited.min(self.recent.len())..];
        let mut abs: Vec<f64> = own.iter().map(|(p, l)| (p - l).abs()).collect();
        abs.sort_by(f64::total_cmp);
        let rel: Vec<f64> = own.iter().map(|(p, l)| (p - l).abs() / l.abs().max(1e-12)).collect();
        let at = |q: f64| abs.get(((abs.len() as f64 - 1.0) * q).round() as usize).copied();
        json!({
            "masks": abs.len(),
            "inherited": inherited,
            "median_abs": at(0.5),
            "max_abs": abs.last(),
            "max_rel": rel.iter().copied().fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x)))),
        })
    }

    /// Fewest members `set` does not share with any verified mask.
    fn novelty(&self, set: &[usize]) -> usize {
        let unshared = |v: &Vec<usize>| set.iter().filter(|i| !v.contains(i)).count();
        self.verified.keys().map(unshared).min().unwrap_or(set.len())
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

/// Run the surrogate strategy over the oracle's window; see the module header. `seed` holds
/// the calls already made on this window (the guard's rules), in the oracle's terms.
pub fn run(
    oracle: &mut Oracle,
    keys: &[super::warm::MemberKey],
    k: usize,
    cfg: &SewaConfig,
    warm_state: Option<&SewaState>,
    seed: Vec<Point>,
) -> Result<(Found, SewaState)> {
    let n = keys.len();
    let estimator = estimator(oracle, cfg)?;
    let use_grad = estimator == Estimator::Concrete;
    let start = warm::start(keys, k, cfg, warm_state);
    let carried = match (&start.cold, warm_state) {
        (None, Some(w)) => w.carried(keys),
        _ => Vec::new(),
    };
    let carried_points = carried.len();
    let seed_points = seed.len();
    let mut points = carried;
    // A rule the guard took from the carried points is already among them.
    for p in seed {
        if !points.iter().any(|q| q.alpha == p.alpha) {
            points.push(p);
        }
    }
    let mut s = Search::new(oracle, points, k, use_grad)?;
    // A warm start inherits the model's measured error on the previous windows.
    let inherited = match (&start.cold, warm_state) {
        (None, Some(w)) => w.errors.clone(),
        _ => Vec::new(),
    };
    let errors_inherited = inherited.len();
    s.recent = inherited;
    let groups = if use_grad { MAX_GROUPS } else { 1 };
    let bands = if use_grad { MAX_BANDS } else { 1 };
    let set = Setting {
        n,
        k,
        cfg,
        dist: banded(&oracle.blend.distances(groups)?, bands),
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
        "surrogate_points_seed": seed_points,
        "surrogate_curvature": model.curvature,
        "surrogate_out_of_sample": s.out_of_sample(errors_inherited),
        "verified_masks": s.verified.len(),
        "oracle_calls_optimise": s.optimise_calls,
        "oracle_calls_verify": s.verify_calls,
    });
    let warm_runs = match (&start.cold, warm_state) {
        (None, Some(w)) => w.warm_runs + 1,
        _ => 0,
    };
    let errors = s.recent[s.recent.len().saturating_sub(ERRORS_KEPT)..].to_vec();
    // Vertex points are not kept: members' own losses live in `Memory`.
    let kept: Vec<Point> = s.points.into_iter().filter(mixed).collect();
    let state = SewaState {
        keys: keys.to_vec(),
        theta,
        warm_runs,
        loss: Some(loss),
        points: Vec::new(),
        errors,
    }
    .with_points(kept);
    Ok((Found { set: chosen, loss, weights: None, details }, state))
}

/// Refit, search the surrogate, verify its best unverified masks and its best novel one;
/// until none is predicted to beat the best verified one by the margin, or the budget is spent.
/// Returns the last model, the relaxation's logits and the rounds run.
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
        let starts: Vec<Vec<usize>> = s.verified.keys().cloned().collect();
        let cands = candidates(&model, set.k, cfg, &theta, best.as_ref().map(|b| &b.0), &starts);
        let todo = proposals(s, &model, cfg, best.as_ref(), cands);
        tracing::debug!(
            round = rounds,
            calls = oracle.calls,
            best = ?best,
            proposals = ?todo,
            "surrogate round"
        );
        if todo.is_empty() || oracle.calls >= set.budget {
            return Ok((model, theta, rounds));
        }
        for (c, pred) in todo {
            if oracle.calls >= set.budget {
                break;
            }
            s.verify(oracle, &c, pred)?;
            let actual = s.verified.get(&c).map(|v| v.0);
            tracing::debug!(round = rounds, mask = ?c, predicted = pred, ?actual, "verified");
        }
    }
}

/// This round's masks to verify, from the ranked candidates: the best `surrogate_batch`
/// unverified ones predicted to beat the best verified mask by the margin of the model's
/// recent error (or the tolerance, once it predicts well), then one novel mask (at least two
/// members unlike every verified mask) within the margin of the model's worst error so far —
/// a model that has been wrong by that much may be wrong there too. Before the model has
/// predicted any call, both are taken unconditionally.
fn proposals(
    s: &Search,
    model: &Model,
    cfg: &SewaConfig,
    best: Option<&(Vec<usize>, f64)>,
    cands: Vec<(Vec<usize>, f64)>,
) -> Vec<(Vec<usize>, f64)> {
    let recent = s.prediction_error(2 * cfg.surrogate_batch);
    let worst = s.prediction_error(usize::MAX);
    // A model that has not yet predicted a single call has no measured error: its first
    // proposals are verified whatever it predicts, so its stopping rule never rests on
    // untested trust.
    let untested = s.recent.is_empty();
    let worth = |pred: f64, err: f64| match best {
        _ if untested => true,
        Some((b, loss)) => {
            let tol = cfg.surrogate_tolerance * loss.abs().max(1e-12);
            let margin = if err > tol { err } else { -tol };
            pred < model.subset(b) + margin
        }
        None => true,
    };
    let fresh: Vec<(Vec<usize>, f64)> =
        cands.into_iter().filter(|(c, _)| !s.verified.contains_key(c)).collect();
    let mut todo: Vec<(Vec<usize>, f64)> = fresh
        .iter()
        .filter(|(_, p)| worth(*p, recent))
        .take(cfg.surrogate_batch)
        .cloned()
        .collect();
    let novel = fresh
        .iter()
        .find(|(c, p)| !todo.iter().any(|(t, _)| t == c) && s.novelty(c) >= 2 && worth(*p, worst));
    todo.extend(novel.cloned());
    todo
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

/// The surrogate's best hard masks of size k, best first (at most `POOL`): every k-subset
/// when there are at most `exhaustive_limit`, else local optima under swaps from the
/// relaxation's top-k and from every verified mask (`starts`), with their swaps.
fn candidates(
    model: &Model,
    k: usize,
    cfg: &SewaConfig,
    theta: &[f64],
    best: Option<&Vec<usize>>,
    starts: &[Vec<usize>],
) -> Vec<(Vec<usize>, f64)> {
    let n = theta.len();
    let keep = POOL.max(4 * cfg.surrogate_batch + 8);
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
        let mut from = vec![top_k(&probs, k)];
        from.extend(best.cloned());
        from.extend(starts.iter().filter(|s| s.len() == k).cloned());
        from.sort();
        from.dedup();
        for start in from {
            let local = descend(model, start);
            out.extend(all_swaps(&local, n).into_iter().map(|s| {
                let p = model.subset(&s);
                (s, p)
            }));
            let p = model.subset(&local);
            out.push((local, p));
            shrink(&mut out, 4 * keep);
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
