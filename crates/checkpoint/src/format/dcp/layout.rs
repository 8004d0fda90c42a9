//! Which tensors of a DCP checkpoint are the model's, and under which names. DCP flattens
//! the saved state dict, so a model's weights appear under a top-level key (`model.` for
//! Accelerate and Lightning) or at the top level beside the training state (torchtitan:
//! `optimizer`, `lr_scheduler`, `dataloader`, `train_state`). Megatron's `torch_dist` keys
//! its items by each ShardedTensor's own flat key instead (`Keys::Megatron`). Pure selection
//! over decoded metadata.

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

/// Whose naming the items of a DCP directory follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Keys {
    /// `dcp.save` of a nested state dict: top-level keys from `planner_data`.
    Dcp,
    /// megatron-core's `torch_dist`: one flat key per ShardedTensor, the model's as the model
    /// names them (`decoder.layers.self_attention.linear_qkv.weight`, layers stacked on a
    /// leading axis), the optimizer's under `optimizer.` (`optimizer.state.exp_avg.<key>`,
    /// `optimizer.state.fp32_param.<key>`), or `chained_N.optimizer.` for a chained optimizer.
    Megatron,
}

/// The model's tensors with their names. DCP: those under `state_key` when given, else those
/// under `model` when there is such a key, else every tensor not under a training-state key;
/// the key and its dot are stripped (`model.layers.0.w` → `layers.0.w`). Megatron: see
/// [`megatron`].
pub(crate) fn select<'m>(
    dir: &Path,
    md: &'m Metadata,
    state_key: Option<&str>,
    keys: Keys,
) -> Result<Vec<(String, &'m TensorItem)>> {
    if keys == Keys::Megatron {
        let picked = megatron(md, state_key);
        return if picked.is_empty() {
            Err(none_picked(dir, md, state_key, keys))
        } else {
            Ok(picked)
        };
    }
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
    Err(none_picked(dir, md, state_key, keys))
}

/// Megatron's model tensors, keys kept whole: with `state_key`, those whose key starts with
/// it and a dot, the prefix stripped (`optimizer.state.exp_avg` picks the first moments);
/// else every tensor not under `optimizer.` or `chained_N.optimizer.`.
fn megatron<'m>(md: &'m Metadata, state_key: Option<&str>) -> Vec<(String, &'m TensorItem)> {
    let named = md.tensors.iter();
    match state_key {
        Some(key) => named
            .filter_map(|t| {
                let rest = t.fqn.strip_prefix(key)?.strip_prefix('.')?;
                Some((rest.to_string(), t))
            })
            .collect(),
        None => named.filter(|t| !megatron_optimizer(&t.fqn)).map(|t| (t.fqn.clone(), t)).collect(),
    }
}

/// `optimizer.…` or `chained_3.optimizer.…`: an optimizer's ShardedTensor in megatron-core.
fn megatron_optimizer(key: &str) -> bool {
    let inner = key
        .strip_prefix("chained_")
        .and_then(|r| r.split_once('.'))
        .filter(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .map_or(key, |(_, rest)| rest);
    inner.starts_with("optimizer.")
}

/// The error for a directory where nothing was picked, listing what is there.
fn none_picked(dir: &Path, md: &Metadata, state_key: Option<&str>, keys: Keys) -> Error {
    let keys = top_keys(md, keys);
    match state_key {
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
    }
}

/// `"model" (12 tensors), "optimizer" (24 tensors)`, for errors. Megatron's keys are flat:
/// grouped by their first component.
fn top_keys(md: &Metadata, keys: Keys) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for t in &md.tensors {
        let top = match keys {
            Keys::Dcp => t.top.as_str(),
            Keys::Megatron => t.fqn.split('.').next().unwrap_or(&t.fqn),
        };
        *counts.entry(top).or_default() += 1;
    }
    if counts.is_empty() {
        return "none with tensors".to_string();
    }
    let listed = counts.iter().take(12).map(|(k, n)| format!("{k:?} ({n} tensors)"));
    listed.collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::megatron_optimizer;

    /// megatron-core's optimizer keys (`optim_state_to_sharding_state`, the distributed
    /// optimizer's `optimizer.distributed.*`, ChainedOptimizer's `chained_N.` prefix) and
    /// model keys that merely contain the word.
    #[test]
    fn megatron_optimizer_keys() {
        for key in [
            "optimizer.state.exp_avg.decoder.layers.mlp.linear_fc1.weight",
            "optimizer.state.fp32_param.embedding.word_embeddings.weight",
            "optimizer.distributed.dp_group_idx_0.param_state",
            "chained_0.optimizer.state.exp_avg_sq.output_layer.weight",
            "chained_12.optimizer.distributed.dp_group_idx_1.exp_avg",
        ] {
            assert!(megatron_optimizer(key), "{key}");
        }
        for key in [
            "decoder.layers.self_attention.linear_qkv.weight",
            "optimizer_head.weight",
            "chained_x.optimizer.state.w",
            "chained_.optimizer.state.w",
            "decoder.optimizer.w",
        ] {
            assert!(!megatron_optimizer(key), "{key}");
        }
    }
}
