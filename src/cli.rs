//! Command line: clap derive, flags only, no logic.

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "sewa", version, about = "Selective Weight Averaging beside a training job")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a small model on a synthetic noisy task and compare every selector on its window.
    Demo(sewa::demo::DemoArgs),
    /// Draw an SVG of a selection over its window.
    Report(sewa::report::ReportArgs),
}
