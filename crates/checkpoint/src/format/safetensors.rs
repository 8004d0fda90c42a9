//! safetensors files: parse and validate the header with plain reads, then hold the file open
//! so tensor bytes are read on demand (`pinned`). Checks, at least as strict as the safetensors
//! crate: header length sane, header is JSON with every key once (tensors, `__metadata__` keys,
//! entry fields), at least one tensor, dtypes supported, each tensor's byte range matches
//! dtype × shape, and the ranges tile the data exactly — no overlap, no gap, ending at the end
//! of the file. Files are opened by `files`; sharding and directories live elsewhere.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{Claim, FormatSpec, FoundFile, Probe, no_weight_file};
use crate::error::{Error, Result};
use crate::pinned::PinnedFile;
use crate::storage::{FileIndex, FileStore, Loaded};
use crate::{DType, Format, InputIo, TensorMeta};

/// Same cap as the safetensors crate: a header above this is corrupt, not big.
const MAX_HEADER: u64 = 100_000_000;

/// Tensors with their absolute byte ranges in the file.
pub(crate) type TensorRanges = Vec<(TensorMeta, Range<usize>)>;

/// A validated header: tensors with absolute byte ranges in the file, and `__metadata__`.
pub(crate) struct Header {
    pub tensors: TensorRanges,
    pub metadata: BTreeMap<String, String>,
}

/// One validated safetensors file, held open.
pub(crate) struct SafetensorsFile {
    pub header: Header,
    pub file: PinnedFile,
}

/// Open one safetensors checkpoint file (opened by `files` from `path`): validate it, hold it
/// open and index its tensors.
pub(crate) fn open(path: &Path, file: File) -> Result<Loaded> {
    let st = open_file(path, file)?;
    let step = step_from_metadata(&st.header.metadata);
    let (tensors, index) = index_files(vec![(0, st.header.tensors)]);
    Ok(Loaded {
        format: Format::Safetensors,
        tensors,
        storage: Box::new(FileStore { files: vec![st.file], index }),
        metadata: st.header.metadata,
        step,
        side_dir: None,
    })
}

/// Flatten per-file tensor lists into the tensor list and the name → (file, range) index.
fn index_files(per_file: Vec<(usize, TensorRanges)>) -> (Vec<TensorMeta>, FileIndex) {
    let mut metas = Vec::new();
    let mut index = HashMap::new();
    for (f, tensors) in per_file {
        for (meta, range) in tensors {
            index.insert(meta.name.clone(), (f, range));
            metas.push(meta);
        }
    }
    (metas, index)
}

/// Step recorded in safetensors `__metadata__`: `step`, else `global_step`.
pub(crate) fn step_from_metadata(meta: &BTreeMap<String, String>) -> Option<u64> {
    ["step", "global_step"].iter().find_map(|k| meta.get(*k)?.trim().parse().ok())
}

/// Validate one safetensors file, opened by `files` from `path`, and hold it open.
pub(crate) fn open_file(path: &Path, file: File) -> Result<SafetensorsFile> {
    let header = read_header(path, &file)?;
    let file = PinnedFile::new(path, file)?;
    Ok(SafetensorsFile { header, file })
}

/// Read and validate the header of an open file.
pub(crate) fn read_header(path: &Path, file: &File) -> Result<Header> {
    let file_len = file.metadata().input(path)?.len();
    if file_len < 8 {
        return Err(Error::bad_input(
            path,
            format!("not a safetensors file: {file_len} bytes, truncated or still being written"),
        ));
    }
    let mut len_bytes = [0u8; 8];
    file.read_exact_at(&mut len_bytes, 0).input(path)?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len == 0 {
        return Err(Error::bad_input(
            path,
            "safetensors header length is 0: the file is zero-filled (preallocated and not \
             yet written?) or not safetensors",
        ));
    }
    if header_len > MAX_HEADER || 8 + header_len > file_len {
        // Not the number itself: for a file that is not safetensors it is its first 8 bytes.
        return Err(Error::bad_input(
            path,
            format!(
                "not a safetensors file, or truncated: its first 8 bytes are not a header \
                 length that fits in its {file_len} bytes"
            ),
        ));
    }
    let mut json = vec![0u8; header_len as usize];
    file.read_exact_at(&mut json, 8).input(path)?;
    parse_header(path, &json, file_len)
}

/// Validate a header given its JSON bytes and the total file length.
pub(crate) fn parse_header(path: &Path, json: &[u8], file_len: u64) -> Result<Header> {
    let data_start = 8 + json.len() as u64;
    let raw: RawHeader = serde_json::from_slice(json).map_err(|e| {
        Error::bad_input(
            path,
            format!("safetensors header is not valid JSON ({e}): corrupt or zero-filled"),
        )
    })?;
    let mut tensors = Vec::new();
    for (name, entry) in raw.tensors {
        tensors.push(parse_entry(path, name, entry)?);
    }
    if tensors.is_empty() {
        return Err(Error::bad_input(
            path,
            "safetensors header lists no tensors: nothing to average (an empty model)",
        ));
    }
    check_layout(path, &mut tensors, file_len - data_start)?;
    let tensors = tensors
        .into_iter()
        .map(|(m, r)| {
            let start = data_start as usize + r.start;
            (m, start..data_start as usize + r.end)
        })
        .collect();
    Ok(Header { tensors, metadata: raw.metadata.into_iter().collect() })
}

/// The header as written: tensor entries in file order plus `__metadata__`. Stricter than a
/// JSON map: a key given twice (a tensor, or a metadata key) is an error, where a map would
/// silently keep the last one — two readers could then disagree about the file.
struct RawHeader {
    tensors: Vec<(String, RawEntry)>,
    metadata: Vec<(String, String)>,
}

impl<'de> serde::Deserialize<'de> for RawHeader {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = RawHeader;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object of tensor entries")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<RawHeader, A::Error> {
                use serde::de::Error as _;
                let mut seen = std::collections::HashSet::new();
                let mut header = RawHeader { tensors: Vec::new(), metadata: Vec::new() };
                while let Some(key) = map.next_key::<String>()? {
                    if !seen.insert(key.clone()) {
                        return Err(A::Error::custom(format!("key {key:?} appears twice")));
                    }
                    if key == "__metadata__" {
                        header.metadata = map.next_value::<UniqueStrings>()?.0;
                        continue;
                    }
                    let entry = map.next_value::<RawEntry>().map_err(|e| {
                        A::Error::custom(format!("tensor {key}: bad header entry: {e}"))
                    })?;
                    header.tensors.push((key, entry));
                }
                Ok(header)
            }
        }
        d.deserialize_map(Visit)
    }
}

/// `__metadata__`: strings to strings, each key once.
struct UniqueStrings(Vec<(String, String)>);

impl<'de> serde::Deserialize<'de> for UniqueStrings {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = UniqueStrings;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("__metadata__ mapping strings to strings")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<UniqueStrings, A::Error> {
                use serde::de::Error as _;
                // A set, not a scan of `out`: a hostile 100 MB header can hold millions of keys.
                let mut seen = std::collections::HashSet::new();
                let mut out: Vec<(String, String)> = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, String>()? {
                    if !seen.insert(k.clone()) {
                        return Err(A::Error::custom(format!(
                            "__metadata__ key {k:?} appears twice"
                        )));
                    }
                    out.push((k, v));
                }
                Ok(UniqueStrings(out))
            }
        }
        d.deserialize_map(Visit)
    }
}

#[derive(serde::Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

fn parse_entry(path: &Path, name: String, raw: RawEntry) -> Result<(TensorMeta, Range<usize>)> {
    let dtype = dtype_from_str(&raw.dtype).ok_or_else(|| {
        Error::bad_input(
            path,
            format!(
                "tensor {name}: dtype {} is not supported (supported: F64, F32, F16, BF16, \
                 I64, I32, I16, I8, U64, U32, U16, U8, BOOL); convert it before averaging",
                raw.dtype
            ),
        )
    })?;
    let (begin, end) = raw.data_offsets;
    let numel = raw.shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    let nbytes = numel.and_then(|n| n.checked_mul(dtype.size()));
    if begin > end || Some(end - begin) != nbytes {
        return Err(Error::bad_input(
            path,
            format!(
                "tensor {name}: header says bytes {begin}..{end} but {dtype:?} × {:?} needs \
                 {} bytes: the header lies about sizes (corrupt file)",
                raw.shape,
                nbytes.map_or("an overflowing number of".to_string(), |n| n.to_string())
            ),
        ));
    }
    Ok((TensorMeta { name, dtype, shape: raw.shape }, begin..end))
}

/// As the safetensors library requires: in file order, each tensor starts exactly where the
/// previous one ended (the first at 0) — no overlap, no gap — and the last ends at the end of
/// the file.
fn check_layout(
    path: &Path,
    tensors: &mut [(TensorMeta, Range<usize>)],
    data_len: u64,
) -> Result<()> {
    tensors.sort_by_key(|(_, r)| (r.start, r.end));
    let mut prev: Option<&str> = None;
    let mut end = 0usize;
    for (meta, r) in tensors.iter() {
        if r.start != end {
            let what = if r.start < end { "overlaps" } else { "leaves a gap after" };
            let other = prev.map_or("the start of the data".to_string(), |p| format!("tensor {p}"));
            return Err(Error::bad_input(
                path,
                format!(
                    "tensor {} (data bytes {}..{}) {what} {other} (ending at {end}): corrupt \
                     header",
                    meta.name, r.start, r.end
                ),
            ));
        }
        prev = Some(&meta.name);
        end = r.end;
    }
    if end as u64 != data_len {
        let what = if end as u64 > data_len { "truncated" } else { "has trailing bytes" };
        return Err(Error::bad_input(
            path,
            format!(
                "file is {what}: the header's tensors end at data byte {end} but the file has \
                 {data_len} data bytes"
            ),
        ));
    }
    tensors.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    Ok(())
}

fn dtype_from_str(s: &str) -> Option<DType> {
    Some(match s {
        "BOOL" => DType::Bool,
        "U8" => DType::U8,
        "I8" => DType::I8,
        "I16" => DType::I16,
        "U16" => DType::U16,
        "I32" => DType::I32,
        "U32" => DType::U32,
        "I64" => DType::I64,
        "U64" => DType::U64,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F32" => DType::F32,
        "F64" => DType::F64,
        _ => return None,
    })
}

/// Length-and-header check of an opened file, without holding it (used by `quick_check`).
pub(crate) fn quick_check(path: &Path, file: File) -> Result<()> {
    read_header(path, &file).map(|_| ())
}

/// Read a small JSON file (index, trainer_state), opened by `files`, with a size cap.
pub(crate) fn read_small_json(path: &Path, file: File) -> Result<serde_json::Value> {
    let text = crate::files::read_capped(path, file, MAX_HEADER)?;
    serde_json::from_slice(&text)
        .map_err(|e| Error::bad_input(path, format!("not valid JSON ({e}): truncated or corrupt")))
}

/// A file that is neither a shard index nor a torch file is read as safetensors (whose first
/// bytes are its header's length, no magic); its header decides.
pub(crate) const FORMAT: FormatSpec =
    FormatSpec { detect: claim, weight_file: no_weight_file, endings: &[".safetensors"] };

fn claim(probe: &Probe<'_>) -> Claim {
    let Some((file, _)) = probe.file()? else { return Ok(None) };
    let path = probe.path.to_path_buf();
    Ok(Some(Box::new(FoundFile { path, file, check: quick_check, open })))
}
