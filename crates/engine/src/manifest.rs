//! The JSON manifest published beside (file output) or inside (directory output) every average:
//! what went in, with which weights, why, how, when. Consumers poll it: it is written last.
//! This module only describes and serialises the record; `publish` decides where and when.
//! Paths are recorded losslessly (see [`path_json`]): a non-UTF-8 name never fails or panics.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::average::{DtypeOverflow, IntPolicy, OutDType};
use crate::error::{Error, Result};
use crate::path_json;
use crate::select::{Method, Selection};
use sewa_checkpoint::{Checkpoint, Format, TensorMeta};

/// Note carried by every manifest: averaging does not fix normalisation statistics.
pub const BATCHNORM_NOTE: &str = "BatchNorm running statistics in an average are stale \
    (averages of statistics, not statistics of the averaged model); recompute them \
    (e.g. torch.optim.swa_utils.update_bn) before evaluating a model with BatchNorm.";

/// A name recorded in a manifest: one this sewa knows, or any other string (a manifest written
/// by another sewa version), kept as written rather than refused, so that reading back an
/// unfamiliar manifest never fails for a name. Serialised as the bare string either way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Named<T> {
    Known(T),
    Other(String),
}

impl<T> From<T> for Named<T> {
    fn from(t: T) -> Self {
        Named::Known(t)
    }
}

impl<T: Serialize> Named<T> {
    /// The name as the manifest writes it.
    pub fn name(&self) -> String {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::String(s)) => s,
            _ => String::new(),
        }
    }
}

/// Compared with the string the manifest holds.
impl<T: Serialize> PartialEq<&str> for Named<T> {
    fn eq(&self, other: &&str) -> bool {
        self.name() == *other
    }
}

/// The empty string: what a manifest that lacks the key (an older sewa's) read as before.
impl<T> Default for Named<T> {
    fn default() -> Self {
        Named::Other(String::new())
    }
}

/// How the published output is laid out (`Manifest.layout`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputLayout {
    /// One safetensors file.
    File,
    /// A directory (`model.safetensors`, or shards with their index; HF side files).
    Dir,
    /// A PEFT adapter directory.
    Adapter,
}

/// What chose the weights: a selector (`[select] method`, `--select`, or `sewa average`'s
/// default `uniform`), the weights given on the command line (`weights`), or a name this
/// version does not know (read from a file another sewa wrote; kept, never refused).
/// Written as the same strings as before: the method's name, or "weights".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum SelectedBy {
    Method(Method),
    Weights,
    Other(String),
}

impl SelectedBy {
    pub fn name(&self) -> &str {
        match self {
            SelectedBy::Method(m) => m.name(),
            SelectedBy::Weights => "weights",
            SelectedBy::Other(s) => s,
        }
    }
}

impl Default for SelectedBy {
    fn default() -> Self {
        SelectedBy::Other(String::new())
    }
}

impl From<Method> for SelectedBy {
    fn from(m: Method) -> Self {
        match m {
            // `[select] method = "weights"` is the user's weights, as `--weights` is: one name.
            Method::Weights => SelectedBy::Weights,
            m => SelectedBy::Method(m),
        }
    }
}

impl From<String> for SelectedBy {
    fn from(s: String) -> Self {
        let known = serde_json::from_value::<Method>(serde_json::Value::String(s.clone()));
        match known {
            Ok(m) => SelectedBy::from(m), // "weights" too: `Method::Weights`
            Err(_) => SelectedBy::Other(s),
        }
    }
}

impl From<&str> for SelectedBy {
    fn from(s: &str) -> Self {
        SelectedBy::from(s.to_string())
    }
}

/// Compared with the string the manifest holds.
impl PartialEq<&str> for SelectedBy {
    fn eq(&self, other: &&str) -> bool {
        self.name() == *other
    }
}

impl From<SelectedBy> for String {
    fn from(s: SelectedBy) -> String {
        s.name().to_string()
    }
}

impl std::fmt::Display for SelectedBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why these weights: filled by the CLI (explicit weights) or a selector.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Provenance {
    /// Selector or rule, e.g. "uniform", "weights", "lawa", "sewa".
    pub method: SelectedBy,
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
            method: s.method.into(),
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
    pub format: Named<Format>,
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
            format: ckpt.format().into(),
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
    /// `--dtype`, `--int-policy`, `--dtype-overflow` (or their `[publish]` keys).
    pub dtype: OutDType,
    pub int_policy: IntPolicy,
    pub dtype_overflow: DtypeOverflow,
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
            dtype: OutDType::default(),
            int_policy: IntPolicy::default(),
            dtype_overflow: DtypeOverflow::default(),
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
    pub layout: Named<OutputLayout>,
    pub files: Vec<FileRecord>,
    /// Tensor bytes written.
    pub tensor_bytes: u64,
    pub tensors: usize,
    pub inputs: Vec<InputRecord>,
    /// Normalised weights, one per input (same order).
    pub weights: Vec<f64>,
    pub selection: Provenance,
    /// The output dtype option: "keep", "f32", "bf16" or "f16".
    pub dtype: Named<OutDType>,
    /// "latest", "first" or "error".
    pub int_policy: Named<IntPolicy>,
    /// What happened to averages beyond `dtype`'s range: "error" (refused) or "saturate"
    /// (empty in a manifest of a sewa that did not record it).
    #[serde(default)]
    pub dtype_overflow: Named<DtypeOverflow>,
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
    /// Set when the output was written by several processes (`sewa average --distributed`):
    /// which rank wrote which files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distributed: Option<DistributedRecord>,
}

/// How a distributed average was written.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DistributedRecord {
    /// The plan's identity (inputs by path, size and mtime; weights; options; outputs; number
    /// of ranks; shard size): equal across reruns of the same job, which reuse its shards.
    pub plan: String,
    pub world_size: usize,
    /// One per rank that wrote files, in rank order.
    pub ranks: Vec<RankRecord>,
}

/// What one rank of a distributed average wrote (also its completion marker's contents).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RankRecord {
    pub rank: usize,
    /// The shard files, by name in the output directory.
    pub files: Vec<String>,
    /// Tensor bytes written.
    pub bytes: u64,
    /// Time this rank took to average and write its shards.
    pub seconds: f64,
    /// When this rank's shards were complete (RFC 3339 UTC): before this manifest's `started`
    /// run when a rerun reused them.
    pub written: String,
}

impl Manifest {
    /// The manifest of `record`, before the output-specific fields (files, side files, finish
    /// time) are known.
    pub fn new(record: AverageRecord, output: PathBuf, selection: Provenance) -> Self {
        let AverageRecord { inputs, renamed_keys, outputs, dtype, int_policy, .. } = record;
        Manifest {
            sewa_version: env!("CARGO_PKG_VERSION").to_string(),
            output: absolute(&output),
            // Set by the publisher, which decides it.
            layout: Named::default(),
            files: Vec::new(),
            tensor_bytes: outputs.iter().map(|t| t.nbytes() as u64).sum(),
            tensors: outputs.len(),
            weights: inputs.iter().map(|i| i.weight).collect(),
            inputs,
            selection,
            dtype: dtype.into(),
            int_policy: int_policy.into(),
            dtype_overflow: record.dtype_overflow.into(),
            int_source: record.int_source.map(|p| absolute(&p)),
            renamed_keys,
            side_files: Vec::new(),
            side_source: None,
            started: crate::timestamp::now_micros(),
            finished: String::new(),
            wall_time_s: 0.0,
            notes: vec![BATCHNORM_NOTE.to_string()],
            distributed: None,
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

/// `Format` as its kebab-case name, e.g. "sharded-safetensors" (what manifests record).
pub fn format_name(f: Format) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn json<T: Serialize>(t: T) -> String {
        serde_json::to_string(&t).unwrap()
    }

    /// Manifests are read by users' tools and by other sewa versions: the typed fields are
    /// written as the same strings as before.
    #[test]
    fn typed_names_serialise_as_the_strings_manifests_always_held() {
        assert_eq!(json(Named::from(Format::ShardedSafetensors)), r#""sharded-safetensors""#);
        assert_eq!(json(Named::from(Format::DeepSpeed)), r#""deepspeed""#);
        assert_eq!(json(Named::from(Format::HfDir)), r#""hf-dir""#);
        assert_eq!(json(Named::from(OutputLayout::File)), r#""file""#);
        assert_eq!(json(Named::from(OutputLayout::Dir)), r#""dir""#);
        assert_eq!(json(Named::from(OutputLayout::Adapter)), r#""adapter""#);
        assert_eq!(json(Named::from(OutDType::BF16)), r#""bf16""#);
        assert_eq!(json(Named::from(OutDType::Keep)), r#""keep""#);
        assert_eq!(json(Named::from(IntPolicy::First)), r#""first""#);
        assert_eq!(json(Named::from(DtypeOverflow::Saturate)), r#""saturate""#);
        assert_eq!(json(SelectedBy::from(Method::BestMetric)), r#""best-metric""#);
        assert_eq!(json(SelectedBy::Weights), r#""weights""#);
        assert_eq!(SelectedBy::from(Method::Weights), SelectedBy::Weights, "one name, one value");
        for m in crate::select::MODEL_BASED {
            assert_eq!(json(SelectedBy::from(m)), format!("{:?}", m.name()));
        }
    }

    /// A manifest another sewa wrote (an unknown format, layout, dtype or method) still
    /// reads: the names are kept as written, and written back unchanged.
    #[test]
    fn unknown_names_read_back_as_other_and_round_trip() {
        let f: Named<Format> = serde_json::from_str(r#""gguf""#).unwrap();
        assert_eq!(f, Named::Other("gguf".into()));
        let f: Named<Format> = serde_json::from_str(r#""torch-zip""#).unwrap();
        assert_eq!(f, Named::Known(Format::TorchZip));
        let m: SelectedBy = serde_json::from_str(r#""sewa""#).unwrap();
        assert_eq!(m, SelectedBy::Method(Method::Sewa));
        let m: SelectedBy = serde_json::from_str(r#""weights""#).unwrap();
        assert_eq!(m, SelectedBy::Weights);
        let m: SelectedBy = serde_json::from_str(r#""swa-v9""#).unwrap();
        assert_eq!((m.name(), json(&m)), ("swa-v9", r#""swa-v9""#.to_string()));
        let l: Named<OutputLayout> = serde_json::from_str(r#""tarball""#).unwrap();
        assert_eq!(json(l), r#""tarball""#);
        // Not a string at all: a clear error, not a panic.
        assert!(serde_json::from_str::<SelectedBy>("7").is_err());
    }
}
