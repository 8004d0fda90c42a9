//! Turning a settled candidate into a window member: cheap completeness check, open,
//! step, schema against the window, a full finite scan (NaN/Inf is bad input) and the metric
//! for best-metric. Every failure is a `Refusal` naming the file's problem; the caller
//! quarantines, or skips quietly what is not model weights. This module keeps no state.

use std::path::Path;

use crate::average::running::non_finite;
use crate::checkpoint::{self, Checkpoint, OpenOptions, TensorMeta};
use crate::config::WatchConfig;
use crate::dtype::first_non_finite;
use crate::error::{Error, Result};
use crate::schema::check_against;

/// Bytes read at a time by the finite scan (and decoded into an f64 scratch buffer).
const SCAN_CHUNK: usize = 1 << 18;

/// Why a candidate cannot be admitted.
pub struct Refusal {
    pub reason: String,
    /// Still being written (no marker, no end record...), as opposed to broken.
    pub incomplete: bool,
    /// Not model weights (optimizer or RNG state, another model's tensors): skipped quietly.
    pub not_weights: bool,
}

/// Open and validate `path` with the `[watch]` options. `reference` is the schema of the
/// current window, if any, and `peer` one of its members (PEFT adapters must share its LoRA
/// settings).
pub fn load(
    path: &Path,
    watch: &WatchConfig,
    metric: &str,
    reference: Option<&[TensorMeta]>,
    peer: Option<&Checkpoint>,
) -> std::result::Result<(Checkpoint, u64, Option<f64>), Refusal> {
    let refuse = |e: Error, incomplete| Refusal {
        reason: e.reason_about(path),
        incomplete,
        not_weights: matches!(e, Error::NotWeights { .. }),
    };
    // A directory without its marker is still being filled; a file that stayed truncated
    // for the whole quiet period is broken (it is retried anyway once it changes).
    let opts = OpenOptions {
        state_key: watch.state_key.clone(),
        deepspeed_weights: watch.deepspeed_weights,
        ..OpenOptions::default()
    };
    checkpoint::quick_check_with(path, &watch.marker, &opts)
        .map_err(|e| refuse(e, path.is_dir()))?;
    let ckpt = Checkpoint::open(path, &opts).map_err(|e| refuse(e, false))?;
    if let Some(why) = checkpoint::not_model_weights(ckpt.tensors(), reference) {
        return Err(Refusal { reason: why, incomplete: false, not_weights: true });
    }
    let step = ckpt.step().or_else(|| checkpoint::step_of(path)).ok_or_else(|| Refusal {
        reason: NO_STEP.into(),
        incomplete: false,
        not_weights: false,
    })?;
    if let Some(schema) = reference {
        check_against("the window", schema, &ckpt).map_err(|e| refuse(e, false))?;
    }
    if let Some(peer) = peer {
        checkpoint::check_same_adapter(peer, &ckpt).map_err(|e| refuse(e, false))?;
    }
    scan_finite(&ckpt).map_err(|e| refuse(e, false))?;
    let metric = read_metric(&ckpt, metric);
    Ok((ckpt, step, metric))
}

/// The refusal of a checkpoint with no step anywhere. Most such files in a run directory are
/// aliases rewritten on every save (`last.pt`), not checkpoints to average: narrowing
/// `pattern` comes first (the daemon adds the pattern of the checkpoints it has loaded).
const NO_STEP: &str = "no training step in its name or contents; if it is not a checkpoint \
    to average (an alias such as last.pt), narrow [watch] pattern to the checkpoints, else name \
    them like step_500.pt, checkpoint-500 or epoch=1-step=500.ckpt or save a \
    {\"model\": ..., \"step\": N} dict";

/// Read every float tensor once, chunk by chunk (a file truncated meanwhile is an error, like
/// any other); the first NaN/Inf is bad input.
fn scan_finite(ckpt: &Checkpoint) -> Result<()> {
    let mut buf = Vec::new();
    for meta in ckpt.tensors().iter().filter(|t| t.dtype.is_float()) {
        let size = meta.dtype.size();
        ckpt.for_each_chunk(
            &meta.name,
            SCAN_CHUNK,
            &mut buf,
            |offset, bytes| match first_non_finite(bytes, meta.dtype) {
                Some(i) => Err(non_finite(ckpt.path(), &meta.name, offset / size + i)),
                None => Ok(()),
            },
        )?;
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
    // Through `checkpoint`'s opener: a FIFO or symlink here must not block or leak.
    let state = dir.join("trainer_state.json");
    let text =
        checkpoint::read_capped(&state, checkpoint::open_child(&state).ok()?, 100 << 20).ok()?;
    let state: serde_json::Value = serde_json::from_slice(&text).ok()?;
    let history = state.get("log_history")?.as_array()?;
    history.iter().rev().find_map(|e| e.get(key)?.as_f64())
}
