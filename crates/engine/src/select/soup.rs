//! `method = "soup"`: a learned soup — mixing weights on the simplex over the window, α =
//! softmax(z), learned by Adam on the logits from the objective's gradient (∂F/∂z_j =
//! α_j ⟨G, w_j − w(α)⟩, the dot products `Blend::dots` streams); optionally sparse: keep the
//! `k` largest weights and re-optimise them alone. Publishes the best weights seen (a step can
//! overshoot). Needs gradients. Reads members only through the `Oracle`.

use serde_json::json;

use super::config::SoupConfig;
use super::mask::Adam;
use super::oracle::Oracle;
use super::search::Found;
use crate::error::{Error, Result};

/// Softmax over the members marked `active` (others get weight 0).
pub fn softmax(z: &[f64], active: &[bool]) -> Vec<f64> {
    let max = z.iter().zip(active).filter(|(_, a)| **a).map(|(z, _)| *z).fold(f64::MIN, f64::max);
    let e: Vec<f64> =
        z.iter().zip(active).map(|(z, a)| if *a { (z - max).exp() } else { 0.0 }).collect();
    let total: f64 = e.iter().sum();
    e.iter().map(|x| x / total).collect()
}

/// ∂F/∂z from the weights and `d_i = ⟨G, w_i − w(α)⟩` (for which Σ α_i d_i = 0).
pub fn logit_gradient(alpha: &[f64], d: &[f64]) -> Vec<f64> {
    let mean: f64 = alpha.iter().zip(d).map(|(a, d)| a * d).sum();
    alpha.iter().zip(d).map(|(a, d)| a * (d - mean)).collect()
}

/// Loss and `⟨G, w_i − w(α)⟩` at the mixture `alpha`: one oracle call.
pub fn loss_and_dots(oracle: &mut Oracle, alpha: &[f64]) -> Result<(f64, Vec<f64>)> {
    let ev = oracle.soft(alpha, true)?;
    let g = ev
        .mask_grad
        .ok_or_else(|| Error::Selection(format!("{} returned no gradient", oracle.describe())))?;
    // The oracle's mask gradient is ⟨G, w_i − w(α)⟩ / Σα.
    let total: f64 = alpha.iter().filter(|a| **a > 0.0).sum();
    Ok((ev.loss, g.into_iter().map(|x| x * total).collect()))
}

/// Refuse forward-only objectives: learned weights need gradients.
pub fn need_grad(oracle: &Oracle, method: &str) -> Result<()> {
    if oracle.supports_grad() {
        return Ok(());
    }
    Err(Error::Usage(format!(
        "method = \"{method}\" learns weights from gradients, but {} gives none: use \
         method = \"sewa\" (it selects from losses alone)",
        oracle.describe()
    )))
}

/// Adam on the logits of the `active` members for `iters` calls; the best (loss, α) seen.
fn descend(
    oracle: &mut Oracle,
    z: &mut [f64],
    active: &[bool],
    iters: usize,
    lr: f64,
    trace: &mut Vec<f64>,
) -> Result<(f64, Vec<f64>)> {
    let mut adam = Adam::new(z.len(), lr);
    let mut best = (f64::INFINITY, Vec::new());
    for _ in 0..iters {
        let alpha = softmax(z, active);
        let (loss, d) = loss_and_dots(oracle, &alpha)?;
        trace.push(loss);
        if loss < best.0 {
            best = (loss, alpha.clone());
        }
        let g = logit_gradient(&alpha, &d);
        adam.step(z, &g);
    }
    Ok(best)
}

/// Learn the soup over the oracle's window.
pub fn run(oracle: &mut Oracle, cfg: &SoupConfig) -> Result<Found> {
    need_grad(oracle, "soup")?;
    let n = oracle.blend.len();
    let mut z = vec![0.0; n];
    let mut trace = Vec::new();
    let all = vec![true; n];
    let (mut loss, mut alpha) = descend(oracle, &mut z, &all, cfg.iterations, cfg.lr, &mut trace)?;
    if let Some(k) = cfg.k.filter(|k| *k < n) {
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| alpha[b].total_cmp(&alpha[a]).then(a.cmp(&b)));
        let mut active = vec![false; n];
        order[..k].iter().for_each(|&i| active[i] = true);
        // Start from the dense weights restricted to the top k.
        let mut zs: Vec<f64> = alpha.iter().map(|a| a.max(1e-12).ln()).collect();
        let iters = cfg.sparse_iterations.max(1);
        (loss, alpha) = descend(oracle, &mut zs, &active, iters, cfg.lr, &mut trace)?;
    }
    let set: Vec<usize> = (0..n).filter(|&i| alpha[i] > 0.0).collect();
    let details = json!({ "learned_weights": alpha, "loss_trace": trace, "sparse_k": cfg.k });
    Ok(Found { set, loss, weights: Some(alpha), details })
}
