//! Turning a settled candidate into a window member: cheap completeness check, open,
//! step, schema against the window, a full finite scan (NaN/Inf is bad input) and the metric
//! for best-metric. Every failure is a `Refusal` naming the file's problem; the caller
//! quarantines, or skips quietly what is not model weights. Two refusals are no verdict on the
//! file: another layout than the window's (`layout`: the window decides whether the run moved
//! on) and running out of file descriptors (`descriptors`: retried, never quarantined).
//! This module keeps no state.

use std::hash::{Hash, Hasher};
use std::path::Path;

use crate::average::running::non_finite;
use crate::config::WatchConfig;
use crate::error::{Error, Result};
use crate::schema::check_against;
use sewa_checkpoint::dtype::first_non_finite;
use sewa_checkpoint::text;
use sewa_checkpoint::{self as checkpoint, Checkpoint, OpenOptions, TensorMeta};

/// Bytes read at a time by the finite scan (and decoded into an f64 scratch buffer).
const SCAN_CHUNK: usize = 1 << 18;

/// Why a candidate cannot be admitted.
pub struct Refusal {
    pub reason: String,
    /// Still being written (no marker, no end record...), as opposed to broken.
    pub incomplete: bool,
    /// Not model weights (optimizer or RNG state, another model's tensors): skipped quietly.
    pub not_weights: bool,
    /// It opened fine but its layout differs from the window's: the fingerprint of its own.
    pub layout: Option<u64>,
    /// Opening it ran out of file descriptors (whose: see `Shortage`).
    pub descriptors: Option<Shortage>,
}

impl Refusal {
    pub fn new(reason: String, incomplete: bool, not_weights: bool) -> Refusal {
        Refusal { reason, incomplete, not_weights, layout: None, descriptors: None }
    }
}

/// Which limit on open files was hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shortage {
    /// EMFILE: this process's `RLIMIT_NOFILE`.
    Process,
    /// ENFILE: the system's file table.
    System,
}

/// Whether `e` is a failure to open for lack of file descriptors. Readers turn OS errors into
/// messages (`Error::BadInput` naming the file), so the errno is recognised both in an I/O
/// error and in the message std writes for one ("... (os error 24)").
pub fn shortage(e: &Error) -> Option<Shortage> {
    const EMFILE: i32 = 24;
    const ENFILE: i32 = 23;
    let of = |code: i32| match code {
        EMFILE => Some(Shortage::Process),
        ENFILE => Some(Shortage::System),
        _ => None,
    };
    match e {
        Error::Io { source, .. } => source.raw_os_error().and_then(of),
        Error::BadInput { msg, .. } | Error::NotWeights { msg, .. } => [EMFILE, ENFILE]
            .into_iter()
            .find(|c| msg.contains(&format!("(os error {c})")))
            .and_then(of),
        _ => None,
    }
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
        descriptors: shortage(&e),
        ..Refusal::new(e.reason_about(path), incomplete, matches!(e, Error::NotWeights { .. }))
    };
    // Another layout than the window's: the window decides whether the run moved on.
    let mismatched = |e: Error, ckpt: &Checkpoint| Refusal {
        layout: Some(fingerprint(ckpt)),
        ..refuse(e, false)
    };
    // A directory without its marker is still being filled; a file that stayed truncated
    // for the whole quiet period is broken (it is retried anyway once it changes).
    let opts = OpenOptions {
        state_key: watch.state_key.clone(),
        deepspeed_weights: watch.deepspeed_weights,
        ..OpenOptions::default()
    };
    // Detected once: the check and the open read the same files.
    let found = checkpoint::detect(path, &opts)
        .and_then(|found| found.quick_check(&watch.marker).map(|()| found))
        .map_err(|e| refuse(e.into(), path.is_dir()))?;
    let ckpt = found.open().map_err(|e| refuse(e.into(), false))?;
    if let Some(why) = checkpoint::not_model_weights(ckpt.tensors(), reference) {
        return Err(Refusal::new(why, false, true));
    }
    let step = ckpt
        .step()
        .or_else(|| checkpoint::step_of(path))
        .ok_or_else(|| Refusal::new(NO_STEP.into(), false, false))?;
    if let (Some(schema), Some(peer)) = (reference, peer) {
        let against = text::path(peer.path()).to_string();
        check_against(&format!("the window ({against})"), schema, &ckpt)
            .map_err(|e| mismatched(e, &ckpt))?;
    }
    if let Some(peer) = peer {
        checkpoint::check_same_adapter(peer, &ckpt).map_err(|e| mismatched(e.into(), &ckpt))?;
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

/// A fingerprint of what must agree across the window: tensor names, dtypes and shapes,
/// whether it is a PEFT adapter, and the adapter's settings (`peft_*` metadata). Compared only
/// within one run (never persisted), so `Hash` output is fine here; XXH3 rather than
/// `DefaultHasher` so that no hash in sewa depends on the toolchain's choice.
pub fn fingerprint(ckpt: &Checkpoint) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3Default::new();
    (ckpt.format() == checkpoint::Format::PeftAdapter).hash(&mut h);
    for t in ckpt.tensors() {
        (&t.name, t.dtype, &t.shape).hash(&mut h);
    }
    ckpt.metadata().iter().filter(|(k, _)| k.starts_with("peft_")).for_each(|kv| kv.hash(&mut h));
    h.finish()
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn os(code: i32) -> std::io::Error {
        std::io::Error::from_raw_os_error(code)
    }

    /// Issue 19 item 6: EMFILE/ENFILE are told apart from bad input however a reader wrapped
    /// them (an I/O error, or its message in a `BadInput`), and nothing else is taken for them.
    #[test]
    fn running_out_of_descriptors_is_recognised_and_nothing_else_is() {
        let p = Path::new("runs/checkpoint-5/model-00003-of-00008.safetensors");
        assert_eq!(shortage(&Error::io(p, os(24))), Some(Shortage::Process));
        assert_eq!(shortage(&Error::io(p, os(23))), Some(Shortage::System));
        let wrapped = Error::bad_input(p, os(24).to_string());
        assert_eq!(shortage(&wrapped), Some(Shortage::Process), "{wrapped}");
        let wrapped = Error::bad_input(p, os(23).to_string());
        assert_eq!(shortage(&wrapped), Some(Shortage::System));
        for other in [
            Error::io(p, os(2)),
            Error::bad_input(p, os(5).to_string()),
            Error::bad_input(p, "tensor w: shape [24] here but [23] in the window"),
            Error::bad_input(p, "header length 24 (os error 240)"),
            Error::Internal("(os error 24)".into()),
        ] {
            assert_eq!(shortage(&other), None, "{other}");
        }
    }
}
