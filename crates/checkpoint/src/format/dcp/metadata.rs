//! A DCP directory's `.metadata`, decoded without running anything: the pickle of
//! `Metadata(state_dict_metadata, planner_data, storage_data, storage_meta, version)` that
//! `FileSystemWriter.finish` writes. Only the classes such a file holds are accepted (see
//! [`ALLOWED`]); any other class is an error naming it, before anything is interpreted. What
//! comes out is plain data: each tensor's dtype, size and chunks with the storage entry
//! (`relative_path`, `offset`, `length`) of each chunk. Pure interpretation of bytes: files
//! are opened and checked in `dcp` (`mod.rs`) and read in `store`.

use std::collections::HashMap;
use std::path::Path;

use crate::DType;
use crate::error::{Error, Result};
use crate::strided::numel;
use crate::unpickle::{self, Id, Pickle, Value};

const METADATA: &str = "torch.distributed.checkpoint.metadata";
/// Where torch < 2.4 kept `TensorProperties` (and its memory-format enum).
const OLD_PROPERTIES: &str = "torch.distributed._shard.sharded_tensor.metadata";
const FILESYSTEM: &str = "torch.distributed.checkpoint.filesystem";
/// megatron-core's `torch_dist` keeps every rank's `SavePlan` in `Metadata.all_local_plans`
/// (to reuse the plan on the next save); sewa decodes none of it.
const PLANNER: &str = "torch.distributed.checkpoint.planner";
const PATHS: &[&str] = &["PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"];

/// dtype names as torch pickles them (`torch.float32` → `torch float32`); the first ones
/// map to sewa's dtypes, the rest are real dtypes sewa does not average.
const DTYPES: &[(&str, Option<DType>)] = &[
    ("float32", Some(DType::F32)),
    ("float64", Some(DType::F64)),
    ("float16", Some(DType::F16)),
    ("bfloat16", Some(DType::BF16)),
    ("int64", Some(DType::I64)),
    ("int32", Some(DType::I32)),
    ("int16", Some(DType::I16)),
    ("int8", Some(DType::I8)),
    ("uint8", Some(DType::U8)),
    ("uint16", Some(DType::U16)),
    ("uint32", Some(DType::U32)),
    ("uint64", Some(DType::U64)),
    ("bool", Some(DType::Bool)),
    ("complex32", None),
    ("complex64", None),
    ("complex128", None),
    ("float8_e4m3fn", None),
    ("float8_e5m2", None),
    ("float8_e4m3fnuz", None),
    ("float8_e5m2fnuz", None),
    ("float8_e8m0fnu", None),
    ("float4_e2m1fn_x2", None),
    ("qint8", None),
    ("quint8", None),
    ("qint32", None),
];

/// The other `torch.*` globals a `.metadata` holds: `Size`, layouts, memory formats.
const TORCH: &[&str] = &[
    "Size",
    "strided",
    "sparse_coo",
    "sparse_csr",
    "contiguous_format",
    "channels_last",
    "channels_last_3d",
    "preserve_format",
];

/// Is `module.name` a class or function a DCP `.metadata` may reference? Nothing is ever
/// called or imported; this keeps files that are not DCP metadata (or hide other objects in
/// it) from being read as if they were.
fn allowed(module: &str, name: &str) -> bool {
    match module {
        METADATA => matches!(
            name,
            "Metadata"
                | "TensorStorageMetadata"
                | "BytesStorageMetadata"
                | "ChunkStorageMetadata"
                | "MetadataIndex"
                | "TensorProperties"
                | "StorageMeta"
                | "_MEM_FORMAT_ENCODING"
        ),
        OLD_PROPERTIES => matches!(name, "TensorProperties" | "MEM_FORMAT_ENCODING"),
        FILESYSTEM => name == "_StorageInfo",
        PLANNER => matches!(name, "SavePlan" | "WriteItem" | "WriteItemType" | "TensorWriteData"),
        "torch" => TORCH.contains(&name) || DTYPES.iter().any(|(d, _)| *d == name),
        // `torch.serialization._get_layout("torch.strided")`: how layouts are pickled.
        "torch.serialization" => name == "_get_layout",
        "collections" => name == "OrderedDict",
        // `StorageMeta.checkpoint_id` (Python < 3.13 and ≥ 3.13 module names).
        "pathlib" | "pathlib._local" => PATHS.contains(&name),
        _ => false,
    }
}

/// See the module header: the classes a real `.metadata` holds.
pub(crate) const ALLOWED: &str = "torch.distributed.checkpoint.metadata.*, \
    torch.distributed.checkpoint.filesystem._StorageInfo, \
    torch.distributed.checkpoint.planner's SavePlan, WriteItem, WriteItemType, TensorWriteData \
    (megatron-core's all_local_plans), \
    torch.distributed._shard.sharded_tensor.metadata.TensorProperties, torch.Size, torch \
    dtypes, layouts and memory formats, collections.OrderedDict, pathlib paths";

/// One tensor of the checkpoint, as `.metadata` describes it.
pub(crate) struct TensorItem {
    pub fqn: String,
    /// The dtype, or the name of one sewa does not read.
    pub dtype: std::result::Result<DType, String>,
    pub size: Vec<usize>,
    pub chunks: Vec<Chunk>,
    /// The top-level key of the state dict it came from (`planner_data`'s first path
    /// component, else the FQN up to its first dot).
    pub top: String,
}

/// A box of a tensor (`offsets`, `sizes` per dimension) and where its bytes are stored.
pub(crate) struct Chunk {
    pub offsets: Vec<usize>,
    pub sizes: Vec<usize>,
    pub storage: StorageInfo,
}

/// `_StorageInfo`: a byte range of a file beside `.metadata`.
#[derive(Clone)]
pub(crate) struct StorageInfo {
    pub relative_path: String,
    pub offset: u64,
    pub length: u64,
    pub transforms: Vec<String>,
}

/// The decoded `.metadata`.
pub(crate) struct Metadata {
    pub tensors: Vec<TensorItem>,
    /// Non-tensor items (`BytesStorageMetadata`: optimizer steps, dataloader state), by FQN.
    pub bytes: Vec<String>,
    /// Every storage entry, tensor chunks and byte items alike (what the directory must hold).
    pub storage: Vec<StorageInfo>,
    pub version: Option<String>,
}

/// Decode `.metadata` (its bytes; `path` names it in errors).
pub(crate) fn decode(path: &Path, bytes: &[u8]) -> Result<Metadata> {
    let bad = |msg: String| Error::bad_input(path, msg);
    let pk = unpickle::load(bytes).map_err(|e| bad(format!("cannot decode the pickle: {e}")))?;
    if let Some((m, n)) = pk.globals().find(|(m, n)| !allowed(m, n)) {
        return Err(bad(format!(
            "references {m}.{n}, which is not a class of torch.distributed.checkpoint \
             metadata (allowed: {ALLOWED}); not a DCP checkpoint, or written by a version \
             sewa does not know"
        )));
    }
    let d = Decoder { pk: &pk, chunks: std::cell::Cell::new(bytes.len() / MIN_CHUNK_BYTES) };
    let root = d.object(pk.root, "Metadata").ok_or_else(|| {
        bad("the pickle is not a torch.distributed.checkpoint Metadata object".into())
    })?;
    let entries = d.storage_data(d.field(root, "storage_data")).map_err(&bad)?;
    let planner = d.planner(d.field(root, "planner_data"));
    let sdm = d.field(root, "state_dict_metadata").and_then(|v| pk.dict_items(v));
    let sdm = sdm.ok_or_else(|| bad("Metadata has no state_dict_metadata dict".into()))?;
    let mut md = Metadata {
        tensors: Vec::new(),
        bytes: Vec::new(),
        storage: entries.values().cloned().collect(),
        version: d.field(root, "version").and_then(|v| pk.str(v)).map(str::to_string),
    };
    for &(k, v) in sdm {
        let fqn =
            pk.str(k).ok_or_else(|| bad("a state_dict_metadata key is not a string".into()))?;
        if d.object(v, "BytesStorageMetadata").is_some() {
            md.bytes.push(fqn.to_string());
            continue;
        }
        let top = planner.get(fqn).cloned();
        let top = top.unwrap_or_else(|| fqn.split('.').next().unwrap_or(fqn).to_string());
        let item = d.tensor(fqn, v, top, &entries).map_err(|e| bad(format!("{fqn}: {e}")))?;
        md.tensors.push(item);
    }
    Ok(md)
}

type Entries = HashMap<(String, Option<Vec<usize>>), StorageInfo>;
type Res<T> = std::result::Result<T, String>;

/// Fewer pickle bytes than any real chunk takes: its `ChunkStorageMetadata` (two
/// `torch.Size` reductions) and its `storage_data` entry (a `MetadataIndex` and a
/// `_StorageInfo`, three fields each) are well over 60 bytes even with every name memoised.
/// A pickle can repeat one memoised chunk with a 2-byte reference, and each chunk decoded
/// costs ~200 bytes: chunk lists and storage entries longer than the file's size allows are
/// refused before they are decoded, so decoding stays within a few times the file's size.
const MIN_CHUNK_BYTES: usize = 32;

struct Decoder<'p> {
    pk: &'p Pickle,
    /// Chunks (and storage entries) that may still be decoded (see [`MIN_CHUNK_BYTES`]).
    chunks: std::cell::Cell<usize>,
}

impl Decoder<'_> {
    /// Take `n` more chunks or storage entries out of what the file's size allows.
    fn take_chunks(&self, n: usize, what: &str) -> Res<()> {
        let left = self.chunks.get();
        if n > left {
            return Err(format!(
                "{what}: more chunks than a .metadata of this size can describe (at most one \
                 per {MIN_CHUNK_BYTES} bytes; a repeated reference?)"
            ));
        }
        self.chunks.set(left - n);
        Ok(())
    }

    /// The state of an instance of the DCP class `class` (dataclasses pickle as
    /// `cls.__new__(cls)` + BUILD(state)); `None` for anything else.
    fn object(&self, id: Id, class: &str) -> Option<Id> {
        let Value::Call(c) = self.pk.get(id) else { return None };
        let (_, name) = self.pk.global(c.func)?;
        (name == class).then_some(c.state.unwrap_or(id))
    }

    /// Field `name` of a dataclass state dict.
    fn field(&self, state: Id, name: &str) -> Option<Id> {
        let items = self.pk.dict_items(state)?;
        items.iter().find(|(k, _)| self.pk.str(*k) == Some(name)).map(|&(_, v)| v)
    }

    /// Non-negative integers of a `torch.Size((...))`, tuple or list.
    fn ints(&self, id: Id) -> Option<Vec<usize>> {
        let items = match self.pk.get(id) {
            Value::Tuple(v) | Value::List(v) => v,
            Value::Call(c) if self.pk.global(c.func) == Some(("torch", "Size")) => {
                return self.ints(*self.pk.tuple(c.args)?.first()?);
            }
            _ => return None,
        };
        items.iter().map(|&i| self.pk.usize(i)).collect()
    }

    /// `storage_data`: `MetadataIndex(fqn, offset)` → `_StorageInfo`.
    fn storage_data(&self, id: Option<Id>) -> Res<Entries> {
        let items = id.and_then(|v| self.pk.dict_items(v)).ok_or("no storage_data dict")?;
        self.take_chunks(items.len(), "storage_data")?;
        let mut out = HashMap::with_capacity(items.len());
        for &(k, v) in items {
            let key =
                self.object(k, "MetadataIndex").ok_or("a storage key is not a MetadataIndex")?;
            let fqn = self.field(key, "fqn").and_then(|f| self.pk.str(f));
            let fqn = fqn.ok_or("a MetadataIndex has no fqn")?.to_string();
            let offset = match self.field(key, "offset") {
                None => None,
                Some(o) if matches!(self.pk.get(o), Value::None) => None,
                Some(o) => Some(self.ints(o).ok_or_else(|| format!("{fqn}: bad offset"))?),
            };
            let info = self.storage_info(v).map_err(|e| format!("{fqn}: {e}"))?;
            out.insert((fqn, offset), info);
        }
        Ok(out)
    }

    fn storage_info(&self, id: Id) -> Res<StorageInfo> {
        let s = self.object(id, "_StorageInfo").ok_or("storage entry is not a _StorageInfo")?;
        let int = |name: &str| {
            let v = self.field(s, name).and_then(|v| self.pk.usize(v));
            v.map(|v| v as u64).ok_or_else(|| format!("_StorageInfo has no valid {name}"))
        };
        let path = self.field(s, "relative_path").and_then(|v| self.pk.str(v));
        let transforms = match self.field(s, "transform_descriptors").map(|v| self.pk.get(v)) {
            None | Some(Value::None) => Vec::new(),
            Some(Value::List(v) | Value::Tuple(v)) => {
                v.iter().map(|&t| self.pk.str(t).unwrap_or("?").to_string()).collect()
            }
            Some(_) => vec!["?".to_string()],
        };
        Ok(StorageInfo {
            relative_path: path.ok_or("_StorageInfo has no relative_path")?.to_string(),
            offset: int("offset")?,
            length: int("length")?,
            transforms,
        })
    }

    /// `planner_data` of the default planner: flattened FQN → path in the original state
    /// dict; the first component is the top-level key. Best effort (custom planners differ).
    fn planner(&self, id: Option<Id>) -> HashMap<String, String> {
        let items = id.and_then(|v| self.pk.dict_items(v)).unwrap_or_default();
        let first = |v: Id| match self.pk.get(v) {
            Value::Tuple(p) | Value::List(p) => p.first().and_then(|&s| self.pk.str(s)),
            _ => None,
        };
        let pairs = items.iter().filter_map(|&(k, v)| Some((self.pk.str(k)?, first(v)?)));
        pairs.map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn tensor(&self, fqn: &str, id: Id, top: String, entries: &Entries) -> Res<TensorItem> {
        let t = self.object(id, "TensorStorageMetadata").ok_or("not a TensorStorageMetadata")?;
        let size = self.field(t, "size").and_then(|s| self.ints(s)).ok_or("no valid size")?;
        numel(&size).ok_or_else(|| format!("size {size:?} overflows"))?;
        let dtype = self.dtype(self.field(t, "properties")).ok_or("no valid dtype")?;
        let list = self.field(t, "chunks").map(|c| self.pk.get(c));
        let Some(Value::List(ids)) = list else { return Err("no chunk list".into()) };
        self.take_chunks(ids.len(), "its chunk list")?;
        let mut chunks = Vec::with_capacity(ids.len());
        for &c in ids {
            let c = self.object(c, "ChunkStorageMetadata").ok_or("a chunk is not a chunk")?;
            let get = |n: &str| self.field(c, n).and_then(|v| self.ints(v));
            let (offsets, sizes) = get("offsets").zip(get("sizes")).ok_or("malformed chunk")?;
            let key = (fqn.to_string(), Some(offsets.clone()));
            let storage = entries.get(&key).cloned().ok_or_else(|| {
                format!("the chunk at offsets {offsets:?} has no storage_data entry")
            })?;
            chunks.push(Chunk { offsets, sizes, storage });
        }
        check_chunks(&size, &chunks)?;
        Ok(TensorItem { fqn: fqn.to_string(), dtype, size, chunks, top })
    }

    /// `TensorProperties`' dtype: its state is a tuple `(dtype, layout, ...)` (a dict in
    /// files from versions without `__getstate__`).
    fn dtype(&self, props: Option<Id>) -> Option<std::result::Result<DType, String>> {
        let state = self.object(props?, "TensorProperties")?;
        let dtype = match self.pk.tuple(state) {
            Some(t) => *t.first()?,
            None => self.field(state, "dtype")?,
        };
        let ("torch", name) = self.pk.global(dtype)? else { return None };
        let (_, d) = DTYPES.iter().find(|(n, _)| *n == name)?;
        Some(d.ok_or_else(|| name.to_string()))
    }
}

/// Every chunk lies inside the tensor and their elements add up to the tensor's: with the
/// exact tiling checked when a tensor is read (`TensorReader::pieces`), chunks that overlap
/// or leave gaps are refused.
fn check_chunks(size: &[usize], chunks: &[Chunk]) -> Res<()> {
    let mut total = 0usize;
    for c in chunks {
        let inside = c.offsets.len() == size.len()
            && c.sizes.len() == size.len()
            && (c.offsets.iter().zip(&c.sizes).zip(size))
                .all(|((&o, &s), &d)| o.checked_add(s).is_some_and(|e| e <= d));
        if !inside {
            return Err(format!(
                "chunk (offsets {:?}, sizes {:?}) lies outside the tensor's size {size:?}",
                c.offsets, c.sizes
            ));
        }
        let n = numel(&c.sizes).ok_or("chunk size overflows")?;
        total = total.checked_add(n).ok_or("chunk sizes overflow")?;
    }
    let want = numel(size).unwrap_or(usize::MAX);
    if total != want {
        return Err(format!("its chunks hold {total} elements, its size {size:?} has {want}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn fixture() -> (std::path::PathBuf, Vec<u8>) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/dcp/torchtitan/step-10");
        let path = dir.join(".metadata");
        let bytes = std::fs::read(&path).unwrap();
        (path, bytes)
    }

    #[test]
    fn the_real_metadata_decodes_to_its_tensors_and_chunks() {
        let (path, bytes) = fixture();
        let md = decode(&path, &bytes).unwrap();
        assert_eq!(md.version.as_deref(), Some("1.0.0"));
        assert_eq!((md.tensors.len(), md.bytes.len()), (11, 6));
        let wq = md.tensors.iter().find(|t| t.fqn == "layers.0.attention.wq.weight").unwrap();
        assert_eq!(
            (wq.dtype.clone(), wq.size.clone(), wq.top.as_str()),
            (Ok(DType::F32), vec![4, 6], wq.fqn.as_str())
        );
        let split: Vec<_> =
            wq.chunks.iter().map(|c| (c.offsets.clone(), c.sizes.clone())).collect();
        assert_eq!(split, [(vec![0, 0], vec![4, 3]), (vec![0, 3], vec![4, 3])]);
        let opt = md.tensors.iter().find(|t| t.fqn.starts_with("optimizer.")).unwrap();
        assert_eq!(opt.top, "optimizer", "from planner_data");
        assert_eq!(md.storage.len(), 11 * 2 - 2 + 6, "every chunk and byte item");
    }

    /// Untrusted files: random corruptions of a real `.metadata` give errors, never panics
    /// (the decoder's memory is bounded by the pickle's size, see `unpickle::vm`).
    #[test]
    fn mutated_metadata_never_panics() {
        let (path, bytes) = fixture();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let (mut decoded, mut failed) = (0, 0);
        for i in 0..3000 {
            let mut b = bytes.clone();
            if i % 3 == 0 {
                b.truncate(rng.random_range(0..b.len()));
            } else {
                for _ in 0..rng.random_range(1..4) {
                    let j = rng.random_range(0..b.len());
                    b[j] = rng.random();
                }
            }
            match decode(&path, &b) {
                Ok(_) => decoded += 1,
                Err(e) => {
                    assert!(e.to_string().contains(".metadata"), "{e}");
                    failed += 1
                }
            }
        }
        assert!(decoded > 0 && failed > 0, "decoded {decoded}, failed {failed}");
    }

    #[test]
    fn classes_outside_dcp_are_refused_by_name() {
        // A pickle of os.system("x"): refused before anything is looked at.
        let p = b"\x80\x02cos\nsystem\nX\x01\x00\x00\x00x\x85R.";
        let err = decode(Path::new(".metadata"), p).err().unwrap().to_string();
        assert!(err.contains("os.system"), "{err}");
        for (m, n) in [
            ("torch", "load"),
            ("torch.serialization", "load"),
            ("pathlib", "Path"),
            ("builtins", "eval"),
        ] {
            assert!(!allowed(m, n), "{m}.{n}");
        }
        assert!(
            allowed(OLD_PROPERTIES, "TensorProperties") && allowed("pathlib._local", "PosixPath")
        );
    }
}
