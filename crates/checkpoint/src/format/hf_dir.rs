//! HF checkpoint directories (`checkpoint-N/` from the Trainer, or a `save_pretrained` dir):
//! find the weights (`model.safetensors`, a sharded index, or `pytorch_model.bin`), open them
//! with the file readers, and read step and eval metric from `trainer_state.json` when present.
//! Every file is opened through `files` (regular files in the directory, no symlinks).
//! Side files (config, tokenizer) are only pointed to (`side_dir`), never read here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{Claim, FormatSpec, Found, Probe, safetensors, sharded, torch};
use crate::error::{Error, Result};
use crate::storage::Loaded;
use crate::{Format, files};

/// The weights a checkpoint directory holds, in order of preference.
enum Weights {
    Single(PathBuf),
    Index(PathBuf),
    TorchBin(PathBuf),
}

/// Which weight files `dir` holds (safetensors preferred over `pytorch_model.bin`). Each must
/// be a regular file in `dir`: a symlink or FIFO under one of these names is an error.
fn find_weights(dir: &Path) -> Result<Weights> {
    let has = |name: &str| files::has_file(dir, Path::new(name));
    if has("model.safetensors")? {
        Ok(Weights::Single(dir.join("model.safetensors")))
    } else if has("model.safetensors.index.json")? {
        Ok(Weights::Index(dir.join("model.safetensors.index.json")))
    } else if has("pytorch_model.bin")? {
        Ok(Weights::TorchBin(dir.join("pytorch_model.bin")))
    } else {
        let hint = if dir.join("pytorch_model.bin.index.json").exists() {
            " (sharded pytorch_model-*.bin is not supported: re-save with \
             save_pretrained(..., safe_serialization=True))"
        } else {
            ""
        };
        Err(Error::bad_input(
            dir,
            format!(
                "no model weights: expected model.safetensors, model.safetensors.index.json or \
                 pytorch_model.bin{hint}"
            ),
        ))
    }
}

/// Is the directory complete enough to open? `marker` is the file it must contain (the
/// Trainer writes `trainer_state.json` last); empty = no marker. Then its weights' own check.
pub(crate) fn quick_check(dir: &Path, marker: &str) -> Result<()> {
    check_marker(dir, marker)?;
    match find_weights(dir)? {
        Weights::Single(p) => safetensors::quick_check(&p, files::open_child(&p)?),
        Weights::Index(p) => sharded::quick_check(&p, files::open_child(&p)?),
        Weights::TorchBin(p) => torch::quick_check(&p, files::open_child(&p)?),
    }
}

/// The directory holds `marker` (empty = no marker to wait for).
pub(crate) fn check_marker(dir: &Path, marker: &str) -> Result<()> {
    if !marker.is_empty() && !files::has_file(dir, Path::new(marker))? {
        return Err(Error::bad_input(
            dir,
            format!("no {marker} yet (HF Trainer writes it last): checkpoint still being written"),
        ));
    }
    Ok(())
}

/// Open the directory's weights (its `pytorch_model.bin` is always a bare state dict), with
/// step and metric from `trainer_state.json` when present.
pub(crate) fn open(dir: &Path) -> Result<Loaded> {
    let mut loaded = match find_weights(dir)? {
        Weights::Single(p) => safetensors::open(&p, files::open_child(&p)?)?,
        Weights::Index(p) => sharded::open(&p, files::open_child(&p)?)?,
        Weights::TorchBin(p) => torch::open(&p, files::open_child(&p)?, None)?,
    };
    loaded.format = Format::HfDir;
    loaded.side_dir = Some(dir.to_path_buf());
    if files::has_file(dir, Path::new(TRAINER_STATE))? {
        let (step, extra) = read_trainer_state(&dir.join(TRAINER_STATE))?;
        loaded.step = step.or(loaded.step);
        for (k, v) in extra {
            loaded.metadata.entry(k).or_insert(v);
        }
    }
    Ok(loaded)
}

const TRAINER_STATE: &str = "trainer_state.json";

/// `global_step`, and as metadata: `global_step`; every numeric `eval_*` value of the last
/// evaluation in `log_history` (this checkpoint's own evaluation) under its own name, e.g.
/// `eval_loss`, `eval_accuracy`; `metric` = that `eval_loss` (lower is better) with
/// `metric_name` and `metric_step`; `best_metric` (the run's best so far, per the Trainer).
fn read_trainer_state(path: &Path) -> Result<(Option<u64>, BTreeMap<String, String>)> {
    let json = safetensors::read_small_json(path, files::open_child(path)?)?;
    let mut meta = BTreeMap::new();
    let step = json.get("global_step").and_then(|v| v.as_u64());
    if let Some(s) = step {
        meta.insert("global_step".to_string(), s.to_string());
    }
    if let Some(best) = json.get("best_metric").and_then(|v| v.as_f64()) {
        meta.insert("best_metric".to_string(), best.to_string());
    }
    let is_eval = |e: &&serde_json::Value| {
        e.as_object().is_some_and(|o| o.keys().any(|k| k.starts_with("eval_")))
    };
    let history = json.get("log_history").and_then(|v| v.as_array());
    let Some(entry) = history.and_then(|h| h.iter().rev().find(is_eval)) else {
        return Ok((step, meta));
    };
    for (k, v) in entry.as_object().into_iter().flatten() {
        if let (true, Some(x)) = (k.starts_with("eval_"), v.as_f64()) {
            meta.insert(k.clone(), x.to_string());
        }
    }
    if let Some(loss) = meta.get("eval_loss").cloned() {
        meta.insert("metric".to_string(), loss);
        meta.insert("metric_name".to_string(), "eval_loss".to_string());
    }
    if let Some(s) = entry.get("step").and_then(|v| v.as_u64()) {
        meta.insert("metric_step".to_string(), s.to_string());
    }
    Ok((step, meta))
}

/// Any directory no other format claimed: an HF checkpoint (`save_pretrained`, the Trainer).
pub(crate) const FORMAT: FormatSpec = FormatSpec { detect: claim, weight_file, endings: &[] };

/// The marker (`trainer_state.json`) counts too: HF writes it last, so a rewrite of the
/// directory shows.
fn weight_file(name: &str) -> bool {
    name.ends_with(".safetensors")
        || name.ends_with(".index.json")
        || (name.starts_with("pytorch_model") && name.ends_with(".bin"))
        || name == TRAINER_STATE
}

fn claim(probe: &Probe<'_>) -> Claim {
    if probe.file.is_some() {
        return Ok(None);
    }
    Ok(Some(Box::new(FoundHf(probe.path.to_path_buf()))))
}

struct FoundHf(PathBuf);

impl Found for FoundHf {
    fn quick_check(&self, marker: &str) -> Result<()> {
        quick_check(&self.0, marker)
    }

    fn open(self: Box<Self>) -> Result<Loaded> {
        open(&self.0)
    }
}
