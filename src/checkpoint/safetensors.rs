//! safetensors files: parse and validate the header with plain reads, then hold the file open
//! so tensor bytes are read on demand (`pinned`). Checks: header length sane,
//! header is JSON, dtypes supported, each tensor's byte range matches dtype × shape, ranges do
//! not overlap and end exactly at the end of the file. Sharding and directories live elsewhere.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::InputIo;
use super::pinned::PinnedFile;
use super::{DType, TensorMeta};
use crate::error::{Error, Result};

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

/// Open and validate one safetensors file.
pub(crate) fn open(path: &Path) -> Result<SafetensorsFile> {
    let file = File::open(path).input(path)?;
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
        return Err(Error::bad_input(
            path,
            format!(
                "safetensors header length {header_len} does not fit in the file ({file_len} \
                 bytes): truncated or not safetensors"
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
    let raw: BTreeMap<String, serde_json::Value> = serde_json::from_slice(json).map_err(|e| {
        Error::bad_input(
            path,
            format!("safetensors header is not valid JSON ({e}): corrupt or zero-filled"),
        )
    })?;
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::new();
    for (name, value) in raw {
        if name == "__metadata__" {
            metadata = parse_metadata(path, value)?;
            continue;
        }
        let (meta, rel) = parse_entry(path, name, value)?;
        tensors.push((meta, rel));
    }
    check_layout(path, &mut tensors, file_len - data_start)?;
    let tensors = tensors
        .into_iter()
        .map(|(m, r)| {
            let start = data_start as usize + r.start;
            (m, start..data_start as usize + r.end)
        })
        .collect();
    Ok(Header { tensors, metadata })
}

fn parse_metadata(path: &Path, value: serde_json::Value) -> Result<BTreeMap<String, String>> {
    serde_json::from_value(value).map_err(|e| {
        Error::bad_input(path, format!("safetensors __metadata__ must map strings to strings: {e}"))
    })
}

#[derive(serde::Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

fn parse_entry(
    path: &Path,
    name: String,
    value: serde_json::Value,
) -> Result<(TensorMeta, Range<usize>)> {
    let raw: RawEntry = serde_json::from_value(value)
        .map_err(|e| Error::bad_input(path, format!("tensor {name}: bad header entry: {e}")))?;
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

/// Ranges must not overlap and must cover the data region up to its exact end.
fn check_layout(
    path: &Path,
    tensors: &mut [(TensorMeta, Range<usize>)],
    data_len: u64,
) -> Result<()> {
    tensors.sort_by_key(|(_, r)| (r.start, r.end));
    let mut prev: Option<(&str, usize)> = None;
    for (meta, r) in tensors.iter() {
        if let Some((pname, pend)) = prev
            && r.start < pend
        {
            return Err(Error::bad_input(
                path,
                format!("tensors {pname} and {} overlap in the file (corrupt header)", meta.name),
            ));
        }
        prev = Some((&meta.name, r.end));
    }
    let end = tensors.iter().map(|(_, r)| r.end as u64).max().unwrap_or(0);
    if end != data_len {
        let what = if end > data_len { "truncated" } else { "has trailing bytes" };
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

/// Length-and-header check of a file by path, without holding it (used by `quick_check`).
pub(crate) fn check_file(path: &Path) -> Result<()> {
    let file = File::open(path).input(path)?;
    read_header(path, &file).map(|_| ())
}

/// Read a small JSON file (index, trainer_state) with a size cap.
pub(crate) fn read_small_json(path: &Path) -> Result<serde_json::Value> {
    let mut text = Vec::new();
    File::open(path).input(path)?.take(MAX_HEADER).read_to_end(&mut text).input(path)?;
    serde_json::from_slice(&text)
        .map_err(|e| Error::bad_input(path, format!("not valid JSON ({e}): truncated or corrupt")))
}
