//! The daemon's TOML configuration: raw text → validated `Config`. Unknown keys are rejected,
//! values that can be wrong on their own (zero sizes, decays outside (0, 1)) reject themselves
//! during deserialisation so the error carries a line and column, and one `check()` does the
//! cross-field rules. This module does not watch, select or publish anything.
//!
//! The `[objective]` and `[select.sewa]` tables are typed by their owners (`objective::config`,
//! `select::sewa`) but parsed here, in the same pass, so their errors carry a line and column
//! too. What the file names on disk (directories, the evaluator program) is checked by
//! `commands::startup`, not here.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

pub use crate::average::{DtypeOverflow, IntPolicy, OutDType};
use crate::error::{Error, Result};
use crate::objective::config::ObjectiveConfig;
use crate::select::SewaConfig;

/// Appended to every config error: where to look for a working example.
const HINT: &str = "(`sewa example-config` prints a config that documents every key)";

/// The shipped example config (`config/sewa.toml`), built into the binary so that an installed
/// sewa (`cargo install`, which copies no data files) can still print it.
pub const EXAMPLE: &str = include_str!("../config/sewa.toml");

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub watch: WatchConfig,
    #[serde(default)]
    pub window: WindowConfig,
    #[serde(default)]
    pub select: SelectConfig,
    pub publish: PublishConfig,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// Loss oracle for model-based selectors (the type is `objective`'s).
    #[serde(default)]
    pub objective: Option<ObjectiveConfig>,
    /// The file this was read from (relative objective data paths start at its directory).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

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
}

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig { size: default_window_size() }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    Uniform,
    Lawa,
    Ema,
    BestMetric,
    Greedy,
    Exhaustive,
    Random,
    Sewa,
}

impl Method {
    /// Selectors that need an `[objective]` (and so produce a loss).
    pub fn needs_objective(self) -> bool {
        matches!(self, Method::Greedy | Method::Exhaustive | Method::Random | Method::Sewa)
    }
    pub fn name(self) -> &'static str {
        match self {
            Method::Uniform => "uniform",
            Method::Lawa => "lawa",
            Method::Ema => "ema",
            Method::BestMetric => "best-metric",
            Method::Greedy => "greedy",
            Method::Exhaustive => "exhaustive",
            Method::Random => "random",
            Method::Sewa => "sewa",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricMode {
    Min,
    Max,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SelectConfig {
    #[serde(default = "default_method")]
    pub method: Method,
    /// Members to average (lawa, best-metric, model-based selectors).
    #[serde(default = "default_k")]
    pub k: Positive,
    /// Re-select after this many new window members.
    #[serde(default = "default_every")]
    pub every: Positive,
    /// EMA decay per checkpoint, newest weight 1, the one before `decay`, ...
    #[serde(default = "default_ema_decay")]
    pub ema_decay: UnitOpen,
    /// Metric key for best-metric: safetensors `__metadata__` key or trainer_state.json field.
    #[serde(default = "default_metric")]
    pub metric: String,
    /// Whether smaller (min) or larger (max) metric values are better.
    #[serde(default = "default_metric_mode")]
    pub metric_mode: MetricMode,
    /// Window members needed before the first selection (see `min_members()` for the default).
    #[serde(default)]
    pub min_members: Option<Positive>,
    /// SeWA options (the type is the SeWA selector's); defaults when the table is absent.
    #[serde(default)]
    pub sewa: SewaConfig,
}

impl Default for SelectConfig {
    fn default() -> Self {
        SelectConfig {
            method: default_method(),
            k: default_k(),
            every: default_every(),
            ema_decay: default_ema_decay(),
            metric: default_metric(),
            metric_mode: default_metric_mode(),
            min_members: None,
            sewa: SewaConfig::default(),
        }
    }
}

impl SelectConfig {
    /// Window members needed before the daemon selects at all: `min_members`, or by default `k`
    /// for the methods that average k members (lawa, best-metric, sewa, exhaustive, random: an
    /// "average of the last 5" made of 1 checkpoint is that checkpoint under a false name) and 1
    /// for those that average whatever the window holds (uniform, ema) or grow their own set
    /// (greedy).
    pub fn min_members(&self) -> usize {
        if let Some(n) = self.min_members {
            return n.get();
        }
        match self.method {
            Method::Uniform | Method::Ema | Method::Greedy => 1,
            _ => self.k.get(),
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
    /// Seconds one unit of pipeline work (a load, an evaluator call, an average, a publish)
    /// may take before the pipeline counts as stuck and the systemd watchdog is no longer fed.
    /// Default: 60, plus the evaluator's longer timeout with `[objective] kind = "command"`.
    #[serde(default)]
    pub stall_s: Option<Positive>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            threads: default_threads(),
            status_file: None,
            state_dir: None,
            recompute_every: default_recompute_every(),
            stall_s: None,
        }
    }
}

/// An integer ≥ 1 (rejected at its line otherwise).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Positive(pub u64);

impl Positive {
    pub fn get(self) -> usize {
        self.0 as usize
    }
}

impl<'de> Deserialize<'de> for Positive {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = i64::deserialize(d)?;
        if v < 1 {
            return Err(serde::de::Error::custom(format!("must be at least 1, got {v}")));
        }
        Ok(Positive(v as u64))
    }
}

/// `deserialize_with` helpers for the owners' tables (`[objective]`, `[select.sewa]`), whose
/// plain-number fields must reject themselves at their line as this module's types do.
pub mod de {
    use serde::{Deserialize, Deserializer};

    /// An integer ≥ 1.
    pub fn at_least_one<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        super::Positive::deserialize(d).map(|p| p.get())
    }

    /// An optional integer ≥ 1.
    pub fn opt_at_least_one<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
        at_least_one(d).map(Some)
    }

    /// A finite number > 0.
    pub fn positive<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        let v = f64::deserialize(d)?;
        if !(v.is_finite() && v > 0.0) {
            return Err(serde::de::Error::custom(format!("must be a positive number, got {v}")));
        }
        Ok(v)
    }
}

/// A float strictly between 0 and 1.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UnitOpen(pub f64);

impl<'de> Deserialize<'de> for UnitOpen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        if !(v > 0.0 && v < 1.0) {
            return Err(serde::de::Error::custom(format!(
                "must be strictly between 0 and 1 (e.g. 0.9), got {v}"
            )));
        }
        Ok(UnitOpen(v))
    }
}

/// A validated glob on entry names.
#[derive(Clone)]
pub struct Pattern(pub glob::Pattern);

impl Pattern {
    pub fn matches(&self, name: &str) -> bool {
        self.0.matches(name)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0.as_str())
    }
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.contains('/') {
            return Err(serde::de::Error::custom(
                "matches entry names directly under `dir`; it cannot contain '/'",
            ));
        }
        glob::Pattern::new(&s)
            .map(Pattern)
            .map_err(|e| serde::de::Error::custom(format!("bad glob {s:?}: {e}")))
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
fn default_method() -> Method {
    Method::Lawa
}
fn default_k() -> Positive {
    Positive(5)
}
fn default_every() -> Positive {
    Positive(1)
}
fn default_ema_decay() -> UnitOpen {
    UnitOpen(0.9)
}
fn default_metric() -> String {
    "eval_loss".to_string()
}
fn default_metric_mode() -> MetricMode {
    MetricMode::Min
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

/// The directory relative paths in the config file `path` start from: the file's own
/// directory, absolute (a bare `sewa.toml` has the parent "", which no process can start in).
pub fn config_dir(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    match abs.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

impl Config {
    /// Read, parse and check a config file.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::config(path, format!("cannot read: {e}")))?;
        let mut cfg = Config::parse(&text, path)?;
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
    }

    /// Parse and check config text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config> {
        let mut cfg: Config = toml::from_str(text)
            .map_err(|e| Error::config(path, format!("{}\n{HINT}", e.to_string().trim_end())))?;
        if let Some(o) = cfg.objective.as_mut() {
            o.int_policy = cfg.publish.int_policy; // evaluators mix integer buffers by it
        }
        cfg.check().map_err(|msg| Error::config(path, format!("{msg}\n{HINT}")))?;
        // The owners' cross-field rules (their single values rejected themselves above).
        cfg.select.sewa.check(path)?;
        cfg.objective.as_ref().map(|o| o.check(path)).transpose()?;
        if cfg.objective.as_ref().is_some_and(|o| o.has_acceptance())
            && cfg.publish.policy != Policy::Best
        {
            let msg = "[objective] acceptance_data / acceptance_command are only used with \
                       [publish] policy = \"best\" (they judge whether a selection replaces the \
                       published model)";
            return Err(Error::config(path, format!("{msg}\n{HINT}")));
        }
        Ok(cfg)
    }

    /// Directory relative objective paths start from: the config file's.
    pub fn base_dir(&self) -> PathBuf {
        self.source.as_deref().map_or_else(|| PathBuf::from("."), config_dir)
    }

    /// Cross-field rules that no single value can check.
    pub fn check(&self) -> std::result::Result<(), String> {
        let (k, size) = (self.select.k.get(), self.window.size.get());
        if k > size {
            return Err(format!(
                "[select] k = {k} is larger than [window] size = {size}; lower k or raise size"
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

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "[watch]\ndir = \"runs\"\n[publish]\nout = \"runs/avg/model.safetensors\"\n";

    fn parse(text: &str) -> Result<Config> {
        Config::parse(text, Path::new("t.toml"))
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.watch.quiet_ms, 2000);
        assert_eq!(c.window.size, Positive(20));
        assert_eq!(c.select.method, Method::Lawa);
        assert_eq!(c.select.k, Positive(5));
        assert_eq!(c.publish.policy, Policy::Latest);
        assert_eq!(c.state_dir(), PathBuf::from("runs/avg/.sewa"));
        assert_eq!(
            crate::publish::manifest_path(&c.publish.out),
            PathBuf::from("runs/avg/model.safetensors.manifest.json")
        );
    }

    #[test]
    fn unknown_key_is_rejected_with_line() {
        let err = parse(&format!("{MIN}[window]\nsise = 3\n")).unwrap_err().to_string();
        assert!(err.contains("sise") && err.contains("line 6"), "{err}");
    }

    #[test]
    fn bad_values_reject_themselves_with_position() {
        let err = parse(&format!("{MIN}[window]\nsize = 0\n")).unwrap_err().to_string();
        assert!(err.contains("at least 1") && err.contains("line 6"), "{err}");
        let err = parse(&format!("{MIN}[select]\nema_decay = 1.5\n")).unwrap_err().to_string();
        assert!(err.contains("between 0 and 1"), "{err}");
        let err = parse(&format!("{MIN}[select]\nmethod = \"lava\"\n")).unwrap_err().to_string();
        assert!(err.contains("lava") && err.contains("lawa"), "{err}");
    }

    #[test]
    fn cross_field_rules() {
        let err = parse(&format!("{MIN}[window]\nsize = 3\n[select]\nk = 5\n")).unwrap_err();
        assert!(err.to_string().contains("larger than [window] size"), "{err}");
        assert_eq!(err.exit_code(), 78);
        let err = parse(&format!("{MIN}policy = \"best\"\n")).unwrap_err().to_string();
        assert!(err.contains("policy = \"best\""), "{err}");
        let err = parse(&format!("{MIN}[select]\nmethod = \"sewa\"\n")).unwrap_err().to_string();
        assert!(err.contains("needs an [objective]"), "{err}");
    }

    #[test]
    fn reserved_tables_parse() {
        let text = format!(
            "{MIN}policy = \"best\"\n[select]\nmethod = \"sewa\"\n[select.sewa]\nsamples = 8\n\
             [objective]\nkind = \"builtin\"\ndata = \"sel.safetensors\"\n"
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.select.sewa.samples, 8);
        assert_eq!(c.objective.unwrap().data, PathBuf::from("sel.safetensors"));
    }

    /// The model-based tables used to be kept raw and parsed again later, which lost the
    /// position of their errors; parsed in the one pass, they point at the line.
    #[test]
    fn errors_inside_objective_and_sewa_tables_have_line_and_column() {
        let head = format!("{MIN}[select]\nmethod = \"sewa\"\n");
        let cases = [
            ("[select.sewa]\nsamples = 4\nsampels = 8\n", "sampels", "line 9, column 1"),
            ("[select.sewa]\nsamples = 0\n", "at least 1", "line 8, column 11"),
            ("[select.sewa]\nlr = -1.0\n", "positive", "line 8, column 6"),
            ("[objective]\ndata = \"d\"\nmodle = \"mlp\"\n", "modle", "line 9, column 1"),
            ("[objective]\ndata = \"d\"\nbatch = 0\n", "at least 1", "line 9, column 9"),
            (
                "[objective]\nkind = \"command\"\ncommand = [\"x\"]\ntimeout_s = 0\n",
                "> 0",
                "line 10",
            ),
        ];
        for (table, want, at) in cases {
            let err = parse(&format!("{head}{table}")).unwrap_err().to_string();
            assert!(err.contains(want) && err.contains(at), "{table}: {err}");
        }
    }

    /// Issue 9 item 12: LAWA published 1-member "averages" before k checkpoints existed.
    #[test]
    fn methods_that_average_k_members_wait_for_k_unless_min_members_says_otherwise() {
        let min = |select: &str| {
            let text = format!("{MIN}[select]\n{select}\n[objective]\ndata = \"d\"\n");
            parse(&text).unwrap().select.min_members()
        };
        for method in ["lawa", "best-metric", "sewa", "exhaustive", "random"] {
            assert_eq!(min(&format!("method = \"{method}\"\nk = 3")), 3, "{method}");
        }
        for method in ["uniform", "ema", "greedy"] {
            assert_eq!(min(&format!("method = \"{method}\"\nk = 3")), 1, "{method}");
        }
        assert_eq!(min("method = \"lawa\"\nk = 3\nmin_members = 1"), 1);
        assert_eq!(min("method = \"uniform\"\nmin_members = 4"), 4);
        let err = parse(&format!(
            "{MIN}[window]\nsize = 4\n[select]\nmethod = \"uniform\"\nk = 2\nmin_members = 5\n"
        ));
        assert!(err.unwrap_err().to_string().contains("min_members = 5"));
        let err = parse(&format!("{MIN}[select]\nmin_members = 0\n")).unwrap_err().to_string();
        assert!(err.contains("at least 1") && err.contains("line 6"), "{err}");
    }

    #[test]
    fn best_only_options_are_refused_under_policy_latest() {
        let err = parse(&format!("{MIN}max_age_steps = 100\n")).unwrap_err().to_string();
        assert!(err.contains("max_age_steps") && err.contains("policy = \"best\""), "{err}");
        let objective = "[objective]\ndata = \"d\"\nacceptance_data = \"a\"\n";
        let sewa = format!("[select]\nmethod = \"sewa\"\n{objective}");
        let err = parse(&format!("{MIN}{sewa}")).unwrap_err().to_string();
        assert!(err.contains("acceptance_data") && err.contains("policy = \"best\""), "{err}");
        let best = format!("{MIN}policy = \"best\"\nmax_age_steps = 100\n{sewa}");
        let c = parse(&best).unwrap();
        assert_eq!(c.publish.max_age_steps, Some(Positive(100)));
    }

    /// Relative paths mean "relative to the config file", whatever the cwd: a bare file name
    /// used to give the evaluator the directory "" and `[watch] dir` depended on the cwd.
    #[test]
    fn relative_paths_resolve_against_the_config_files_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("sewa.toml");
        let text = "[watch]\ndir = \"runs\"\n[publish]\nout = \"avg/model.safetensors\"\n\
                    [runtime]\nstate_dir = \"state\"\n";
        std::fs::write(&path, text).unwrap();
        let cfg = Config::load(&path).unwrap();
        assert_eq!(cfg.watch.dir, tmp.path().join("runs"));
        assert_eq!(cfg.publish.out, tmp.path().join("avg/model.safetensors"));
        assert_eq!(cfg.state_dir(), tmp.path().join("state"));
        assert_eq!(cfg.base_dir(), tmp.path());
        assert_eq!(config_dir(Path::new("sewa.toml")), std::env::current_dir().unwrap());
    }
}
