//! The daemon's TOML configuration: raw text → validated `Config`. Unknown keys are rejected,
//! values that can be wrong on their own (zero sizes, decays outside (0, 1)) reject themselves
//! during deserialisation so the error carries a line and column, and one `check()` does the
//! cross-field rules. Every command reads its file once, here: `Config::load` (the daemon,
//! `check-config`, `status`) or `Config::load_selection` (`average --select`, `report
//! --config`), both through the same parse. This module does not watch, select or publish
//! anything.
//!
//! The `[select]` (with `[select.sewa]`) and `[objective]` tables are typed by their owners
//! (`select::config`, `objective::config`) but parsed here, in the same pass, so their errors carry a line and column
//! too. What the file names on disk (directories, the evaluator program) is checked by
//! `commands::startup`, not here.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::average::{DtypeOverflow, IntPolicy, OutDType};
use crate::checked::{LoopbackAddr, MemoryBudget, Pattern, Positive};
use crate::error::{Error, Result};
use crate::objective::config::ObjectiveConfig;
use crate::select::{Method, SelectConfig};

/// Appended to every config error: where to look for a working example.
const HINT: &str = "(`sewa example-config` prints a config that documents every key)";

/// The shipped example config (`config/sewa.toml`), built into the binary so that an installed
/// sewa (`cargo install`, which copies no data files) can still print it.
pub const EXAMPLE: &str = include_str!("../../../../config/sewa.toml");

/// The daemon's configuration (`sewa watch`, `check-config`, `status`): every table, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub watch: WatchConfig,
    pub window: WindowConfig,
    pub select: SelectConfig,
    pub publish: PublishConfig,
    pub runtime: RuntimeConfig,
    /// Loss oracle for model-based selectors (the type is `objective`'s).
    pub objective: Option<ObjectiveConfig>,
    /// The file this was read from (relative objective data paths start at its directory).
    pub source: Option<PathBuf>,
    /// Facts about the file worth a warning that do not make it wrong (a key the chosen
    /// method ignores): printed by `check-config`, logged by `watch`.
    pub notes: Vec<String>,
}

/// The file's tables as written. `[watch]` and `[publish]` are optional here: a one-shot
/// selection (`average --select`, `report --config`) may take a file with only `[objective]`
/// and `[select]`; the daemon requires both (`Config::parse`). `[objective]` is read by its own
/// pass (its type depends on its `kind`), so it is only skipped here.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Tables {
    watch: Option<WatchConfig>,
    #[serde(default)]
    window: WindowConfig,
    #[serde(default)]
    select: SelectConfig,
    publish: Option<PublishConfig>,
    #[serde(default)]
    runtime: RuntimeConfig,
    #[serde(default, rename = "objective")]
    _objective: Option<serde::de::IgnoredAny>,
}

/// What a one-shot selection (`sewa average --select`, `sewa report --config`) takes from a
/// config file, read by the same parse as the daemon's (`Config::load_selection`) (a file with
/// `[watch]` and `[publish]` passes every daemon rule too).
#[derive(Clone, Debug)]
pub struct SelectionConfig {
    pub select: SelectConfig,
    /// Its `int_policy` is `[publish] int_policy` (default `latest`) until the command sets
    /// the one its average uses.
    pub objective: ObjectiveConfig,
    /// `[publish] int_policy`, when the file has a `[publish]` table.
    pub int_policy: Option<IntPolicy>,
    /// The file's directory: relative objective paths start there.
    pub base_dir: PathBuf,
}

/// Most `[runtime] threads`: far above any machine sewa shares with a trainer, low enough
/// that a typo (`threads = 100000`) is refused instead of starting that many threads.
pub const MAX_THREADS: usize = 1024;

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WatchConfig {
    /// The trainer's checkpoint directory. Only its direct entries are candidates.
    pub dir: PathBuf,
    /// Glob on entry names (files or directories) that are candidates.
    #[serde(default = "default_pattern")]
    pub pattern: Pattern,
    /// Quiet period: a candidate must see no event and no size/mtime change for this long.
    #[serde(default = "default_quiet_ms")]
    pub quiet_ms: u64,
    /// > 0: poll the directory at this interval instead of inotify (NFS, Lustre, FUSE).
    #[serde(default)]
    pub poll_interval_ms: u64,
    /// File whose presence marks an HF checkpoint directory as complete.
    #[serde(default = "default_marker")]
    pub marker: String,
    /// Torch checkpoints: the top-level entry holding the state dict (`sewa average
    /// --state-key`); `None`: the top level or `state_dict`, `model_state_dict`, `model`, `module`.
    #[serde(default)]
    pub state_key: Option<String>,
    /// DeepSpeed checkpoints: `"module"` (default) or `"fp32"` (`sewa average
    /// --deepspeed-weights`).
    #[serde(default)]
    pub deepspeed_weights: sewa_checkpoint::DeepSpeedWeights,
    /// Full rescan period, the backstop for missed events.
    #[serde(default = "default_rescan_s")]
    pub rescan_s: Positive,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    /// Number of most recent valid checkpoints (by training step) kept.
    #[serde(default = "default_window_size")]
    pub size: Positive,
    /// Free bytes to keep on the watched directory's filesystem: below it, members whose files
    /// were deleted are released (oldest first). Default: the larger of 5 % of the filesystem
    /// and twice the newest checkpoint's size (`daemon::disk`); 0 never releases.
    #[serde(default, deserialize_with = "crate::checked::de::opt_size")]
    pub min_free_bytes: Option<u64>,
    /// Keep members whose files were deleted (their blocks stay allocated while sewa holds
    /// them); false releases them at once, so the window follows the trainer's rotation.
    #[serde(default = "default_keep_deleted")]
    pub keep_deleted: bool,
}

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig {
            size: default_window_size(),
            min_free_bytes: None,
            keep_deleted: default_keep_deleted(),
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Publish every new selection.
    Latest,
    /// Publish only when the selection's loss beats the published one.
    Best,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PublishConfig {
    /// `*.safetensors` → one file; anything else → an HF-layout directory.
    pub out: PathBuf,
    #[serde(default = "default_policy")]
    pub policy: Policy,
    #[serde(default = "default_dtype")]
    pub dtype: OutDType,
    #[serde(default = "default_int_policy")]
    pub int_policy: IntPolicy,
    /// Averages beyond a narrower `dtype`'s range: "error" (not published) or "saturate".
    #[serde(default)]
    pub dtype_overflow: DtypeOverflow,
    /// Command run after each publication, with SEWA_MANIFEST and SEWA_OUTPUT in its
    /// environment (e.g. recompute BatchNorm statistics); its failure is logged, never fatal.
    #[serde(default)]
    pub on_publish: Vec<String>,
    /// `policy = "best"`: a published model whose newest member is more than this many steps
    /// older than the window's newest member no longer blocks a selection with a worse loss.
    #[serde(default)]
    pub max_age_steps: Option<Positive>,
    /// TensorBoard event files: after each selection its figures are appended as scalars at
    /// the window's newest step (`daemon::tensorboard`). Unset: nothing is written.
    #[serde(default)]
    pub tensorboard_dir: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Worker threads for averaging and selection.
    #[serde(default = "default_threads")]
    pub threads: Positive,
    /// Status JSON (default: `<state_dir>/status.json`).
    #[serde(default)]
    pub status_file: Option<PathBuf>,
    /// Private state (default: `.sewa/` beside the published output).
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// Exact recompute of the running average after this many incremental updates.
    #[serde(default = "default_recompute_every")]
    pub recompute_every: Positive,
    /// Bytes sewa may keep between publications: the running average (4 bytes per float
    /// parameter) is kept only when it fits; otherwise every publication streams the selected
    /// members (k reads). "auto": a quarter of the memory available at start-up.
    #[serde(default)]
    pub memory_budget: MemoryBudget,
    /// Seconds one unit of pipeline work (a load, an evaluator call, an average, a publish)
    /// may take before the pipeline counts as stuck and the systemd watchdog is no longer fed.
    /// Default: 60, plus the evaluator's longer timeout with `[objective] kind = "command"`.
    #[serde(default)]
    pub stall_s: Option<Positive>,
    /// A Prometheus text endpoint (`GET /metrics`) on this loopback address (`daemon::metrics`);
    /// anything but loopback is refused at its line. Unset: nothing is bound.
    #[serde(default)]
    pub metrics_addr: Option<LoopbackAddr>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            threads: default_threads(),
            status_file: None,
            state_dir: None,
            recompute_every: default_recompute_every(),
            memory_budget: MemoryBudget::Auto,
            stall_s: None,
            metrics_addr: None,
        }
    }
}

fn default_pattern() -> Pattern {
    Pattern(glob::Pattern::new("*").expect("static glob"))
}
fn default_quiet_ms() -> u64 {
    2000
}
fn default_marker() -> String {
    "trainer_state.json".to_string()
}
fn default_rescan_s() -> Positive {
    Positive(60)
}
fn default_window_size() -> Positive {
    Positive(20)
}
fn default_keep_deleted() -> bool {
    true
}
fn default_policy() -> Policy {
    Policy::Latest
}
fn default_dtype() -> OutDType {
    OutDType::Keep
}
fn default_int_policy() -> IntPolicy {
    IntPolicy::Latest
}
fn default_threads() -> Positive {
    Positive(1)
}
fn default_recompute_every() -> Positive {
    Positive(16)
}

/// Keys written in `text` that the chosen method does not read: a warning each, since the
/// user expects them to matter (`k = 5` with `method = "uniform"`, which averages the whole
/// window).
fn ignored_keys(cfg: &Config, text: &str) -> Vec<String> {
    let raw: toml::Table = toml::from_str(text).unwrap_or_default();
    let given = |key: &str| raw.get("select").and_then(|s| s.get(key)).is_some();
    let method = cfg.select.method;
    let mut notes = Vec::new();
    if given("k") && !method.uses_k() {
        notes.push(format!(
            "[select] k = {} is ignored: method {:?} does not average a fixed number of members",
            cfg.select.k.get(),
            method.name()
        ));
    }
    for (key, user) in [("wsm_shape", Method::Wsm), ("weights", Method::Weights)] {
        if given(key) && method != user {
            notes.push(format!(
                "[select] {key} is ignored: only method = {:?} reads it (method is {:?})",
                user.name(),
                method.name()
            ));
        }
    }
    notes
}

/// The directory relative paths in the config file `path` start from: the file's own
/// directory, absolute (a bare `sewa.toml` has the parent "", which no process can start in).
pub fn config_dir(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    match abs.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The config file's text (`file::read_small`: a regular file of at most `MAX_CONFIG_BYTES`).
fn read_text(path: &Path) -> Result<String> {
    let bytes =
        file::read_small(path, file::MAX_CONFIG_BYTES).map_err(|why| Error::config(path, why))?;
    String::from_utf8(bytes).map_err(|e| Error::config(path, format!("is not UTF-8 text: {e}")))
}

/// The file's tables and its `[objective]` (by its kind), each value checked on its own; errors
/// carry the file's line and column.
fn parse_tables(text: &str, path: &Path) -> Result<(Tables, Option<ObjectiveConfig>)> {
    let bad =
        |e: toml::de::Error| Error::config(path, format!("{}\n{HINT}", e.to_string().trim_end()));
    let tables: Tables = toml::from_str(text).map_err(bad)?;
    let objective = ObjectiveConfig::from_config_text(text).map_err(bad)?;
    Ok((tables, objective))
}

/// A separate acceptance split judges whether a selection replaces the published model: only
/// `policy = "best"` does that.
fn check_acceptance(o: Option<&ObjectiveConfig>, policy: Policy, path: &Path) -> Result<()> {
    if o.is_some_and(|o| o.has_acceptance()) && policy != Policy::Best {
        let msg = "[objective] acceptance_data / acceptance_command are only used with \
                   [publish] policy = \"best\" (they judge whether a selection replaces the \
                   published model)";
        return Err(Error::config(path, format!("{msg}\n{HINT}")));
    }
    Ok(())
}

impl Config {
    /// Read (`file::read_small`: a regular file of at most `MAX_CONFIG_BYTES`), parse and check
    /// a config file.
    pub fn load(path: &Path) -> Result<Config> {
        let mut cfg = Config::parse(&read_text(path)?, path)?;
        cfg.resolve_relative_paths(&config_dir(path));
        cfg.source = Some(path.to_path_buf());
        Ok(cfg)
    }

    /// Every relative path in the file means "relative to the file's directory", whoever starts
    /// sewa from wherever: resolved here, once, so nothing downstream depends on the cwd.
    fn resolve_relative_paths(&mut self, dir: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        resolve(&mut self.watch.dir);
        resolve(&mut self.publish.out);
        self.runtime.state_dir.as_mut().map(resolve);
        self.runtime.status_file.as_mut().map(resolve);
        self.publish.tensorboard_dir.as_mut().map(resolve);
    }

    /// Parse and check config text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config> {
        let (tables, objective) = parse_tables(text, path)?;
        let missing = |table: &str, example: &str| {
            let msg = format!("no [{table}] table: `sewa watch` needs one ({example})");
            Error::config(path, format!("{msg}\n{HINT}"))
        };
        let watch = tables.watch.ok_or_else(|| missing("watch", "dir = \"checkpoints\""))?;
        let publish =
            tables.publish.ok_or_else(|| missing("publish", "out = \"avg/model.safetensors\""))?;
        let mut cfg = Config {
            watch,
            window: tables.window,
            select: tables.select,
            publish,
            runtime: tables.runtime,
            objective,
            source: None,
            notes: Vec::new(),
        };
        if let Some(o) = cfg.objective.as_mut() {
            o.int_policy = cfg.publish.int_policy; // evaluators mix integer buffers by it
        }
        cfg.check().map_err(|msg| Error::config(path, format!("{msg}\n{HINT}")))?;
        cfg.notes = ignored_keys(&cfg, text);
        // The owners' cross-field rules (their single values rejected themselves above).
        cfg.select.sewa.check(path)?;
        cfg.objective.as_ref().map(|o| o.check(path)).transpose()?;
        check_acceptance(cfg.objective.as_ref(), cfg.publish.policy, path)?;
        Ok(cfg)
    }

    /// Read and check a config file for a one-shot selection: the same parse as
    /// [`load`](Self::load); a file with `[watch]` and `[publish]` is a daemon config and
    /// passes all of its rules; one without them needs an `[objective]` table and passes the
    /// rules among the tables it has.
    pub fn load_selection(path: &Path) -> Result<SelectionConfig> {
        let text = read_text(path)?;
        let base_dir = config_dir(path);
        let (has_watch, has_publish) = {
            let raw: toml::Table = toml::from_str(&text).unwrap_or_default();
            (raw.contains_key("watch"), raw.contains_key("publish"))
        };
        let (select, objective, int_policy) = if has_watch || has_publish {
            let cfg = Config::parse(&text, path)?;
            (cfg.select, cfg.objective, Some(cfg.publish.int_policy))
        } else {
            let (tables, objective) = parse_tables(&text, path)?;
            tables.select.sewa.check(path)?;
            objective.as_ref().map(|o| o.check(path)).transpose()?;
            check_acceptance(objective.as_ref(), Policy::Latest, path)?;
            (tables.select, objective, None)
        };
        let mut objective = objective.ok_or_else(|| {
            Error::config(path, "no [objective] table: model-based selection needs one")
        })?;
        objective.int_policy = int_policy.unwrap_or_default();
        Ok(SelectionConfig { select, objective, int_policy, base_dir })
    }

    /// Directory relative objective paths start from: the config file's.
    pub fn base_dir(&self) -> PathBuf {
        self.source.as_deref().map_or_else(|| PathBuf::from("."), config_dir)
    }

    /// Cross-field rules that no single value can check.
    pub fn check(&self) -> std::result::Result<(), String> {
        let (k, size) = (self.select.k.get(), self.window.size.get());
        // A method that ignores k (uniform averages the whole window) is not held to it.
        if k > size && self.select.method.uses_k() {
            return Err(format!(
                "[select] k = {k} is larger than [window] size = {size}; lower k or raise size"
            ));
        }
        let threads = self.runtime.threads.get();
        if threads > MAX_THREADS {
            return Err(format!(
                "[runtime] threads = {threads} is more than {MAX_THREADS}; sewa shares the \
                 machine with a trainer: a few threads are plenty"
            ));
        }
        if self.select.method.needs_objective() && self.objective.is_none() {
            return Err(format!(
                "[select] method = {:?} needs an [objective] table",
                self.select.method.name()
            ));
        }
        if self.publish.policy == Policy::Best && !self.select.method.needs_objective() {
            return Err(format!(
                "[publish] policy = \"best\" compares selection losses, but method {:?} has \
                 none; use policy = \"latest\" or a model-based method (sewa, greedy, ...)",
                self.select.method.name()
            ));
        }
        if self.watch.state_key.as_deref() == Some("") {
            return Err("[watch] state_key is empty; remove it to use the default keys".into());
        }
        if self.publish.max_age_steps.is_some() && self.publish.policy != Policy::Best {
            return Err("[publish] max_age_steps is only used with policy = \"best\"".to_string());
        }
        self.select.check_weights(size)?;
        let min = self.select.min_members();
        if min > size {
            return Err(format!(
                "[select] min_members = {min} is larger than [window] size = {size}: nothing \
                 would ever be selected; lower min_members (or k) or raise size"
            ));
        }
        if self.watch.marker.is_empty() || self.watch.marker.contains('/') {
            return Err("[watch] marker must be a plain file name".to_string());
        }
        if self.publish.out.as_os_str().is_empty() {
            return Err("[publish] out is empty".to_string());
        }
        if self.publish.tensorboard_dir.as_ref().is_some_and(|d| d.as_os_str().is_empty()) {
            return Err("[publish] tensorboard_dir is empty; remove it to write no events".into());
        }
        if self.publish.out == self.watch.dir {
            return Err("[publish] out cannot be the watched directory itself".to_string());
        }
        Ok(())
    }

    /// Private state directory: configured, or `.sewa/` beside the output.
    pub fn state_dir(&self) -> PathBuf {
        if let Some(d) = &self.runtime.state_dir {
            return d.clone();
        }
        let parent = self.publish.out.parent().filter(|p| !p.as_os_str().is_empty());
        parent.unwrap_or(Path::new(".")).join(".sewa")
    }

    /// Where the status JSON is written.
    pub fn status_file(&self) -> PathBuf {
        self.runtime.status_file.clone().unwrap_or_else(|| self.state_dir().join("status.json"))
    }
}

mod file;
pub use file::{MAX_CONFIG_BYTES, read_small};

#[cfg(test)]
mod tests;
