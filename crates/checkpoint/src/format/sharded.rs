//! HF sharded safetensors: `*.safetensors.index.json` (`weight_map`: tensor → shard file) plus
//! the shards beside it. Every shard must exist, validate and hold the tensors the index puts
//! there; shard names that are absolute or leave the directory (`..`), and shards that are
//! symlinks or not regular files, are refused (`files` opens them).
//! Single-file parsing lives in `safetensors.rs`.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Component, Path, PathBuf};

use super::safetensors::{self, step_from_metadata};
use super::{Claim, FormatSpec, FoundFile, Probe, no_weight_file};
use crate::error::{Error, Result};
use crate::storage::{FileStore, Loaded};
use crate::{Format, files};

/// The parsed index: tensor → shard name, shard name → path relative to `dir` (the index's
/// directory), and the index's `metadata`.
pub(crate) struct Index {
    pub weight_map: BTreeMap<String, String>,
    pub dir: PathBuf,
    pub shards: BTreeMap<String, PathBuf>,
    pub metadata: BTreeMap<String, String>,
}

/// Parse an index file (opened by `files` from `index_path`) and resolve its shard names.
pub(crate) fn read_index(index_path: &Path, file: File) -> Result<Index> {
    let json = safetensors::read_small_json(index_path, file)?;
    let wm = json.get("weight_map").and_then(|v| v.as_object()).ok_or_else(|| {
        Error::bad_input(index_path, "index has no \"weight_map\" object (not an HF shard index)")
    })?;
    let dir = match index_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
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
    Ok(Index { weight_map, dir: dir.to_path_buf(), shards, metadata })
}

/// Only plain relative names below the index's directory, naming a regular file there (no
/// symlink on the way: `link.safetensors -> /outside/x` is refused).
fn resolve_shard(index_path: &Path, dir: &Path, shard: &str) -> Result<PathBuf> {
    let rel = Path::new(shard);
    if shard.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(Error::bad_input(
            index_path,
            format!("shard name {shard:?} is absolute or leaves the checkpoint directory; refused"),
        ));
    }
    if !files::has_file(dir, rel)? {
        return Err(Error::bad_input(
            index_path,
            format!(
                "shard {shard} is missing (expected at {}): incomplete checkpoint",
                crate::text::path(&dir.join(rel))
            ),
        ));
    }
    Ok(rel.to_path_buf())
}

impl Index {
    /// Open one shard (by its name in the index) the only way shards are opened.
    fn open_shard(&self, rel: &Path) -> Result<(PathBuf, File)> {
        Ok((self.dir.join(rel), files::open_in_dir(&self.dir, rel)?))
    }
}

fn json_to_string(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Length-and-header check of every shard, without holding them open (for `quick_check`).
pub(crate) fn quick_check(index_path: &Path, file: File) -> Result<()> {
    let index = read_index(index_path, file)?;
    index.shards.values().try_for_each(|rel| {
        let (path, file) = index.open_shard(rel)?;
        safetensors::quick_check(&path, file)
    })
}

/// Open the index (opened by `files` from `index_path`) and every shard.
pub(crate) fn open(index_path: &Path, file: File) -> Result<Loaded> {
    let index = read_index(index_path, file)?;
    let mut files = Vec::new();
    let mut per_shard: HashMap<&str, (usize, HashMap<String, _>)> = HashMap::new();
    let mut metadata = BTreeMap::new();
    for (name, rel) in &index.shards {
        let (path, file) = index.open_shard(rel)?;
        let st = safetensors::open_file(&path, file)?;
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
                index.dir.join(&index.shards[shard]),
                format!(
                    "tensor {tensor} is not in this shard although {} says so",
                    crate::text::path(index_path)
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
        storage: Box::new(FileStore { files, index: idx }),
        metadata,
        step,
        side_dir: None,
    })
}

/// A file named `*.index.json` is a shard index.
pub(crate) const FORMAT: FormatSpec =
    FormatSpec { detect: claim, weight_file: no_weight_file, endings: &[".index.json"] };

fn claim(probe: &Probe<'_>) -> Claim {
    if !probe.name().ends_with(".index.json") {
        return Ok(None);
    }
    let Some((file, _)) = probe.file()? else { return Ok(None) };
    let path = probe.path.to_path_buf();
    Ok(Some(Box::new(FoundFile { path, file, check: quick_check, open })))
}
