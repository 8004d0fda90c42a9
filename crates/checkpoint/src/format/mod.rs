//! The checkpoint formats, one module (or folder) each, every one registered by one line in
//! `FORMATS`: how to recognise it (`detect`, given a `Probe` of the path), which files of a
//! checkpoint directory are its weights (`weight_file`, for the directory's identity) and
//! which file-name endings the watcher should take for it (`endings`). What `detect` returns
//! (`Found`) holds what it learned (the open file, the directory layout) and does the rest:
//! `quick_check` (is it complete enough to open? no tensor data read, for the watcher) and
//! `open` (validate and index it, holding its files: a `Loaded`). So a path is detected once
//! for both. `magic` tells files apart by their first bytes.
//! Lightning `.ckpt` files are torch files whose tensors sit under a key (`torch`); a
//! directory with `.metadata` is a torch.distributed.checkpoint (`dcp`), and with megatron-core's
//! `common.pt` / `metadata.json` beside it a Megatron `torch_dist` one (`megatron`); DeepSpeed and PEFT
//! directories are built on the torch and safetensors readers.

pub(crate) mod dcp;
pub(crate) mod deepspeed;
pub(crate) mod hf_dir;
pub(crate) mod magic;
pub(crate) mod megatron;
pub(crate) mod peft;
pub(crate) mod safetensors;
pub(crate) mod sharded;
pub(crate) mod torch;

use std::fs::File;
use std::path::Path;

use crate::OpenOptions;
use crate::error::Result;
use crate::storage::Loaded;
use magic::Magic;

/// Every format, in the order their `detect` is tried: the first to claim a path reads it.
/// Directories: Megatron (DCP with megatron-core's files), DCP, DeepSpeed, PEFT, then any other directory is an HF checkpoint. Files:
/// a shard index by its name, then by first bytes torch zips, then safetensors.
pub(crate) const FORMATS: &[FormatSpec] = &[
    megatron::FORMAT,
    dcp::FORMAT,
    deepspeed::FORMAT,
    peft::FORMAT,
    hf_dir::FORMAT,
    sharded::FORMAT,
    torch::FORMAT,
    safetensors::FORMAT,
];

/// A format's answer to a probe.
pub(crate) type Claim = Result<Option<Box<dyn Found>>>;

/// One format's entry in `FORMATS`.
pub(crate) struct FormatSpec {
    /// Whether the probed path is in this format: `Some` to read it, `None` to let the next
    /// format look, an error when it is this format's but unreadable (a legacy torch pickle).
    pub detect: fn(&Probe<'_>) -> Claim,
    /// Files inside a checkpoint directory whose change means the weights changed.
    pub weight_file: fn(&str) -> bool,
    /// Endings of the file names (lower case) the watcher takes as this format's checkpoints.
    pub endings: &'static [&'static str],
}

/// What a format's `detect` is shown: the path, the caller's options, and for a file the
/// file opened once (regular files only) and what its first bytes are.
pub(crate) struct Probe<'a> {
    pub path: &'a Path,
    pub opts: &'a OpenOptions,
    pub file: Option<(File, Magic)>,
}

impl Probe<'_> {
    /// The file's name, lossily (for matching endings).
    pub fn name(&self) -> String {
        self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }

    /// The opened file (another descriptor of the same open file), when the path is a file.
    pub fn file(&self) -> Result<Option<(File, &Magic)>> {
        use crate::InputIo;
        match &self.file {
            Some((f, m)) => Ok(Some((f.try_clone().input(self.path)?, m))),
            None => Ok(None),
        }
    }
}

/// A path a format has claimed, holding what `detect` learned.
pub(crate) trait Found: Send {
    /// Complete enough to open? `marker` is the file an HF checkpoint directory must contain
    /// (empty: none); formats with their own completion rule ignore it.
    fn quick_check(&self, marker: &str) -> Result<()>;
    /// Validate and index it.
    fn open(self: Box<Self>) -> Result<Loaded>;
}

/// Is `name` a weight file of some format (see `FormatSpec::weight_file`)?
pub(crate) fn is_weight_file(name: &str) -> bool {
    FORMATS.iter().any(|f| (f.weight_file)(name))
}

/// The file-name endings of every format's checkpoint files, lower case.
pub fn checkpoint_endings() -> impl Iterator<Item = &'static str> {
    FORMATS.iter().flat_map(|f| f.endings.iter().copied())
}

/// For formats whose checkpoints are single files: no weight files inside directories.
pub(crate) fn no_weight_file(_: &str) -> bool {
    false
}

/// Another descriptor of `file` (the format functions take theirs by value).
pub(crate) fn dup(path: &Path, file: &File) -> Result<File> {
    use crate::InputIo;
    file.try_clone().input(path)
}

/// A claimed single file whose check and open need only the path and the file.
pub(crate) struct FoundFile {
    pub path: std::path::PathBuf,
    pub file: File,
    pub check: fn(&Path, File) -> Result<()>,
    pub open: fn(&Path, File) -> Result<Loaded>,
}

impl Found for FoundFile {
    fn quick_check(&self, _marker: &str) -> Result<()> {
        (self.check)(&self.path, dup(&self.path, &self.file)?)
    }

    fn open(self: Box<Self>) -> Result<Loaded> {
        (self.open)(&self.path, self.file)
    }
}
