//! The `sewa` binary: parse flags, start logging, call the library, map errors to exit codes
//! (0 ok, 2 bad input or usage, 78 config, 1 internal). Nothing else lives here.

#![deny(unsafe_code)] // only the signal set-up below, each block allowed where it stands

mod cli;
mod commands;

use std::process::ExitCode;

use crate::cli::{Cli, Command, LogFormat};
use clap::Parser;

fn main() -> ExitCode {
    catch_early_hangups(); // first of all: see its docs
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Watch(_)) {
        default_hangups();
    }
    // `sewa watch` reads its config here, once, while the process is single-threaded: the
    // thread cap comes from it, and the command runs with it (its errors are reported below,
    // once logging is up).
    let mut config = match &cli.command {
        Command::Watch(a) => Some(sewa_engine::config::Config::load(&a.config)),
        _ => None,
    };
    cap_threads(thread_cap(&cli.command, config.as_ref()));
    // The demo prints its own summary; its in-process watcher's per-checkpoint lines would bury it.
    let default_level = if matches!(cli.command, Command::Demo(_)) { "warn" } else { "info" };
    init_logging(cli.log_format, default_level);
    let result = match &cli.command {
        Command::Average(args) => commands::average::run(args).map(|text| println!("{text}")),
        Command::Inspect(args) => commands::inspect::run(args).map(|text| print!("{text}")),
        Command::Watch(args) => config
            .take()
            .unwrap_or_else(|| Err(sewa_engine::Error::Internal("the config was not read".into())))
            .and_then(|cfg| commands::watch::watch(args, cfg)),
        Command::Status(args) => commands::watch::status(args).map(|text| print!("{text}")),
        Command::CheckConfig(args) => commands::check::run(args).map(|text| println!("{text}")),
        Command::ExampleConfig => {
            print!("{}", sewa_engine::config::EXAMPLE);
            Ok(())
        }
        Command::Demo(args) => commands::demo::run(args).map(|_| ()),
        Command::Report(args) => commands::report::run(args),
    };
    // A Ctrl-C while an evaluator runs: its stop finishes (and sets the exit code) first.
    commands::interrupt::settle();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `sewa watch` and config checks speak the config file's words; other commands
            // name a setting by its flag.
            let config_words = matches!(cli.command, Command::Watch(_) | Command::CheckConfig(_));
            let shown = e.to_string();
            let shown = if config_words { shown } else { commands::flags::in_flag_words(&shown) };
            match cli.log_format {
                LogFormat::Text => eprintln!("sewa: error: {shown}"),
                LogFormat::Json => tracing::error!("{shown}"),
            }
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

/// Logs go to stderr; `RUST_LOG` overrides the default level. notify logs its bookkeeping at
/// info (the watch of a rotated `checkpoint-N/` the kernel already dropped): kept out of the
/// default log, as a normal event.
fn init_logging(format: LogFormat, default_level: &str) {
    use tracing_subscriber::EnvFilter;
    let default = format!("{default_level},notify=warn");
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
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

/// Threads sewa may use for compute: the command's own cap (the sidecar must not compete with
/// the trainer for cores). The demo's model is tiny: a second thread costs more than it saves
/// (measured: SeWA over 20 checkpoints 0.5 s on one thread vs 2.0 s on two, busy 2-core machine).
/// `sewa watch` takes `[runtime] threads` from its config (`loaded`; a reload cannot resize
/// these pools once they run: the daemon says so when the key changes).
fn thread_cap(
    command: &Command,
    loaded: Option<&sewa_engine::error::Result<sewa_engine::config::Config>>,
) -> usize {
    match (command, loaded) {
        (Command::Average(a), _) => a.threads,
        (Command::Watch(_), Some(Ok(c))) => c.runtime.threads.get(),
        _ => 1,
    }
}

/// candle's and rayon's pools read these once: set them before the first candle op, while the
/// process is still single-threaded. A value the user exported wins.
fn cap_threads(n: usize) {
    for var in ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"] {
        if std::env::var_os(var).is_none() {
            // SAFETY: called first thing in main, before any other thread exists.
            #[allow(unsafe_code)]
            unsafe {
                std::env::set_var(var, n.max(1).to_string())
            };
        }
    }
}

/// SIGHUP's default action is to exit, and `sewa watch` answers it (reload) only once its
/// runtime runs, after reading the config: a SIGHUP in those first milliseconds (a service
/// manager reloading a unit it just started) killed the daemon. So before anything else, main
/// catches SIGHUP into `daemon::EARLY_HANGUP`, which the daemon turns into one reload once its
/// own handler is installed (tokio keeps calling this one too, which only sets the flag again).
/// SIGTERM and SIGINT keep their default action until the daemon installs its handlers:
/// stopping a daemon that has not started yet is what they should do.
fn catch_early_hangups() {
    extern "C" fn note(_: libc::c_int) {
        // Only an atomic store: async-signal-safe.
        sewa_engine::daemon::EARLY_HANGUP.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    let handler: extern "C" fn(libc::c_int) = note;
    // SAFETY: a zeroed sigaction is a valid empty one; the handler only stores to an atomic;
    // SA_RESTART keeps interrupted reads going. Nothing else runs yet (first line of main).
    #[allow(unsafe_code)]
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGHUP, &action, std::ptr::null_mut());
    }
}

/// Every command but `watch` has no use for SIGHUP: give it its default action back (a closed
/// terminal ends `sewa average`), delivering one that came while the command line was parsed.
fn default_hangups() {
    // SAFETY: restoring SIG_DFL; raise() delivers to this thread, the only one yet.
    #[allow(unsafe_code)]
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_DFL);
        if sewa_engine::daemon::EARLY_HANGUP.load(std::sync::atomic::Ordering::SeqCst) {
            libc::raise(libc::SIGHUP);
        }
    }
}
