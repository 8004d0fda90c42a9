//! Output layout: which tensors go into which safetensors file, in what order, and each file's
//! header (built with safetensors' own `Metadata`, so it is exactly what the crate would write).
//! Knowing every header before any tensor is averaged lets `publish` stream tensors straight
//! to disk instead of holding the whole output in memory. No I/O here.

use std::collections::HashMap;

use safetensors::tensor::{Metadata, TensorInfo};

use crate::error::{Error, Result};
use sewa_checkpoint::TensorMeta;

/// One output safetensors file.
#[derive(Clone, Debug)]
pub struct FileLayout {
    pub name: String,
    /// Indices into the plan's outputs, in data order.
    pub tensors: Vec<usize>,
    /// Length prefix plus JSON header, padded to 8 bytes: write this, then the tensors.
    pub header: Vec<u8>,
    /// Total file size.
    pub size: u64,
}

/// Split `outputs` into files: one named `single` when the total fits in `shard_bytes`, else
/// HF shards `model-0000i-of-0000n.safetensors`, each at most `shard_bytes` (a bigger tensor
/// gets a shard of its own). Every file carries `metadata` as `__metadata__`.
pub fn plan_files(
    outputs: &[TensorMeta],
    single: &str,
    shard_bytes: u64,
    metadata: &HashMap<String, String>,
) -> Result<Vec<FileLayout>> {
    let total: u64 = outputs.iter().map(|t| t.nbytes() as u64).sum();
    let groups: Vec<Vec<usize>> = if total <= shard_bytes {
        vec![(0..outputs.len()).collect()]
    } else {
        shard_groups(outputs, shard_bytes)
    };
    let n = groups.len();
    groups
        .into_iter()
        .enumerate()
        .map(|(i, group)| {
            let name = if n == 1 {
                single.to_string()
            } else {
                format!("model-{:05}-of-{n:05}.safetensors", i + 1)
            };
            file_layout(name, outputs, group, metadata)
        })
        .collect()
}

/// Split `outputs` (sorted by name) among `world` ranks by bytes, with no communication: every
/// rank computes the same split from the same tensor list. Rank `r` takes the contiguous run of
/// tensors whose byte midpoint falls in the `r`-th `1/world` of the total, so no rank holds
/// more than its share plus one tensor. A rank may get nothing (more ranks than tensors).
pub fn partition_by_bytes(outputs: &[TensorMeta], world: usize) -> Vec<Vec<usize>> {
    let world = world.max(1);
    let total: u128 = outputs.iter().map(|t| t.nbytes() as u128).sum();
    let mut parts = vec![Vec::new(); world];
    let mut start = 0u128;
    for (i, t) in outputs.iter().enumerate() {
        let b = t.nbytes() as u128;
        // Twice the midpoint, against twice the total: integers only, the same on every rank.
        let rank = match total {
            0 => 0,
            _ => ((2 * start + b) * world as u128 / (2 * total)).min(world as u128 - 1) as usize,
        };
        parts[rank].push(i);
        start += b;
    }
    parts
}

/// The files of an output written by `world` ranks: each rank's part ([`partition_by_bytes`])
/// split into shards of at most `shard_bytes` as [`plan_files`] does, numbered across ranks in
/// rank order, each with the rank that writes it. One file in all is named `single`.
pub fn plan_rank_files(
    outputs: &[TensorMeta],
    world: usize,
    single: &str,
    shard_bytes: u64,
    metadata: &HashMap<String, String>,
) -> Result<Vec<(usize, FileLayout)>> {
    let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
    for (rank, part) in partition_by_bytes(outputs, world).into_iter().enumerate() {
        let mine: Vec<TensorMeta> = part.iter().map(|&i| outputs[i].clone()).collect();
        let bytes: u64 = mine.iter().map(|t| t.nbytes() as u64).sum();
        let split = if bytes <= shard_bytes {
            vec![(0..mine.len()).collect()]
        } else {
            shard_groups(&mine, shard_bytes)
        };
        groups.extend(
            split
                .into_iter()
                .filter(|g: &Vec<usize>| !g.is_empty())
                .map(|g| (rank, g.into_iter().map(|j| part[j]).collect())),
        );
    }
    if groups.is_empty() {
        // No tensors at all: one empty file, as the single-process publisher writes.
        groups.push((0, Vec::new()));
    }
    let n = groups.len();
    groups
        .into_iter()
        .enumerate()
        .map(|(i, (rank, group))| {
            let name = if n == 1 {
                single.to_string()
            } else {
                format!("model-{:05}-of-{n:05}.safetensors", i + 1)
            };
            Ok((rank, file_layout(name, outputs, group, metadata)?))
        })
        .collect()
}

/// Greedy split in name order, as HF's `save_pretrained` does.
fn shard_groups(outputs: &[TensorMeta], shard_bytes: u64) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0u64;
    for (i, t) in outputs.iter().enumerate() {
        let b = t.nbytes() as u64;
        let current = groups.last_mut().expect("never empty");
        if !current.is_empty() && size + b > shard_bytes {
            groups.push(vec![i]);
            size = b;
        } else {
            current.push(i);
            size += b;
        }
    }
    groups
}

fn file_layout(
    name: String,
    outputs: &[TensorMeta],
    mut tensors: Vec<usize>,
    metadata: &HashMap<String, String>,
) -> Result<FileLayout> {
    // safetensors' own order: by descending dtype (so wide types stay aligned), then name.
    tensors.sort_by(|&a, &b| {
        let (x, y) = (&outputs[a], &outputs[b]);
        (y.dtype.to_safetensors().cmp(&x.dtype.to_safetensors())).then(x.name.cmp(&y.name))
    });
    let mut offset = 0usize;
    let infos = tensors
        .iter()
        .map(|&i| {
            let t = &outputs[i];
            let info = TensorInfo {
                dtype: t.dtype.to_safetensors(),
                shape: t.shape.clone(),
                data_offsets: (offset, offset + t.nbytes()),
            };
            offset += t.nbytes();
            (t.name.clone(), info)
        })
        .collect();
    let meta = Metadata::new(Some(metadata.clone()), infos)
        .map_err(|e| Error::Internal(format!("safetensors header for {name}: {e}")))?;
    let mut json = serde_json::to_vec(&meta)
        .map_err(|e| Error::Internal(format!("safetensors header for {name}: {e}")))?;
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut header = (json.len() as u64).to_le_bytes().to_vec();
    header.extend_from_slice(&json);
    let size = (header.len() + offset) as u64;
    Ok(FileLayout { name, tensors, header, size })
}

/// `model.safetensors.index.json` for sharded output.
pub fn index_json(files: &[FileLayout], outputs: &[TensorMeta]) -> Result<Vec<u8>> {
    let total: u64 = outputs.iter().map(|t| t.nbytes() as u64).sum();
    let weight_map: std::collections::BTreeMap<&str, &str> = files
        .iter()
        .flat_map(|f| f.tensors.iter().map(|&i| (outputs[i].name.as_str(), f.name.as_str())))
        .collect();
    let index = serde_json::json!({
        "metadata": { "total_size": total },
        "weight_map": weight_map,
    });
    let mut v = serde_json::to_vec_pretty(&index)
        .map_err(|e| Error::Internal(format!("model.safetensors.index.json: {e}")))?;
    v.push(b'\n');
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sewa_checkpoint::DType;

    fn t(name: &str, dtype: DType, n: usize) -> TensorMeta {
        TensorMeta { name: name.into(), dtype, shape: vec![n] }
    }

    #[test]
    fn header_parses_and_matches_sizes() {
        let outs = vec![t("a", DType::F16, 3), t("b", DType::F32, 5), t("c", DType::I64, 1)];
        let md = HashMap::from([("format".to_string(), "pt".to_string())]);
        let files = plan_files(&outs, "x.safetensors", u64::MAX, &md).unwrap();
        assert_eq!(files.len(), 1);
        let f = &files[0];
        assert_eq!(f.header.len() % 8, 0);
        // Descending dtype: i64 before f32 before f16.
        assert_eq!(f.tensors, vec![2, 1, 0]);
        let mut bytes = f.header.clone();
        bytes.resize(f.size as usize, 0);
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("b").unwrap().shape(), &[5]);
        let (_, m) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(m.metadata().as_ref().unwrap()["format"], "pt");
    }

    #[test]
    fn ranks_split_by_bytes_contiguously_and_cover_every_tensor_once() {
        let outs: Vec<_> = [10, 10, 10, 5, 5]
            .iter()
            .enumerate()
            .map(|(i, &n)| t(&format!("w{i}"), DType::F32, n))
            .collect();
        let nbytes: Vec<usize> = outs.iter().map(|t| t.nbytes()).collect();
        assert_eq!(nbytes, [40, 40, 40, 20, 20]);
        assert_eq!(partition_by_bytes(&outs, 1), vec![vec![0, 1, 2, 3, 4]]);
        // Midpoints 20, 60, 100, 130, 150 of 160.
        assert_eq!(partition_by_bytes(&outs, 2), vec![vec![0, 1], vec![2, 3, 4]]);
        assert_eq!(partition_by_bytes(&outs, 4), vec![vec![0], vec![1], vec![2], vec![3, 4]]);
        let many = partition_by_bytes(&outs, 8);
        assert_eq!(many.len(), 8);
        let mut all: Vec<usize> = many.concat();
        all.sort();
        assert_eq!(all, [0, 1, 2, 3, 4], "each tensor on exactly one rank");
        assert!(partition_by_bytes(&[], 3).iter().all(Vec::is_empty));
    }

    #[test]
    fn rank_files_are_numbered_across_ranks_and_split_by_shard_size() {
        let outs: Vec<_> = (0..6).map(|i| t(&format!("w{i}"), DType::F32, 10)).collect();
        let md = HashMap::new();
        let one = plan_rank_files(&outs, 1, "model.safetensors", u64::MAX, &md).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!((one[0].0, one[0].1.name.as_str()), (0, "model.safetensors"));
        let two = plan_rank_files(&outs, 2, "model.safetensors", 80, &md).unwrap();
        let got: Vec<(usize, &str, Vec<usize>)> =
            two.iter().map(|(r, f)| (*r, f.name.as_str(), f.tensors.clone())).collect();
        assert_eq!(
            got,
            [
                (0, "model-00001-of-00004.safetensors", vec![0, 1]),
                (0, "model-00002-of-00004.safetensors", vec![2]),
                (1, "model-00003-of-00004.safetensors", vec![3, 4]),
                (1, "model-00004-of-00004.safetensors", vec![5]),
            ]
        );
        // Headers as the single-process publisher would write the same group.
        let same = plan_files(&outs[..2], "x", u64::MAX, &md).unwrap();
        assert_eq!(two[0].1.header, same[0].header);
        let empty = plan_rank_files(&[], 4, "model.safetensors", 80, &md).unwrap();
        assert_eq!(empty.len(), 1);
    }

    #[test]
    fn shards_respect_threshold_and_name_order() {
        let outs: Vec<_> = (0..5).map(|i| t(&format!("w{i}"), DType::F32, 10)).collect();
        let files = plan_files(&outs, "model.safetensors", 80, &HashMap::new()).unwrap();
        let names: Vec<_> = files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "model-00001-of-00003.safetensors",
                "model-00002-of-00003.safetensors",
                "model-00003-of-00003.safetensors"
            ]
        );
        assert_eq!(files[0].tensors, vec![0, 1]);
        assert_eq!(files[2].tensors, vec![4]);
        let index: serde_json::Value =
            serde_json::from_slice(&index_json(&files, &outs).unwrap()).unwrap();
        assert_eq!(index["metadata"]["total_size"], 200);
        assert_eq!(index["weight_map"]["w4"], "model-00003-of-00003.safetensors");
    }
}
