//! Command-line flags (clap derive). Flags only: no logic here; `commands` does the work.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

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
    /// Watch a trainer's checkpoint directory and keep publishing the selected average.
    Watch(WatchArgs),
    /// Print a running (or stopped) `sewa watch`'s status file for people.
    Status(StatusArgs),
    /// Validate a config file and exit (0 valid, 78 invalid).
    CheckConfig(CheckConfigArgs),
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
}
