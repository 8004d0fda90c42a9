//! torch zip pickles (`torch.save`: `.pt`, `.pth`, `.bin`) and Lightning `.ckpt` files. The
//! pickle is decoded by `candle_core::pickle` into plain objects — no Python code runs, so
//! untrusted files are safe — and we walk those objects ourselves to index each tensor's
//! storage entry, dtype, offset, shape and strides (with errors naming the tensor). Tensor
//! bytes are read on demand from the zip with positioned reads on the file opened at open
//! time (never mapped: torch.save rewrites files in place). Legacy (non-zip) files are refused.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use candle_core::pickle::{Object, Stack};

use super::identity::Identity;
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
    let root = decode_pickle(path, &mut zip, &pkl)?;
    let (dict, format, metadata) = state_dict(path, root)?;
    let entries = entry_offsets(path, &mut zip, &prefix)?;
    let mut metas = Vec::new();
    let mut tensors = HashMap::new();
    for (key, value) in dict {
        let Object::Unicode(name) = key else { continue };
        let Some(raw) = rebuild_args(path, &name, value)? else { continue };
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

fn decode_pickle(path: &Path, zip: &mut Zip, pkl: &str) -> Result<Object> {
    let bytes = read_entry(path, zip, pkl)?;
    let mut stack = Stack::empty();
    let mut cursor = std::io::Cursor::new(bytes);
    stack.read_loop(&mut cursor).and_then(|_| stack.finalize()).map_err(|e| {
        Error::bad_input(path, format!("cannot decode the pickle in {pkl}: {e}; {RESAVE}"))
    })
}

/// Keys under which checkpoints nest their state dict, in order of preference (Lightning and
/// most training loops: `state_dict`; DeepSpeed: `module`).
const NESTED_KEYS: &[&str] = &["state_dict", "model_state_dict", "model", "module"];

type Items = Vec<(Object, Object)>;

/// The dict of tensors: the top-level dict, or a nested state dict (see `NESTED_KEYS`).
/// Also returns the top level's scalar entries (`epoch`, `global_step`, ...) as metadata.
fn state_dict(path: &Path, root: Object) -> Result<(Items, Format, BTreeMap<String, String>)> {
    let Object::Dict(items) = root else {
        return Err(Error::bad_input(
            path,
            "the pickle's top-level object is not a dict of tensors (a pickled nn.Module or \
             TorchScript archive?): save model.state_dict() instead",
        ));
    };
    let mut nested: BTreeMap<usize, Items> = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    let mut lightning = path.extension().is_some_and(|e| e == "ckpt");
    let mut rest = Vec::new();
    for (k, v) in items {
        let Object::Unicode(key) = &k else {
            rest.push((k, v));
            continue;
        };
        let key = key.clone();
        match (NESTED_KEYS.iter().position(|n| *n == key), v) {
            (Some(rank), Object::Dict(d)) => {
                nested.insert(rank, d);
            }
            (_, v) => {
                lightning |= key == "pytorch-lightning_version";
                if let Some(text) = scalar_text(&v) {
                    metadata.insert(key, text);
                }
                rest.push((k, v));
            }
        }
    }
    match nested.into_iter().next() {
        Some((_, d)) => {
            let format = if lightning { Format::Lightning } else { Format::TorchZip };
            Ok((d, format, metadata))
        }
        None => Ok((rest, Format::TorchZip, BTreeMap::new())),
    }
}

fn scalar_text(v: &Object) -> Option<String> {
    match v {
        Object::Int(i) => Some(i.to_string()),
        Object::Long(i) => Some(i.to_string()),
        Object::Float(f) => Some(f.to_string()),
        Object::Unicode(s) => Some(s.clone()),
        Object::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// `_rebuild_tensor_v2(storage, offset, size, stride, ...)` arguments of a tensor value,
/// unwrapping parameters; `None` for values that are not tensors (`_metadata`, extra state).
fn rebuild_args(path: &Path, name: &str, value: Object) -> Result<Option<RawTensor>> {
    let Object::Reduce { callable, args } = value else { return Ok(None) };
    let Object::Class { module_name, class_name } = *callable else { return Ok(None) };
    let bad = |what: String| Error::bad_input(path, format!("tensor {name}: {what}"));
    match (module_name.as_str(), class_name.as_str()) {
        ("torch._utils", "_rebuild_tensor_v2") => parse_rebuild(*args).map(Some).map_err(bad),
        ("torch._utils", "_rebuild_parameter")
        | ("torch._utils", "_rebuild_parameter_with_state") => {
            let Object::Tuple(mut a) = *args else { return Err(bad("malformed parameter".into())) };
            if a.is_empty() {
                return Err(bad("malformed parameter".into()));
            }
            rebuild_args(path, name, a.remove(0))
        }
        ("torch._tensor", "_rebuild_from_type_v2") => {
            let Object::Tuple(mut a) = *args else { return Err(bad("malformed tensor".into())) };
            if a.len() < 3 {
                return Err(bad("malformed tensor subclass".into()));
            }
            // (function, type, args, state): rebuild with `function(*args)`.
            let func = a.remove(0);
            let func_args = a.remove(1);
            let inner = Object::Reduce { callable: Box::new(func), args: Box::new(func_args) };
            rebuild_args(path, name, inner)
        }
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

fn parse_rebuild(args: Object) -> std::result::Result<RawTensor, String> {
    let Object::Tuple(a) = args else {
        return Err("malformed _rebuild_tensor_v2 arguments".into());
    };
    if a.len() < 4 {
        return Err("malformed _rebuild_tensor_v2 arguments".into());
    }
    let Object::PersistentLoad(pid) = &a[0] else {
        return Err("storage is not a persistent id".into());
    };
    let Object::Tuple(pid) = pid.as_ref() else { return Err("malformed storage id".into()) };
    let (class, key, numel) = match pid.as_slice() {
        [
            Object::Unicode(kind),
            Object::Class { class_name, .. },
            Object::Unicode(key),
            _loc,
            n,
        ] if kind == "storage" => (class_name.clone(), key.clone(), as_usize(n)?),
        _ => return Err(format!("unrecognised storage id {pid:?}")),
    };
    Ok(RawTensor {
        storage_class: class,
        key,
        numel,
        offset: as_usize(&a[1])?,
        shape: as_usizes(&a[2])?,
        stride: as_usizes(&a[3])?,
    })
}

fn as_usize(o: &Object) -> std::result::Result<usize, String> {
    match o {
        Object::Int(i) if *i >= 0 => Ok(*i as usize),
        Object::Long(i) if *i >= 0 => Ok(*i as usize),
        other => Err(format!("expected a non-negative integer, found {other:?}")),
    }
}

fn as_usizes(o: &Object) -> std::result::Result<Vec<usize>, String> {
    match o {
        Object::Tuple(v) | Object::List(v) => v.iter().map(as_usize).collect(),
        other => Err(format!("expected a tuple of sizes, found {other:?}")),
    }
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
