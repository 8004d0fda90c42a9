//! `[publish] on_publish`: a user command run after each publication (recompute BatchNorm
//! statistics, trigger an evaluation job...). It runs in the background with the manifest and
//! output paths in its environment; its failure is logged, never fatal, and it never delays
//! the next selection. One run at a time, coalesced: publications while the hook still runs
//! are remembered as one pending run for the latest of them, started when the current run ends,
//! so slow hooks cannot pile up and the final publication is never left without its hook.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use tracing::{info, warn};

/// Runs the configured command; cheap to keep in the pipeline.
#[derive(Default)]
pub struct Hook {
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    running: bool,
    /// The latest publication that arrived while a run was going.
    pending: Option<Job>,
}

/// One hook run: the command (as configured at publication time) and what it is told.
struct Job {
    command: Vec<String>,
    output: PathBuf,
    manifest: PathBuf,
}

impl Hook {
    /// Run `command` for the publication at `output` with manifest `manifest`, now or, if a run
    /// is going, once it ends (only the latest of several waiting publications is run).
    pub fn run(&self, command: &[String], output: &Path, manifest: &Path) {
        if command.is_empty() {
            return;
        }
        let job =
            Job { command: command.to_vec(), output: output.into(), manifest: manifest.into() };
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.running {
            if state.pending.replace(job).is_none() {
                info!(command = %command.join(" "), "on_publish still running; it runs again for the latest publication when it ends");
            }
            return;
        }
        state.running = true;
        drop(state);
        let shared = self.state.clone();
        std::thread::spawn(move || {
            let mut job = job;
            loop {
                run_once(&job);
                let mut state = shared.lock().unwrap_or_else(|p| p.into_inner());
                match state.pending.take() {
                    Some(next) => job = next,
                    None => {
                        state.running = false;
                        return;
                    }
                }
            }
        });
    }
}

/// Start the command, log its stderr, wait for it and log how it ended.
fn run_once(job: &Job) {
    let shown = job.command.join(" ");
    let child = Command::new(&job.command[0])
        .args(&job.command[1..])
        .env("SEWA_MANIFEST", &job.manifest)
        .env("SEWA_OUTPUT", &job.output)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            warn!(command = %shown, error = %e, "on_publish could not start");
            return;
        }
    };
    let mut tail = Vec::new();
    if let Some(err) = child.stderr.take() {
        for line in BufReader::new(err).lines().map_while(|l| l.ok()) {
            info!(target: "sewa::on_publish", "{line}");
            tail.push(line);
            if tail.len() > 10 {
                tail.remove(0);
            }
        }
    }
    match child.wait() {
        Ok(s) if s.success() => info!(command = %shown, "on_publish finished"),
        Ok(s) => warn!(command = %shown, status = %s, stderr = %tail.join(" | "),
                       "on_publish failed; the publication stands"),
        Err(e) => warn!(command = %shown, error = %e, "on_publish: wait failed"),
    }
}
