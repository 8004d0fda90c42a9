//! torch zip pickles (`torch.save`: `.pt`, `.pth`, `.bin`) and Lightning `.ckpt` files. The
//! pickle is decoded by our own `unpickle` into plain values — no Python code runs, so
//! untrusted files are safe — and we walk those values to index each tensor's
//! storage entry, dtype, offset, shape and strides (with errors naming the tensor). Tensor
//! bytes are read on demand from the zip with positioned reads on the file opened at open
//! time (never mapped: torch.save rewrites files in place). Legacy (non-zip) files are refused.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::identity::Identity;
use super::unpickle::{self, Id, Pickle, Value};
use super::{DType, Format, InputIo, Loaded, Storage, TensorMeta};
use crate::error::{Error, Result};

const RESAVE: &str = "re-save it with torch.save(obj, path, _use_new_zipfile_serialization=True) \
                      or convert it to safetensors";

pub(crate) fn has_torch_extension(name: &str) -> bool {
    [".pt", ".pth", ".bin", ".ckpt"].iter().any(|e| name.ends_with(e))
}

pub(crate) fn legacy_error(path: &Path) -> Error {
    Error::bad_input(
        path,
        format!("legacy (non-zip) torch serialization is not supported: {RESAVE}"),
    )
}

pub(crate) fn not_zip_error(path: &Path) -> Error {
    Error::bad_input(
        path,
        "not a torch zip file (no zip header): zero-filled, truncated or not written by \
         torch.save",
    )
}

/// Where one tensor's elements live: a stored zip entry plus a strided view into it.
struct PickleTensor {
    /// Absolute file offset of the storage entry's bytes.
    data_start: u64,
    dtype: DType,
    /// View, in elements: offset into the storage and strides per dimension.
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// An open torch zip file and the index of its state-dict tensors.
pub(crate) struct PickleStore {
    path: PathBuf,
    file: File,
    identity: Identity,
    tensors: HashMap<String, PickleTensor>,
}

impl PickleStore {
    pub fn still_valid(&self) -> bool {
        self.file.metadata().map(|m| Identity::from_metadata(&m) == self.identity).unwrap_or(false)
    }

    /// The tensor's bytes in row-major order (strided views are made contiguous).
    pub fn read(&self, key: &str, meta: &TensorMeta) -> Result<Vec<u8>> {
        let t = self
            .tensors
            .get(key)
            .ok_or_else(|| Error::bad_input(&self.path, format!("no tensor named {key}")))?;
        let es = t.dtype.size();
        let numel = meta.numel();
        if numel == 0 {
            return Ok(Vec::new());
        }
        let span = view_span(&t.shape, &t.stride);
        let mut raw = vec![0u8; span * es];
        let at = t.data_start + (t.offset * es) as u64;
        self.file.read_exact_at(&mut raw, at).input(&self.path)?;
        if is_contiguous(&t.shape, &t.stride) {
            raw.truncate(numel * es);
            return Ok(raw);
        }
        Ok(gather(&raw, &t.shape, &t.stride, es))
    }
}

/// Elements from the view's first to its last element, inclusive.
fn view_span(shape: &[usize], stride: &[usize]) -> usize {
    1 + shape.iter().zip(stride).map(|(&d, &s)| (d.saturating_sub(1)) * s).sum::<usize>()
}

fn is_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    let mut expect = 1;
    for (&d, &s) in shape.iter().zip(stride).rev() {
        if d != 1 && s != expect {
            return false;
        }
        expect *= d;
    }
    true
}

/// Copy a strided view (transposes, slices) into row-major order.
fn gather(raw: &[u8], shape: &[usize], stride: &[usize], es: usize) -> Vec<u8> {
    let numel: usize = shape.iter().product();
    let mut out = Vec::with_capacity(numel * es);
    let mut idx = vec![0usize; shape.len()];
    for _ in 0..numel {
        let pos: usize = idx.iter().zip(stride).map(|(i, s)| i * s).sum();
        out.extend_from_slice(&raw[pos * es..(pos + 1) * es]);
        for d in (0..shape.len()).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

/// Cheap completeness check: the zip's central directory (end record) is present and the
/// archive holds a `data.pkl`. A half-written torch.save file has no end record.
pub(crate) fn check_zip(path: &Path) -> Result<()> {
    let file = File::open(path).input(path)?;
    let zip = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| zip_error(path, e))?;
    find_pickle(path, &zip).map(|_| ())
}

fn zip_error(path: &Path, e: zip::result::ZipError) -> Error {
    Error::bad_input(
        path,
        format!(
            "incomplete or corrupt torch zip ({e}): still being written by torch.save, or \
             truncated"
        ),
    )
}

/// Name of the `…/data.pkl` entry.
fn find_pickle<R: Read + std::io::Seek>(path: &Path, zip: &zip::ZipArchive<R>) -> Result<String> {
    zip.file_names()
        .filter_map(|n| n.ok())
        .find(|n| n.as_ref() == "data.pkl" || n.ends_with("/data.pkl"))
        .map(|n| n.into_owned())
        .ok_or_else(|| Error::bad_input(path, "zip file has no data.pkl: not a torch.save file"))
}

/// Open a torch zip pickle and index the tensors of its state dict.
pub(crate) fn open(path: &Path) -> Result<Loaded> {
    let file = File::open(path).input(path)?;
    let identity = Identity::from_metadata(&file.metadata().input(path)?);
    let mut zip = zip::ZipArchive::new(BufReader::new(file.try_clone().input(path)?))
        .map_err(|e| zip_error(path, e))?;
    let pkl = find_pickle(path, &zip)?;
    let prefix = pkl.strip_suffix("data.pkl").unwrap_or_default().to_string();
    check_byteorder(path, &mut zip, &prefix)?;
    let pk = decode_pickle(path, &mut zip, &pkl)?;
    let (dict, format, metadata) = state_dict(path, &pk)?;
    let entries = entry_offsets(path, &mut zip, &prefix)?;
    let mut metas = Vec::new();
    let mut tensors = HashMap::new();
    for (key, value) in dict {
        let Some(name) = pk.str(key) else { continue };
        let name = name.to_string();
        let Some(raw) = tensor_of(path, &pk, &name, value)? else { continue };
        let t = locate(path, &name, raw, &entries)?;
        metas.push(TensorMeta { name: name.clone(), dtype: t.dtype, shape: t.shape.clone() });
        tensors.insert(name, t);
    }
    if metas.is_empty() {
        return Err(Error::bad_input(
            path,
            format!(
                "no tensors found: expected a state dict at the top level or under one of \
                 {NESTED_KEYS:?}"
            ),
        ));
    }
    let step = metadata.get("global_step").and_then(|s| s.parse().ok());
    Ok(Loaded {
        format,
        tensors: metas,
        storage: Storage::Pickle(PickleStore { path: path.to_path_buf(), file, identity, tensors }),
        metadata,
        step,
        side_dir: None,
    })
}

type Zip = zip::ZipArchive<BufReader<File>>;

fn read_entry(path: &Path, zip: &mut Zip, name: &str) -> Result<Vec<u8>> {
    let mut entry = zip.by_name(name).map_err(|e| zip_error(path, e))?;
    let mut buf = Vec::new();
    entry.read_to_end(&mut buf).input(path)?;
    Ok(buf)
}

fn check_byteorder(path: &Path, zip: &mut Zip, prefix: &str) -> Result<()> {
    let name = format!("{prefix}byteorder");
    if zip.index_for_name(&name).is_none() {
        return Ok(()); // older torch versions wrote no byteorder record: little-endian
    }
    let order = read_entry(path, zip, &name)?;
    if order.trim_ascii() != b"little" {
        return Err(Error::bad_input(
            path,
            "big-endian torch file: re-save it on a little-endian machine",
        ));
    }
    Ok(())
}

fn decode_pickle(path: &Path, zip: &mut Zip, pkl: &str) -> Result<Pickle> {
    let bytes = read_entry(path, zip, pkl)?;
    unpickle::load(&bytes).map_err(|e| {
        Error::bad_input(path, format!("cannot decode the pickle in {pkl}: {e}; {RESAVE}"))
    })
}

/// Keys under which checkpoints nest their state dict, in order of preference (Lightning and
/// most training loops: `state_dict`; DeepSpeed: `module`).
const NESTED_KEYS: &[&str] = &["state_dict", "model_state_dict", "model", "module"];

type Items = Vec<(Id, Id)>;

/// The dict of tensors: the top-level dict, or a nested state dict (see `NESTED_KEYS`).
/// Also returns the top level's scalar entries (`epoch`, `global_step`, ...) as metadata.
fn state_dict(path: &Path, pk: &Pickle) -> Result<(Items, Format, BTreeMap<String, String>)> {
    let items = pk.dict_items(pk.root).ok_or_else(|| {
        Error::bad_input(
            path,
            "the pickle's top-level object is not a dict of tensors (a pickled nn.Module or \
             TorchScript archive?): save model.state_dict() instead",
        )
    })?;
    let mut nested: BTreeMap<usize, Id> = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    let mut lightning = path.extension().is_some_and(|e| e == "ckpt");
    for &(k, v) in items {
        let Some(key) = pk.str(k) else { continue };
        match NESTED_KEYS.iter().position(|n| *n == key) {
            Some(rank) if pk.dict_items(v).is_some() => {
                nested.insert(rank, v);
            }
            _ => {
                lightning |= key == "pytorch-lightning_version";
                if let Some(text) = scalar_text(pk.get(v)) {
                    metadata.insert(key.to_string(), text);
                }
            }
        }
    }
    match nested.into_values().next() {
        Some(d) => {
            let format = if lightning { Format::Lightning } else { Format::TorchZip };
            Ok((pk.dict_items(d).unwrap_or_default().to_vec(), format, metadata))
        }
        None => Ok((items.to_vec(), Format::TorchZip, BTreeMap::new())),
    }
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::Int(i) => Some(i.to_string()),
        Value::Float(f) => Some(f.to_string()),
        Value::Str(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The tensor a state-dict value describes, or `None` for values that are not tensors
/// (`_metadata`, extra state). Errors for tensor kinds we cannot read.
fn tensor_of(path: &Path, pk: &Pickle, name: &str, value: Id) -> Result<Option<RawTensor>> {
    match pk.get(value) {
        Value::Call { func, args, .. } => rebuild(path, pk, name, *func, *args),
        _ => Ok(None),
    }
}

/// Interpret `func(*args)` when `func` is one of torch's tensor rebuild functions, unwrapping
/// parameters and tensor subclasses down to `_rebuild_tensor_v2(storage, offset, size, stride)`.
fn rebuild(path: &Path, pk: &Pickle, name: &str, func: Id, args: Id) -> Result<Option<RawTensor>> {
    let Some((module, fname)) = pk.global(func) else { return Ok(None) };
    let bad = |what: String| Error::bad_input(path, format!("tensor {name}: {what}"));
    let a = pk.tuple(args).unwrap_or_default();
    match (module, fname) {
        ("torch._utils", "_rebuild_tensor_v2") => parse_rebuild(pk, a).map(Some).map_err(bad),
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => match a {
            [data, ..] => tensor_of(path, pk, name, *data),
            _ => Err(bad("malformed parameter".into())),
        },
        // (function, type, args, state): the tensor is `function(*args)`.
        ("torch._tensor", "_rebuild_from_type_v2") => match a {
            [f, _ty, inner, ..] => rebuild(path, pk, name, *f, *inner),
            _ => Err(bad("malformed tensor subclass".into())),
        },
        ("torch._utils", other) if other.starts_with("_rebuild") => Err(bad(format!(
            "{other} tensors (quantized, sparse, meta or device-specific) are not supported; \
             save a dense CPU state_dict"
        ))),
        _ => Ok(None),
    }
}

/// A tensor as the pickle describes it, before its storage is located in the zip.
struct RawTensor {
    storage_class: String,
    key: String,
    numel: usize,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

fn parse_rebuild(pk: &Pickle, a: &[Id]) -> std::result::Result<RawTensor, String> {
    let [storage, offset, size, stride, ..] = a else {
        return Err("malformed _rebuild_tensor_v2 arguments".into());
    };
    let Value::Persistent(pid) = pk.get(*storage) else {
        return Err("storage is not a persistent id".into());
    };
    let (class, key, numel) = match pk.tuple(*pid).unwrap_or_default() {
        [kind, cls, key, _location, numel] if pk.str(*kind) == Some("storage") => (
            pk.global(*cls).map(|(_, n)| n.to_string()).ok_or("storage type is not a class")?,
            pk.str(*key).ok_or("storage key is not a string")?.to_string(),
            pk.usize(*numel).ok_or("storage size is not an integer")?,
        ),
        _ => return Err("unrecognised storage id".into()),
    };
    Ok(RawTensor {
        storage_class: class,
        key,
        numel,
        offset: pk.usize(*offset).ok_or("storage offset is not an integer")?,
        shape: usizes(pk, *size)?,
        stride: usizes(pk, *stride)?,
    })
}

fn usizes(pk: &Pickle, id: Id) -> std::result::Result<Vec<usize>, String> {
    let items = pk.tuple(id).ok_or("expected a tuple of sizes")?;
    items
        .iter()
        .map(|&i| pk.usize(i).ok_or_else(|| "expected a non-negative size".to_string()))
        .collect()
}

fn dtype_of_storage(class: &str) -> Option<DType> {
    Some(match class {
        "FloatStorage" => DType::F32,
        "DoubleStorage" => DType::F64,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "LongStorage" => DType::I64,
        "IntStorage" => DType::I32,
        "ShortStorage" => DType::I16,
        "CharStorage" => DType::I8,
        "ByteStorage" => DType::U8,
        "BoolStorage" => DType::Bool,
        _ => return None,
    })
}

/// Zip entry name → (absolute data offset, stored length), for uncompressed entries;
/// compressed entries map to `None` (torch never compresses; a re-zipped file might).
fn entry_offsets(
    path: &Path,
    zip: &mut Zip,
    prefix: &str,
) -> Result<HashMap<String, Option<(u64, u64)>>> {
    let mut out = HashMap::new();
    for i in 0..zip.len() {
        let entry = zip.by_index_raw(i).map_err(|e| zip_error(path, e))?;
        let name = entry.name().map_err(|e| zip_error(path, e))?;
        let Some(key) = name.strip_prefix(prefix).and_then(|n| n.strip_prefix("data/")) else {
            continue;
        };
        let key = key.to_string();
        let stored = entry.compression() == zip::CompressionMethod::Stored;
        let loc = entry.data_start().filter(|_| stored).map(|s| (s, entry.size()));
        out.insert(key, loc);
    }
    Ok(out)
}

/// Resolve a tensor's storage in the zip and check its view stays inside the storage.
fn locate(
    path: &Path,
    name: &str,
    raw: RawTensor,
    entries: &HashMap<String, Option<(u64, u64)>>,
) -> Result<PickleTensor> {
    let bad = |what: String| Error::bad_input(path, format!("tensor {name}: {what}"));
    let dtype = dtype_of_storage(&raw.storage_class).ok_or_else(|| {
        bad(format!(
            "storage type {} is not supported (supported: Float, Double, Half, BFloat16, Long, \
             Int, Short, Char, Byte, Bool); convert the tensor (e.g. .float()) before saving",
            raw.storage_class
        ))
    })?;
    if raw.shape.len() != raw.stride.len() {
        return Err(bad("shape and stride lengths differ".into()));
    }
    let (data_start, storage_len) = match entries.get(&raw.key) {
        None => return Err(bad(format!("storage data/{} is missing from the zip", raw.key))),
        Some(None) => return Err(bad(format!("storage data/{} is compressed; {RESAVE}", raw.key))),
        Some(Some(loc)) => *loc,
    };
    let numel: usize = raw.shape.iter().product();
    let end = raw.offset + view_span(&raw.shape, &raw.stride);
    let need = end as u64 * dtype.size() as u64;
    if numel > 0 && (end > raw.numel || need > storage_len) {
        return Err(bad(format!(
            "view (offset {}, shape {:?}, stride {:?}) reaches past its storage of {} bytes",
            raw.offset, raw.shape, raw.stride, storage_len
        )));
    }
    Ok(PickleTensor { data_start, dtype, offset: raw.offset, shape: raw.shape, stride: raw.stride })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_transposes() {
        // storage [0,1,2,3,4,5] as 3x2, viewed transposed: shape [2,3], stride [1,2]
        let raw: Vec<u8> = (0u8..6).collect();
        assert_eq!(gather(&raw, &[2, 3], &[1, 2], 1), vec![0, 2, 4, 1, 3, 5]);
        assert!(!is_contiguous(&[2, 3], &[1, 2]));
        assert!(is_contiguous(&[2, 3], &[3, 1]));
        assert!(is_contiguous(&[], &[]));
        assert_eq!(view_span(&[2, 3], &[1, 2]), 6);
    }
}
