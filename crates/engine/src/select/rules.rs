//! Fixed selection rules that need no model: `uniform`, `lawa` (last k), `ema` (exponential
//! decay over the window), `best-metric` (k best by a metric stored with the checkpoint),
//! `wsm` (Megatron-LM's decay-shaped merge coefficients over the last k, `wsm.rs`) and
//! `weights` (the user's own weights over the newest members).
//! Pure: the window summary (sorted by step, oldest first) in, a `Selection` out.
//! Model-based selectors live beside this file and are reached through `select::run`.

use serde_json::json;

use super::wsm::{self, WsmShape};
use super::{Details, MemberSummary, Selection};
use super::{Method, MetricMode};
use crate::error::{Error, Result};

fn empty(method: &str) -> Error {
    Error::Selection(format!("{method}: the window is empty, nothing to select"))
}

/// Every member, equal weights.
pub fn uniform(members: &[MemberSummary]) -> Result<Selection> {
    let n = members.len();
    if n == 0 {
        return Err(empty("uniform"));
    }
    Ok(Selection {
        method: Method::Uniform,
        weights: vec![1.0 / n as f64; n],
        why: format!("all {n} window members, equal weights"),
        loss: None,
        details: Details::default(),
    })
}

/// Latest weight averaging: the last `k` members by step, equal weights.
pub fn lawa(members: &[MemberSummary], k: usize) -> Result<Selection> {
    let n = members.len();
    if n == 0 {
        return Err(empty("lawa"));
    }
    let take = k.min(n);
    let mut weights = vec![0.0; n];
    weights[n - take..].iter_mut().for_each(|w| *w = 1.0 / take as f64);
    Ok(Selection {
        method: Method::Lawa,
        weights,
        why: format!("last {take} of {n} by step (k = {k})"),
        loss: None,
        details: Details::extra(json!({ "k": k })),
    })
}

/// Exponential moving average over the window: newest weight 1, previous `decay`, then
/// `decay²`..., normalised. Unlike a running EMA it forgets members that left the window.
pub fn ema(members: &[MemberSummary], decay: f64) -> Result<Selection> {
    let n = members.len();
    if n == 0 {
        return Err(empty("ema"));
    }
    let raw: Vec<f64> = (0..n).map(|i| decay.powi((n - 1 - i) as i32)).collect();
    let total: f64 = raw.iter().sum();
    Ok(Selection {
        method: Method::Ema,
        weights: raw.iter().map(|w| w / total).collect(),
        why: format!("EMA over {n} members, decay {decay} per checkpoint"),
        loss: None,
        details: Details::extra(json!({ "decay": decay })),
    })
}

/// Warmup-stable-merge: the last `k` members by step weighted, oldest first, by Megatron-LM's
/// merge coefficients for `shape` (`wsm::coefficients`, its values kept bit for bit).
pub fn wsm(members: &[MemberSummary], k: usize, shape: WsmShape) -> Result<Selection> {
    let n = members.len();
    if n == 0 {
        return Err(empty("wsm"));
    }
    let take = k.min(n);
    let coefficients = wsm::coefficients(shape, take);
    let mut weights = vec![0.0; n];
    weights[n - take..].copy_from_slice(&coefficients);
    Ok(Selection {
        method: Method::Wsm,
        weights,
        why: format!("WSM {shape} weights over the last {take} of {n} by step (k = {k})"),
        loss: None,
        details: Details::extra(json!({
            "k": k,
            "shape": shape,
            "coefficients": coefficients,
            "source": wsm::SOURCE,
        })),
    })
}

/// The user's weights over the newest `weights.len()` members, oldest first (normalised);
/// an error when the window holds fewer members than weights or the weights are bad.
pub fn weights(members: &[MemberSummary], given: &[f64]) -> Result<Selection> {
    let (n, m) = (members.len(), given.len());
    wsm::check_weights(given).map_err(|why| Error::Selection(format!("weights {why}")))?;
    if m > n {
        return Err(Error::Selection(format!(
            "weights: {m} weights but the window holds {n} member{}: one weight per member",
            if n == 1 { "" } else { "s" }
        )));
    }
    let total: f64 = given.iter().sum();
    let mut w = vec![0.0; n];
    w[n - m..].iter_mut().zip(given).for_each(|(w, g)| *w = g / total);
    Ok(Selection {
        method: Method::Weights,
        weights: w,
        why: format!("the configured weights over the newest {m} of {n} by step"),
        loss: None,
        details: Details::extra(json!({ "weights": given })),
    })
}

/// The `k` members with the best metric (members without one are skipped), equal weights.
pub fn best_metric(
    members: &[MemberSummary],
    k: usize,
    metric: &str,
    mode: MetricMode,
) -> Result<Selection> {
    let mut scored: Vec<(usize, f64)> = members
        .iter()
        .enumerate()
        .filter_map(|(i, m)| m.metric.filter(|v| v.is_finite()).map(|v| (i, v)))
        .collect();
    if scored.is_empty() {
        return Err(Error::Selection(format!(
            "best-metric: none of the {} window members carries a finite {metric:?} \
             (safetensors __metadata__ or trainer_state.json)",
            members.len()
        )));
    }
    // Ties go to the newer checkpoint.
    scored.sort_by(|a, b| {
        let ord = a.1.partial_cmp(&b.1).expect("finite");
        let ord = if mode == MetricMode::Max { ord.reverse() } else { ord };
        ord.then(b.0.cmp(&a.0))
    });
    scored.truncate(k);
    let mut weights = vec![0.0; members.len()];
    for (i, _) in &scored {
        weights[*i] = 1.0 / scored.len() as f64;
    }
    let chosen: Vec<f64> = scored.iter().map(|(_, v)| *v).collect();
    Ok(Selection {
        method: Method::BestMetric,
        weights,
        why: format!(
            "{} best of {} by {metric} ({})",
            scored.len(),
            members.len(),
            if mode == MetricMode::Min { "lowest" } else { "highest" }
        ),
        loss: None,
        details: Details::extra(json!({ "metric": metric, "mode": mode, "chosen_values": chosen })),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn window(metrics: &[Option<f64>]) -> Vec<MemberSummary> {
        let m = metrics.iter().enumerate().map(|(i, m)| MemberSummary {
            path: PathBuf::from(format!("step_{i}")),
            step: Some(i as u64 * 100),
            metric: *m,
        });
        m.collect()
    }

    #[test]
    fn uniform_and_lawa() {
        let w = window(&[None; 4]);
        assert_eq!(uniform(&w).unwrap().weights, vec![0.25; 4]);
        let s = lawa(&w, 2).unwrap();
        assert_eq!(s.weights, vec![0.0, 0.0, 0.5, 0.5]);
        assert_eq!(s.members(), vec![2, 3]);
        assert_eq!(lawa(&w, 9).unwrap().weights, vec![0.25; 4], "k beyond the window takes all");
        assert!(lawa(&[], 2).is_err());
    }

    #[test]
    fn ema_weights_decay_towards_the_past() {
        let s = ema(&window(&[None; 3]), 0.5).unwrap();
        let total = 1.0 + 0.5 + 0.25;
        let expect = [0.25 / total, 0.5 / total, 1.0 / total];
        for (a, b) in s.weights.iter().zip(expect) {
            assert!((a - b).abs() < 1e-12);
        }
    }

    #[test]
    fn wsm_weighs_the_last_k_and_records_its_shape() {
        let w = window(&[None; 5]);
        let s = wsm(&w, 3, WsmShape::MinusSqrt).unwrap();
        assert_eq!(s.members(), vec![2, 3, 4]);
        assert_eq!(&s.weights[2..], wsm::coefficients(WsmShape::MinusSqrt, 3).as_slice());
        assert!(s.weights[2] > s.weights[4], "older members weigh more: {:?}", s.weights);
        let d = s.details.json();
        assert_eq!(d["shape"], "minus-sqrt");
        assert_eq!(d["k"], 3);
        assert_eq!(wsm(&w, 9, WsmShape::Linear).unwrap().members().len(), 5);
        assert!(wsm(&[], 2, WsmShape::Linear).is_err());
    }

    #[test]
    fn weights_apply_to_the_newest_members_and_refuse_bad_counts() {
        let w = window(&[None; 4]);
        let s = weights(&w, &[1.0, 3.0]).unwrap();
        assert_eq!(s.weights, vec![0.0, 0.0, 0.25, 0.75]);
        let e = weights(&w[..1], &[1.0, 3.0]).unwrap_err().to_string();
        assert!(e.contains("2 weights") && e.contains("1 member"), "{e}");
        assert!(weights(&w, &[0.0, 0.0]).unwrap_err().to_string().contains("all zero"));
        assert!(weights(&w, &[1.0, -1.0]).is_err());
    }

    #[test]
    fn best_metric_min_max_and_missing() {
        let w = window(&[Some(0.5), None, Some(0.1), Some(0.3), Some(f64::NAN)]);
        let s = best_metric(&w, 2, "eval_loss", MetricMode::Min).unwrap();
        assert_eq!(s.members(), vec![2, 3]);
        let s = best_metric(&w, 1, "acc", MetricMode::Max).unwrap();
        assert_eq!(s.members(), vec![0]);
        let err = best_metric(&window(&[None, None]), 1, "eval_loss", MetricMode::Min);
        assert!(err.unwrap_err().to_string().contains("eval_loss"));
    }
}
