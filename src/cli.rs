//! Command-line flags (clap derive). Flags only: no logic here; `commands` does the work.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use sewa_checkpoint::DeepSpeedWeights;
use sewa_engine::average::{DtypeOverflow, IntPolicy, OutDType};
use sewa_engine::checked::parse_size;
use sewa_engine::select::WsmShape;

#[derive(Debug, Parser)]
#[command(name = "sewa", version, about = "Selective Weight Averaging of training checkpoints")]
pub struct Cli {
    /// Log line format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Average checkpoints into one model, published atomically with a JSON manifest.
    Average(AverageArgs),
    /// Show a checkpoint's format, tensors (dtype, shape), size, step and metadata.
    Inspect(InspectArgs),
    /// Watch a trainer's checkpoint directory and keep publishing the selected average.
    Watch(WatchArgs),
    /// Print a running (or stopped) `sewa watch`'s status file for people.
    Status(StatusArgs),
    /// Run every check `sewa watch` runs at start-up, then exit (0 valid, 78 invalid).
    CheckConfig(CheckConfigArgs),
    /// Print an example config that documents every key (`sewa example-config > sewa.toml`).
    ExampleConfig,
    /// Train a small model on a synthetic noisy task, then compare every selector (SeWA too)
    /// on its checkpoint window and publish SeWA's average. Self-contained, no downloads.
    Demo(DemoArgs),
    /// Draw an SVG of a selection over its window (member losses, SeWA probabilities, chosen).
    Report(ReportArgs),
}

#[derive(Debug, Args)]
pub struct AverageArgs {
    /// Output: a path ending in .safetensors is one file; any other path is a Hugging Face
    /// directory (model.safetensors or shards, side files, manifest.json), or for PEFT
    /// adapters an adapter directory. Its parent directory must exist (or pass --parents).
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
    /// Create --out's missing parent directories (without it a missing one is an error).
    #[arg(long)]
    pub parents: bool,
    /// Non-negative weights, one per input (after --last), comma-separated; normalised to sum 1.
    /// Default: uniform.
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true, value_name = "W,W,...")]
    pub weights: Option<Vec<f64>>,
    /// A fixed rule for the weights instead of --weights: uniform (the default) or wsm
    /// (Megatron-LM's decay-shaped merge weights, see --wsm-shape; inputs ordered oldest first
    /// by training step when every input has one, else in the order given).
    #[arg(long, value_enum, value_name = "RULE", conflicts_with_all = ["weights", "select"])]
    pub method: Option<AverageMethod>,
    /// --method wsm: the decay shape turned into merge weights: linear (equal weights, the
    /// default as in Megatron's tool), cosine, exponential or minus-sqrt.
    #[arg(long, value_name = "SHAPE", requires = "method")]
    pub wsm_shape: Option<WsmShape>,
    /// Average only the last N inputs (by training step when every input has one, else in the
    /// order given).
    #[arg(long, value_name = "N")]
    pub last: Option<usize>,
    /// Output dtype of floating tensors: keep (the inputs' dtype), f32, bf16 or f16.
    #[arg(long, default_value_t = OutDType::Keep, value_name = "DTYPE")]
    pub dtype: OutDType,
    /// Integer/bool tensors (step counters, num_batches_tracked): copy from the latest input,
    /// the first, or refuse them (error). Default: --config's [publish] int_policy, else latest.
    #[arg(long, value_name = "POLICY")]
    pub int_policy: Option<IntPolicy>,
    /// Averages beyond a narrower --dtype's range (f16 above 65504): refuse them (error) or
    /// clamp them to the dtype's largest finite value (saturate).
    #[arg(long, default_value_t = DtypeOverflow::Error, value_name = "POLICY")]
    pub dtype_overflow: DtypeOverflow,
    /// Worker threads for the averaging kernel.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub threads: usize,
    /// With --threads 1, a second thread reads the inputs ahead of the arithmetic: auto (the
    /// default) turns it on when this process may run on two or more CPUs.
    #[arg(long, value_enum, default_value_t = ReadAhead::Auto, value_name = "WHEN")]
    pub read_ahead: ReadAhead,
    /// Strip this key prefix from every input (repeatable; `_orig_mod.` is always stripped).
    #[arg(long = "strip-prefix", value_name = "PREFIX")]
    pub strip_prefix: Vec<String>,
    /// Torch checkpoints: the top-level entry holding the state dict (`net` for
    /// `torch.save({"net": model.state_dict(), "step": s})`). Default: the top level itself, or
    /// `state_dict`, `model_state_dict`, `model` or `module`.
    #[arg(long, value_name = "KEY")]
    pub state_key: Option<String>,
    /// DeepSpeed checkpoints: `module` (the module state dict, training precision; ZeRO-1/2)
    /// or `fp32` (the fp32 masters rebuilt from every rank's optimizer states, as
    /// zero_to_fp32.py; needed for ZeRO-3).
    #[arg(long, default_value_t = DeepSpeedWeights::Module, value_name = "WEIGHTS")]
    pub deepspeed_weights: DeepSpeedWeights,
    /// PEFT adapters: `adapters` averages the adapters' A and B tensors (an adapter
    /// directory out); `merge-delta` averages the merged deltas (alpha/r)·B·A and adds them to
    /// --base (a full model out). avg(B)·avg(A) is not avg(B·A): see docs/average.md.
    #[arg(long, value_enum, default_value_t = LoraMode::Adapters, value_name = "MODE")]
    pub lora: LoraMode,
    /// The base model (an HF directory or safetensors file) for --lora merge-delta.
    #[arg(long, value_name = "DIR")]
    pub base: Option<PathBuf>,
    /// Shard directory outputs above this size (bytes, or with KiB/MiB/GiB/KB/MB/GB); PEFT
    /// adapter directories are never sharded.
    #[arg(long, default_value = "5GiB", value_parser = parse_size, value_name = "SIZE")]
    pub max_shard_size: u64,
    /// Config file whose `[objective]` (and `[select.sewa]`, `[select.soup]`, `[select.twa]`)
    /// tables drive --select; its other tables are not read.
    #[arg(long, value_name = "FILE", requires = "select")]
    pub config: Option<PathBuf>,
    /// Choose the inputs with a model-based selector: sewa, greedy, exhaustive, random, soup
    /// or twa.
    #[arg(long, value_name = "METHOD", requires = "config", conflicts_with = "weights")]
    pub select: Option<String>,
    /// Members to choose with --select (sewa, exhaustive, random; greedy picks its own size;
    /// soup and twa learn weights, soup's optional sparse k is `[select.soup] k`).
    #[arg(long, value_name = "K", default_value_t = 5)]
    pub k: usize,
    /// Write the average with several processes, each averaging its share of the tensors (split
    /// by bytes) into its own shards, committed once by rank 0 when all are complete: launch it
    /// with `torchrun --no-python --nproc-per-node N sewa average --distributed ...` or `srun`.
    /// The rank is --rank/--world-size, else RANK/WORLD_SIZE (torchrun), else
    /// SLURM_PROCID/SLURM_NTASKS. Without this flag those variables are never read. --out must
    /// be a directory on a file system every rank sees.
    #[arg(long, conflicts_with_all = ["select", "base"])]
    pub distributed: bool,
    /// --distributed: this process's rank, 0 to --world-size minus 1.
    #[arg(long, value_name = "N", requires_all = ["distributed", "world_size"])]
    pub rank: Option<usize>,
    /// --distributed: the number of processes.
    #[arg(long, value_name = "N", requires_all = ["distributed", "rank"])]
    pub world_size: Option<usize>,
    /// --distributed: how long rank 0 waits for the other ranks' shards once its own are
    /// written, in seconds (default 3600).
    #[arg(long, value_name = "SECS", requires = "distributed")]
    pub commit_timeout: Option<u64>,
    /// Input checkpoints: .safetensors, sharded index, HF checkpoint dir, .pt/.bin/.pth, .ckpt,
    /// torch.distributed.checkpoint (DCP) dir, DeepSpeed checkpoint dir, PEFT adapter dir.
    #[arg(required = true, value_name = "INPUT")]
    pub inputs: Vec<PathBuf>,
}

/// `sewa average --read-ahead`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ReadAhead {
    Auto,
    On,
    Off,
}

impl ReadAhead {
    /// Whether to read ahead here: `auto` when the process may use at least two CPUs
    /// (affinity and cgroup quota counted, as `available_parallelism` counts them).
    pub fn enabled(self) -> bool {
        match self {
            ReadAhead::On => true,
            ReadAhead::Off => false,
            ReadAhead::Auto => std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2),
        }
    }
}

/// `sewa average --method`: the fixed rules that need nothing but the inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AverageMethod {
    Uniform,
    Wsm,
}

/// How `sewa average` combines PEFT adapters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LoraMode {
    #[default]
    Adapters,
    MergeDelta,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Strip this key prefix (repeatable; `_orig_mod.` is always stripped).
    #[arg(long = "strip-prefix", value_name = "PREFIX")]
    pub strip_prefix: Vec<String>,
    /// Torch checkpoints: the top-level entry holding the state dict (see `average --help`).
    #[arg(long, value_name = "KEY")]
    pub state_key: Option<String>,
    /// DeepSpeed checkpoints: `module` (the module state dict, training precision; ZeRO-1/2)
    /// or `fp32` (the fp32 masters rebuilt from every rank's optimizer states, as
    /// zero_to_fp32.py; needed for ZeRO-3).
    #[arg(long, default_value_t = DeepSpeedWeights::Module, value_name = "WEIGHTS")]
    pub deepspeed_weights: DeepSpeedWeights,
    /// A checkpoint file or directory (any format `sewa average` reads).
    #[arg(value_name = "INPUT")]
    pub input: PathBuf,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// TOML config (see config/sewa.toml). SIGHUP re-reads it.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Override `[watch] dir`.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The config the daemon runs with (locates its status file).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Print the raw JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    /// The TOML file to check.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Also start the [objective] (evaluator or builtin), evaluate it once on the first
    /// checkpoint in [watch] dir, and print how long each took.
    #[arg(long)]
    pub objective: bool,
}

/// `sewa demo` flags.
#[derive(Clone, Debug, Args)]
pub struct DemoArgs {
    /// Directory for checkpoints and outputs (default: a new one under the temp dir, kept).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Write the table rows as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Members averaged by the k-subset methods.
    #[arg(long, default_value_t = 5)]
    pub k: usize,
    /// Window size (the last N checkpoints).
    #[arg(long, default_value_t = 20)]
    pub window: usize,
    /// Seed for the task, the training run and the selectors.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// `sewa report` flags: `sewa report MANIFEST.json`, `sewa report --config FILE CKPT...`, or
/// `sewa report --history --config FILE` (or `--history HISTORY.jsonl`).
#[derive(Clone, Debug, Args)]
pub struct ReportArgs {
    /// A selection JSON (the demo's `selection.json`, a published manifest); with --config, the
    /// window's checkpoints instead; with --history and no --config, the history file.
    #[arg(required_unless_present = "history", value_name = "INPUT")]
    pub inputs: Vec<PathBuf>,
    /// Run a selection now with this config's objective over the checkpoints given; with
    /// --history, the `sewa watch` config whose run to draw.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Draw a whole `sewa watch` run from its publication history (the `*.history.jsonl`
    /// beside the status file): each member's loss by step, the published average's loss,
    /// the members each publication used.
    #[arg(long, conflicts_with_all = ["select", "k"])]
    pub history: bool,
    /// Model-based method for --config: sewa, greedy, exhaustive, random, soup or twa.
    #[arg(long, default_value = "sewa", requires = "config")]
    pub select: String,
    /// Members to choose with --config.
    #[arg(long, default_value_t = 5, requires = "config")]
    pub k: usize,
    /// SVG to write.
    #[arg(long, default_value = "sewa-report.svg")]
    pub out: PathBuf,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// `--select`'s help names every method `select::model_based` accepts, and INPUT's help
    /// every directory format `Checkpoint::open` reads.
    #[test]
    fn help_lists_every_method_and_format_the_code_accepts() {
        let mut cli = super::Cli::command();
        let average = cli.find_subcommand_mut("average").unwrap();
        let help = |id: &str| {
            let arg = average.get_arguments().find(|a| a.get_id() == id).unwrap();
            arg.get_help().unwrap().to_string()
        };
        let select = help("select");
        for m in sewa_engine::select::MODEL_BASED {
            assert!(select.contains(m.name()), "--select help lacks {}: {select}", m.name());
        }
        let inputs = help("inputs");
        for format in ["DCP", "DeepSpeed", "PEFT", "HF", ".ckpt", "sharded"] {
            assert!(inputs.contains(format), "INPUT help lacks {format}: {inputs}");
        }
    }
}
