//! What a checkpoint is: a named set of tensors (name, dtype, shape) whose bytes can be viewed
//! without copying when the format allows (safetensors is memory-mapped; torch zip pickles are
//! read tensor by tensor). Formats, validation and the one `unsafe` mmap constructor live here.
//! This module does not average, select or publish.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Element type of a tensor, as stored on disk (little-endian).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    Bool,
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F16,
    BF16,
    F32,
    F64,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::Bool | DType::U8 | DType::I8 => 1,
            DType::I16 | DType::U16 | DType::F16 | DType::BF16 => 2,
            DType::I32 | DType::U32 | DType::F32 => 4,
            DType::I64 | DType::U64 | DType::F64 => 8,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
    }

    pub fn to_safetensors(self) -> safetensors::Dtype {
        use safetensors::Dtype as S;
        match self {
            DType::Bool => S::BOOL,
            DType::U8 => S::U8,
            DType::I8 => S::I8,
            DType::I16 => S::I16,
            DType::U16 => S::U16,
            DType::I32 => S::I32,
            DType::U32 => S::U32,
            DType::I64 => S::I64,
            DType::U64 => S::U64,
            DType::F16 => S::F16,
            DType::BF16 => S::BF16,
            DType::F32 => S::F32,
            DType::F64 => S::F64,
        }
    }

    /// `None` for safetensors dtypes sewa does not average (fp8, complex, ...).
    pub fn from_safetensors(d: safetensors::Dtype) -> Option<Self> {
        use safetensors::Dtype as S;
        Some(match d {
            S::BOOL => DType::Bool,
            S::U8 => DType::U8,
            S::I8 => DType::I8,
            S::I16 => DType::I16,
            S::U16 => DType::U16,
            S::I32 => DType::I32,
            S::U32 => DType::U32,
            S::I64 => DType::I64,
            S::U64 => DType::U64,
            S::F16 => DType::F16,
            S::BF16 => DType::BF16,
            S::F32 => DType::F32,
            S::F64 => DType::F64,
            _ => return None,
        })
    }
}

/// One tensor's description. Checkpoints list these sorted by name.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TensorMeta {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorMeta {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn nbytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }
}

/// How a checkpoint is stored on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// One `.safetensors` file, memory-mapped.
    Safetensors,
    /// `*.safetensors.index.json` plus shards.
    ShardedSafetensors,
    /// HF `checkpoint-N/` directory (model.safetensors, sharded index or pytorch_model.bin).
    HfDir,
    /// torch.save zip pickle (`.pt`, `.pth`, `.bin`).
    TorchZip,
    /// Lightning `.ckpt` (tensors under `state_dict`).
    Lightning,
    /// Built in memory (tests, demo).
    Memory,
}

/// Options for opening checkpoints.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Key prefixes to strip (default: `_orig_mod.`, which torch.compile adds).
    pub strip_prefixes: Vec<String>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions { strip_prefixes: vec!["_orig_mod.".to_string()] }
    }
}

/// An opened checkpoint: tensor list plus byte access. Cheap to keep open (mapped, not read).
pub struct Checkpoint {
    path: PathBuf,
    format: Format,
    tensors: Vec<TensorMeta>,
    step: Option<u64>,
    metadata: BTreeMap<String, String>,
    side_dir: Option<PathBuf>,
    renamed: Vec<(String, String)>,
    storage: Storage,
}

/// Where tensor bytes come from. (Helper A extends this with mmapped and pickle storages.)
enum Storage {
    Memory(BTreeMap<String, Vec<u8>>),
}

impl Checkpoint {
    /// Open any supported checkpoint (file or directory), detecting the format.
    pub fn open(path: &Path, _opts: &OpenOptions) -> Result<Self> {
        Err(Error::bad_input(path, "format readers are not built yet"))
    }

    /// A checkpoint held in memory: `(name, dtype, shape, little-endian bytes)` per tensor.
    pub fn from_memory(
        label: impl Into<PathBuf>,
        step: Option<u64>,
        tensors: Vec<(String, DType, Vec<usize>, Vec<u8>)>,
    ) -> Result<Self> {
        let path = label.into();
        let mut metas = Vec::new();
        let mut data = BTreeMap::new();
        for (name, dtype, shape, bytes) in tensors {
            let meta = TensorMeta { name: name.clone(), dtype, shape };
            if meta.nbytes() != bytes.len() {
                return Err(Error::bad_input(
                    &path,
                    format!("tensor {name}: {} bytes for shape {:?}", bytes.len(), meta.shape),
                ));
            }
            metas.push(meta);
            data.insert(name, bytes);
        }
        metas.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Checkpoint {
            path,
            format: Format::Memory,
            tensors: metas,
            step,
            metadata: BTreeMap::new(),
            side_dir: None,
            renamed: Vec::new(),
            storage: Storage::Memory(data),
        })
    }

    /// The path the user gave (file or directory).
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn format(&self) -> Format {
        self.format
    }
    /// Tensors sorted by name.
    pub fn tensors(&self) -> &[TensorMeta] {
        &self.tensors
    }
    pub fn tensor(&self, name: &str) -> Option<&TensorMeta> {
        self.tensors.binary_search_by(|t| t.name.as_str().cmp(name)).ok().map(|i| &self.tensors[i])
    }
    /// Training step, from the file name or metadata.
    pub fn step(&self) -> Option<u64> {
        self.step
    }
    /// safetensors `__metadata__` (first file) and similar string metadata.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }
    /// Directory holding HF side files (config.json, tokenizer...), when there is one.
    pub fn side_dir(&self) -> Option<&Path> {
        self.side_dir.as_deref()
    }
    /// Keys renamed by normalisation, `(original, new)`.
    pub fn renamed_keys(&self) -> &[(String, String)] {
        &self.renamed
    }
    /// Sum of all tensors' byte sizes.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.nbytes() as u64).sum()
    }

    /// The tensor's little-endian bytes: borrowed straight from the map for safetensors,
    /// owned for pickles. Not aligned: read elements with `from_le_bytes` or check alignment.
    pub fn data(&self, name: &str) -> Result<Cow<'_, [u8]>> {
        match &self.storage {
            Storage::Memory(m) => m
                .get(name)
                .map(|v| Cow::Borrowed(v.as_slice()))
                .ok_or_else(|| Error::bad_input(&self.path, format!("no tensor named {name}"))),
        }
    }

    /// Tell the kernel we are done with this tensor's pages (keeps RSS flat over many inputs).
    pub fn release(&self, _name: &str) {}
}
