//! The JSON manifest published beside (file output) or inside (directory output) every average:
//! what went in, with which weights, why, how, when. Consumers poll it: it is written last.
//! This module only describes and serialises the record; `publish` decides where and when.
//! Paths are recorded losslessly (see [`path_json`]): a non-UTF-8 name never fails or panics.

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::path_json;
use crate::select::Selection;
use sewa_checkpoint::{Checkpoint, TensorMeta};

/// Note carried by every manifest: averaging does not fix normalisation statistics.
pub const BATCHNORM_NOTE: &str = "BatchNorm running statistics in an average are stale \
    (averages of statistics, not statistics of the averaged model); recompute them \
    (e.g. torch.optim.swa_utils.update_bn) before evaluating a model with BatchNorm.";

/// Why these weights: filled by the CLI (explicit weights) or a selector.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Provenance {
    /// Selector or rule, e.g. "uniform", "weights", "lawa", "sewa".
    pub method: String,
    /// One human-readable line, e.g. "last 5 of 20 by step".
    pub why: String,
    /// Loss of the selection on the selection data, when an objective was used.
    #[serde(default)]
    pub loss: Option<f64>,
    /// Method-specific report (probabilities, iterations, oracle calls, wall time...).
    #[serde(default)]
    pub details: serde_json::Value,
}

impl From<&Selection> for Provenance {
    fn from(s: &Selection) -> Self {
        Provenance {
            method: s.method.clone(),
            why: s.why.clone(),
            loss: s.loss,
            details: s.details.json(),
        }
    }
}

/// One input as recorded.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InputRecord {
    #[serde(with = "path_json")]
    pub path: PathBuf,
    pub step: Option<u64>,
    /// Tensor bytes (not file size: a .ckpt also holds optimizer state).
    pub bytes: u64,
    pub format: String,
    /// Normalised weight.
    pub weight: f64,
    /// (device, inode, size, mtime) of the file version averaged; lets a restarted daemon
    /// tell a checkpoint replaced at the same path from the one it published.
    #[serde(default)]
    pub identity: Option<sewa_checkpoint::Identity>,
}

impl InputRecord {
    /// `ckpt` averaged with normalised `weight`; `step` as the caller knows it (the daemon's
    /// window also takes steps from names).
    pub fn of(ckpt: &Checkpoint, step: Option<u64>, weight: f64) -> Self {
        InputRecord {
            path: absolute(ckpt.path()),
            step,
            bytes: ckpt.total_bytes(),
            format: format_name(ckpt.format()),
            weight,
            identity: Some(*ckpt.identity()),
        }
    }
}

/// What was averaged, as the manifest records it: a plain record that `sewa average` fills
/// from its plan and `sewa watch` from its members (streamed or kept in its running average),
/// so both list the same things (renamed keys included).
#[derive(Clone, Debug, PartialEq)]
pub struct AverageRecord {
    /// Inputs with their normalised weights, in the order they were averaged.
    pub inputs: Vec<InputRecord>,
    pub renamed_keys: Vec<RenameRecord>,
    /// Output tensors.
    pub outputs: Vec<TensorMeta>,
    /// `--dtype`, `--int-policy`, `--dtype-overflow` as written in the config.
    pub dtype: String,
    pub int_policy: String,
    pub dtype_overflow: String,
    /// Input the integer/bool tensors were copied from, when there are any.
    pub int_source: Option<PathBuf>,
}

impl AverageRecord {
    /// The record of `inputs` (checkpoint, step, weight), with everything else empty.
    pub fn new<'c>(inputs: impl IntoIterator<Item = (&'c Checkpoint, Option<u64>, f64)>) -> Self {
        let (mut records, mut renamed_keys) = (Vec::new(), Vec::new());
        for (ckpt, step, weight) in inputs {
            records.push(InputRecord::of(ckpt, step, weight));
            renamed_keys.extend(ckpt.renamed_keys().iter().map(|(from, to)| RenameRecord {
                input: absolute(ckpt.path()),
                from: from.clone(),
                to: to.clone(),
            }));
        }
        AverageRecord {
            inputs: records,
            renamed_keys,
            outputs: Vec::new(),
            dtype: String::new(),
            int_policy: String::new(),
            dtype_overflow: String::new(),
            int_source: None,
        }
    }
}

/// One key renamed while opening an input (e.g. torch.compile's `_orig_mod.` prefix).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RenameRecord {
    #[serde(with = "path_json")]
    pub input: PathBuf,
    pub from: String,
    pub to: String,
}

/// One published file, relative to the output directory (or the output file's name).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FileRecord {
    #[serde(with = "path_json")]
    pub name: PathBuf,
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub sewa_version: String,
    /// The published path (file or directory).
    #[serde(with = "path_json")]
    pub output: PathBuf,
    /// "file", "dir" or "adapter" (a PEFT adapter directory).
    pub layout: String,
    pub files: Vec<FileRecord>,
    /// Tensor bytes written.
    pub tensor_bytes: u64,
    pub tensors: usize,
    pub inputs: Vec<InputRecord>,
    /// Normalised weights, one per input (same order).
    pub weights: Vec<f64>,
    pub selection: Provenance,
    pub dtype: String,
    pub int_policy: String,
    /// What happened to averages beyond `dtype`'s range: "error" (refused) or "saturate".
    #[serde(default)]
    pub dtype_overflow: String,
    /// Input the integer/bool tensors were copied from, when there are any.
    #[serde(with = "path_json::option", default)]
    pub int_source: Option<PathBuf>,
    pub renamed_keys: Vec<RenameRecord>,
    /// HF side files copied (config.json, tokenizer...) and where from.
    pub side_files: Vec<String>,
    #[serde(with = "path_json::option", default)]
    pub side_source: Option<PathBuf>,
    /// RFC 3339 UTC, microseconds. Also in every published safetensors file's `__metadata__`
    /// as `sewa_started`: a reader checks that the two are equal to know that a model and a
    /// manifest belong to the same publication.
    pub started: String,
    pub finished: String,
    pub wall_time_s: f64,
    pub notes: Vec<String>,
}

impl Manifest {
    /// The manifest of `record`, before the output-specific fields (files, side files, finish
    /// time) are known.
    pub fn new(record: AverageRecord, output: PathBuf, selection: Provenance) -> Self {
        let AverageRecord { inputs, renamed_keys, outputs, dtype, int_policy, .. } = record;
        Manifest {
            sewa_version: env!("CARGO_PKG_VERSION").to_string(),
            output: absolute(&output),
            layout: String::new(),
            files: Vec::new(),
            tensor_bytes: outputs.iter().map(|t| t.nbytes() as u64).sum(),
            tensors: outputs.len(),
            weights: inputs.iter().map(|i| i.weight).collect(),
            inputs,
            selection,
            dtype,
            int_policy,
            dtype_overflow: record.dtype_overflow,
            int_source: record.int_source.map(|p| absolute(&p)),
            renamed_keys,
            side_files: Vec::new(),
            side_source: None,
            started: crate::timestamp::now_micros(),
            finished: String::new(),
            wall_time_s: 0.0,
            notes: vec![BATCHNORM_NOTE.to_string()],
        }
    }

    /// The manifest as pretty JSON. Cannot fail for a manifest built here (paths are encoded
    /// losslessly, non-finite numbers become `null`); an error is reported, never a panic.
    pub fn to_json(&self) -> Result<Vec<u8>> {
        let mut v = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::Internal(format!("cannot serialise the manifest: {e}")))?;
        v.push(b'\n');
        Ok(v)
    }
}

/// `Format` as its kebab-case name, e.g. "sharded-safetensors".
pub fn format_name(f: sewa_checkpoint::Format) -> String {
    match serde_json::to_value(f) {
        Ok(serde_json::Value::String(s)) => s,
        _ => format!("{f:?}"),
    }
}

/// `p` made absolute against the current directory (not canonicalised), so a manifest read
/// from elsewhere still points at the right files; `p` itself if that fails.
pub fn absolute(p: &std::path::Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}
