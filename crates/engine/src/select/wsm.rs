//! WSM (warmup-stable-merge) merge weights: a learning-rate decay shape turned into one merge
//! coefficient per checkpoint, defined exactly as Megatron-LM's weighted checkpoint merge
//! defines them, and the explicit per-member weights of `method = "weights"`. Pure numbers:
//! the rules that apply them to a window are in `rules.rs`.
//!
//! Source followed (NVIDIA/Megatron-LM PR #5114, "Weighted Checkpoint Merging & WSM"):
//! `tools/checkpoint/weighted_merge.py` at commit 812d36dbc43ccc404ed50f94896b5374f0bf767d
//! (branch `codex/wsm-weighted-merge-prod`, 2026-07-06): `SCHEDULES` (`linear`, `minus-sqrt`)
//! and `_schedule_to_merge_coefficients`. That tool offers no other shape; `cosine` and
//! `exponential` are the WSD decay styles of the same repository's
//! `megatron/core/optimizer_param_scheduler.py` (`lr_wsd_decay_style`, commit
//! d98e8a64ddf34856e74b24714e3bedb2f5a39553) put through the same conversion.
//!
//! The conversion, for n checkpoints ordered oldest first and a decay f with f(0) = 1:
//! `c[n-1] = f((n-1)/n)`, `c[i] = f(i/n) - f((i+1)/n)` for 0 < i < n-1, and
//! `c[0] = 1 - (c[1] + ... + c[n-1])` summed left to right (n ≤ 1: `[1.0]`). Read as WSM's
//! theorem: the merged model applies the k-th update between checkpoints with the learning
//! rate multiplied by f(k/n), so a decaying f gives the newest checkpoints the smallest
//! weights (`linear` gives equal ones).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

/// Where the shapes and the conversion come from, recorded in every manifest that uses them.
pub const SOURCE: &str = "NVIDIA/Megatron-LM tools/checkpoint/weighted_merge.py @ 812d36dbc43c \
     (linear, minus-sqrt, coefficients); cosine and exponential: \
     megatron/core/optimizer_param_scheduler.py WSD decay styles @ d98e8a64ddf3";

/// A decay shape (`[select] wsm_shape`, `sewa average --wsm-shape`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WsmShape {
    /// `1 - x` (weighted_merge.py `_schedule_linear_decay`): equal weights.
    Linear,
    /// `0.5 (cos(πx) + 1)` (optimizer_param_scheduler.py, WSD `cosine`).
    Cosine,
    /// `2 · 0.5^x - 1` (optimizer_param_scheduler.py, WSD `exponential`).
    Exponential,
    /// `1 - √x` (weighted_merge.py `_schedule_minus_sqrt_decay`; WSD `minus_sqrt`).
    MinusSqrt,
}

impl WsmShape {
    pub const ALL: [WsmShape; 4] =
        [WsmShape::Linear, WsmShape::Cosine, WsmShape::Exponential, WsmShape::MinusSqrt];

    pub fn name(self) -> &'static str {
        match self {
            WsmShape::Linear => "linear",
            WsmShape::Cosine => "cosine",
            WsmShape::Exponential => "exponential",
            WsmShape::MinusSqrt => "minus-sqrt",
        }
    }

    /// The decay at position `x` in [0, 1): each expression as Megatron writes it, so that
    /// the same libm gives the same bits.
    pub fn decay(self, x: f64) -> f64 {
        match self {
            WsmShape::Linear => 1.0 - x,
            WsmShape::Cosine => 0.5 * ((std::f64::consts::PI * x).cos() + 1.0),
            WsmShape::Exponential => (2.0 * 0.5f64.powf(x)) - 1.0,
            WsmShape::MinusSqrt => 1.0 - x.sqrt(),
        }
    }
}

impl fmt::Display for WsmShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for WsmShape {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(shape) = WsmShape::ALL.into_iter().find(|w| w.name() == s) {
            return Ok(shape);
        }
        let names: Vec<&str> = WsmShape::ALL.iter().map(|w| w.name()).collect();
        // Megatron's optimizer spells it minus_sqrt; its `inverse-square-root` is another
        // curve (lr ∝ 1/√step, never reaching zero), which no merge schedule uses.
        let hint = match s {
            "minus_sqrt" | "1-sqrt" | "one-minus-sqrt" => " (did you mean \"minus-sqrt\"?)",
            "inverse-square-root" | "inverse_square_root" | "inv-sqrt" | "sqrt" => {
                " (the merge weights of WSM's square-root decay are \"minus-sqrt\", 1 - √x; \
                 Megatron's inverse-square-root learning rate is a different curve)"
            }
            _ => "",
        };
        Err(format!("unknown WSM shape {s:?}: expected one of {names:?}{hint}"))
    }
}

impl<'de> Deserialize<'de> for WsmShape {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(|e| serde::de::Error::custom(format!("wsm_shape: {e}")))
    }
}

/// Megatron's merge coefficients for `n` checkpoints, oldest first
/// (`_schedule_to_merge_coefficients`, transcribed step for step, sums included).
pub fn coefficients(shape: WsmShape, n: usize) -> Vec<f64> {
    if n <= 1 {
        return vec![1.0; n];
    }
    let decay: Vec<f64> = (0..n).map(|i| shape.decay(i as f64 / n as f64)).collect();
    let mut c = vec![0.0; n];
    c[n - 1] = decay[n - 1];
    for i in 1..n - 1 {
        c[i] = decay[i] - decay[i + 1];
    }
    // Python's sum() over the list while c[0] is still 0.0: left to right from 0.
    let total = c.iter().fold(0.0, |acc, x| acc + x);
    c[0] = 1.0 - total;
    c
}

/// What is wrong with explicit per-member weights, if anything: each must be a finite
/// number ≥ 0 and one at least must be positive (their ratios are what count).
pub fn check_weights(w: &[f64]) -> Result<(), String> {
    if w.is_empty() {
        return Err("is empty: give one weight per window member, oldest first".into());
    }
    if let Some((i, bad)) = w.iter().enumerate().find(|(_, x)| !(x.is_finite() && **x >= 0.0)) {
        return Err(format!("entry {} is {bad}: every weight must be a finite number >= 0", i + 1));
    }
    let sum: f64 = w.iter().sum();
    if !sum.is_finite() {
        return Err("sum overflows: scale the weights down (only their ratios matter)".into());
    }
    if sum <= 0.0 {
        return Err("are all zero: at least one weight must be positive".into());
    }
    Ok(())
}

/// `deserialize_with` for `[select] weights`: rejected at its own line when `check_weights`
/// finds it wrong.
pub fn de_weights<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<f64>>, D::Error> {
    let w = Vec::<f64>::deserialize(d)?;
    check_weights(&w).map_err(|why| serde::de::Error::custom(format!("weights {why}")))?;
    Ok(Some(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_start_at_one_and_end_at_zero() {
        for s in WsmShape::ALL {
            assert_eq!(s.decay(0.0), 1.0, "{s}");
            assert!(s.decay(1.0).abs() < 1e-15, "{s}");
            assert_eq!(s.name().parse::<WsmShape>().unwrap(), s);
        }
    }

    #[test]
    fn linear_is_uniform_and_every_shape_sums_to_one() {
        for n in 1..40 {
            for s in WsmShape::ALL {
                let c = coefficients(s, n);
                assert_eq!(c.len(), n);
                assert!((c.iter().sum::<f64>() - 1.0).abs() < 1e-12, "{s} {n}");
                assert!(c.iter().all(|x| *x > 0.0), "{s} {n}: {c:?}");
                // Convex decays weigh older checkpoints more (cosine, concave at first,
                // peaks in the middle of the window).
                if matches!(s, WsmShape::Exponential | WsmShape::MinusSqrt) {
                    assert!(c.windows(2).all(|p| p[0] >= p[1]), "{s} {n}: {c:?}");
                }
            }
            let lin = coefficients(WsmShape::Linear, n);
            assert!(lin.iter().all(|x| (x - 1.0 / n as f64).abs() < 1e-12), "{lin:?}");
        }
        assert!(coefficients(WsmShape::MinusSqrt, 0).is_empty());
    }

    #[test]
    fn unknown_shapes_list_the_names_and_hint_at_minus_sqrt() {
        let e = "inverse-square-root".parse::<WsmShape>().unwrap_err();
        assert!(e.contains("minus-sqrt") && e.contains("cosine"), "{e}");
        let e = "minus_sqrt".parse::<WsmShape>().unwrap_err();
        assert!(e.contains("did you mean \"minus-sqrt\""), "{e}");
        assert!("Linear".parse::<WsmShape>().is_err());
    }

    #[test]
    fn explicit_weights_are_refused_when_negative_all_zero_or_not_finite() {
        assert!(check_weights(&[0.0, 1.0, 3.0]).is_ok());
        for bad in [&[][..], &[0.0, 0.0], &[1.0, -0.5], &[f64::NAN], &[f64::INFINITY, 1.0]] {
            assert!(check_weights(bad).is_err(), "{bad:?}");
        }
        assert!(check_weights(&[f64::MAX, f64::MAX]).unwrap_err().contains("overflows"));
    }
}
