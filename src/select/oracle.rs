//! The counted loss oracle model-based selectors share: evaluates soft masks (with gradient) and
//! hard subsets (cached, so revisiting a subset is free), and counts every objective call — the
//! selection cost reports give. It refuses what no selection may be built on: a non-finite loss
//! or gradient (it would flow through Adam, top-k and `policy = "best"`'s comparison) and a
//! first gradient that is zero everywhere (an evaluator that broke autograd). It decides nothing.

use std::collections::HashMap;

use super::blend::Blend;
use crate::error::{Error, Result};
use crate::objective::{Evaluation, Objective, Params};

pub struct Oracle<'a, 'o> {
    pub blend: Blend<'a>,
    objective: &'o mut dyn Objective,
    /// Objective calls made so far.
    pub calls: usize,
    cache: HashMap<Vec<usize>, f64>,
    /// Reused buffer holding the last average evaluated.
    pub point: Params,
    /// Whether a gradient was checked for being zero everywhere (the first one is).
    grad_seen: bool,
}

impl<'a, 'o> Oracle<'a, 'o> {
    pub fn new(blend: Blend<'a>, objective: &'o mut dyn Objective) -> Self {
        let point = blend.zeros();
        Oracle { blend, objective, calls: 0, cache: HashMap::new(), point, grad_seen: false }
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
        self.refuse_unusable(&ev, mask)?;
        Ok(ev)
    }

    /// The loss of `set` if it was evaluated already (free).
    pub fn cached(&self, set: &[usize]) -> Option<f64> {
        let mut key = set.to_vec();
        key.sort_unstable();
        self.cache.get(&key).copied()
    }

    /// Record the loss of `set` measured elsewhere (an earlier selection's member loss), so
    /// `subset` returns it without a call.
    pub fn remember(&mut self, set: &[usize], loss: f64) {
        let mut key = set.to_vec();
        key.sort_unstable();
        self.cache.insert(key, loss);
    }

    fn refuse_unusable(&mut self, ev: &Evaluation, mask: &[f64]) -> Result<()> {
        let at = || {
            let used = mask.iter().filter(|m| **m > 0.0).count();
            format!("an average of {used} of {} members", mask.len())
        };
        let who = self.objective.describe();
        if !ev.loss.is_finite() {
            return Err(Error::Internal(format!(
                "{who} returned a non-finite loss ({}) at {}: the selection is abandoned and \
                 nothing is published from it",
                ev.loss,
                at()
            )));
        }
        let Some(grad) = &ev.grad else { return Ok(()) };
        if let Some(t) = grad.iter().find(|t| t.data.iter().any(|x| !x.is_finite())) {
            return Err(Error::Internal(format!(
                "{who} returned a non-finite gradient for {} at {}: the selection is abandoned \
                 and nothing is published from it",
                t.name,
                at()
            )));
        }
        if !std::mem::replace(&mut self.grad_seen, true)
            && grad.iter().all(|t| t.data.iter().all(|x| *x == 0.0))
        {
            return Err(Error::Usage(format!(
                "{who} returned a gradient that is exactly zero for every weight: the loss is not \
                 differentiated through the weights sewa sends (in PyTorch, \
                 model.load_state_dict(weights) detaches them; use \
                 torch.func.functional_call(model, weights, args)). To select without \
                 gradients instead, set [select.sewa] estimator = \"reinforce\""
            )));
        }
        Ok(())
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
        let g = ev.grad.ok_or_else(|| {
            Error::Internal(format!("{} returned no gradient", self.objective.describe()))
        })?;
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
