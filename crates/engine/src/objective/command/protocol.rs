//! The evaluator protocol's messages (docs/evaluator.md, "The protocol"): versions 1
//! (candidate and gradient files) and 2 (the evaluator holds the window's members and receives
//! mixing weights), the hello that picks between them, and the checks on what comes back.
//! Pure: no process, no files.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
use serde_json::json;

use sewa_checkpoint::Format;

/// The highest protocol version sewa speaks (offered in the hello and in `SEWA_PROTOCOL`).
pub const PROTOCOL: u32 = 2;
/// The versions sewa accepts in the evaluator's hello.
pub const SUPPORTED: [u32; 2] = [1, 2];

/// A line the evaluator sends.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Reply {
    Hello {
        protocol: u32,
        #[serde(default)]
        grad: bool,
        #[serde(default)]
        name: Option<String>,
        /// Version 2: the evaluator takes `members` and mixing weights.
        #[serde(default)]
        mix: bool,
        /// Version 2: member formats it loads itself (others come as safetensors copies).
        #[serde(default)]
        formats: Vec<String>,
        /// Float dtypes it reads protocol 1 candidates in (`f32` always; `bf16`, `f16`).
        #[serde(default)]
        dtypes: Vec<String>,
    },
    Result {
        id: u64,
        loss: Option<f64>,
        /// Version 1: the gradient file.
        #[serde(default)]
        grad: Option<PathBuf>,
        /// Version 2: ∂F/∂α_i per member id.
        #[serde(default)]
        dots: Option<BTreeMap<String, Option<f64>>>,
    },
    /// Version 2: the answer to `members`: how many members it now holds.
    Ready {
        members: usize,
    },
    Error {
        message: String,
    },
}

/// What the evaluator said it can do.
#[derive(Clone, Debug, Default)]
pub struct Abilities {
    pub protocol: u32,
    pub grad: bool,
    pub name: String,
    /// Mixing requests (version 2 with `"mix": true`).
    pub mix: bool,
    pub formats: Vec<String>,
    /// Candidate dtypes beyond f32 it reads (`bf16`, `f16`).
    pub dtypes: Vec<String>,
}

pub fn hello() -> serde_json::Value {
    json!({"type": "hello", "protocol": PROTOCOL, "protocols": SUPPORTED})
}

/// The name a member's format has on the wire, for formats a client may load itself.
/// `torch` covers torch.save zips and Lightning files (tensors at the top level or under
/// `state_dict`); `hf-dir` is a directory holding model.safetensors, a shard index or
/// pytorch_model.bin. DCP, Megatron, DeepSpeed and PEFT members are staged as safetensors
/// copies.
pub fn wire_format(format: Format) -> Option<&'static str> {
    match format {
        Format::Safetensors => Some("safetensors"),
        Format::ShardedSafetensors => Some("safetensors-index"),
        Format::HfDir => Some("hf-dir"),
        Format::TorchZip | Format::Lightning => Some("torch"),
        // Sharded, partitioned or adapter layouts the client does not assemble: sewa hands
        // over a safetensors copy of what it reads.
        Format::Memory
        | Format::Dcp
        | Format::Megatron
        | Format::DeepSpeed
        | Format::PeftAdapter => None,
    }
}

/// One member the evaluator should load.
pub struct Added {
    pub id: String,
    pub path: PathBuf,
    pub format: &'static str,
    /// How many tensors sewa sees in it (the evaluator checks it loaded as many).
    pub tensors: usize,
}

pub fn members(add: &[Added], remove: &[String]) -> serde_json::Value {
    let add: Vec<serde_json::Value> = add
        .iter()
        .map(|a| {
            json!({"id": a.id, "path": crate::path_json::value(&a.path), "format": a.format,
                   "tensors": a.tensors})
        })
        .collect();
    json!({"type": "members", "add": add, "remove": remove})
}

/// A mixing request: only members with α > 0 are listed; `ints` supplies integer buffers.
pub fn evaluate_mix(
    id: u64,
    ids: &[String],
    alpha: &[f64],
    grad: bool,
    ints: &str,
) -> serde_json::Value {
    let weights: serde_json::Map<String, serde_json::Value> = ids
        .iter()
        .zip(alpha)
        .filter(|(_, a)| **a > 0.0)
        .map(|(i, a)| (i.clone(), json!(a)))
        .collect();
    json!({"type": "evaluate", "id": id, "weights": weights, "grad": grad, "ints": ints})
}

/// The per-member dot products in `ids`' order, or what is wrong with them.
pub fn dots_in_order(
    dots: &BTreeMap<String, Option<f64>>,
    ids: &[String],
) -> std::result::Result<Vec<f64>, String> {
    ids.iter()
        .map(|id| match dots.get(id) {
            None => Err(format!("returned no ∂F/∂α for member {id}")),
            Some(Some(d)) if d.is_finite() => Ok(*d),
            Some(_) => Err(format!("returned a non-finite ∂F/∂α for member {id}")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_request_lists_only_positive_weights_and_is_small() {
        let ids: Vec<String> = (0..32).map(|i| i.to_string()).collect();
        let mut alpha = vec![0.0; 32];
        alpha[3] = 0.5;
        alpha[30] = 0.5;
        let msg = evaluate_mix(7, &ids, &alpha, true, "30");
        assert_eq!(msg["weights"].as_object().unwrap().len(), 2);
        assert!(serde_json::to_vec(&msg).unwrap().len() < 200);
    }

    #[test]
    fn dots_must_cover_every_member_and_be_finite() {
        let ids = vec!["1".to_string(), "2".to_string()];
        let mut d = BTreeMap::from([("1".to_string(), Some(0.5)), ("2".to_string(), Some(-1.0))]);
        assert_eq!(dots_in_order(&d, &ids).unwrap(), vec![0.5, -1.0]);
        d.insert("2".into(), None);
        assert!(dots_in_order(&d, &ids).unwrap_err().contains("non-finite"));
        d.remove("2");
        assert!(dots_in_order(&d, &ids).unwrap_err().contains("member 2"));
    }
}
