//! HF sharded safetensors: `*.safetensors.index.json` (`weight_map`: tensor → shard file) plus
//! the shards beside it. Every shard must exist, validate and hold the tensors the index puts
//! there; shard names that are absolute or leave the directory (`..`) are refused.
//! Single-file parsing lives in `safetensors.rs`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};

use super::detect::{Loaded, step_from_metadata};
use super::{Format, Storage, safetensors};
use crate::error::{Error, Result};

/// The parsed index: tensor → shard name, shard name → path, and the index's `metadata`.
pub(crate) struct Index {
    pub weight_map: BTreeMap<String, String>,
    pub shards: BTreeMap<String, PathBuf>,
    pub metadata: BTreeMap<String, String>,
}

/// Parse an index file and resolve its shard names safely.
pub(crate) fn read_index(index_path: &Path) -> Result<Index> {
    let json = safetensors::read_small_json(index_path)?;
    let wm = json.get("weight_map").and_then(|v| v.as_object()).ok_or_else(|| {
        Error::bad_input(index_path, "index has no \"weight_map\" object (not an HF shard index)")
    })?;
    let dir = index_path.parent().unwrap_or(Path::new("."));
    let mut weight_map = BTreeMap::new();
    let mut shards = BTreeMap::new();
    for (tensor, shard) in wm {
        let shard = shard.as_str().ok_or_else(|| {
            Error::bad_input(index_path, format!("weight_map[{tensor:?}] is not a file name"))
        })?;
        if !shards.contains_key(shard) {
            shards.insert(shard.to_string(), resolve_shard(index_path, dir, shard)?);
        }
        weight_map.insert(tensor.clone(), shard.to_string());
    }
    if weight_map.is_empty() {
        return Err(Error::bad_input(index_path, "index has an empty weight_map"));
    }
    let metadata = json
        .get("metadata")
        .and_then(|m| m.as_object())
        .map(|m| m.iter().map(|(k, v)| (k.clone(), json_to_string(v))).collect())
        .unwrap_or_default();
    Ok(Index { weight_map, shards, metadata })
}

/// Only plain relative names below the index's directory; the shard must exist.
fn resolve_shard(index_path: &Path, dir: &Path, shard: &str) -> Result<PathBuf> {
    let rel = Path::new(shard);
    if shard.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(Error::bad_input(
            index_path,
            format!("shard name {shard:?} is absolute or leaves the checkpoint directory; refused"),
        ));
    }
    let path = dir.join(rel);
    if !path.is_file() {
        return Err(Error::bad_input(
            index_path,
            format!(
                "shard {shard} is missing (expected at {}): incomplete checkpoint",
                path.display()
            ),
        ));
    }
    Ok(path)
}

fn json_to_string(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Length-and-header check of every shard, without holding them open (for `quick_check`).
pub(crate) fn check(index_path: &Path) -> Result<()> {
    let index = read_index(index_path)?;
    index.shards.values().try_for_each(|p| safetensors::check_file(p))
}

/// Open the index and every shard.
pub(crate) fn open(index_path: &Path) -> Result<Loaded> {
    let index = read_index(index_path)?;
    let mut files = Vec::new();
    let mut per_shard: HashMap<&str, (usize, HashMap<String, _>)> = HashMap::new();
    let mut metadata = BTreeMap::new();
    for (name, path) in &index.shards {
        let st = safetensors::open(path)?;
        if files.is_empty() {
            metadata = st.header.metadata.clone();
        }
        let by_name: HashMap<String, _> =
            st.header.tensors.into_iter().map(|(m, r)| (m.name.clone(), (m, r))).collect();
        per_shard.insert(name.as_str(), (files.len(), by_name));
        files.push(st.file);
    }
    let mut tensors = Vec::new();
    let mut idx = HashMap::new();
    for (tensor, shard) in &index.weight_map {
        let (f, by_name) = per_shard.get_mut(shard.as_str()).expect("every shard was opened");
        let (meta, range) = by_name.remove(tensor).ok_or_else(|| {
            Error::bad_input(
                &index.shards[shard],
                format!(
                    "tensor {tensor} is not in this shard although {} says so",
                    index_path.display()
                ),
            )
        })?;
        idx.insert(tensor.clone(), (*f, range));
        tensors.push(meta);
    }
    for (k, v) in index.metadata {
        metadata.entry(k).or_insert(v);
    }
    let step = step_from_metadata(&metadata);
    Ok(Loaded {
        format: Format::ShardedSafetensors,
        tensors,
        storage: Storage::Files { files, index: idx },
        metadata,
        step,
        side_dir: None,
    })
}
