//! The guard every model-based selection passes through: the fixed rules a user would
//! otherwise have had for one call each — LAWA-k and other contiguous runs of k members, the
//! uniform window, EMAs over the window — are verified with real calls, and a method's answer
//! is published only when its verified loss is no worse than the best of them; otherwise that
//! rule's weights are. So a learned selection can never be worse, on the selection data, than
//! the simple rule it replaces. The rules' calls double as the surrogate's first data points
//! (a spread of mixtures across the window, with gradients when the objective gives them).
//! Which rules, and the verdict, are pure; the oracle computes the losses.

use serde::Serialize;
use serde_json::json;

use super::oracle::Oracle;
use super::quadfit::Point;
use super::search::Found;
use crate::error::Result;

/// One fixed rule over the window: its name (`lawa-5`, `run-5@3`, `uniform`, `ema-0.8`) and
/// its normalised weights in window order.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub name: String,
    pub weights: Vec<f64>,
}

/// A rule with its verified loss (and the call's data point for the surrogate).
#[derive(Clone, Debug)]
pub struct Checked {
    pub rule: Rule,
    pub loss: f64,
    /// Whether the loss came from an earlier window (no call now).
    pub reused: bool,
}

/// The rules the guard verifies over a window of `n` members (oldest first) for subsets of
/// `k`, in the order they are called:
/// - contiguous runs of k: LAWA-k, then — for a window seen for the first time (`known` holds
///   no run of k) — runs stepping back by ⌈k/2⌉ so every member lies in one or two runs, the
///   oldest run always included (about 2n/k runs: the whole family of "average a stretch of
///   the trajectory" rules at half the cost); for a window that slid, the runs verified in
///   earlier windows whose members all survive (free), so a slide costs one new run;
/// - the uniform window (SWA over the window);
/// - EMAs over the window whose effective lengths 1/(1 − d) are k and 2k (d = 1 − 1/k,
///   1 − 1/(2k)): the EMA a user would tune to the same horizon as k, and a slower one.
///
/// Duplicates (k ≥ n: every rule is the window) are dropped.
pub fn rules(n: usize, k: usize, known: &[Point]) -> Vec<Rule> {
    if n == 0 {
        return Vec::new();
    }
    let k = k.clamp(1, n);
    let known_runs: Vec<usize> = known.iter().filter_map(|p| run_start(&p.alpha, k)).collect();
    let mut out: Vec<Rule> = Vec::new();
    let mut push = |name: String, weights: Vec<f64>| {
        if !out.iter().any(|r| same(&r.weights, &weights)) {
            out.push(Rule { name, weights });
        }
    };
    let mut starts: Vec<usize> = if known_runs.is_empty() {
        let mut grid: Vec<usize> = (0..=n - k).rev().step_by(k.div_ceil(2)).collect();
        if grid.last() != Some(&0) {
            grid.push(0);
        }
        grid
    } else {
        let mut s = known_runs;
        s.push(n - k);
        s.sort_unstable_by(|a, b| b.cmp(a));
        s.dedup();
        s
    };
    starts.retain(|&s| s + k <= n);
    for s in starts {
        let mut w = vec![0.0; n];
        w[s..s + k].iter_mut().for_each(|x| *x = 1.0 / k as f64);
        let name = if s + k == n { format!("lawa-{k}") } else { format!("run-{k}@{s}") };
        push(name, w);
    }
    push("uniform".into(), vec![1.0 / n as f64; n]);
    for horizon in [k, 2 * k] {
        if horizon < 2 {
            continue;
        }
        let d = 1.0 - 1.0 / horizon as f64;
        push(format!("ema-{}", round3(d)), ema_weights(n, d));
    }
    out
}

/// EMA over the window: newest weight 1, then d, d², … (normalised), as `rules::ema`.
pub fn ema_weights(n: usize, decay: f64) -> Vec<f64> {
    let raw: Vec<f64> = (0..n).map(|i| decay.powi((n - 1 - i) as i32)).collect();
    let total: f64 = raw.iter().sum();
    raw.iter().map(|w| w / total).collect()
}

/// Where `alpha` starts if it is a uniform run of `k` consecutive members.
fn run_start(alpha: &[f64], k: usize) -> Option<usize> {
    let start = alpha.iter().position(|a| *a > 0.0)?;
    let w = 1.0 / k as f64;
    let inside = |i: usize| i >= start && i < start + k;
    let ok = start + k <= alpha.len()
        && alpha
            .iter()
            .enumerate()
            .all(|(i, a)| if inside(i) { (a - w).abs() < 1e-12 } else { *a == 0.0 });
    ok.then_some(start)
}

/// The members `weights` averages uniformly, if it is a uniform average of a subset.
fn uniform_support(weights: &[f64]) -> Option<Vec<usize>> {
    let set: Vec<usize> = (0..weights.len()).filter(|&i| weights[i] > 0.0).collect();
    let w = 1.0 / set.len().max(1) as f64;
    let uniform = weights.iter().all(|x| *x == 0.0 || (x - w).abs() < 1e-12);
    (uniform && !set.is_empty()).then_some(set)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn same(a: &[f64], b: &[f64]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12)
}

/// Verify `rules` with the oracle (with gradient when `want_grad`), taking a loss from `known`
/// (points from earlier windows, already re-indexed to this one) when one has the same
/// weights. Returns the checked rules and their data points (a reused rule's point as it was
/// carried; a rule whose loss was cached without a point has none). Hard rules (contiguous
/// runs) land in the oracle's subset cache, so no method pays for them again.
pub fn check(
    oracle: &mut Oracle,
    rules: Vec<Rule>,
    known: &[Point],
    want_grad: bool,
) -> Result<(Vec<Checked>, Vec<Point>)> {
    let mut checked = Vec::with_capacity(rules.len());
    let mut points = Vec::new();
    for rule in rules {
        let hard = uniform_support(&rule.weights);
        let earlier = known.iter().find(|p| same(&p.alpha, &rule.weights));
        let cached = hard.as_deref().and_then(|set| oracle.cached(set));
        let (loss, reused) = match (earlier, cached) {
            (Some(p), _) => {
                points.push(p.clone());
                (p.loss, true)
            }
            (None, Some(l)) => (l, true),
            (None, None) => {
                let ev = oracle.soft(&rule.weights, want_grad)?;
                // The surrogate's gradient rows are ⟨G, w_i − w(α)⟩ (the oracle divides by Σm = 1).
                let grad = ev.mask_grad.map(|g| g.into_iter().map(Some).collect());
                points.push(Point {
                    alpha: rule.weights.clone(),
                    loss: ev.loss,
                    grad: grad.unwrap_or_default(),
                });
                (ev.loss, false)
            }
        };
        if let Some(set) = &hard {
            oracle.remember(set, loss);
        }
        checked.push(Checked { rule, loss, reused });
    }
    Ok((checked, points))
}

/// The guard's verdict, for the report.
#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    /// `method` when the method's answer stands, else the winning rule's name.
    pub winner: String,
    pub method_loss: f64,
    pub best_rule: String,
    pub best_rule_loss: f64,
    /// (best rule's loss − method's loss) / |best rule's loss|: how much the method gained
    /// over the best rule (negative: the rule won by that much).
    pub gain: f64,
    /// Every rule verified, in call order: (name, loss).
    pub rules: Vec<(String, f64)>,
    /// Rule losses taken from earlier windows (no call).
    pub reused: usize,
}

/// Keep the method's answer unless a checked rule's verified loss is strictly lower; then the
/// rule's weights replace it. A non-finite method loss always loses.
pub fn judge(found: Found, checked: &[Checked]) -> (Found, Option<Verdict>) {
    let Some(best) = checked.iter().min_by(|a, b| a.loss.total_cmp(&b.loss)) else {
        return (found, None);
    };
    let method_loss = found.loss;
    let rule_wins = !method_loss.is_finite() || best.loss < method_loss;
    let verdict = Verdict {
        winner: if rule_wins { best.rule.name.clone() } else { "method".into() },
        method_loss,
        best_rule: best.rule.name.clone(),
        best_rule_loss: best.loss,
        gain: (best.loss - method_loss) / best.loss.abs().max(1e-300),
        rules: checked.iter().map(|c| (c.rule.name.clone(), c.loss)).collect(),
        reused: checked.iter().filter(|c| c.reused).count(),
    };
    if !rule_wins {
        return (found, Some(verdict));
    }
    let w = &best.rule.weights;
    let hard = uniform_support(w);
    let set = hard.clone().unwrap_or_else(|| (0..w.len()).filter(|&i| w[i] > 0.0).collect());
    let mut details = found.details;
    if let Some(obj) = details.as_object_mut() {
        obj.insert("method_set".into(), json!(found.set));
        obj.insert("method_weights".into(), json!(found.weights));
    }
    let weights = if hard.is_some() { None } else { Some(w.clone()) };
    (Found { set, loss: best.loss, weights, details }, Some(verdict))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn support(r: &Rule) -> Vec<usize> {
        (0..r.weights.len()).filter(|&i| r.weights[i] > 0.0).collect()
    }

    #[test]
    fn runs_cover_the_window_from_the_newest_back_to_the_oldest() {
        let rs = rules(20, 5, &[]);
        let runs: Vec<Vec<usize>> = rs
            .iter()
            .filter(|r| r.name.contains('-') && support(r).len() == 5)
            .map(support)
            .collect();
        assert_eq!(rs[0].name, "lawa-5");
        assert_eq!(support(&rs[0]), vec![15, 16, 17, 18, 19]);
        assert_eq!(runs.last().unwrap(), &vec![0, 1, 2, 3, 4], "the oldest run is included");
        for i in 0..20 {
            let covering = runs.iter().filter(|r| r.contains(&i)).count();
            assert!((1..=2).contains(&covering), "member {i} lies in {covering} runs");
        }
        let names: Vec<&str> = rs.iter().map(|r| r.name.as_str()).collect();
        assert!(
            names.contains(&"uniform") && names.contains(&"ema-0.8") && names.contains(&"ema-0.9")
        );
        for r in &rs {
            assert!((r.weights.iter().sum::<f64>() - 1.0).abs() < 1e-12, "{}", r.name);
        }
    }

    #[test]
    fn a_window_no_larger_than_k_has_one_rule() {
        let rs = rules(3, 5, &[]);
        assert_eq!(rs.len(), 3, "the window itself and two EMAs: {rs:?}");
        assert_eq!(rs[0].weights, vec![1.0 / 3.0; 3]);
        assert_eq!(rules(1, 1, &[]).len(), 1);
        assert!(rules(0, 3, &[]).is_empty());
    }

    #[test]
    fn a_slid_window_reuses_the_runs_that_survive_and_adds_the_newest() {
        let point = |start: usize| {
            let mut alpha = vec![0.0; 20];
            alpha[start..start + 5].iter_mut().for_each(|a| *a = 0.2);
            Point { alpha, loss: 1.0, grad: vec![] }
        };
        // Runs verified in the previous window (starts 15, 12, 9 there) shifted by one.
        let known = vec![point(14), point(11), point(8)];
        let rs = rules(20, 5, &known);
        let runs: Vec<Vec<usize>> =
            rs.iter().filter(|r| support(r).len() == 5).map(support).collect();
        assert_eq!(runs.iter().map(|r| r[0]).collect::<Vec<_>>(), vec![15, 14, 11, 8]);
        assert_eq!(rs[0].name, "lawa-5");
        assert_eq!(run_start(&point(3).alpha, 5), Some(3));
        assert_eq!(run_start(&point(3).alpha, 4), None);
    }

    fn found(set: Vec<usize>, loss: f64) -> Found {
        Found { set, loss, weights: None, details: json!({}) }
    }

    fn checked(name: &str, weights: Vec<f64>, loss: f64) -> Checked {
        Checked { rule: Rule { name: name.into(), weights }, loss, reused: false }
    }

    #[test]
    fn the_best_rule_replaces_a_worse_method_answer_with_its_own_weights() {
        let rules = vec![
            checked("lawa-2", vec![0.0, 0.5, 0.5], 1.0),
            checked("ema-0.5", vec![1.0 / 7.0, 2.0 / 7.0, 4.0 / 7.0], 0.9),
        ];
        let (f, v) = judge(found(vec![0, 1], 1.2), &rules);
        let v = v.unwrap();
        assert_eq!(v.winner, "ema-0.5");
        assert_eq!(f.loss, 0.9);
        assert_eq!(f.set, vec![0, 1, 2]);
        assert_eq!(f.weights.as_deref(), Some(&[1.0 / 7.0, 2.0 / 7.0, 4.0 / 7.0][..]));
        assert!(v.gain < 0.0);
        assert_eq!(f.details["method_set"], json!([0, 1]));
        // A hard rule keeps uniform weights over its set.
        let (f, _) = judge(found(vec![0, 1], 1.2), &rules[..1]);
        assert_eq!((f.set, f.weights, f.loss), (vec![1, 2], None, 1.0));
    }

    #[test]
    fn the_method_stands_when_no_rule_is_strictly_better() {
        let rules = vec![checked("lawa-2", vec![0.0, 0.5, 0.5], 1.0)];
        let (f, v) = judge(found(vec![0, 2], 1.0), &rules);
        assert_eq!((f.set, v.unwrap().winner), (vec![0, 2], "method".to_string()));
        let (f, v) = judge(found(vec![0, 2], f64::NAN), &rules);
        assert_eq!((f.set, v.unwrap().winner), (vec![1, 2], "lawa-2".to_string()));
    }
}
