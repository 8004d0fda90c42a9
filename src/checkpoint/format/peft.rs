//! PEFT adapter directories (`save_pretrained` of a `PeftModel`): `adapter_config.json` plus
//! `adapter_model.safetensors` (or `adapter_model.bin`). The weights are read with the
//! safetensors or torch reader under their stored names (`base_model.model.<module>.lora_A
//! .weight`, ...); the config's LoRA settings that decide what the tensors mean (`peft_type`,
//! `r`, `lora_alpha`, `target_modules`, rsLoRA, DoRA, fan-in-fan-out, rank and alpha patterns)
//! become metadata (`peft_*`), so that adapters trained differently are refused before they
//! are averaged ([`check_same_adapter`]) and the merged-delta average knows its scale.
//! The directory is the side directory: publishing copies `adapter_config.json` from it.

use std::path::Path;

use serde_json::Value;

use super::{safetensors, torch};
use crate::checkpoint::storage::Loaded;
use crate::checkpoint::{Checkpoint, Format, files};
use crate::error::{Error, Result};

pub(crate) const CONFIG: &str = "adapter_config.json";
const SAFETENSORS: &str = "adapter_model.safetensors";
const BIN: &str = "adapter_model.bin";

/// The config keys that must agree across averaged adapters, in the order differences are
/// reported, with the metadata key each becomes.
const SETTINGS: &[(&str, &str)] = &[
    ("peft_type", "peft_type"),
    ("r", "peft_r"),
    ("lora_alpha", "peft_lora_alpha"),
    ("target_modules", "peft_target_modules"),
    ("use_rslora", "peft_use_rslora"),
    ("use_dora", "peft_use_dora"),
    ("fan_in_fan_out", "peft_fan_in_fan_out"),
    ("rank_pattern", "peft_rank_pattern"),
    ("alpha_pattern", "peft_alpha_pattern"),
    ("modules_to_save", "peft_modules_to_save"),
];

/// Is `dir` a PEFT adapter directory (its config and one of its weight files are there)?
pub fn is_adapter_dir(dir: &Path) -> bool {
    let has = |n: &str| files::has_file(dir, Path::new(n)).unwrap_or(false);
    has(CONFIG) && (has(SAFETENSORS) || has(BIN))
}

fn weights(dir: &Path) -> Result<std::path::PathBuf> {
    if files::has_file(dir, Path::new(SAFETENSORS))? {
        return Ok(dir.join(SAFETENSORS));
    }
    Ok(dir.join(BIN))
}

/// Complete enough to open: the config parses and the weights pass their own quick check.
/// (`save_pretrained` writes the weights, then the config.)
pub(crate) fn quick_check(dir: &Path) -> Result<()> {
    read_config(dir)?;
    let w = weights(dir)?;
    let file = files::open_child(&w)?;
    if w.ends_with(SAFETENSORS) {
        safetensors::quick_check(&w, file)
    } else {
        torch::quick_check(&w, file)
    }
}

/// Open the adapter: its tensors, with the config's settings as `peft_*` metadata.
pub(crate) fn open(dir: &Path) -> Result<Loaded> {
    let settings = read_config(dir)?;
    let w = weights(dir)?;
    let file = files::open_child(&w)?;
    let mut loaded = if w.ends_with(SAFETENSORS) {
        safetensors::open(&w, file)?
    } else {
        torch::open(&w, file, None)?
    };
    loaded.format = Format::PeftAdapter;
    loaded.side_dir = Some(dir.to_path_buf());
    loaded.metadata.extend(settings);
    Ok(loaded)
}

/// The LoRA settings of `dir/adapter_config.json` as `(metadata key, canonical text)`.
fn read_config(dir: &Path) -> Result<Vec<(String, String)>> {
    let path = dir.join(CONFIG);
    let json = safetensors::read_small_json(&path, files::open_child(&path)?)?;
    let obj = json.as_object().ok_or_else(|| Error::bad_input(&path, "not a JSON object"))?;
    let peft_type = obj.get("peft_type").and_then(Value::as_str).unwrap_or("LORA");
    if peft_type != "LORA" {
        return Err(Error::bad_input(
            &path,
            format!("peft_type {peft_type:?}: only LoRA adapters are averaged"),
        ));
    }
    for key in ["r", "lora_alpha"] {
        if !obj.get(key).is_some_and(|v| v.as_f64().is_some_and(|x| x > 0.0)) {
            return Err(Error::bad_input(
                &path,
                format!("{key} is missing or not a positive number"),
            ));
        }
    }
    Ok(SETTINGS
        .iter()
        .map(|&(key, meta)| (meta.to_string(), canonical(obj.get(key).unwrap_or(&Value::Null))))
        .collect())
}

/// A setting as text that compares equal when PEFT would treat it the same: `target_modules`
/// is a set (PEFT writes it in any order), so lists are sorted; `null`, `{}` and `[]` are "none".
fn canonical(v: &Value) -> String {
    match v {
        Value::Null => "none".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) if a.is_empty() => "none".into(),
        Value::Array(a) => {
            let mut items: Vec<String> = a.iter().map(canonical).collect();
            items.sort();
            items.join(",")
        }
        Value::Object(o) if o.is_empty() => "none".into(),
        other => other.to_string(),
    }
}

/// Adapters can be averaged only when they were trained with the same LoRA settings (rank,
/// alpha, target modules, ...): otherwise their tensors mean different things even where
/// their shapes agree. The error names the first difference and both directories.
pub fn check_same_adapter(first: &Checkpoint, other: &Checkpoint) -> Result<()> {
    let is_adapter = |c: &Checkpoint| c.format() == Format::PeftAdapter;
    if is_adapter(first) != is_adapter(other) {
        let (adapter, model) = if is_adapter(first) { (first, other) } else { (other, first) };
        return Err(Error::bad_input(
            model.path(),
            format!(
                "is a full model but {} is a PEFT adapter: adapters average only with adapters \
                 (use --lora merge-delta --base DIR to merge adapters into a model)",
                crate::text::path(adapter.path())
            ),
        ));
    }
    if !is_adapter(first) {
        return Ok(());
    }
    for &(key, meta) in SETTINGS {
        let (a, b) = (first.metadata().get(meta), other.metadata().get(meta));
        if a != b {
            let show = |v: Option<&String>| v.map_or("none".to_string(), |s| s.clone());
            return Err(Error::bad_input(
                other.path(),
                format!(
                    "LoRA adapters differ in {key}: {} here, {} in {}; only adapters trained \
                     with the same {key} can be averaged",
                    show(b),
                    show(a),
                    crate::text::path(first.path())
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::canonical;
    use serde_json::json;

    #[test]
    fn target_modules_compare_as_sets() {
        assert_eq!(canonical(&json!(["v", "q"])), canonical(&json!(["q", "v"])));
        assert_eq!(canonical(&json!({})), canonical(&json!(null)));
        assert_ne!(canonical(&json!(4)), canonical(&json!(8)));
    }
}
