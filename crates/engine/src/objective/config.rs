//! `[objective]` table: which loss oracle to build and from what data, by `kind`
//! (`ObjectiveConfig::kind`: a builtin model or an external evaluator, each with its own keys).
//! The table as written is read by the type of its `kind` (`BuiltinTable`, `CommandTable`: the
//! other kind's keys are errors at their line), from the whole config text so errors keep the
//! file's line; then its cross-field checks. Building the objective is `build`'s; this module
//! evaluates nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::command::{CommandConfig, default_startup_timeout_s, default_timeout_s};
use crate::average::IntPolicy;
use crate::error::{Error, Result};

/// Where the loss is computed: in-process candle models, or an external evaluator process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectiveKind {
    #[default]
    Builtin,
    Command,
}

/// The `[objective]` table, as the rest of sewa reads it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ObjectiveConfig {
    /// What computes the loss, with the keys of that kind only.
    #[serde(flatten)]
    pub kind: Kind,
    /// The integer policy of the average this objective selects for (`[publish] int_policy`,
    /// or `sewa average --int-policy`), set by whoever builds the config (not a key of this
    /// table): a protocol 2 evaluator is told which member's integer buffers a mixture carries.
    #[serde(skip)]
    pub int_policy: IntPolicy,
}

/// `[objective]`'s keys, by `kind`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Kind {
    Builtin(BuiltinConfig),
    Command(EvaluatorConfig),
}

impl Default for Kind {
    fn default() -> Self {
        Kind::Builtin(BuiltinConfig::default())
    }
}

/// `kind = "builtin"` (the default). Defaults: `model = "mlp"`, `activation = "relu"`,
/// `loss = "cross_entropy"`, `batch` = all rows, `device = "cpu"`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct BuiltinConfig {
    pub model: ModelKind,
    /// safetensors file with `inputs` (f32 [N, D]) and `targets`; relative to the config file.
    /// Required.
    pub data: PathBuf,
    pub activation: Activation,
    pub loss: LossKind,
    /// Where the model is evaluated (`"cpu"`, `"cuda"`, `"cuda:N"`).
    pub device: DeviceSpec,
    /// Rows per forward/backward chunk. The loss is always over all rows; this bounds memory.
    pub batch: Option<usize>,
    /// `policy = "best"`: a second held-out file (same layout as `data`) on which a selection
    /// is compared with the published model, so that acceptance is not judged on the split the
    /// selection optimised. Without it the selection's own loss is compared.
    pub acceptance_data: Option<PathBuf>,
}

impl BuiltinConfig {
    /// The data path, resolved against the directory of the config file.
    pub fn data_path(&self, base_dir: &Path) -> PathBuf {
        if self.data.is_absolute() { self.data.clone() } else { base_dir.join(&self.data) }
    }
}

/// `kind = "command"`: an external evaluator process (see `command::CommandConfig`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct EvaluatorConfig {
    /// The evaluator's program and arguments.
    pub command: Vec<String>,
    pub timeout_s: Option<f64>,
    pub startup_timeout_s: Option<f64>,
    pub env: BTreeMap<String, String>,
    /// Working directory of the evaluator, relative to the config file.
    pub cwd: Option<PathBuf>,
    /// Where protocol 1's candidate and gradient files and protocol 2's member copies are
    /// exchanged (default: /dev/shm, else the temp dir).
    pub staging_dir: Option<PathBuf>,
    /// `policy = "best"`: a second evaluator process (same protocol and settings as
    /// `command`) that computes the loss on the other split.
    pub acceptance_command: Vec<String>,
}

impl EvaluatorConfig {
    /// The evaluator's settings, `cwd` resolved against `base_dir`.
    pub fn command_config(&self, base_dir: &Path) -> CommandConfig {
        CommandConfig {
            command: self.command.clone(),
            timeout_s: self.timeout_s.unwrap_or_else(default_timeout_s),
            startup_timeout_s: self.startup_timeout_s.unwrap_or_else(default_startup_timeout_s),
            env: self.env.clone(),
            cwd: Some(self.cwd.as_ref().map_or(base_dir.to_path_buf(), |c| base_dir.join(c))),
            staging_dir: self.staging_dir.as_ref().map(|d| base_dir.join(d)),
            one_shot: false,
        }
    }
}

/// Which builtin model to infer from the checkpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    #[default]
    Mlp,
}

/// Where the builtin objective computes: `"cpu"` (default), `"cuda"` or `"cuda:N"`. CUDA needs
/// a build with `--features cuda`; asking for it otherwise is a config error with its position.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

impl DeviceSpec {
    /// The candle device (CUDA is initialised here, at the objective's first use).
    pub fn open(self) -> Result<candle_core::Device> {
        match self {
            DeviceSpec::Cpu => Ok(candle_core::Device::Cpu),
            DeviceSpec::Cuda(n) => candle_core::Device::new_cuda(n).map_err(|e| {
                Error::Internal(format!("[objective] device = \"cuda:{n}\" cannot be opened: {e}"))
            }),
        }
    }
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let cuda = |n: usize| {
            if cfg!(feature = "cuda") {
                Ok(DeviceSpec::Cuda(n))
            } else {
                Err(format!(
                    "device {s:?} needs CUDA, and this sewa was built without it \
                     (cargo install --features cuda)"
                ))
            }
        };
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => cuda(0),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => cuda(n),
                _ => Err(format!("unknown device {s:?}; expected \"cpu\", \"cuda\" or \"cuda:N\"")),
            },
        }
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            DeviceSpec::Cpu => s.serialize_str("cpu"),
            DeviceSpec::Cuda(n) => s.serialize_str(&format!("cuda:{n}")),
        }
    }
}

/// Non-linearity between the MLP's linear layers (none after the last).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    #[default]
    Relu,
    Gelu,
    Tanh,
}

/// Loss over the selection data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// Mean cross-entropy of logits against integer class ids.
    #[default]
    CrossEntropy,
    /// Mean squared error against f32 targets.
    Mse,
}

/// A key of the other kind: refused where it is written (serde reports the value's line and
/// column), naming the kind that takes it, instead of being accepted and ignored.
macro_rules! refuse {
    ($($f:ident: $msg:expr;)*) => {$(
        fn $f<'de, D: serde::Deserializer<'de>>(_: D) -> std::result::Result<Option<()>, D::Error> {
            Err(serde::de::Error::custom($msg))
        }
    )*};
}

const ONLY_COMMAND: &str = "is only used with kind = \"command\" (this [objective] is \
                            kind = \"builtin\", the default)";
const ONLY_BUILTIN: &str = "is only used with kind = \"builtin\" (this [objective] is \
                            kind = \"command\")";

refuse! {
    no_command: format!("[objective] command {ONLY_COMMAND}");
    no_timeout_s: format!("[objective] timeout_s {ONLY_COMMAND}");
    no_startup_timeout_s: format!("[objective] startup_timeout_s {ONLY_COMMAND}");
    no_env: format!("[objective] env {ONLY_COMMAND}");
    no_cwd: format!("[objective] cwd {ONLY_COMMAND}");
    no_staging_dir: format!("[objective] staging_dir {ONLY_COMMAND}");
    no_acceptance_command: "[objective] acceptance_command is for kind = \"command\"; with the \
        builtin objective name the file: acceptance_data = \"acceptance.safetensors\"";
    no_model: format!("[objective] model {ONLY_BUILTIN}");
    no_data: format!("[objective] data {ONLY_BUILTIN}: the evaluator reads its own data");
    no_activation: format!("[objective] activation {ONLY_BUILTIN}");
    no_loss: format!("[objective] loss {ONLY_BUILTIN}");
    no_device: format!("[objective] device {ONLY_BUILTIN}: the evaluator picks its own");
    no_batch: format!("[objective] batch {ONLY_BUILTIN}");
    no_acceptance_data: "[objective] acceptance_data is not supported with kind = \"command\" \
        (sewa never tells an evaluator which data to use); start a second evaluator on the \
        other split instead: acceptance_command = [\"python3\", \"eval.py\", \
        \"acceptance.safetensors\"]";
}

/// `[objective]` with `kind = "builtin"` (or no `kind`) as written: its own keys, and the
/// command kind's refused at their line.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // the other kind's keys are read only to be refused
struct BuiltinTable {
    #[serde(default)]
    kind: ObjectiveKind,
    #[serde(default)]
    model: ModelKind,
    #[serde(default)]
    data: PathBuf,
    #[serde(default)]
    activation: Activation,
    #[serde(default)]
    loss: LossKind,
    #[serde(default)]
    device: DeviceSpec,
    #[serde(default, deserialize_with = "crate::checked::de::opt_at_least_one")]
    batch: Option<usize>,
    #[serde(default)]
    acceptance_data: Option<PathBuf>,
    #[serde(default, deserialize_with = "no_command")]
    command: Option<()>,
    #[serde(default, deserialize_with = "no_timeout_s")]
    timeout_s: Option<()>,
    #[serde(default, deserialize_with = "no_startup_timeout_s")]
    startup_timeout_s: Option<()>,
    #[serde(default, deserialize_with = "no_env")]
    env: Option<()>,
    #[serde(default, deserialize_with = "no_cwd")]
    cwd: Option<()>,
    #[serde(default, deserialize_with = "no_staging_dir")]
    staging_dir: Option<()>,
    #[serde(default, deserialize_with = "no_acceptance_command")]
    acceptance_command: Option<()>,
}

/// `[objective]` with `kind = "command"` as written: its own keys, and the builtin kind's
/// refused at their line.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // the other kind's keys are read only to be refused
struct CommandTable {
    kind: ObjectiveKind,
    #[serde(default)]
    command: Vec<String>,
    #[serde(default, deserialize_with = "super::command::opt_timeout_s")]
    timeout_s: Option<f64>,
    #[serde(default, deserialize_with = "super::command::opt_timeout_s")]
    startup_timeout_s: Option<f64>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    cwd: Option<PathBuf>,
    #[serde(default)]
    staging_dir: Option<PathBuf>,
    #[serde(default)]
    acceptance_command: Vec<String>,
    #[serde(default, deserialize_with = "no_model")]
    model: Option<()>,
    #[serde(default, deserialize_with = "no_data")]
    data: Option<()>,
    #[serde(default, deserialize_with = "no_activation")]
    activation: Option<()>,
    #[serde(default, deserialize_with = "no_loss")]
    loss: Option<()>,
    #[serde(default, deserialize_with = "no_device")]
    device: Option<()>,
    #[serde(default, deserialize_with = "no_batch")]
    batch: Option<()>,
    #[serde(default, deserialize_with = "no_acceptance_data")]
    acceptance_data: Option<()>,
}

impl From<BuiltinTable> for ObjectiveConfig {
    fn from(t: BuiltinTable) -> Self {
        let BuiltinTable { model, data, activation, loss, device, batch, acceptance_data, .. } = t;
        let b = BuiltinConfig { model, data, activation, loss, device, batch, acceptance_data };
        ObjectiveConfig { kind: Kind::Builtin(b), ..Default::default() }
    }
}

impl From<CommandTable> for ObjectiveConfig {
    fn from(t: CommandTable) -> Self {
        let e = EvaluatorConfig {
            command: t.command,
            timeout_s: t.timeout_s,
            startup_timeout_s: t.startup_timeout_s,
            env: t.env,
            cwd: t.cwd,
            staging_dir: t.staging_dir,
            acceptance_command: t.acceptance_command,
        };
        ObjectiveConfig { kind: Kind::Command(e), ..Default::default() }
    }
}

/// A document whose only table read here is `[objective]` (the others are `config`'s).
#[derive(Deserialize)]
struct Nested<T> {
    objective: Option<T>,
}

impl ObjectiveConfig {
    /// The `[objective]` table of config `text` (`None`: the file has none), read by the type
    /// of its `kind`. `text` is deserialised again as a whole (not the table cut out of it), so
    /// an error's line and column are the file's.
    pub fn from_config_text(text: &str) -> std::result::Result<Option<Self>, toml::de::Error> {
        let raw: toml::Table = toml::from_str(text)?;
        let Some(table) = raw.get("objective") else { return Ok(None) };
        if is_command(table) {
            Ok(toml::from_str::<Nested<CommandTable>>(text)?.objective.map(Self::from))
        } else {
            Ok(toml::from_str::<Nested<BuiltinTable>>(text)?.objective.map(Self::from))
        }
    }

    /// `text` is the table itself (no `[objective]` header): for tests and tools.
    pub fn from_table_text(text: &str) -> std::result::Result<Self, toml::de::Error> {
        let raw: toml::Value = toml::from_str(text)?;
        if is_command(&raw) {
            toml::from_str::<CommandTable>(text).map(Self::from)
        } else {
            toml::from_str::<BuiltinTable>(text).map(Self::from)
        }
    }
}

/// Which table type reads `table`: `kind = "command"`, else builtin (whose `kind` field then
/// reports any other value, with its position).
fn is_command(table: &toml::Value) -> bool {
    table.get("kind").and_then(toml::Value::as_str) == Some("command")
}

impl ObjectiveConfig {
    /// A builtin objective on `data` with every other setting at its default.
    pub fn builtin(data: impl Into<PathBuf>) -> Self {
        let b = BuiltinConfig { data: data.into(), ..Default::default() };
        ObjectiveConfig { kind: Kind::Builtin(b), ..Default::default() }
    }

    /// The builtin kind's keys, if this is one.
    pub fn as_builtin(&self) -> Option<&BuiltinConfig> {
        match &self.kind {
            Kind::Builtin(b) => Some(b),
            Kind::Command(_) => None,
        }
    }

    /// The command kind's keys, if this is one.
    pub fn as_command(&self) -> Option<&EvaluatorConfig> {
        match &self.kind {
            Kind::Command(e) => Some(e),
            Kind::Builtin(_) => None,
        }
    }

    /// Which kind, without its keys.
    pub fn kind(&self) -> ObjectiveKind {
        match self.kind {
            Kind::Builtin(_) => ObjectiveKind::Builtin,
            Kind::Command(_) => ObjectiveKind::Command,
        }
    }

    /// Cross-field checks that serde cannot express.
    pub fn check(&self, config_path: &Path) -> Result<()> {
        let fail = |msg: &str| Err(Error::config(config_path, msg));
        match &self.kind {
            Kind::Builtin(b) if b.batch == Some(0) => fail("[objective] batch must be at least 1"),
            Kind::Builtin(b) if b.data.as_os_str().is_empty() => {
                fail("[objective] kind = \"builtin\" needs data = \"selection.safetensors\"")
            }
            Kind::Builtin(b)
                if b.acceptance_data.as_ref().is_some_and(|p| p.as_os_str().is_empty()) =>
            {
                fail("[objective] acceptance_data is empty")
            }
            Kind::Builtin(_) => Ok(()),
            Kind::Command(e) if e.acceptance_command.first().is_some_and(|c| c.is_empty()) => {
                fail("[objective] acceptance_command must name a program")
            }
            Kind::Command(e) => e.command_config(Path::new(".")).check(config_path),
        }
    }

    /// Whether a separate acceptance split is configured.
    pub fn has_acceptance(&self) -> bool {
        match &self.kind {
            Kind::Builtin(b) => b.acceptance_data.is_some(),
            Kind::Command(e) => !e.acceptance_command.is_empty(),
        }
    }

    /// How the evaluator is named in messages: its command line, or "objective".
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Command(e) if !e.command.is_empty() => e.command.join(" "),
            _ => "objective".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_unknown_keys() {
        let c = ObjectiveConfig::from_table_text("data = \"sel.safetensors\"").unwrap();
        c.check(Path::new("c.toml")).unwrap();
        let c = c.as_builtin().unwrap();
        assert_eq!(c.activation, Activation::Relu);
        assert_eq!(c.loss, LossKind::CrossEntropy);
        assert_eq!(c.batch, None);
        let e = ObjectiveConfig::from_table_text("data = \"x\"\nlr = 1").unwrap_err();
        assert!(e.to_string().contains("lr"), "{e}");
        assert!(ObjectiveConfig::from_table_text("data = \"x\"\nactivation = \"swish\"").is_err());
    }

    #[test]
    fn acceptance_split_is_named_the_way_each_kind_takes_data() {
        let parse = |text: &str| {
            let c = ObjectiveConfig::from_table_text(text).map_err(|e| e.to_string())?;
            c.check(Path::new("c.toml")).map(|()| c).map_err(|e| e.to_string())
        };
        let c = parse("data = \"sel\"\nacceptance_data = \"acc\"").unwrap();
        assert!(c.has_acceptance());
        assert!(!parse("data = \"sel\"").unwrap().has_acceptance());
        let e = parse("kind = \"command\"\ncommand = [\"e\"]\nacceptance_data = \"acc\"");
        assert!(e.unwrap_err().contains("acceptance_command = ["));
        let e = parse("data = \"sel\"\nacceptance_command = [\"e\"]").unwrap_err();
        assert!(e.contains("acceptance_data = "), "{e}");
        let c = parse("kind = \"command\"\ncommand = [\"e\"]\nacceptance_command = [\"f\"]");
        assert!(c.unwrap().has_acceptance());
    }

    /// Issue 20: `[objective]` is read by the type of its `kind`, so a key of the other kind
    /// (accepted and ignored before) is an error at its line, naming the key and the kind that
    /// takes it, wherever `kind` is written in the table.
    #[test]
    fn a_key_of_the_other_kind_is_refused_at_its_line() {
        let cases = [
            ("kind = \"command\"\ncommand = [\"e\"]\ndevice = \"cpu\"\n", "device", 3),
            ("data = \"x\"\nkind = \"command\"\ncommand = [\"e\"]\n", "data", 1),
            ("data = \"x\"\nenv = { A = \"1\" }\n", "env", 2),
            ("kind = \"builtin\"\ndata = \"x\"\ntimeout_s = 5\n", "timeout_s", 3),
            ("data = \"x\"\ncwd = \"/tmp\"\n", "cwd", 2),
        ];
        for (text, key, line) in cases {
            let e = ObjectiveConfig::from_table_text(text).unwrap_err().to_string();
            let at = format!("line {line}");
            assert!(e.contains(&format!("[objective] {key} is only used")), "{text}: {e}");
            assert!(e.contains(&at) && e.contains("column"), "{text}: {e}");
        }
        let e = ObjectiveConfig::from_table_text("kind = \"shell\"\n").unwrap_err().to_string();
        assert!(e.contains("shell") && e.contains("command") && e.contains("line 1"), "{e}");
        // Each kind's own keys still parse, `kind` absent meaning builtin.
        let c = ObjectiveConfig::from_table_text("data = \"x\"\ndevice = \"cpu\"\n").unwrap();
        assert_eq!(
            (c.kind(), c.as_builtin().unwrap().device),
            (ObjectiveKind::Builtin, DeviceSpec::Cpu)
        );
        let text = "kind = \"command\"\ncommand = [\"e\"]\ntimeout_s = 5\ncwd = \"w\"\n";
        let c = ObjectiveConfig::from_table_text(text).unwrap();
        assert_eq!(
            (c.kind(), c.as_command().unwrap().timeout_s),
            (ObjectiveKind::Command, Some(5.0))
        );
    }

    /// The `cuda` feature is real: `device` picks where the builtin objective computes. Without
    /// the feature, asking for CUDA is a config error naming the key's position and the fix.
    #[test]
    fn device_is_parsed_with_its_position_and_cuda_needs_the_feature() {
        let parse = |text: &str| {
            let c = ObjectiveConfig::from_table_text(text).map_err(|e| e.to_string())?;
            Ok::<_, String>(c.as_builtin().unwrap().clone())
        };
        assert_eq!(parse("data = \"x\"").unwrap().device, DeviceSpec::Cpu);
        assert_eq!(parse("data = \"x\"\ndevice = \"cpu\"").unwrap().device, DeviceSpec::Cpu);
        let e = parse("data = \"x\"\ndevice = \"gpu\"").unwrap_err();
        assert!(e.contains("line 2") && e.contains("unknown device"), "{e}");
        let cuda = parse("data = \"x\"\ndevice = \"cuda:1\"");
        if cfg!(feature = "cuda") {
            assert_eq!(cuda.unwrap().device, DeviceSpec::Cuda(1));
        } else {
            let e = cuda.unwrap_err();
            assert!(e.contains("line 2") && e.contains("--features cuda"), "{e}");
        }
    }
}
