//! `Selection.details`: the report a selector leaves with its answer, typed where anyone reads
//! it back (the demo's table, `sewa report`, the daemon's `policy = "best"` judge and its
//! member-loss memory): members, chosen indices, costs, member losses, probabilities, the
//! acceptance split's verdict. What only people read (traces, a method's own counters) stays in
//! `extra`, serialised beside the typed keys, so the JSON is one flat object as before.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::path_json;

/// One window member as the details list it (window order).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MemberRecord {
    #[serde(default, with = "path_json")]
    pub path: PathBuf,
    #[serde(default)]
    pub step: Option<u64>,
}

/// A selection's report. Every key is optional: fixed rules fill few of them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Details {
    /// Indices into `members` of the members averaged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chosen: Option<Vec<usize>>,
    /// Loss of the published weighting on the selection data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Objective calls the method spent (member losses it used included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oracle_calls: Option<usize>,
    /// Objective calls made only for the report (member losses the method did not use).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oracle_calls_report: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wall_seconds: Option<f64>,
    /// The objective's description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub objective: Option<String>,
    /// The window, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<Vec<MemberRecord>>,
    /// Each member's own loss, in window order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member_losses: Option<Vec<f64>>,
    /// Member losses taken from earlier selections (no call).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member_losses_remembered: Option<usize>,
    /// Member losses computed by this selection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member_losses_computed: Option<usize>,
    /// SeWA's selection probabilities, in window order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probabilities: Option<Vec<f64>>,
    /// SeWA (direct): the optimiser's top-k before polishing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<Vec<usize>>,
    /// `policy = "best"` on `[objective] acceptance_data`: the candidate's loss there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acceptance_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acceptance_published_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oracle_calls_acceptance: Option<usize>,
    /// Method-specific keys for people (traces, counters), serialised beside the others.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Details {
    /// Details holding only method-specific keys (a JSON object; anything else is dropped).
    pub fn extra(v: serde_json::Value) -> Details {
        match v {
            serde_json::Value::Object(extra) => Details { extra, ..Details::default() },
            _ => Details::default(),
        }
    }

    /// The whole report as one JSON object (manifests, logs, tests).
    pub fn json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// Total objective calls of the selection (method and report).
    pub fn total_calls(&self) -> usize {
        self.oracle_calls.unwrap_or(0) + self.oracle_calls_report.unwrap_or(0)
    }

    /// Merge a method's JSON report: typed keys it carries move into their fields.
    pub fn merge(&mut self, v: serde_json::Value) {
        let mut all = self.json();
        if let (Some(a), serde_json::Value::Object(b)) = (all.as_object_mut(), v) {
            a.extend(b);
        }
        if let Ok(d) = serde_json::from_value(all) {
            *self = d;
        }
    }
}

impl std::fmt::Display for Details {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.json())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_and_extra_keys_round_trip_as_one_flat_object() {
        let mut d = Details { oracle_calls: Some(3), ..Details::default() };
        d.merge(serde_json::json!({"top_k": [1, 2], "iterations": 40, "cold_reason": null}));
        assert_eq!(d.top_k, Some(vec![1, 2]), "a typed key moves into its field");
        assert_eq!(d.extra["iterations"], 40);
        let v = d.json();
        assert_eq!(v["oracle_calls"], 3);
        assert!(v["cold_reason"].is_null() && v.as_object().unwrap().contains_key("cold_reason"));
        let back: Details = serde_json::from_value(v).unwrap();
        assert_eq!(back, d);
    }
}
