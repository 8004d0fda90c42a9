//! PEFT adapter directories (`save_pretrained` of a `PeftModel`): `adapter_config.json` plus
//! `adapter_model.safetensors` (or `adapter_model.bin`). The weights are read with the
//! safetensors or torch reader under their stored names (`base_model.model.<module>.lora_A
//! .weight`, ...); the config's LoRA settings that decide what the tensors mean (`peft_type`,
//! `r`, `lora_alpha`, `target_modules`, rsLoRA, DoRA, fan-in-fan-out, rank and alpha patterns)
//! become metadata (`peft_*`), so that adapters trained differently are refused before they
//! are averaged ([`check_same_adapter`]) and the merged-delta average knows its scale.
//! The directory is the side directory: publishing copies `adapter_config.json` from it.

use std::collections::BTreeMap;
use std::path::Path;

use super::{Claim, FormatSpec, Found, Probe, safetensors, torch};
use crate::error::{Error, Result};
use crate::storage::Loaded;
use crate::{Checkpoint, Format, files};

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

/// Largest `adapter_config.json` read. Real ones are 1–2 KiB; a `target_modules` list or
/// `rank_pattern` naming every module of a large model stays in the tens of KiB.
const CONFIG_CAP: u64 = 1 << 20;

/// The fields of `adapter_config.json` sewa reads, typed: every other field is skipped by the
/// parser without being built, so refusing a hostile config costs about its (capped) size.
#[derive(serde::Deserialize)]
struct AdapterConfig {
    peft_type: Option<String>,
    r: Option<serde_json::Number>,
    lora_alpha: Option<serde_json::Number>,
    #[serde(default, deserialize_with = "names")]
    target_modules: Option<String>,
    use_rslora: Option<bool>,
    use_dora: Option<bool>,
    fan_in_fan_out: Option<bool>,
    rank_pattern: Option<BTreeMap<String, serde_json::Number>>,
    alpha_pattern: Option<BTreeMap<String, serde_json::Number>>,
    #[serde(default, deserialize_with = "names")]
    modules_to_save: Option<String>,
}

/// The LoRA settings of `dir/adapter_config.json` as `(metadata key, canonical text)`.
fn read_config(dir: &Path) -> Result<Vec<(String, String)>> {
    let path = dir.join(CONFIG);
    let text = files::read_capped(&path, files::open_child(&path)?, CONFIG_CAP)?;
    let c: AdapterConfig = serde_json::from_slice(&text).map_err(|e| {
        Error::bad_input(&path, format!("not a valid adapter config ({e}): truncated or corrupt"))
    })?;
    let peft_type = c.peft_type.as_deref().unwrap_or("LORA");
    if peft_type != "LORA" {
        return Err(Error::bad_input(
            &path,
            format!("peft_type {peft_type:?}: only LoRA adapters are averaged"),
        ));
    }
    for (key, v) in [("r", &c.r), ("lora_alpha", &c.lora_alpha)] {
        if !v.as_ref().is_some_and(|v| v.as_f64().is_some_and(|x| x > 0.0)) {
            return Err(Error::bad_input(
                &path,
                format!("{key} is missing or not a positive number"),
            ));
        }
    }
    let text = |v: Option<String>| v.unwrap_or_else(|| "none".into());
    let number = |v: Option<serde_json::Number>| text(v.map(|n| n.to_string()));
    let flag = |v: Option<bool>| text(v.map(|b| b.to_string()));
    let pattern = |v: Option<BTreeMap<String, serde_json::Number>>| match v {
        Some(m) if !m.is_empty() => serde_json::to_string(&m).unwrap_or_default(),
        _ => "none".into(),
    };
    let values = [
        text(c.peft_type),
        number(c.r),
        number(c.lora_alpha),
        text(c.target_modules),
        flag(c.use_rslora),
        flag(c.use_dora),
        flag(c.fan_in_fan_out),
        pattern(c.rank_pattern),
        pattern(c.alpha_pattern),
        text(c.modules_to_save),
    ];
    Ok(SETTINGS.iter().zip(values).map(|(&(_, meta), v)| (meta.to_string(), v)).collect())
}

/// A module-name setting as canonical text: PEFT treats a list as a set (and writes it in any
/// order), so its names are sorted and joined with `,`; a string (a regex) is kept as it is;
/// `null` and `[]` are `None` ("none").
fn names<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<String>, D::Error> {
    struct Names;
    impl<'de> serde::de::Visitor<'de> for Names {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("null, a string or a list of strings")
        }
        fn visit_unit<E>(self) -> std::result::Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E>(self) -> std::result::Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: serde::Deserializer<'de>>(
            self,
            d: D,
        ) -> std::result::Result<Self::Value, D::Error> {
            d.deserialize_any(Names)
        }
        fn visit_str<E>(self, s: &str) -> std::result::Result<Self::Value, E> {
            Ok(Some(s.to_string()))
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> std::result::Result<Self::Value, A::Error> {
            let mut items = Vec::new();
            while let Some(s) = seq.next_element::<String>()? {
                items.push(s);
            }
            items.sort();
            Ok((!items.is_empty()).then(|| items.join(",")))
        }
    }
    d.deserialize_option(Names)
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
                 (lora = \"merge-delta\" with base = \"DIR\" merges adapters into a model)",
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

/// A directory holding an adapter's config and weights.
pub(crate) const FORMAT: FormatSpec = FormatSpec { detect: claim, weight_file, endings: &[] };

fn weight_file(name: &str) -> bool {
    name == BIN || name == SAFETENSORS || name == CONFIG
}

fn claim(probe: &Probe<'_>) -> Claim {
    if probe.file.is_some() || !is_adapter_dir(probe.path) {
        return Ok(None);
    }
    Ok(Some(Box::new(FoundPeft(probe.path.to_path_buf()))))
}

struct FoundPeft(std::path::PathBuf);

impl Found for FoundPeft {
    /// The adapter's own completion rule; the HF marker does not apply.
    fn quick_check(&self, _marker: &str) -> Result<()> {
        quick_check(&self.0)
    }

    fn open(self: Box<Self>) -> Result<Loaded> {
        open(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(json: &str) -> Result<Vec<(String, String)>> {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join(CONFIG), json).unwrap();
        read_config(tmp.path())
    }

    fn get(s: &[(String, String)], key: &str) -> String {
        s.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()).unwrap()
    }

    #[test]
    fn settings_read_as_peft_means_them() {
        let a = settings(r#"{"r": 4, "lora_alpha": 8, "target_modules": ["v", "q"], "x": [1]}"#)
            .unwrap();
        let b = settings(
            r#"{"r": 4, "lora_alpha": 8, "target_modules": ["q", "v"],
            "rank_pattern": {}, "modules_to_save": [], "use_dora": null}"#,
        )
        .unwrap();
        assert_eq!(a, b, "sets, and null, {{}} and [] are none");
        assert_eq!(get(&a, "peft_target_modules"), "q,v");
        assert_eq!(get(&a, "peft_r"), "4");
        let c = settings(
            r#"{"r": 8, "lora_alpha": 16.5, "target_modules": "q|v",
            "rank_pattern": {"q": 2}, "use_rslora": true}"#,
        )
        .unwrap();
        assert_eq!([get(&c, "peft_lora_alpha"), get(&c, "peft_target_modules")], ["16.5", "q|v"]);
        assert_eq!(get(&c, "peft_rank_pattern"), r#"{"q":2}"#);
        assert_eq!(get(&c, "peft_use_rslora"), "true");
    }

    /// Issue 19: the config is parsed typed and capped, so a hostile one is refused without
    /// being built as a JSON value (a 98 MB array of numbers took 1.6 GB that way).
    #[test]
    fn hostile_configs_are_refused_by_type_or_size() {
        for (json, says) in [
            (r#"{"r": "4", "lora_alpha": 8}"#, "invalid type"),
            (r#"{"r": 4, "lora_alpha": 8, "target_modules": [1, 2]}"#, "invalid type"),
            (r#"{"r": 0, "lora_alpha": 8}"#, "r is missing"),
            (r#"{"lora_alpha": 8}"#, "r is missing"),
            (r#"{"r": 4, "lora_alpha": 8, "r": 5}"#, "duplicate field"),
            (r#"{"r": 4, "lora_alpha": 8, "peft_type": "IA3"}"#, "only LoRA"),
            (r#"{"r": 4"#, "not a valid adapter config"),
        ] {
            let err = settings(json).unwrap_err().to_string();
            assert!(err.contains(CONFIG) && err.contains(says), "{json}: {err}");
        }
        let mut big = String::from(r#"{"r": 4, "lora_alpha": 8, "x": ["#);
        big.extend(std::iter::repeat_n("1,", (CONFIG_CAP / 2) as usize));
        big.push_str("1]}");
        let err = settings(&big).unwrap_err().to_string();
        assert!(err.contains("larger than"), "{err}");
    }
}
