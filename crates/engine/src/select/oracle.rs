//! The counted loss oracle model-based selectors share: evaluates soft masks (with gradient) and
//! hard subsets (cached, so revisiting a subset is free), and counts every objective call — the
//! selection cost reports give. It refuses what no selection may be built on: a non-finite loss
//! or gradient (it would flow through Adam, top-k and `policy = "best"`'s comparison) and a
//! first gradient that is zero everywhere (an evaluator that broke autograd). With an objective
//! that mixes members itself (`Objective::mixes`) it sends mixing weights and gets ∂F/∂α per
//! member; otherwise it forms the average and streams the gradient's dot products (`Blend`).
//! Either way selectors see the mask gradient. It decides nothing.

use std::collections::HashMap;

use super::blend::Blend;
use crate::error::{Error, Result};
use crate::objective::{Objective, Params};

pub struct Oracle<'a, 'o> {
    pub blend: Blend<'a>,
    objective: &'o mut dyn Objective,
    /// Objective calls made so far.
    pub calls: usize,
    cache: HashMap<Vec<usize>, f64>,
    /// Reused buffer holding the last average evaluated (empty when the objective mixes).
    point: Params,
    /// Whether the objective takes mixing weights instead of averages.
    mixing: bool,
    /// Whether a gradient was checked for being zero everywhere (the first one is).
    grad_seen: bool,
}

/// One soft-mask evaluation as selectors use it.
#[derive(Clone, Debug)]
pub struct Soft {
    pub loss: f64,
    /// ∂F/∂m_i = ⟨G, w_i − w(m)⟩ / Σ m for every member, when a gradient was asked for and
    /// the objective gives one.
    pub mask_grad: Option<Vec<f64>>,
}

impl<'a, 'o> Oracle<'a, 'o> {
    pub fn new(blend: Blend<'a>, objective: &'o mut dyn Objective) -> Self {
        let mixing = objective.mixes();
        objective.members_dtype(blend.float_dtype());
        // A mixing objective never needs the model-sized average buffer.
        let point = if mixing { Vec::new() } else { blend.zeros() };
        let cache = HashMap::new();
        Oracle { blend, objective, calls: 0, cache, point, mixing, grad_seen: false }
    }

    pub fn supports_grad(&self) -> bool {
        self.objective.supports_grad()
    }

    pub fn describe(&self) -> String {
        self.objective.describe()
    }

    /// Loss (and with `want_grad` the mask gradient) at `Σ m_i w_i / Σ m_i` (`m_i > 0` only).
    pub fn soft(&mut self, mask: &[f64], want_grad: bool) -> Result<Soft> {
        let total: f64 = mask.iter().filter(|m| **m > 0.0).sum();
        if total <= 0.0 {
            return Err(Error::Selection("mix: all coefficients are zero".into()));
        }
        if self.mixing {
            self.soft_mixed(mask, total, want_grad)
        } else {
            self.soft_averaged(mask, total, want_grad)
        }
    }

    /// The objective mixes: ∂F/∂m_i = (⟨G, w_i⟩ − Σ_j α_j ⟨G, w_j⟩) / Σ m with α = m / Σ m.
    fn soft_mixed(&mut self, mask: &[f64], total: f64, want_grad: bool) -> Result<Soft> {
        let alpha: Vec<f64> = mask.iter().map(|m| if *m > 0.0 { m / total } else { 0.0 }).collect();
        self.calls += 1;
        let ev = self.objective.evaluate_mix(self.blend.members(), &alpha, want_grad)?;
        self.refuse_loss(ev.loss, mask)?;
        let Some(dots) = ev.member_dots else { return Ok(Soft { loss: ev.loss, mask_grad: None }) };
        if dots.len() != mask.len() || dots.iter().any(|d| !d.is_finite()) {
            return Err(self.unusable_gradient("the members' ∂F/∂α", mask));
        }
        self.refuse_zero_gradient(dots.iter().all(|d| *d == 0.0))?;
        let center: f64 = alpha.iter().zip(&dots).map(|(a, d)| a * d).sum();
        let mask_grad = dots.iter().map(|d| (d - center) / total).collect();
        Ok(Soft { loss: ev.loss, mask_grad: Some(mask_grad) })
    }

    /// The objective takes averages: form it, then stream ⟨G, w_i − w(m)⟩ from the members.
    fn soft_averaged(&mut self, mask: &[f64], total: f64, want_grad: bool) -> Result<Soft> {
        self.blend.mix(mask, &mut self.point)?;
        self.calls += 1;
        let ev = self.objective.evaluate(&self.point, want_grad)?;
        self.refuse_loss(ev.loss, mask)?;
        let Some(grad) = &ev.grad else { return Ok(Soft { loss: ev.loss, mask_grad: None }) };
        if let Some(t) = grad.iter().find(|t| t.data.iter().any(|x| !x.is_finite())) {
            return Err(self.unusable_gradient(&format!("gradient for {}", t.name), mask));
        }
        self.refuse_zero_gradient(grad.iter().all(|t| t.data.iter().all(|x| *x == 0.0)))?;
        let d = self.blend.dots(grad, &self.point)?;
        Ok(Soft { loss: ev.loss, mask_grad: Some(d.into_iter().map(|x| x / total).collect()) })
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

    fn at(mask: &[f64]) -> String {
        let used = mask.iter().filter(|m| **m > 0.0).count();
        format!("an average of {used} of {} members", mask.len())
    }

    fn refuse_loss(&self, loss: f64, mask: &[f64]) -> Result<()> {
        if loss.is_finite() {
            return Ok(());
        }
        Err(Error::Selection(format!(
            "{} returned a non-finite loss ({loss}) at {}: the selection is abandoned and \
             nothing is published from it",
            self.objective.describe(),
            Self::at(mask)
        )))
    }

    fn unusable_gradient(&self, what: &str, mask: &[f64]) -> Error {
        Error::Selection(format!(
            "{} returned a non-finite {what} at {}: the selection is abandoned and nothing is \
             published from it",
            self.objective.describe(),
            Self::at(mask)
        ))
    }

    /// The first gradient must not be zero everywhere (`all_zero`).
    fn refuse_zero_gradient(&mut self, all_zero: bool) -> Result<()> {
        if std::mem::replace(&mut self.grad_seen, true) || !all_zero {
            return Ok(());
        }
        Err(Error::Usage(format!(
            "{} returned a gradient that is exactly zero for every weight: the loss is not \
             differentiated through the weights sewa sends (in PyTorch, \
             model.load_state_dict(weights) detaches them; use \
             torch.func.functional_call(model, weights, args)). To select without \
             gradients instead, set [select.sewa] estimator = \"reinforce\"",
            self.objective.describe()
        )))
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
        let g = ev.mask_grad.ok_or_else(|| {
            Error::Selection(format!("{} returned no gradient", self.objective.describe()))
        })?;
        Ok((ev.loss, g))
    }

    pub fn indicator(&self, set: &[usize]) -> Vec<f64> {
        let mut m = vec![0.0; self.blend.len()];
        set.iter().for_each(|&i| m[i] = 1.0);
        m
    }
}
