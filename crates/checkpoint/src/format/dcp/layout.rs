//! Which tensors of a DCP checkpoint are the model's, and under which names. DCP flattens
//! the saved state dict, so a model's weights appear under a top-level key (`model.` for
//! Accelerate and Lightning) or at the top level beside the training state (torchtitan:
//! `optimizer`, `lr_scheduler`, `dataloader`, `train_state`). Pure selection over decoded
//! metadata.

use std::collections::BTreeMap;
use std::path::Path;

use super::metadata::{Metadata, TensorItem};
use crate::error::{Error, Result};

/// Top-level keys holding training state rather than the model (torchtitan, Lightning's
/// `optimizer_0`, common trainers); `optimizer_*`, `lr_scheduler_*` and `scheduler_*` too.
const NOT_MODEL: &[&str] = &[
    "optimizer",
    "optimizers",
    "optim",
    "lr_scheduler",
    "lr_schedulers",
    "scheduler",
    "schedulers",
    "dataloader",
    "dataloaders",
    "train_state",
    "rng",
    "rng_state",
    "rng_states",
];

fn not_model(top: &str) -> bool {
    NOT_MODEL.contains(&top)
        || ["optimizer_", "lr_scheduler_", "scheduler_"].iter().any(|p| top.starts_with(p))
}

/// The model's tensors with their names: those under `state_key` when given, else those
/// under `model` when there is such a key, else every tensor not under a training-state key;
/// the key and its dot are stripped (`model.layers.0.w` → `layers.0.w`).
pub(crate) fn select<'m>(
    dir: &Path,
    md: &'m Metadata,
    state_key: Option<&str>,
) -> Result<Vec<(String, &'m TensorItem)>> {
    let under = |key: &str| -> Vec<(String, &'m TensorItem)> {
        let strip = |f: &'m str| f.strip_prefix(key).and_then(|r| r.strip_prefix('.'));
        let named = md.tensors.iter().filter(|t| t.top == key);
        named.map(|t| (strip(&t.fqn).unwrap_or(&t.fqn).to_string(), t)).collect()
    };
    let picked = match state_key {
        Some(key) => under(key),
        None if md.tensors.iter().any(|t| t.top == "model") => under("model"),
        None => {
            let model = md.tensors.iter().filter(|t| !not_model(&t.top));
            model.map(|t| (t.fqn.clone(), t)).collect()
        }
    };
    if !picked.is_empty() {
        return Ok(picked);
    }
    let keys = top_keys(md);
    Err(match state_key {
        Some(key) => Error::bad_input(
            dir,
            format!("state key {key:?} holds no tensors (top-level keys: {keys})"),
        ),
        None => Error::not_weights(
            dir,
            format!(
                "holds only training state, no model tensors (top-level keys: {keys}); name \
                 the model's key: state_key = \"KEY\""
            ),
        ),
    })
}

/// `"model" (12 tensors), "optimizer" (24 tensors)`, for errors.
fn top_keys(md: &Metadata) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for t in &md.tensors {
        *counts.entry(t.top.as_str()).or_default() += 1;
    }
    if counts.is_empty() {
        return "none with tensors".to_string();
    }
    let listed = counts.iter().take(12).map(|(k, n)| format!("{k:?} ({n} tensors)"));
    listed.collect::<Vec<_>>().join(", ")
}
