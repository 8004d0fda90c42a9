//! Turning a settled candidate into a window member: cheap completeness check, open,
//! step, schema against the window, a full finite scan (NaN/Inf is bad input) and the metric
//! for best-metric. Every failure is an `Error::BadInput` naming the file; the caller
//! quarantines. This module keeps no state.

use std::path::Path;

use crate::accumulate::{add_bytes, non_finite};
use crate::checkpoint::{self, Checkpoint, OpenOptions, TensorMeta};
use crate::error::{Error, Result};
use crate::schema::check_against;

/// Bytes read at a time by the finite scan (and decoded into an f64 scratch buffer).
const SCAN_CHUNK: usize = 1 << 18;

/// Why a candidate cannot be admitted.
pub struct Refusal {
    pub reason: String,
    /// Still being written (no marker, no end record...), as opposed to broken.
    pub incomplete: bool,
}

/// Open and validate `path`. `reference` is the schema of the current window, if any.
pub fn load(
    path: &Path,
    marker: &str,
    metric: &str,
    reference: Option<&[TensorMeta]>,
) -> std::result::Result<(Checkpoint, u64, Option<f64>), Refusal> {
    let refuse = |e: Error, incomplete| Refusal { reason: strip_path(&e, path), incomplete };
    // A directory without its marker is still being filled; a file that stayed truncated
    // for the whole quiet period is broken (it is retried anyway once it changes).
    checkpoint::quick_check(path, marker).map_err(|e| refuse(e, path.is_dir()))?;
    let ckpt = Checkpoint::open(path, &OpenOptions::default()).map_err(|e| refuse(e, false))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let step = ckpt.step().or_else(|| checkpoint::parse_step(name)).ok_or_else(|| Refusal {
        reason: "no training step in its name or metadata (name checkpoints like \
                 step_500.safetensors, checkpoint-500 or epoch=1-step=500.ckpt)"
            .into(),
        incomplete: false,
    })?;
    if let Some(schema) = reference {
        check_against("the window", schema, &ckpt).map_err(|e| refuse(e, false))?;
    }
    scan_finite(&ckpt).map_err(|e| refuse(e, false))?;
    let metric = read_metric(&ckpt, metric);
    Ok((ckpt, step, metric))
}

/// Error text without the leading "path: " (the log line names the path once).
fn strip_path(e: &Error, path: &Path) -> String {
    let text = e.to_string();
    let prefix = format!("{}: ", path.display());
    text.strip_prefix(&prefix).map(str::to_string).unwrap_or(text)
}

/// Read every float tensor once, chunk by chunk (a file truncated meanwhile is an error, like
/// any other); the first NaN/Inf is bad input.
fn scan_finite(ckpt: &Checkpoint) -> Result<()> {
    let (mut buf, mut scratch) = (Vec::new(), Vec::new());
    for meta in ckpt.tensors().iter().filter(|t| t.dtype.is_float()) {
        let size = meta.dtype.size();
        ckpt.for_each_chunk(&meta.name, SCAN_CHUNK, &mut buf, |offset, bytes| {
            scratch.clear();
            scratch.resize(bytes.len() / size, 0.0);
            match add_bytes(&mut scratch, bytes, meta.dtype, 1.0) {
                Some(i) => Err(non_finite(ckpt.path(), &meta.name, offset / size + i)),
                None => Ok(()),
            }
        })?;
    }
    Ok(())
}

/// The metric from safetensors metadata, else from an HF dir's trainer_state.json
/// (last `log_history` entry carrying it).
fn read_metric(ckpt: &Checkpoint, key: &str) -> Option<f64> {
    if let Some(v) = ckpt.metadata().get(key).and_then(|s| s.trim().parse::<f64>().ok()) {
        return Some(v);
    }
    let dir = if ckpt.path().is_dir() { ckpt.path() } else { ckpt.side_dir()? };
    let text = std::fs::read(dir.join("trainer_state.json")).ok()?;
    let state: serde_json::Value = serde_json::from_slice(&text).ok()?;
    let history = state.get("log_history")?.as_array()?;
    history.iter().rev().find_map(|e| e.get(key)?.as_f64())
}
