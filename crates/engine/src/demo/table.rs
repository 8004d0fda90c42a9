//! The demo's comparison: every selector over the same final window, scored on the held-out
//! selection loss and on clean test accuracy, with its selection cost; rendering of the table.
//! Fixed rules come from `select::rules`, as in the daemon.

use std::time::Instant;

use candle_core::Tensor;
use serde::Serialize;

use crate::error::Result;
use crate::objective::{Activation, Objective, mlp};
use crate::select::blend::Blend;
use crate::select::{
    MemberSummary, Method, Selection, SewaConfig, Strategy, rules, run_model_based,
};
use sewa_checkpoint::Checkpoint;

/// One line of the table (also the `--json` record).
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// The row's label: a method with its setting ("sewa 5 (direct)", "random 5 (10 seeds)").
    pub method: String,
    /// Members averaged (mean over seeds for `random`).
    pub size: f64,
    /// Steps of the members averaged (first seed for `random`).
    pub steps: Vec<u64>,
    pub heldout_loss: f64,
    pub test_accuracy: f64,
    pub wall_seconds: f64,
    pub oracle_calls: f64,
}

/// Scores a weighting of the window on the clean test split.
pub struct Scorer<'a> {
    pub test_x: Tensor,
    pub test_y: &'a [i64],
    pub activation: Activation,
}

impl Scorer<'_> {
    /// (held-out loss, test accuracy) of `Σ weights_i w_i`.
    fn score(&self, blend: &Blend, obj: &mut dyn Objective, weights: &[f64]) -> Result<(f64, f64)> {
        let mut p = blend.zeros();
        blend.mix(weights, &mut p)?;
        let loss = obj.evaluate(&p, false)?.loss;
        let pred = mlp::predict(&p, self.activation, &self.test_x)?;
        let right = pred.iter().zip(self.test_y).filter(|(p, y)| **p as i64 == **y).count();
        Ok((loss, right as f64 / self.test_y.len() as f64))
    }
}

fn steps(members: &[Checkpoint], w: &[f64]) -> Vec<u64> {
    w.iter().zip(members).filter(|(w, _)| **w > 0.0).filter_map(|(_, m)| m.step()).collect()
}

/// Fixed rules' weights over the window, from `select::rules` (the daemon's own): last (LAWA
/// with k = 1), uniform, LAWA (last k), EMA (decay 0.8).
fn fixed_rules(members: &[Checkpoint], k: usize) -> Result<Vec<(String, Vec<f64>)>> {
    let summaries: Vec<MemberSummary> = members
        .iter()
        .map(|m| MemberSummary { path: m.path().to_path_buf(), step: m.step(), metric: None })
        .collect();
    let (n, k) = (members.len(), k.min(members.len()));
    Ok(vec![
        ("last".into(), rules::lawa(&summaries, 1)?.weights),
        (format!("uniform {n}"), rules::uniform(&summaries)?.weights),
        (format!("lawa {k}"), rules::lawa(&summaries, k)?.weights),
        ("ema 0.8".into(), rules::ema(&summaries, 0.8)?.weights),
    ])
}

/// All rows, plus SeWA's selection (the one the demo publishes).
pub fn rows(
    members: &[Checkpoint],
    obj: &mut dyn Objective,
    scorer: &Scorer,
    k: usize,
    cfg: &SewaConfig,
) -> Result<(Vec<Row>, Selection)> {
    let refs: Vec<&Checkpoint> = members.iter().collect();
    let blend = Blend::new(&refs)?;
    let mut rows = Vec::new();
    for (name, w) in fixed_rules(members, k)? {
        let (loss, acc) = scorer.score(&blend, obj, &w)?;
        let steps = steps(members, &w);
        let size = steps.len() as f64;
        rows.push(Row {
            method: name,
            size,
            steps,
            heldout_loss: loss,
            test_accuracy: acc,
            wall_seconds: 0.0,
            oracle_calls: 0.0,
        });
    }
    rows.push(random_mean(members, obj, scorer, k, cfg, &blend)?);
    let mut sewa = None;
    let direct = SewaConfig { strategy: Strategy::Direct, ..cfg.clone() };
    let runs = [
        (Method::Greedy, "greedy".to_string(), cfg),
        (Method::Soup, "soup (learned)".to_string(), cfg),
        (Method::Twa, "twa (learned)".to_string(), cfg),
        (Method::Sewa, format!("sewa {k}"), cfg),
        (Method::Sewa, format!("sewa {k} (direct)"), &direct),
        (Method::Exhaustive, format!("exhaustive {k}"), cfg),
    ];
    for (method, label, c) in runs {
        let t = Instant::now();
        let (sel, _) = run_model_based(method, k, &refs, obj, c, None)?;
        let wall = t.elapsed().as_secs_f64();
        let (loss, acc) = scorer.score(&blend, obj, &sel.weights)?;
        let steps = steps(members, &sel.weights);
        rows.push(Row {
            method: label,
            size: steps.len() as f64,
            steps,
            heldout_loss: loss,
            test_accuracy: acc,
            wall_seconds: wall,
            oracle_calls: sel.details.total_calls() as f64,
        });
        if method == Method::Sewa && sewa.is_none() {
            sewa = Some(sel);
        }
    }
    Ok((rows, sewa.expect("sewa row")))
}

/// `random k`, averaged over 10 seeds.
fn random_mean(
    members: &[Checkpoint],
    obj: &mut dyn Objective,
    scorer: &Scorer,
    k: usize,
    cfg: &SewaConfig,
    blend: &Blend,
) -> Result<Row> {
    let refs: Vec<&Checkpoint> = members.iter().collect();
    let (mut loss, mut acc, mut wall, mut first) = (0.0, 0.0, 0.0, Vec::new());
    for s in 0..10 {
        let c = SewaConfig { seed: cfg.seed.wrapping_add(s), ..cfg.clone() };
        let t = Instant::now();
        let (sel, _) = run_model_based(Method::Random, k, &refs, obj, &c, None)?;
        wall += t.elapsed().as_secs_f64() / 10.0;
        let (l, a) = scorer.score(blend, obj, &sel.weights)?;
        loss += l / 10.0;
        acc += a / 10.0;
        if s == 0 {
            first = steps(members, &sel.weights);
        }
    }
    Ok(Row {
        method: format!("random {k} (10 seeds)"),
        size: k.min(members.len()) as f64,
        steps: first,
        heldout_loss: loss,
        test_accuracy: acc,
        wall_seconds: wall,
        oracle_calls: 1.0,
    })
}

/// The table as text.
pub fn render(rows: &[Row], window: usize, k: usize) -> String {
    let mut s = format!(
        "selection over the last {window} checkpoints (k = {k}); held-out = selection split, \
         accuracy on the clean test split\n{:<22} {:>5} {:>13} {:>9} {:>10} {:>8}  steps\n",
        "method", "size", "held-out loss", "test acc", "select s", "oracle"
    );
    for r in rows {
        let steps: Vec<String> = r.steps.iter().map(|s| s.to_string()).collect();
        let steps =
            if steps.len() > 8 { format!("{} steps", steps.len()) } else { steps.join(",") };
        s.push_str(&format!(
            "{:<22} {:>5} {:>13.5} {:>8.2}% {:>10.3} {:>8}  {}\n",
            r.method,
            r.size,
            r.heldout_loss,
            100.0 * r.test_accuracy,
            r.wall_seconds,
            r.oracle_calls,
            steps
        ));
    }
    s
}
