//! DeepSpeed checkpoints: a `global_stepN/` directory (or the directory whose `latest` file
//! names it) with `*_model_states.pt` and every data-parallel rank's `*_optim_states.pt`.
//! Which files exist and which rank each holds is decided here; the weights are read either
//! from the `module` state dict of `mp_rank_00_model_states.pt` (ZeRO-0/1/2, training
//! precision; the default) or rebuilt from the fp32 master partitions of every rank
//! (`zero`, as DeepSpeed's `zero_to_fp32.py` does; the only way for ZeRO-3, whose `module`
//! holds placeholders of shape [0]). Tensor parallel (`mp_rank_01`...) and pipeline
//! (`layer_*`) checkpoints are refused. The pickles also hold DeepSpeed objects (loss scaler,
//! config enums): the unpickler keeps them as data, nothing is executed.

use std::path::{Path, PathBuf};

mod partition;
mod pickled;
mod zero;

use super::{Claim, FormatSpec, Found, Probe, torch};
use crate::error::{Error, Result};
use crate::storage::Loaded;
use crate::{DeepSpeedWeights, Format, files};

const MODEL_SUFFIX: &str = "_model_states.pt";
const OPTIM_SUFFIX: &str = "_optim_states.pt";
/// ZeRO-0/1/2 write the full module once, under this name.
const MODULE_FILE: &str = "mp_rank_00_model_states.pt";

/// The files of one `global_stepN/` directory, by rank.
pub(crate) struct Layout {
    pub dir: PathBuf,
    /// `mp_rank_00_model_states.pt`, when present (ZeRO-0/1/2).
    pub module: Option<PathBuf>,
    /// `zero_pp_rank_{r}_mp_rank_00_model_states.pt` by rank (ZeRO-3).
    pub rank_models: Vec<PathBuf>,
    /// `[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt` by rank.
    pub optim: Vec<PathBuf>,
    /// The directory that held `latest` when the input was named through it.
    pub parent: Option<PathBuf>,
}

impl Layout {
    /// Open one of the layout's files. Named through `latest`, it is opened as `tag/name`
    /// inside that directory, so the tag is never followed as a symlink, even one swapped in
    /// after `detect` looked.
    pub fn open(&self, file: &Path) -> Result<std::fs::File> {
        match &self.parent {
            Some(parent) => match file.strip_prefix(parent) {
                Ok(rel) => files::open_in_dir(parent, rel),
                Err(_) => files::open_child(file),
            },
            None => files::open_child(file),
        }
    }

    /// The model-states file whose `param_shapes`, buffers and `dp_world_size` are read.
    pub fn first_model(&self) -> Result<&Path> {
        self.module.as_deref().or(self.rank_models.first().map(PathBuf::as_path)).ok_or_else(|| {
            Error::bad_input(&self.dir, "no *_model_states.pt: not a DeepSpeed checkpoint")
        })
    }
}

/// The DeepSpeed checkpoint at `path`, if it is one: a directory holding `*_model_states.pt`,
/// or one whose `latest` names such a subdirectory (and that holds no HF weights of its own:
/// an HF Trainer directory with `model.safetensors` beside `global_stepN/` is read as HF).
pub(crate) fn detect(path: &Path) -> Result<Option<Layout>> {
    if let Some(layout) = scan(path)? {
        return Ok(Some(layout));
    }
    let has = |n: &str| files::has_file(path, Path::new(n));
    let hf = ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"];
    if !has("latest")? || hf.iter().try_fold(false, |any, n| Ok::<_, Error>(any || has(n)?))? {
        return Ok(None);
    }
    let tag = read_latest(&path.join("latest"))?;
    let dir = path.join(&tag);
    // Inside the checkpoint directory: never through a symlink (it could lead anywhere). The
    // tag is one plain name, so this looks at the tag itself, not at what a trailing `/`
    // would resolve it to.
    if !std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
        return Err(Error::bad_input(
            path.join("latest"),
            format!("names the tag {tag:?}, but {} is not a directory here", text(&dir)),
        ));
    }
    match scan(&dir)? {
        Some(layout) => Ok(Some(Layout { parent: Some(path.to_path_buf()), ..layout })),
        None => Err(Error::bad_input(
            path.join("latest"),
            format!("names the tag {tag:?}, but {} holds no *_model_states.pt", text(&dir)),
        )),
    }
}

fn bad(path: &Path, msg: impl Into<String>) -> Error {
    Error::bad_input(path, msg.into())
}

fn text(p: &Path) -> String {
    crate::text::path(p).to_string()
}

/// The tag in `latest`: one plain directory name, exactly (no separator anywhere, not `.` or
/// `..`). A trailing `/` or `/.` would make the later checks look through a symlink named by
/// the tag instead of at it.
fn read_latest(path: &Path) -> Result<String> {
    let bytes = files::read_capped(path, files::open_child(path)?, 4096)?;
    let tag = String::from_utf8_lossy(&bytes).trim().to_string();
    if is_one_name(&tag) {
        return Ok(tag);
    }
    Err(Error::bad_input(
        path,
        format!("tag {tag:?} is not a plain directory name (one name, no /); refused"),
    ))
}

fn is_one_name(tag: &str) -> bool {
    !tag.contains('/') && files::is_plain(Path::new(tag))
}

/// The rank in `zero_pp_rank_{r}_mp_rank_00` (after an optional `bf16_`), with the model
/// parallel rank, or `None` for other names.
fn ranks(name: &str) -> Option<(usize, usize)> {
    let rest = name.strip_prefix("bf16_").unwrap_or(name).strip_prefix("zero_pp_rank_")?;
    let (dp, rest) = rest.split_once("_mp_rank_")?;
    let mp = rest.split('_').next()?;
    Some((dp.parse().ok()?, mp.parse().ok()?))
}

/// The DeepSpeed files of `dir`, or `None` when it holds no `*_model_states.pt`.
fn scan(dir: &Path) -> Result<Option<Layout>> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Ok(None) };
    let mut layout = Layout {
        dir: dir.to_path_buf(),
        module: None,
        rank_models: Vec::new(),
        optim: Vec::new(),
        parent: None,
    };
    let (mut models, mut optim) = (Vec::new(), Vec::new());
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let refuse = |why: &str| Err(Error::bad_input(dir.join(&name), why.to_string()));
        // Pipeline stages: `layer_01-model_00-model_states.pt`.
        if name.starts_with("layer_") && name.ends_with("model_states.pt") {
            return refuse("pipeline-parallel DeepSpeed checkpoints (layer_*) are not supported");
        }
        let is_model = name.ends_with(MODEL_SUFFIX);
        if !is_model && !name.ends_with(OPTIM_SUFFIX) {
            continue;
        }
        if name == MODULE_FILE {
            layout.module = Some(dir.join(&name));
            continue;
        }
        match ranks(&name) {
            Some((_, mp)) if mp != 0 => {
                return refuse(
                    "tensor-parallel DeepSpeed checkpoints (mp_rank > 0) are not supported",
                );
            }
            Some((dp, _)) if is_model => models.push((dp, dir.join(&name))),
            Some((dp, _)) => optim.push((dp, dir.join(&name))),
            None if name.starts_with("mp_rank_") => {
                return refuse(
                    "tensor-parallel DeepSpeed checkpoints (mp_rank > 0) are not supported",
                );
            }
            None => continue,
        }
    }
    if layout.module.is_none() && models.is_empty() {
        return Ok(None);
    }
    layout.rank_models = by_rank(dir, models, MODEL_SUFFIX)?;
    layout.optim = by_rank(dir, optim, OPTIM_SUFFIX)?;
    Ok(Some(layout))
}

/// Files ordered by rank; ranks must be 0..n, each once (a gap is a missing rank file).
fn by_rank(dir: &Path, mut found: Vec<(usize, PathBuf)>, suffix: &str) -> Result<Vec<PathBuf>> {
    found.sort();
    for (i, (rank, path)) in found.iter().enumerate() {
        if *rank != i {
            let what = if *rank < i { "a second file for rank" } else { "no file for rank" };
            let (bad, missing) =
                if *rank < i { (*rank, path.clone()) } else { (i, dir.to_path_buf()) };
            return Err(Error::bad_input(
                missing,
                format!(
                    "{what} {bad} (*zero_pp_rank_{bad}_mp_rank_00{suffix}): incomplete or mixed checkpoint"
                ),
            ));
        }
    }
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

/// Is the checkpoint complete enough to open? Its model-states file(s) are complete torch
/// zips, and for fp32 weights (or ZeRO-3) so is every rank's optimizer-states file, as many as
/// the world size they state. DeepSpeed writes `latest` after all of them; a `global_stepN/`
/// named directly has no such marker, so its files are checked instead. Only what more files
/// can fix is reported here: rank files that disagree on the world size (or outnumber it)
/// pass, and `open` refuses them naming the files, for `average` and the watcher alike (which
/// quarantines them instead of waiting for ranks that will never come).
pub(crate) fn quick_check(layout: &Layout, weights: DeepSpeedWeights) -> Result<()> {
    let check = |p: &Path| torch::check_zip(p, layout.open(p)?);
    layout.module.iter().chain(&layout.rank_models).try_for_each(|p| check(p))?;
    if weights == DeepSpeedWeights::Module && layout.module.is_some() {
        return Ok(());
    }
    layout.first_model()?;
    layout.optim.iter().try_for_each(|p| check(p))?;
    let Ok(world) = zero::world_size(layout) else { return Ok(()) };
    let short = |n: usize| n < world;
    if short(layout.optim.len()) || (layout.module.is_none() && short(layout.rank_models.len())) {
        return zero::check_rank_count(layout, world);
    }
    Ok(())
}

/// Open the checkpoint for `weights` (see the module header).
pub(crate) fn open(layout: &Layout, weights: DeepSpeedWeights) -> Result<Loaded> {
    let mut loaded = match (weights, &layout.module) {
        (DeepSpeedWeights::Module, Some(module)) => open_module(layout, module)?,
        (DeepSpeedWeights::Module, None) => return Err(zero3_module_error(&layout.dir)),
        (DeepSpeedWeights::Fp32, _) => zero::open_fp32(layout)?,
    };
    loaded.format = Format::DeepSpeed;
    loaded.side_dir = layout
        .parent
        .clone()
        .filter(|p| files::has_file(p, Path::new("config.json")).unwrap_or(false));
    loaded.metadata.insert("deepspeed_weights".into(), weights.to_string());
    Ok(loaded)
}

fn zero3_module_error(dir: &Path) -> Error {
    Error::bad_input(
        dir,
        "ZeRO-3 checkpoint: its module weights are placeholders of shape [0] (the parameters \
         live partitioned in the optimizer states); read the fp32 masters with \
         deepspeed_weights = \"fp32\"",
    )
}

/// The `module` state dict of `mp_rank_00_model_states.pt`; the step from `global_steps`.
fn open_module(layout: &Layout, path: &Path) -> Result<Loaded> {
    let mut loaded = torch::open(path, layout.open(path)?, Some("module"))?;
    if loaded.tensors.iter().any(|t| t.shape == [0]) {
        return Err(zero3_module_error(path.parent().unwrap_or(path)));
    }
    loaded.step = loaded.metadata.get("global_steps").and_then(|s| s.parse().ok()).or(loaded.step);
    Ok(loaded)
}

/// A `global_stepN/` directory, or one whose `latest` names it (see `detect`).
pub(crate) const FORMAT: FormatSpec = FormatSpec { detect: claim, weight_file, endings: &[] };

fn weight_file(name: &str) -> bool {
    name.ends_with(MODEL_SUFFIX) || name.ends_with(OPTIM_SUFFIX) || name == "latest"
}

fn claim(probe: &Probe<'_>) -> Claim {
    if probe.file.is_some() {
        return Ok(None);
    }
    let weights = probe.opts.deepspeed_weights;
    Ok(detect(probe.path)?.map(|layout| Box::new(FoundDeepSpeed { layout, weights }) as _))
}

struct FoundDeepSpeed {
    layout: Layout,
    weights: DeepSpeedWeights,
}

impl Found for FoundDeepSpeed {
    /// DeepSpeed's own completion rule; the HF marker does not apply.
    fn quick_check(&self, _marker: &str) -> Result<()> {
        quick_check(&self.layout, self.weights)
    }

    fn open(self: Box<Self>) -> Result<Loaded> {
        open(&self.layout, self.weights)
    }
}

#[cfg(test)]
mod tests {
    use super::{ranks, scan};

    #[test]
    fn pipeline_and_tensor_parallel_layouts_are_refused_by_name() {
        for (other, what) in [
            ("layer_01-model_00-model_states.pt", "pipeline-parallel"),
            ("mp_rank_01_model_states.pt", "tensor-parallel"),
            ("zero_pp_rank_0_mp_rank_01_optim_states.pt", "tensor-parallel"),
        ] {
            let tmp = tempfile::tempdir().unwrap();
            std::fs::write(tmp.path().join(super::MODULE_FILE), b"").unwrap();
            std::fs::write(tmp.path().join(other), b"").unwrap();
            let err = scan(tmp.path()).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(what) && err.contains(other), "{other}: {err}");
        }
    }

    #[test]
    fn latest_names_one_directory_exactly() {
        for ok in ["global_step2", "step.2", "..x"] {
            assert!(super::is_one_name(ok), "{ok}");
        }
        for bad in ["", ".", "..", "evil/", "evil/.", "evil//", "a/b", "/abs", "./evil"] {
            assert!(!super::is_one_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn rank_names() {
        assert_eq!(ranks("zero_pp_rank_3_mp_rank_00_optim_states.pt"), Some((3, 0)));
        assert_eq!(ranks("bf16_zero_pp_rank_12_mp_rank_00_optim_states.pt"), Some((12, 0)));
        assert_eq!(ranks("zero_pp_rank_0_mp_rank_01_model_states.pt"), Some((0, 1)));
        assert_eq!(ranks("zero_pp_rank_x_mp_rank_00_model_states.pt"), None);
        assert_eq!(ranks("mp_rank_00_model_states.pt"), None);
    }
}
