//! The bench's rows and their summaries per strategy: distributions (median, p90, max) of the
//! gap to exhaustive, calls and wall time, counts of windows worse than LAWA-k, and the test
//! split's losses against LAWA's. Pure: rows in, text out.

use serde::Serialize;

/// One strategy on one cold window.
#[derive(Clone, Serialize)]
pub struct Row {
    pub window: String,
    pub family: String,
    pub strategy: String,
    /// Loss of the published weights on the selection split (re-evaluated by the bench).
    pub loss: f64,
    /// The loss the selector reported (`Selection.loss`), when it reports one.
    pub reported_loss: Option<f64>,
    pub exhaustive_loss: f64,
    /// 100 · (loss − exhaustive) / exhaustive.
    pub gap_pct: f64,
    pub lawa_loss: f64,
    pub worse_than_lawa: bool,
    /// `details.total_calls()` (0 for fixed rules, which need no objective to select).
    pub calls: usize,
    pub wall_s: f64,
    pub test_loss: f64,
    pub test_lawa: f64,
    /// 100 · (test − test of LAWA-k) / test of LAWA-k: negative is better than LAWA.
    pub test_vs_lawa_pct: f64,
    pub weights: Vec<f64>,
    pub details: serde_json::Value,
    pub error: Option<String>,
}

/// One warm selection after a slide, beside a cold one on the same window.
#[derive(Clone, Serialize)]
pub struct WarmRow {
    pub window: String,
    pub family: String,
    pub strategy: String,
    pub planted: bool,
    /// The window after `slide` slides (members `[slide, slide + window)`).
    pub slide: usize,
    pub warm_loss: f64,
    pub cold_loss: f64,
    pub lawa_loss: f64,
    /// The exhaustive best k-subset's loss on this window (planted windows, last slide).
    pub exhaustive_loss: Option<f64>,
    /// 100 · (warm − cold) / cold: positive means the warm start ended worse.
    pub gap_pct: f64,
    pub warm_calls: usize,
    pub cold_calls: usize,
    pub warm_chosen: Vec<usize>,
    pub cold_chosen: Vec<usize>,
    pub warm_details: serde_json::Value,
    pub error: Option<String>,
}

/// Nearest-rank quantile of finite values (NaN when there are none).
pub fn quantile(values: &[f64], q: f64) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn max(values: &[f64]) -> f64 {
    quantile(values, 1.0)
}

/// Strategies in first-seen order.
fn strategies<'a>(names: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for n in names {
        if !out.iter().any(|o| o == n) {
            out.push(n.to_string());
        }
    }
    out
}

pub fn cold_summary(rows: &[Row]) -> String {
    let mut s = format!(
        "{:<14} {:>4} {:>8} {:>8} {:>8} {:>6} {:>6} {:>6} {:>8} {:>9} {:>9} {:>4}\n",
        "strategy",
        "n",
        "gap med",
        "gap p90",
        "gap max",
        ">lawa",
        "calls",
        "max",
        "wall med",
        "test/lawa",
        "p90",
        "err"
    );
    for name in strategies(rows.iter().map(|r| r.strategy.as_str())) {
        let all: Vec<&Row> = rows.iter().filter(|r| r.strategy == name).collect();
        let ok: Vec<&Row> = all.iter().copied().filter(|r| r.error.is_none()).collect();
        let col = |f: &dyn Fn(&Row) -> f64| ok.iter().map(|r| f(r)).collect::<Vec<f64>>();
        let gap = col(&|r| r.gap_pct);
        let calls = col(&|r| r.calls as f64);
        let test = col(&|r| r.test_vs_lawa_pct);
        s += &format!(
            "{:<14} {:>4} {:>7.3}% {:>7.3}% {:>7.3}% {:>6} {:>6.0} {:>6.0} {:>7.3}s {:>+8.3}% {:>+8.3}% {:>4}\n",
            name,
            ok.len(),
            quantile(&gap, 0.5),
            quantile(&gap, 0.9),
            max(&gap),
            ok.iter().filter(|r| r.worse_than_lawa).count(),
            quantile(&calls, 0.5),
            max(&calls),
            quantile(&col(&|r| r.wall_s), 0.5),
            quantile(&test, 0.5),
            quantile(&test, 0.9),
            all.len() - ok.len()
        );
    }
    s
}

/// Planted windows after their last slide: warm, cold and LAWA-k against the exhaustive best.
pub fn planted_summary(rows: &[WarmRow]) -> String {
    let mut s = format!(
        "{:<10} {:>3} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
        "strategy", "n", "warm med", "warm max", "cold med", "cold max", "lawa med", "lawa max"
    );
    for name in strategies(rows.iter().map(|r| r.strategy.as_str())) {
        let last: Vec<(&WarmRow, f64)> = rows
            .iter()
            .filter(|r| r.strategy == name && r.error.is_none())
            .filter_map(|r| r.exhaustive_loss.map(|b| (r, b)))
            .collect();
        if last.is_empty() {
            continue;
        }
        let gap = |f: &dyn Fn(&WarmRow) -> f64| -> Vec<f64> {
            last.iter().map(|(r, b)| 100.0 * (f(r) - b) / b).collect()
        };
        let (warm, cold, lawa) =
            (gap(&|r| r.warm_loss), gap(&|r| r.cold_loss), gap(&|r| r.lawa_loss));
        s += &format!(
            "{:<10} {:>3} {:>8.3}% {:>8.3}% {:>8.3}% {:>8.3}% {:>8.3}% {:>8.3}%\n",
            name,
            last.len(),
            quantile(&warm, 0.5),
            max(&warm),
            quantile(&cold, 0.5),
            max(&cold),
            quantile(&lawa, 0.5),
            max(&lawa)
        );
    }
    s
}

pub fn warm_summary(rows: &[WarmRow]) -> String {
    let mut s = format!(
        "{:<10} {:<8} {:>5} {:>9} {:>9} {:>9} {:>8} {:>6} {:>6} {:>6} {:>5} {:>4}\n",
        "strategy",
        "windows",
        "n",
        "gap med",
        "gap p90",
        "gap max",
        ">0.1%",
        "calls",
        "max",
        "cold",
        ">lawa",
        "err"
    );
    for name in strategies(rows.iter().map(|r| r.strategy.as_str())) {
        for (label, planted) in [("all", None), ("planted", Some(true))] {
            let all: Vec<&WarmRow> = rows
                .iter()
                .filter(|r| r.strategy == name && planted.is_none_or(|p| r.planted == p))
                .collect();
            if all.is_empty() {
                continue;
            }
            let ok: Vec<&WarmRow> = all.iter().copied().filter(|r| r.error.is_none()).collect();
            let gap: Vec<f64> = ok.iter().map(|r| r.gap_pct).collect();
            let calls: Vec<f64> = ok.iter().map(|r| r.warm_calls as f64).collect();
            let cold: Vec<f64> = ok.iter().map(|r| r.cold_calls as f64).collect();
            s += &format!(
                "{:<10} {:<8} {:>5} {:>+8.3}% {:>+8.3}% {:>+8.3}% {:>8} {:>6.0} {:>6.0} {:>6.0} {:>5} {:>4}\n",
                name,
                label,
                ok.len(),
                quantile(&gap, 0.5),
                quantile(&gap, 0.9),
                max(&gap),
                gap.iter().filter(|g| **g > 0.1).count(),
                quantile(&calls, 0.5),
                max(&calls),
                quantile(&cold, 0.5),
                ok.iter().filter(|r| r.warm_loss > r.lawa_loss * (1.0 + 1e-9)).count(),
                all.len() - ok.len()
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn nearest_rank_quantiles() {
        let v = [5.0, 1.0, 4.0, 2.0, 3.0, f64::NAN];
        assert_eq!(quantile(&v, 0.5), 3.0);
        assert_eq!(quantile(&v, 0.9), 5.0);
        assert_eq!(quantile(&v, 0.0), 1.0);
        assert!(quantile(&[], 0.5).is_nan());
    }
}
