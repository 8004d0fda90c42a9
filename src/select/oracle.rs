//! The counted loss oracle model-based selectors share: evaluates soft masks (with gradient) and
//! hard subsets (cached, so revisiting a subset is free), and counts every objective call — the
//! selection cost reports give. It does not decide anything.

use std::collections::HashMap;

use super::blend::Blend;
use crate::error::Result;
use crate::objective::{Evaluation, Objective, Params};

pub struct Oracle<'a, 'o> {
    pub blend: Blend<'a>,
    objective: &'o mut dyn Objective,
    /// Objective calls made so far.
    pub calls: usize,
    cache: HashMap<Vec<usize>, f64>,
    /// Reused buffer holding the last average evaluated.
    pub point: Params,
}

impl<'a, 'o> Oracle<'a, 'o> {
    pub fn new(blend: Blend<'a>, objective: &'o mut dyn Objective) -> Self {
        let point = blend.zeros();
        Oracle { blend, objective, calls: 0, cache: HashMap::new(), point }
    }

    pub fn supports_grad(&self) -> bool {
        self.objective.supports_grad()
    }

    pub fn describe(&self) -> String {
        self.objective.describe()
    }

    /// Loss (and gradient) at `Σ m_i w_i / Σ m_i`; the average stays in `self.point`.
    pub fn soft(&mut self, mask: &[f64], want_grad: bool) -> Result<Evaluation> {
        self.blend.mix(mask, &mut self.point)?;
        self.calls += 1;
        let ev = self.objective.evaluate(&self.point, want_grad)?;
        if !ev.loss.is_finite() {
            tracing::warn!(loss = ev.loss, "objective returned a non-finite loss");
        }
        Ok(ev)
    }

    /// Loss of the uniform average of `set` (indices, any order). Cached by set.
    pub fn subset(&mut self, set: &[usize]) -> Result<f64> {
        let mut key = set.to_vec();
        key.sort_unstable();
        if let Some(l) = self.cache.get(&key) {
            return Ok(*l);
        }
        let loss = self.soft(&self.indicator(&key), false)?.loss;
        self.cache.insert(key, loss);
        Ok(loss)
    }

    /// Loss and gradient of the uniform average of `set`, plus `∂F/∂m_i` at that hard mask
    /// (⟨G, w_i − w(m)⟩ / |set|) for every member.
    pub fn subset_with_mask_grad(&mut self, set: &[usize]) -> Result<(f64, Vec<f64>)> {
        let mask = self.indicator(set);
        let ev = self.soft(&mask, true)?;
        let mut key = set.to_vec();
        key.sort_unstable();
        self.cache.insert(key, ev.loss);
        let g = ev.grad.expect("objective supports gradients");
        let d = self.blend.dots(&g, &self.point)?;
        let k = set.len() as f64;
        Ok((ev.loss, d.into_iter().map(|x| x / k).collect()))
    }

    pub fn indicator(&self, set: &[usize]) -> Vec<f64> {
        let mut m = vec![0.0; self.blend.len()];
        set.iter().for_each(|&i| m[i] = 1.0);
        m
    }
}
