//! `sewa watch`, `sewa status`: load the config, then run the daemon or print its status file.
//! (`sewa check-config` is `check`.)

use std::path::{Path, PathBuf};

use crate::cli::{StatusArgs, WatchArgs};
use sewa_engine::config::Config;
use sewa_engine::daemon::{self, RunOptions};
use sewa_engine::error::{Error, Result};
use sewa_engine::status::{self, Status};

/// Run the daemon until SIGTERM/SIGINT, with `loaded`: `args.config` as `main` read it (once:
/// it also sizes the thread pools).
pub fn watch(args: &WatchArgs, loaded: Config) -> Result<()> {
    // Every window member's files stay open: take the descriptors the hard limit allows.
    let (limit, failed) = daemon::descriptors::raise();
    match failed {
        Some(why) => tracing::warn!(soft = limit.soft, hard = limit.hard, "{why}"),
        None => tracing::debug!(soft = limit.soft, hard = limit.hard, "limit on open files"),
    }
    let cfg = configure(loaded, &args.config, args.dir.as_deref())?;
    let blocking = cfg.runtime.threads.get() + 1;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(blocking)
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(format!("cannot start the runtime: {e}")))?;
    // SIGHUP builds the configuration the same way: the command line's overrides survive.
    let (file, dir): (PathBuf, Option<PathBuf>) = (args.config.clone(), args.dir.clone());
    let reload: daemon::Reload =
        std::sync::Arc::new(move || configure(Config::load(&file)?, &file, dir.as_deref()));
    let opts = RunOptions { reload: Some(reload), systemd: true };
    let status_file = cfg.status_file();
    let result = rt.block_on(async {
        let stop = daemon::termination()?; // before anything is logged: see `termination`
        daemon::run(cfg, opts, stop).await
    });
    // Work abandoned on a blocking thread still owns its evaluators and staging copies, and
    // no destructor runs for it: stop their process groups and remove the copies here.
    sewa_engine::objective::command::stop_all();
    daemon::settle_stopped(&status_file);
    // Do not wait for a publish still running on a blocking thread: it renames a complete
    // file or nothing, so leaving now cannot tear the output.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    result
}

/// The daemon's configuration: `cfg` (as read from `file`) with the command-line overrides
/// (`--dir`) applied and checked, every start-up check passed (`startup`, the same as
/// `check-config`'s), the output's and state's directories created. A watched directory that
/// does not exist yet is waited for by the daemon.
fn configure(mut cfg: Config, file: &Path, dir: Option<&Path>) -> Result<Config> {
    if let Some(dir) = dir {
        cfg.watch.dir = dir.to_path_buf();
        cfg.check().map_err(|msg| Error::config(file, msg))?;
    }
    super::startup::check(&cfg, file)?;
    for note in &cfg.notes {
        tracing::warn!(config = %file.display(), "{note}");
    }
    if let Ok(Some(tight)) = super::startup::descriptors(&cfg) {
        tracing::warn!("{tight}");
    }
    // The daemon creates the output's directory (a service's first start on a fresh
    // machine), but says so: a typo in `out` should not pass unnoticed.
    if let Some(first) = sewa_engine::publish::check_parent(&cfg.publish.out, true)?.first() {
        tracing::info!(dir = %first.display(), "created the directory of [publish] out");
    }
    let state = cfg.state_dir();
    std::fs::create_dir_all(&state).map_err(|e| Error::io(&state, e))?;
    Ok(cfg)
}

/// The status file as text (or raw JSON).
pub fn status(args: &StatusArgs) -> Result<String> {
    let cfg = Config::load(&args.config)?;
    let path = cfg.status_file();
    if !path.exists() {
        return Err(Error::Usage(format!(
            "{}: no status file; is `sewa watch --config {}` running?",
            path.display(),
            args.config.display()
        )));
    }
    let s = Status::read(&path)?;
    if args.json {
        return serde_json::to_string_pretty(&s).map_err(|e| Error::Internal(e.to_string()));
    }
    Ok(status::render(&s))
}
