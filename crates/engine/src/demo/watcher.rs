//! The demo's sidecar: the real `sewa watch` pipeline (notify watcher, window, SeWA selection,
//! atomic publisher) running in-process on the directory the demo trains into, exactly as it
//! would beside a user's job. Its config is written next to the checkpoints so the user can run
//! `sewa watch --config` on it again. The trainer hands over each checkpoint and waits until the
//! watcher has selected over it (`admit`), so every checkpoint is a window of its own and the
//! run is the same every time; `History` records what was published after which checkpoint.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::daemon::{self, RunOptions};
use crate::error::{Error, Result, WithPath};
use crate::manifest::Manifest;
use crate::status::Status;

/// One publication by the watcher, as its manifest recorded it.
#[derive(Clone, Debug)]
pub struct Publication {
    /// The checkpoint whose arrival led to it.
    pub after_step: u64,
    /// Which selection it was (1-based).
    pub selection: u64,
    /// Steps of the members averaged.
    pub steps: Vec<u64>,
    pub loss: Option<f64>,
}

/// What the watcher did while the model trained.
#[derive(Debug, Default)]
pub struct History {
    pub publications: Vec<Publication>,
    /// The status after the last checkpoint was taken in.
    pub last: Option<Status>,
}

/// A running in-process `sewa watch`.
pub struct Sidecar {
    pub config_path: PathBuf,
    pub config: Config,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

/// The config the demo's watcher runs with: SeWA over the last `window` checkpoints, held-out
/// loss from the builtin MLP objective, "best so far" publishing.
fn config_text(ckpt_dir: &Path, window: usize, k: usize, seed: u64) -> String {
    format!(
        r#"# Written by `sewa demo`; run it again with: sewa watch --config <this file>
[watch]
dir = {dir:?}
pattern = "step_*.safetensors"
quiet_ms = 50
[window]
size = {window}
[select]
method = "sewa"
k = {k}
every = 1
[select.sewa]
seed = {seed}
[objective]
kind = "builtin"
model = "mlp"
data = "selection.safetensors"
[publish]
out = {out:?}
policy = "best"
[runtime]
threads = 1
"#,
        dir = ckpt_dir.display().to_string(),
        out = ckpt_dir.with_file_name("published").join("model.safetensors").display().to_string(),
    )
}

impl Sidecar {
    /// Write the config into `dir` and start watching `ckpt_dir`.
    pub fn start(dir: &Path, ckpt_dir: &Path, window: usize, k: usize, seed: u64) -> Result<Self> {
        let config_path = dir.join("sewa.toml");
        std::fs::write(&config_path, config_text(ckpt_dir, window, k, seed))
            .with_path(&config_path)?;
        let config = Config::load(&config_path)?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let cfg = config.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .map_err(|e| Error::Internal(format!("demo: tokio runtime: {e}")))?;
            let opts = RunOptions { reload: None, systemd: false };
            rt.block_on(daemon::run(cfg, opts, async {
                let _ = rx.await;
            }))
        });
        Ok(Sidecar { config_path, config, stop: Some(tx), thread: Some(thread) })
    }

    /// Wait until the watcher has taken in and selected over the checkpoint at `step`, then
    /// record in `history` what it published, if it did.
    pub fn admit(&self, step: u64, history: &mut History) -> Result<()> {
        let status = self.wait_for_step(step, Duration::from_secs(120))?;
        let before = history.last.as_ref().map_or(0, |s| s.counters.publishes);
        if status.counters.publishes > before
            && let Some(p) = &status.last_publish
        {
            let text = std::fs::read(&p.manifest).with_path(&p.manifest)?;
            let m: Manifest = serde_json::from_slice(&text)
                .map_err(|e| Error::Internal(format!("demo: {}: {e}", p.manifest.display())))?;
            history.publications.push(Publication {
                after_step: step,
                selection: status.counters.selections,
                steps: m.inputs.iter().filter_map(|i| i.step).collect(),
                loss: m.selection.loss,
            });
        }
        history.last = Some(status);
        Ok(())
    }

    /// Wait until the watcher has taken in (and selected over) the checkpoint at `step`.
    pub fn wait_for_step(&self, step: u64, deadline: Duration) -> Result<Status> {
        let path = self.config.status_file();
        let t0 = Instant::now();
        loop {
            if let Ok(s) = Status::read(&path)
                && s.members.iter().any(|m| m.step == step)
            {
                return Ok(s);
            }
            if self.thread.as_ref().is_some_and(|t| t.is_finished()) || t0.elapsed() > deadline {
                return Err(Error::Internal(format!(
                    "demo: the watcher did not take in step {step} within {deadline:?} (status: {})",
                    path.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stop the watcher (as SIGTERM would) and wait for it.
    pub fn stop(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(Error::Internal("demo: the watcher thread panicked".into())),
            None => Ok(()),
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}
