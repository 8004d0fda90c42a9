//! SeWA's warm starts: the state one selection leaves for the next (θ per member, keyed by
//! path and step, and how many warm selections ran since the last cold one), where the next
//! window's logits start, and whether it starts cold instead. Pure: no oracle calls, no files.
//! The state lives in memory only (the daemon's `select::Memory`); nothing here is persisted.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::config::SewaConfig;
use super::mask::project;
use super::quadfit::Point;

/// Most surrogate data points a state keeps (the newest), per member of the window.
const POINTS_PER_MEMBER: usize = 4;

/// Before a warm start, survivors' logits are clamped to this distance from the k-th largest.
/// Why: the relaxed mask's gradient factor m(1−m)/τ vanishes for a logit far below the top k
/// (≈0 at −4 for τ ≤ 0.5), so a member rejected in earlier windows could never come back.
pub const THETA_BAND: f64 = 3.0;

/// A window member's identity across selections: its path (compared as bytes, so two
/// non-UTF-8 names that print alike stay apart) and its step.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MemberKey {
    #[serde(with = "crate::path_json")]
    pub path: PathBuf,
    pub step: Option<u64>,
}

/// What survives between selections for a warm start.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SewaState {
    /// Member identities (`select::member_key`), in window order.
    pub keys: Vec<MemberKey>,
    /// Final logits θ, one per key.
    pub theta: Vec<f64>,
    /// Warm selections since the last cold one (for `cold_every`).
    #[serde(default)]
    pub warm_runs: usize,
    /// The selection's loss: the next warm start must do at least as well.
    #[serde(default)]
    pub loss: Option<f64>,
    /// The surrogate strategy's oracle calls (weights and gradient over `keys`), reused by the
    /// next window for the members that survive.
    #[serde(default)]
    pub points: Vec<Point>,
    /// The surrogate's newest (predicted, actual) losses of verified masks: the model's
    /// measured error, so a warm start's first proposals need not be verified blindly.
    #[serde(default)]
    pub errors: Vec<(f64, f64)>,
}

impl SewaState {
    /// Keep the newest points only, so the state stays the size of a few windows' calls.
    pub fn with_points(mut self, mut points: Vec<Point>) -> Self {
        let cap = POINTS_PER_MEMBER * self.keys.len().max(1);
        if points.len() > cap {
            points.drain(..points.len() - cap);
        }
        self.points = points;
        self
    }

    /// The points that apply to the window `keys`: those mixing only survivors, re-indexed;
    /// a newcomer's gradient component is unknown.
    pub fn carried(&self, keys: &[MemberKey]) -> Vec<Point> {
        let to_new: Vec<Option<usize>> =
            self.keys.iter().map(|o| keys.iter().position(|k| k == o)).collect();
        let map = |p: &Point| -> Option<Point> {
            let mut alpha = vec![0.0; keys.len()];
            let mut grad = vec![None; if p.grad.is_empty() { 0 } else { keys.len() }];
            for (j, a) in p.alpha.iter().enumerate() {
                match to_new.get(j).copied().flatten() {
                    Some(i) => alpha[i] = *a,
                    None if *a != 0.0 => return None,
                    None => {}
                }
            }
            for (j, g) in p.grad.iter().enumerate() {
                if let (Some(i), Some(g)) = (to_new.get(j).copied().flatten(), g) {
                    grad[i] = Some(*g);
                }
            }
            let ok = p.loss.is_finite() && alpha.iter().all(|a| a.is_finite());
            ok.then_some(Point { alpha, loss: p.loss, grad })
        };
        let same_len = |p: &&Point| p.alpha.len() == self.keys.len();
        self.points.iter().filter(same_len).filter_map(map).collect()
    }
}

/// Where a selection's logits start.
pub struct Start {
    pub theta: Vec<f64>,
    /// Why the start is cold; `None` for a warm start.
    pub cold: Option<String>,
}

/// The flat start s_i = k/K.
pub fn flat(n: usize, k: usize) -> Vec<f64> {
    // Clamped so k = K (nothing to choose) still gives finite logits.
    let p = (k as f64 / n as f64).clamp(1e-6, 1.0 - 1e-6);
    vec![(p / (1.0 - p)).ln(); n]
}

/// θ for the window `keys`: from the previous selection's state when there is one, it has
/// survivors and `cold_every` does not call for a cold start; else flat. Survivors keep their
/// logits (clamped to `THETA_BAND` around the k-th largest); newcomers start *at* the k-th
/// largest, on the boundary of the top k, where the gradient can move them either way.
pub fn start(keys: &[MemberKey], k: usize, cfg: &SewaConfig, warm: Option<&SewaState>) -> Start {
    let n = keys.len();
    let cold = |why: &str| Start { theta: flat(n, k), cold: Some(why.to_string()) };
    let Some(w) = warm else { return cold("no previous selection") };
    if cfg.cold_every > 0 && w.warm_runs + 1 >= cfg.cold_every {
        return cold(&format!("cold_every = {}", cfg.cold_every));
    }
    let old: Vec<Option<f64>> = keys
        .iter()
        .map(|key| {
            let j = w.keys.iter().position(|o| o == key)?;
            w.theta.get(j).copied().filter(|t| t.is_finite())
        })
        .collect();
    let mut kept: Vec<f64> = old.iter().flatten().copied().collect();
    if kept.is_empty() {
        return cold("no member survived from the previous window");
    }
    kept.sort_by(|a, b| b.total_cmp(a));
    let anchor = kept[k.clamp(1, kept.len()) - 1];
    let (lo, hi) = (anchor - THETA_BAND, anchor + THETA_BAND);
    let mut theta: Vec<f64> = old.iter().map(|o| o.unwrap_or(anchor).clamp(lo, hi)).collect();
    project(&mut theta, k);
    Start { theta, cold: None }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(names: &[&str]) -> Vec<MemberKey> {
        names.iter().map(|s| MemberKey { path: s.into(), step: None }).collect()
    }

    fn state(names: &[&str], theta: Vec<f64>, warm_runs: usize) -> SewaState {
        SewaState { keys: keys(names), theta, warm_runs, ..SewaState::default() }
    }

    #[test]
    fn newcomers_start_at_the_kth_largest_survivor_not_the_mean() {
        // Two chosen survivors, three rejected ones far below: the mean (≈ −3) would bury the
        // newcomer; the 2nd largest (1.0) puts it on the boundary of the top 2.
        let old = state(&["a", "b", "c", "d", "e"], vec![3.0, 1.0, -6.0, -7.0, -8.0], 0);
        let cfg = SewaConfig::default();
        let s = start(&keys(&["a", "b", "c", "d", "e", "new"]), 2, &cfg, Some(&old));
        assert!(s.cold.is_none());
        let th = &s.theta;
        assert!((th[5] - th[1]).abs() < 1e-9, "newcomer ties the k-th survivor: {th:?}");
        assert!(((th[0] - th[1]) - 2.0).abs() < 1e-9, "survivors keep their differences");
        for t in &th[2..5] {
            assert!((th[1] - t - THETA_BAND).abs() < 1e-9, "rejects clamped to the band: {th:?}");
        }
    }

    #[test]
    fn cold_every_and_missing_survivors_start_cold() {
        let old = state(&["a", "b"], vec![1.0, -1.0], 2);
        let ks = keys(&["a", "b", "c"]);
        let every3 = SewaConfig { cold_every: 3, ..SewaConfig::default() };
        assert!(start(&ks, 1, &every3, Some(&old)).cold.unwrap().contains("cold_every"));
        let every4 = SewaConfig { cold_every: 4, ..SewaConfig::default() };
        assert!(start(&ks, 1, &every4, Some(&old)).cold.is_none());
        let never = SewaConfig { cold_every: 0, ..SewaConfig::default() };
        assert!(start(&ks, 1, &never, Some(&state(&["a"], vec![0.0], 99))).cold.is_none());
        let gone = start(&keys(&["x", "y"]), 1, &never, Some(&old));
        assert!(gone.cold.unwrap().contains("survived"));
        assert_eq!(gone.theta, flat(2, 1));
    }
}
