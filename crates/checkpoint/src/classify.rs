//! Whether a file holds model weights at all, decided from summaries (no I/O, no pickle): a
//! torch pickle's top-level entries when no state dict was found in it, or an opened
//! checkpoint's tensor list against the model being averaged. Run directories hold optimizer,
//! scheduler and RNG state beside the weights (`optim_500.pt`, `rng_state.pth`); those are
//! *not weights* (`Error::NotWeights`: skipped quietly by the daemon), while a dict of tensors
//! under a key sewa does not know is a real refusal that names the key to pass.

use std::fmt::Write;

use super::TensorMeta;

/// What one top-level entry of a torch pickle holds.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Holds {
    /// A dict with this many tensors directly in it (a state dict, perhaps).
    Tensors(usize),
    /// An `optimizer.state_dict()` (`state` and `param_groups`), or one of those two entries.
    Optimizer,
    /// A tensor.
    Tensor,
    /// A scalar, shown as written (`500`, `0.25`, `"adam"`).
    Scalar(String),
    /// Anything else: a dict without tensors, a list, an object.
    Other(&'static str),
}

/// At most this many keys are listed in an error (a hostile file may have millions).
const MAX_LISTED: usize = 12;
/// Keys longer than this are cut in the listing.
const MAX_KEY_CHARS: usize = 60;

/// The verdict on a pickle in which no state dict was found at the top level or under the
/// known keys (`nested`).
#[derive(Debug, PartialEq)]
pub(crate) enum NoStateDict {
    /// Weights are there, under a key sewa does not know: a refusal naming the keys.
    UnknownKey(String),
    /// Not model weights (optimizer, scheduler or trainer state): skip it.
    NotWeights(String),
}

/// Decide what a pickle without a usable state dict is, with a message listing its keys.
pub(crate) fn no_state_dict(entries: &[(String, Holds)], nested: &[&str]) -> NoStateDict {
    let listing = list_keys(entries);
    let candidates: Vec<&str> = entries
        .iter()
        .filter(|(_, h)| matches!(h, Holds::Tensors(n) if *n > 0))
        .map(|(k, _)| k.as_str())
        .collect();
    if let Some(first) = candidates.first() {
        let key = shown_key(first);
        return NoStateDict::UnknownKey(format!(
            "no state dict at the top level or under one of {nested:?}; top-level keys: \
             {listing}. Name the entry that holds the model's weights: state_key = {key:?}"
        ));
    }
    let optimizer = entries.iter().any(|(_, h)| *h == Holds::Optimizer);
    let what = if optimizer { "optimizer state" } else { "no dict of tensors" };
    NoStateDict::NotWeights(format!("{what}, not model weights (top-level keys: {listing})"))
}

/// `"net" (dict of 3 tensors), "step" (500), ...`.
fn list_keys(entries: &[(String, Holds)]) -> String {
    let mut s = String::new();
    for (i, (key, holds)) in entries.iter().take(MAX_LISTED).enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        let what = match holds {
            Holds::Tensors(n) => format!("dict of {n} tensors"),
            Holds::Optimizer => "optimizer state".into(),
            Holds::Tensor => "tensor".into(),
            Holds::Scalar(v) => v.chars().take(MAX_KEY_CHARS).collect(),
            Holds::Other(kind) => (*kind).into(),
        };
        let _ = write!(s, "{:?} ({what})", shown_key(key));
    }
    if entries.len() > MAX_LISTED {
        let _ = write!(s, " and {} more", entries.len() - MAX_LISTED);
    }
    if entries.is_empty() {
        s.push_str("none");
    }
    s
}

fn shown_key(key: &str) -> String {
    let mut k: String = key.chars().take(MAX_KEY_CHARS).collect();
    if k.len() < key.len() {
        k.push('…');
    }
    k
}

/// Why an opened checkpoint is not weights of the model in `reference` (the window's tensor
/// list), if it is not: it has no floating-point tensor at all (RNG state, counters), or none
/// of its floating-point tensors is one of the reference's. A checkpoint sharing any float
/// tensor name is weights (of this model or a changed one): the schema check reports that.
pub fn not_model_weights(
    tensors: &[TensorMeta],
    reference: Option<&[TensorMeta]>,
) -> Option<String> {
    let mut floats = tensors.iter().filter(|t| t.dtype.is_float()).peekable();
    let Some(first) = floats.peek().map(|t| t.name.clone()) else {
        return Some(format!(
            "no floating-point tensors ({} integer or bool tensors), not model weights",
            tensors.len()
        ));
    };
    let reference = reference?;
    let known = |name: &str| reference.binary_search_by(|r| r.name.as_str().cmp(name)).is_ok();
    if floats.any(|t| known(&t.name)) {
        return None;
    }
    let example = reference.iter().find(|t| t.dtype.is_float()).map_or("", |t| t.name.as_str());
    Some(format!(
        "none of its floating-point tensors is a tensor of the window's model ({first:?} is not \
         one; the window has {example:?}): not weights of this model"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    fn t(name: &str, dtype: DType) -> TensorMeta {
        TensorMeta { name: name.into(), dtype, shape: vec![2] }
    }

    const NESTED: &[&str] = &["state_dict", "model"];

    #[test]
    fn optimizer_state_is_not_weights() {
        let e = vec![("state".into(), Holds::Optimizer), ("param_groups".into(), Holds::Optimizer)];
        let NoStateDict::NotWeights(msg) = no_state_dict(&e, NESTED) else { panic!() };
        assert!(msg.starts_with("optimizer state") && msg.contains("\"param_groups\""), "{msg}");
        let e = vec![("last_epoch".into(), Holds::Scalar("3".into()))];
        let NoStateDict::NotWeights(msg) = no_state_dict(&e, NESTED) else { panic!() };
        assert!(msg.contains("no dict of tensors") && msg.contains("\"last_epoch\" (3)"), "{msg}");
    }

    #[test]
    fn unknown_key_is_named_with_the_flag_to_pass() {
        let e = vec![
            ("optimizer".into(), Holds::Optimizer),
            ("net".into(), Holds::Tensors(4)),
            ("step".into(), Holds::Scalar("500".into())),
        ];
        let NoStateDict::UnknownKey(msg) = no_state_dict(&e, NESTED) else { panic!() };
        assert!(msg.contains("\"net\" (dict of 4 tensors)"), "{msg}");
        assert!(msg.contains("\"step\" (500)") && msg.contains("state_key = \"net\""), "{msg}");
        assert!(msg.contains("state_key = \"net\""), "{msg}");
    }

    #[test]
    fn listing_is_bounded() {
        let e: Vec<_> = (0..1000).map(|i| ("k".repeat(i), Holds::Other("list"))).collect();
        let NoStateDict::NotWeights(msg) = no_state_dict(&e, NESTED) else { panic!() };
        assert!(msg.contains("and 988 more") && msg.len() < 2000, "{}", msg.len());
    }

    #[test]
    fn files_without_float_tensors_of_the_model_are_not_weights() {
        let window = vec![t("b", DType::F32), t("n", DType::I64), t("w", DType::F32)];
        let rng = vec![t("cpu", DType::U8)];
        assert!(not_model_weights(&rng, None).unwrap().contains("no floating-point"));
        assert!(not_model_weights(&rng, Some(&window)).is_some());
        let other = vec![t("mlp.0.weight", DType::F32), t("n", DType::I64)];
        assert!(not_model_weights(&other, None).is_none(), "no window yet: nothing to compare");
        let msg = not_model_weights(&other, Some(&window)).unwrap();
        assert!(msg.contains("\"mlp.0.weight\"") && msg.contains("\"b\""), "{msg}");
        let changed = vec![t("w", DType::F16), t("extra", DType::F32)];
        assert!(not_model_weights(&changed, Some(&window)).is_none(), "shares w: schema check");
        assert!(not_model_weights(&window, Some(&window)).is_none());
    }
}
