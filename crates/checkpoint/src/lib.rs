//! sewa's checkpoint reader. What a checkpoint is: a named set of tensors (name, dtype, shape) whose bytes are read on
//! demand, piece by piece, through a [`TensorReader`] (safetensors files are held open and read
//! with positioned reads, never mapped, so a file changed underneath gives an error, never
//! SIGBUS: see `pinned`; torch zip pickles are read tensor by tensor). Formats, validation and
//! how files are opened (`files`: regular files only, no symlinks inside a checkpoint
//! directory) live here, with the errors bad input gets (`error`), `DType` and the float decoding
//! every reader of tensor bytes uses (`dtype`), and names from hostile files made printable
//! (`text`). This crate does not average, select or publish, and depends on nothing of sewa's.
#![forbid(unsafe_code)]

mod classify;
mod detect;
pub mod dtype;
pub mod error;
mod files;
mod format;
mod identity;
mod keys;
mod names;
mod pinned;
mod reader;
mod storage;
mod strided;
pub mod text;
mod unpickle;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub use classify::not_model_weights;
pub use detect::{Detected, detect, quick_check, quick_check_with};
pub use files::{has_file, open_child, open_in_dir, open_regular, read_capped};
pub use format::checkpoint_endings;
pub use format::peft::{check_same_adapter, is_adapter_dir};
pub use identity::Identity;
pub use names::{is_temp_name, parse_step, step_of};
pub use reader::TensorReader;
pub use storage::ChunkInfo;

pub use crate::error::{Error, Result, WithPath};
use storage::{MemoryStore, Storage};

pub use crate::dtype::DType;

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
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// One `.safetensors` file.
    Safetensors,
    /// `*.safetensors.index.json` plus shards.
    ShardedSafetensors,
    /// HF `checkpoint-N/` directory (model.safetensors, sharded index or pytorch_model.bin).
    HfDir,
    /// torch.save zip pickle (`.pt`, `.pth`, `.bin`).
    TorchZip,
    /// Lightning `.ckpt` (tensors under `state_dict`).
    Lightning,
    /// torch.distributed.checkpoint directory (`.metadata` + `*.distcp`).
    Dcp,
    /// Megatron-LM `torch_dist` directory (`iter_NNNNNNN/`: DCP plus `common.pt`, `metadata.json`).
    Megatron,
    /// DeepSpeed `global_stepN/` directory (ZeRO model and optimizer states).
    #[serde(rename = "deepspeed")]
    DeepSpeed,
    /// PEFT adapter directory (`adapter_model.safetensors` or `.bin` + `adapter_config.json`).
    PeftAdapter,
    /// Built in memory (tests, demo).
    Memory,
}

/// Options for opening checkpoints.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Key prefixes to strip (default: `_orig_mod.`, which torch.compile adds).
    pub strip_prefixes: Vec<String>,
    /// The top-level entry of a torch checkpoint dict that holds the state dict (`net` in
    /// `{"net": sd, "step": 500}`). `None`: the top level itself or one of the usual keys
    /// (`state_dict`, `model_state_dict`, `model`, `module`). Other formats ignore it.
    pub state_key: Option<String>,
    /// DeepSpeed checkpoints: which weights to read (see [`DeepSpeedWeights`]).
    pub deepspeed_weights: DeepSpeedWeights,
}

/// Which weights of a DeepSpeed checkpoint are read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeepSpeedWeights {
    /// The `module` state dict of `mp_rank_00_model_states.pt` (training precision; ZeRO-1/2).
    #[default]
    Module,
    /// The fp32 master weights rebuilt from every rank's optimizer states (as zero_to_fp32.py).
    Fp32,
}

impl std::fmt::Display for DeepSpeedWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeepSpeedWeights::Module => "module",
            DeepSpeedWeights::Fp32 => "fp32",
        })
    }
}

impl std::str::FromStr for DeepSpeedWeights {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "module" => Ok(DeepSpeedWeights::Module),
            "fp32" => Ok(DeepSpeedWeights::Fp32),
            _ => Err(format!("unknown DeepSpeed weights {s:?}; expected module or fp32")),
        }
    }
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            strip_prefixes: vec!["_orig_mod.".to_string()],
            state_key: None,
            deepspeed_weights: DeepSpeedWeights::Module,
        }
    }
}

/// An opened checkpoint: tensor list plus byte access. Cheap to keep open (files held, not read).
pub struct Checkpoint {
    path: PathBuf,
    format: Format,
    tensors: Vec<TensorMeta>,
    step: Option<u64>,
    metadata: BTreeMap<String, String>,
    side_dir: Option<PathBuf>,
    renamed: Vec<(String, String)>,
    /// Normalised name → name in the file, for renamed keys only.
    orig_names: HashMap<String, String>,
    identity: Option<Identity>,
    storage: Box<dyn Storage>,
}

/// I/O errors on checkpoint inputs are bad input (skip the checkpoint), not fatal errors.
trait InputIo<T> {
    fn input(self, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> InputIo<T> for std::io::Result<T> {
    fn input(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::bad_input(path, e.to_string()))
    }
}

impl Checkpoint {
    /// Open any supported checkpoint (file or directory), detecting the format, validating it
    /// cheaply and holding open (safetensors) or indexing (torch zip) its tensors.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Self> {
        detect(path, opts)?.open()
    }

    /// What a format read (`Detected::open`), its keys normalised.
    fn from_loaded(
        path: &Path,
        loaded: storage::Loaded,
        before: Identity,
        opts: &OpenOptions,
    ) -> Result<Self> {
        let names = loaded.tensors.iter().map(|t| t.name.clone());
        let (renamed, to_orig) = keys::normalise(path, names, &opts.strip_prefixes)?;
        let mut tensors = loaded.tensors;
        for t in &mut tensors {
            t.name = keys::strip_one(&t.name, &opts.strip_prefixes);
        }
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        let orig_names = to_orig.into_iter().filter(|(new, orig)| new != orig).collect();
        Ok(Checkpoint {
            path: path.to_path_buf(),
            format: loaded.format,
            tensors,
            step: step_of(path).or(loaded.step),
            metadata: loaded.metadata,
            side_dir: loaded.side_dir,
            renamed,
            orig_names,
            identity: Some(before),
            storage: loaded.storage,
        })
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
            orig_names: HashMap::new(),
            identity: None,
            storage: Box::new(MemoryStore(data)),
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
    /// Training step: parsed from the file or directory name, else from the checkpoint's own
    /// records (safetensors metadata `step`, HF `trainer_state.json` `global_step`, a torch
    /// checkpoint dict's `step`, `global_step`, `iteration` or, last, `epoch` entry — which
    /// covers Lightning's `global_step`). The name wins: a trainer that names files by step
    /// and stores an epoch counter inside gets its step.
    pub fn step(&self) -> Option<u64> {
        self.step
    }
    /// String metadata: safetensors `__metadata__` (first file), plus for HF directories
    /// `metric` (from trainer_state.json) and for Lightning files `epoch` and `global_step`.
    /// See "Training step and metric" in docs/formats.md for the keys.
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

    /// Identity of the path at open time (`Identity::of(path)`); compare it with
    /// `Identity::of(path)` now to learn whether the path holds something new. Checkpoints
    /// built in memory have a fixed dummy identity.
    pub fn identity(&self) -> &Identity {
        static NONE: std::sync::OnceLock<Identity> = std::sync::OnceLock::new();
        self.identity.as_ref().unwrap_or_else(|| NONE.get_or_init(Identity::none))
    }

    /// True while the files we hold still have the size and mtime they had when opened, i.e.
    /// nobody rewrote them in place. Reads check this themselves (a changed file is an error,
    /// never a crash); callers check it to drop such a checkpoint before using it at all.
    /// A file renamed over or unlinked is still valid (we hold the old inode).
    pub fn still_valid(&self) -> bool {
        self.storage.still_valid()
    }

    /// The pieces a tensor is stored in (a DCP tensor's chunks: offsets, sizes, file and rank
    /// of each); `None` for tensors stored whole and for formats without pieces.
    pub fn chunks(&self, name: &str) -> Option<Vec<ChunkInfo>> {
        self.storage.chunks(self.stored_name(name))
    }

    /// Disk space this checkpoint alone keeps allocated: the allocated bytes of the files it
    /// holds open that no path links to any more (deleted by rotation, renamed over). Freed
    /// when the checkpoint is dropped. One `fstat` per file.
    pub fn unlinked_bytes(&self) -> u64 {
        self.storage.unlinked_bytes()
    }

    fn stored_name<'a>(&'a self, name: &'a str) -> &'a str {
        self.orig_names.get(name).map_or(name, String::as_str)
    }

    fn no_tensor(&self, name: &str) -> Error {
        Error::bad_input(&self.path, format!("no tensor named {name}"))
    }

    /// A reader of the tensor's little-endian bytes, piece by piece: in place for tensors in
    /// memory, positioned reads for files (a pickle tensor is decoded into memory here).
    /// Its length is checked against the tensor's dtype and shape.
    pub fn reader(&self, name: &str) -> Result<TensorReader<'_>> {
        let meta = self.tensor(name).ok_or_else(|| self.no_tensor(name))?;
        let key = self.stored_name(name);
        let reader = self.storage.reader(key, meta)?.ok_or_else(|| self.no_tensor(name))?;
        if reader.len() != meta.nbytes() {
            return Err(Error::bad_input(
                &self.path,
                format!(
                    "tensor {name}: {} bytes of data for {:?} {:?} ({} expected)",
                    reader.len(),
                    meta.dtype,
                    meta.shape,
                    meta.nbytes()
                ),
            ));
        }
        Ok(reader)
    }

    /// `f(offset, bytes)` over the tensor in pieces of at most `chunk` bytes (see
    /// [`TensorReader::for_each_chunk`]); `buf` is the reusable read buffer.
    pub fn for_each_chunk(
        &self,
        name: &str,
        chunk: usize,
        buf: &mut Vec<u8>,
        f: impl FnMut(usize, &[u8]) -> Result<()>,
    ) -> Result<()> {
        self.reader(name)?.for_each_chunk(chunk, buf, f)
    }

    /// The whole tensor's little-endian bytes: borrowed when in memory, else read into a new
    /// buffer of the tensor's size (bounded: its range was checked against the file's length
    /// at open). For whole tensors only (integer buffers, small tensors, tests); stream large
    /// ones with [`reader`](Self::reader) or [`for_each_chunk`](Self::for_each_chunk).
    pub fn data(&self, name: &str) -> Result<Cow<'_, [u8]>> {
        self.reader(name)?.into_bytes()
    }
}
