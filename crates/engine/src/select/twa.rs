//! `method = "twa"`: trainable weight averaging in coefficient form. The members span a
//! subspace; a gradient step projected onto it is, in coefficients, Δα = −η G⁻¹ (W g) with G
//! the members' Gram matrix (here the centred one, from the squared distances `Blend` streams
//! once) and (W g)_i = ⟨G, w_i⟩ the dot products every oracle call gives. The step keeps
//! Σα = 1 (the average stays an average); unlike a soup nothing ties α to a softmax, but the
//! averaging path publishes only non-negative weights, so each step is projected onto α ≥ 0.
//! The step size adapts (grow on success, halve and retry on failure); the best α seen is
//! published. Needs gradients. Reads members only through the `Oracle`.

use serde_json::json;

use super::config::TwaConfig;
use super::oracle::Oracle;
use super::quadfit::solve;
use super::search::Found;
use super::soup::{loss_and_dots, need_grad};
use crate::error::Result;

/// Ridge on the centred Gram matrix, relative to its mean diagonal: members that are nearly
/// collinear would otherwise make G⁻¹ blow up along their tiny differences.
const GRAM_RIDGE: f64 = 1e-3;

/// Centred Gram matrix −½ J D J (+ ridge) from squared distances D.
pub fn centred_gram(d: &[Vec<f64>]) -> Vec<f64> {
    let n = d.len();
    let row: Vec<f64> = d.iter().map(|r| r.iter().sum::<f64>() / n as f64).collect();
    let all = row.iter().sum::<f64>() / n as f64;
    let mut g = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            g[i * n + j] = -0.5 * (d[i][j] - row[i] - row[j] + all);
        }
    }
    let mean = (0..n).map(|i| g[i * n + i]).sum::<f64>() / n as f64;
    (0..n).for_each(|i| g[i * n + i] += GRAM_RIDGE * mean.max(1e-300));
    g
}

/// The preconditioned direction −G⁻¹(d − μ1) with μ such that its coefficients sum to 0.
pub fn direction(gram: &[f64], d: &[f64]) -> Vec<f64> {
    let n = d.len();
    let x = solve(&mut gram.to_vec(), d, n);
    let y = solve(&mut gram.to_vec(), &vec![1.0; n], n);
    let (sx, sy): (f64, f64) = (x.iter().sum(), y.iter().sum());
    let mu = if sy.abs() > 0.0 { sx / sy } else { 0.0 };
    x.iter().zip(&y).map(|(x, y)| -(x - mu * y)).collect()
}

/// Euclidean projection onto the simplex {α ≥ 0, Σα = 1}.
pub fn project_simplex(v: &[f64]) -> Vec<f64> {
    let mut s = v.to_vec();
    s.sort_by(|a, b| b.total_cmp(a));
    let (mut acc, mut theta) = (0.0, 0.0);
    for (i, x) in s.iter().enumerate() {
        acc += x;
        let t = (acc - 1.0) / (i + 1) as f64;
        if x - t > 0.0 {
            theta = t;
        }
    }
    v.iter().map(|x| (x - theta).max(0.0)).collect()
}

/// Run TWA over the oracle's window.
pub fn run(oracle: &mut Oracle, cfg: &TwaConfig) -> Result<Found> {
    need_grad(oracle, "twa")?;
    let n = oracle.blend.len();
    let dist = oracle.blend.distances(1)?;
    let gram = centred_gram(&dist[0]);
    let mut alpha = vec![1.0 / n as f64; n];
    let (mut loss, mut d) = loss_and_dots(oracle, &alpha)?;
    let mut trace = vec![loss];
    let mut step = cfg.step / n as f64;
    let (mut accepted, mut rejected) = (0, 0);
    for _ in 1..cfg.iterations {
        let dir = direction(&gram, &d);
        let biggest = dir.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        if biggest == 0.0 || !biggest.is_finite() {
            break;
        }
        let trial: Vec<f64> = alpha.iter().zip(&dir).map(|(a, x)| a + step * x / biggest).collect();
        let trial = project_simplex(&trial);
        let (l, dt) = loss_and_dots(oracle, &trial)?;
        trace.push(l);
        if l < loss {
            (alpha, loss, d) = (trial, l, dt);
            step *= 1.5;
            accepted += 1;
        } else {
            step *= 0.5;
            rejected += 1;
        }
    }
    let set: Vec<usize> = (0..n).filter(|&i| alpha[i] > 0.0).collect();
    let details = json!({
        "learned_weights": alpha,
        "loss_trace": trace,
        "steps_accepted": accepted,
        "steps_rejected": rejected,
    });
    Ok(Found { set, loss, weights: Some(alpha), details })
}
