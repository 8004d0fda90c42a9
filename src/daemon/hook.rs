//! `[publish] on_publish`: a user command run after each publication (recompute BatchNorm
//! statistics, trigger an evaluation job...). It runs in the background with the manifest and
//! output paths in its environment; its failure is logged, never fatal, and it never delays
//! the next selection. One run at a time: a publication while the previous hook still runs
//! skips the hook (logged), so slow hooks cannot pile up.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::{info, warn};

/// Runs the configured command; cheap to keep in the pipeline.
#[derive(Default)]
pub struct Hook {
    running: Arc<AtomicBool>,
}

impl Hook {
    /// Start `command` for the publication at `output` with manifest `manifest`.
    pub fn run(&self, command: &[String], output: &Path, manifest: &Path) {
        let Some((program, args)) = command.split_first() else { return };
        if self.running.swap(true, Ordering::SeqCst) {
            warn!(command = %command.join(" "), "on_publish still running; skipped this time");
            return;
        }
        let child = Command::new(program)
            .args(args)
            .env("SEWA_MANIFEST", manifest)
            .env("SEWA_OUTPUT", output)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                warn!(command = %command.join(" "), error = %e, "on_publish could not start");
                self.running.store(false, Ordering::SeqCst);
                return;
            }
        };
        let running = self.running.clone();
        let shown = command.join(" ");
        std::thread::spawn(move || {
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
            running.store(false, Ordering::SeqCst);
        });
    }
}
