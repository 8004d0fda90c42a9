//! The `sewa` binary: parse flags, start logging, call the library, map errors to exit codes
//! (0 ok, 2 bad input or usage, 78 config, 1 internal). Nothing else lives here.

use std::process::ExitCode;

use clap::Parser;
use sewa::cli::{Cli, Command, LogFormat};
use sewa::commands;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match &cli.command {
        Command::Average(args) => commands::average::run(args).map(|p| {
            println!("{}\nmanifest: {}", p.path.display(), p.manifest_path.display());
        }),
        Command::Inspect(args) => commands::inspect::run(args).map(|text| print!("{text}")),
        Command::Watch(args) => commands::watch::watch(args),
        Command::Status(args) => commands::watch::status(args).map(|text| print!("{text}")),
        Command::CheckConfig(args) => {
            commands::watch::check_config(args).map(|text| println!("{text}"))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match cli.log_format {
                LogFormat::Text => eprintln!("sewa: error: {e}"),
                LogFormat::Json => tracing::error!("{e}"),
            }
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

/// Logs go to stderr; `RUST_LOG` overrides the default level (info).
fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // No colour codes in files and journald.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.with_target(false).init(),
        LogFormat::Json => builder.json().init(),
    }
}
