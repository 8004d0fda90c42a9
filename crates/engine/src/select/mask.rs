//! The tools SeWA's two strategies share over a mask's logits θ (s = σ(θ)): binary-concrete
//! relaxed samples, the projection keeping Σ s = k, Adam, the top-k, and which gradient
//! estimator the objective allows. Pure, apart from `estimator` asking the oracle what it gives.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::config::{Estimator, SewaConfig};
use super::oracle::Oracle;
use crate::error::{Error, Result};

/// One binary-concrete (Gumbel-sigmoid) relaxed mask: m_i = σ((θ_i + logit u_i) / τ).
pub(super) fn relaxed_mask(theta: &[f64], tau: f64, rng: &mut ChaCha8Rng) -> Vec<f64> {
    let sample = |th: &f64| {
        let u: f64 = rng.random_range(1e-7..1.0 - 1e-7);
        sigmoid((th + (u / (1.0 - u)).ln()) / tau)
    };
    theta.iter().map(sample).collect()
}

pub(super) fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Shift θ by one constant so that Σ σ(θ_i) = k (bisection; the map is monotone in the shift).
pub fn project(theta: &mut [f64], k: usize) {
    let sum = |c: f64| theta.iter().map(|t| sigmoid(t + c)).sum::<f64>();
    let (mut lo, mut hi) = (-60.0, 60.0);
    for _ in 0..80 {
        let mid = 0.5 * (lo + hi);
        if sum(mid) < k as f64 { lo = mid } else { hi = mid }
    }
    let c = 0.5 * (lo + hi);
    theta.iter_mut().for_each(|t| *t += c);
}

/// Adam on θ.
pub(super) struct Adam {
    m: Vec<f64>,
    v: Vec<f64>,
    t: i32,
    lr: f64,
}

impl Adam {
    pub(super) fn new(n: usize, lr: f64) -> Self {
        Adam { m: vec![0.0; n], v: vec![0.0; n], t: 0, lr }
    }
    pub(super) fn step(&mut self, theta: &mut [f64], g: &[f64]) {
        const B1: f64 = 0.9;
        const B2: f64 = 0.999;
        self.t += 1;
        for i in 0..theta.len() {
            self.m[i] = B1 * self.m[i] + (1.0 - B1) * g[i];
            self.v[i] = B2 * self.v[i] + (1.0 - B2) * g[i] * g[i];
            let mh = self.m[i] / (1.0 - B1.powi(self.t));
            let vh = self.v[i] / (1.0 - B2.powi(self.t));
            theta[i] -= self.lr * mh / (vh.sqrt() + 1e-8);
        }
    }
}

pub(super) fn argmax(x: &[f64]) -> usize {
    (0..x.len()).max_by(|&a, &b| x[a].total_cmp(&x[b])).unwrap_or(0)
}

/// Indices of the k largest probabilities (ties: lower index first), sorted.
pub fn top_k(s: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..s.len()).collect();
    idx.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
    let mut set = idx[..k].to_vec();
    set.sort_unstable();
    set
}

/// The estimator `cfg` asks for, checked against what the objective gives.
pub(super) fn estimator(oracle: &Oracle, cfg: &SewaConfig) -> Result<Estimator> {
    let estimator = match cfg.estimator {
        Estimator::Auto if oracle.supports_grad() => Estimator::Concrete,
        Estimator::Auto => Estimator::Reinforce,
        e => e,
    };
    if estimator == Estimator::Concrete && !oracle.supports_grad() {
        return Err(Error::Usage(format!(
            "estimator = \"concrete\" needs gradients, but {} gives none: use \"reinforce\"",
            oracle.describe()
        )));
    }
    Ok(estimator)
}
