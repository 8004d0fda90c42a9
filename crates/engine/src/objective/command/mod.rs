//! `[objective] kind = "command"`: the loss comes from a long-running evaluator process the
//! user writes (their own model and held-out data, any framework), spoken to over JSON lines.
//!
//! Owns the evaluator's lifecycle: start, versioned handshake, requests with a timeout,
//! restart with backoff after a failure. Protocol 1: candidates and gradients travel as
//! safetensors files in a private staging directory (`staging`). Protocol 2: the evaluator
//! holds the window's members (`members`) and requests carry only mixing weights, replies one
//! number per member. The process and its pipes are `process`'s, the messages `protocol`'s.
//! Does not choose checkpoints; a failed call is an error the selector gives up on, never a
//! made-up loss.

mod config;
mod group;
mod leftovers;
mod lines;
mod members;
mod process;
mod protocol;
mod staging;
mod stderr;
mod window;

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use super::{Evaluation, MixEvaluation, Objective, Params};
use crate::average::IntPolicy;
use crate::error::{Error, Result};
pub use config::{CommandConfig, opt_timeout_s};
pub(crate) use config::{default_startup_timeout_s, default_timeout_s};
pub use group::stop_all;
use members::{Held, MemberKey};
use process::{Process, RecvError};
pub use protocol::PROTOCOL;
use protocol::{Abilities, Reply};
use sewa_checkpoint::{Checkpoint, DType};
use staging::Staging;
use stderr::Tail;

const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A running evaluator: its process, what it said it can do, the members it holds.
struct Session {
    process: Process,
    abilities: Abilities,
    held: Held,
}

/// Bytes moved between sewa and the evaluator so far: protocol lines both ways, and files in
/// the staging directory (candidates and member copies written, gradients read).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub lines_out: u64,
    pub lines_in: u64,
    pub staged_written: u64,
    pub staged_read: u64,
    /// Bytes of member copies in staging now (memory, when staging is under /dev/shm).
    pub staged_held: u64,
}

/// The evaluator objective. Restarts its process after any failure, with exponential backoff.
pub struct CommandObjective {
    /// The members' float dtype, sent instead of f32 to an evaluator that reads it (`dtypes`).
    candidate_dtype: Option<(DType, &'static str)>,
    config: CommandConfig,
    session: Option<Session>,
    staging: Staging,
    stderr_tail: Tail,
    next_id: u64,
    next_member: u64,
    /// Staging copies of members the evaluator cannot load itself, kept across restarts.
    copies: Vec<(MemberKey, PathBuf)>,
    /// Line bytes of processes that are gone (the live one counts its own).
    lines_done: (u64, u64),
    failures: u32,
    not_before: Option<Instant>,
    abilities: Abilities,
    int_policy: IntPolicy,
}

impl CommandObjective {
    /// Start the evaluator and complete the handshake.
    pub fn start(config: CommandConfig) -> Result<Self> {
        let staging = Staging::new(config.staging_dir.as_deref())?;
        let mut me = CommandObjective {
            candidate_dtype: None,
            config,
            session: None,
            staging,
            stderr_tail: Arc::new(Mutex::new(VecDeque::new())),
            next_id: 0,
            next_member: 0,
            copies: Vec::new(),
            lines_done: (0, 0),
            failures: 0,
            not_before: None,
            abilities: Abilities::default(),
            int_policy: IntPolicy::Latest,
        };
        me.ensure_session()?;
        Ok(me)
    }

    /// Which member supplies integer buffers in mixing requests: the newest (`latest`, the
    /// default) or the oldest (`first`) member with a positive weight, as `[publish]
    /// int_policy` picks them for the published average.
    pub fn set_int_policy(&mut self, policy: IntPolicy) {
        self.int_policy = policy;
    }

    /// Where candidates and member copies are written (for tests and logs).
    pub fn scratch_dir(&self) -> &Path {
        self.staging.path()
    }

    /// The protocol version the running evaluator speaks (0 when none runs).
    pub fn protocol(&self) -> u32 {
        self.session.as_ref().map_or(0, |s| s.abilities.protocol)
    }

    /// Bytes moved so far (see `Traffic`).
    pub fn traffic(&self) -> Traffic {
        let live =
            self.session.as_ref().map_or((0, 0), |s| (s.process.bytes_out, s.process.bytes_in));
        Traffic {
            lines_out: self.lines_done.0 + live.0,
            lines_in: self.lines_done.1 + live.1,
            staged_written: self.staging.written,
            staged_read: self.staging.read,
            staged_held: self.staging.held,
        }
    }

    /// An error about the evaluator, with its last stderr lines for context.
    fn failure(&self, what: impl std::fmt::Display) -> Error {
        let tail = self.stderr_tail.lock().map(|t| t.iter().cloned().collect::<Vec<_>>());
        let tail = tail.unwrap_or_default();
        let mut msg = format!("evaluator {what}");
        if !tail.is_empty() {
            msg.push_str("; its last stderr lines:\n  ");
            msg.push_str(&tail.join("\n  "));
        }
        Error::Evaluator(format!("{}: {msg}", self.config.command.join(" ")))
    }

    fn ensure_session(&mut self) -> Result<()> {
        if self.session.is_some() {
            return Ok(());
        }
        if let Some(t) = self.not_before {
            // Backoff: a crashing evaluator is not restarted in a tight loop; callers retry
            // later (the daemon at its next selection).
            let wait = t.saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                return Err(self.failure(format!(
                    "failed recently; next restart allowed in {:.1} s",
                    wait.as_secs_f64()
                )));
            }
        }
        match self.spawn() {
            Ok(s) => {
                self.abilities = s.abilities.clone();
                self.session = Some(s);
                Ok(())
            }
            Err(e) => {
                self.note_failure(&e);
                Err(e)
            }
        }
    }

    fn note_failure(&mut self, e: &Error) {
        self.failures += 1;
        let backoff = BACKOFF_START
            .saturating_mul(1 << self.failures.min(16).saturating_sub(1))
            .min(BACKOFF_MAX);
        self.not_before = Some(Instant::now() + backoff);
        if self.config.one_shot {
            tracing::warn!(error = %e, "evaluator failed");
        } else {
            tracing::warn!(error = %e, retry_in = ?backoff, "evaluator failed; it will be restarted");
        }
    }

    /// Drop the session (killing the process: after a failure its state is unknown).
    fn end(&mut self, s: Session) {
        self.lines_done.0 += s.process.bytes_out;
        self.lines_done.1 += s.process.bytes_in;
    }

    fn spawn(&mut self) -> Result<Session> {
        let process = Process::spawn(&self.config, PROTOCOL, &self.stderr_tail)?;
        let mut s = Session { process, abilities: Abilities::default(), held: Held::default() };
        if let Err(e) = self.handshake(&mut s) {
            self.end(s);
            return Err(e);
        }
        Ok(s)
    }

    fn handshake(&self, s: &mut Session) -> Result<()> {
        s.process
            .send(&protocol::hello(), seconds(self.config.startup_timeout_s))
            .map_err(|e| self.failure(format!("did not accept the hello: {e}")))?;
        match self.receive(s, "startup_timeout_s", self.config.startup_timeout_s)? {
            Reply::Hello { protocol, grad, name, mix, formats, dtypes }
                if protocol::SUPPORTED.contains(&protocol) =>
            {
                let name = name.unwrap_or_else(|| self.config.command.join(" "));
                let mix = mix && protocol >= 2;
                tracing::info!(evaluator = %name, protocol, grad, mix, "evaluator ready");
                s.abilities = Abilities { protocol, grad, name, mix, formats, dtypes };
                Ok(())
            }
            Reply::Hello { protocol, .. } => Err(self.failure(format!(
                "speaks protocol version {protocol}, sewa speaks {:?}: update the evaluator \
                 client (pip install ./clients/python) or sewa",
                protocol::SUPPORTED
            ))),
            other => Err(self.failure(format!("answered the hello with {other:?}"))),
        }
    }

    /// Next reply line, within the timeout.
    fn receive(&self, s: &mut Session, key: &str, timeout_s: f64) -> Result<Reply> {
        let line = match s.process.recv(seconds(timeout_s)) {
            Ok(line) => line,
            Err(RecvError::Unreadable(e)) => {
                return Err(self.failure(format!("stdout unreadable: {e}")));
            }
            Err(RecvError::Timeout) => {
                return Err(self.failure(format!("did not answer within {key} = {timeout_s}")));
            }
            Err(RecvError::Exited(status)) => {
                return Err(self.failure(format!("exited ({status})")));
            }
            Err(RecvError::ClosedStdout) => {
                return Err(self.failure(format!(
                    "closed its stdout but was still running after {key} = {timeout_s}"
                )));
            }
        };
        serde_json::from_str(&line).map_err(|e| {
            let shown: String = line.chars().take(200).collect();
            self.failure(format!("sent a malformed line ({e}): {shown:?}"))
        })
    }

    /// Send a request, within `timeout_s`; a closed stdin most likely means it died: let its
    /// last words reach the error.
    fn send(&self, s: &mut Session, msg: &serde_json::Value) -> Result<()> {
        s.process.send(msg, seconds(self.config.timeout_s)).map_err(|e| {
            if e.kind() == std::io::ErrorKind::TimedOut {
                return self.failure(format!("{e} (timeout_s = {})", self.config.timeout_s));
            }
            s.process.drain_stderr();
            self.failure(format!("closed its stdin: {e}"))
        })
    }

    /// Run `f` on the session; after a failure the process is killed and restarted later.
    fn with_session<T>(
        &mut self,
        f: impl FnOnce(&mut Self, &mut Session) -> Result<T>,
    ) -> Result<T> {
        self.ensure_session()?;
        let mut s = self.session.take().expect("session ensured");
        match f(self, &mut s) {
            Ok(v) => {
                self.session = Some(s);
                self.failures = 0;
                Ok(v)
            }
            Err(e) => {
                self.end(s);
                self.note_failure(&e);
                Err(e)
            }
        }
    }

    /// Protocol 1 (and 2 without mixing): the candidate as a file, the gradient as a file.
    fn request(&mut self, params: &Params, want_grad: bool) -> Result<Evaluation> {
        self.with_session(|me, s| {
            me.next_id += 1;
            let id = me.next_id;
            let weights = me.staging.file(&format!("candidate-{id}.safetensors"));
            let grad_path = me.staging.file(&format!("grad-{id}.safetensors"));
            let ask_grad = want_grad && s.abilities.grad;
            let dtype = me.candidate_dtype.filter(|d| s.abilities.dtypes.iter().any(|n| n == d.1));
            let dtype = dtype.map_or(DType::F32, |d| d.0);
            let result = me.staging.write_params(params, &weights, dtype).and_then(|()| {
                let req = json!({"type": "evaluate", "id": id, "weights": weights,
                                 "grad": ask_grad, "grad_path": grad_path});
                me.exchange(s, &req, id, params, ask_grad)
            });
            let _ = std::fs::remove_file(&weights);
            let _ = std::fs::remove_file(&grad_path);
            result
        })
    }

    fn exchange(
        &mut self,
        s: &mut Session,
        req: &serde_json::Value,
        id: u64,
        params: &Params,
        ask_grad: bool,
    ) -> Result<Evaluation> {
        self.send(s, req)?;
        let reply = self.receive(s, "timeout_s", self.config.timeout_s)?;
        let (loss, grad, _) = self.result(reply, id)?;
        let grad = match (ask_grad, grad) {
            (false, _) => None,
            (true, None) => return Err(self.failure("did not return the gradient asked for")),
            (true, Some(p)) => Some(self.staging.read_grad(&self.evaluator_path(&p), params)?),
        };
        Ok(Evaluation { loss, grad })
    }

    /// A path the evaluator sent, as sewa must open it: a relative one is relative to the
    /// evaluator's working directory, not sewa's.
    fn evaluator_path(&self, p: &Path) -> PathBuf {
        match &self.config.cwd {
            Some(cwd) if p.is_relative() => cwd.join(p),
            _ => p.to_path_buf(),
        }
    }

    /// A result line for request `id`: its finite loss, gradient file and dot products.
    #[allow(clippy::type_complexity)]
    fn result(
        &self,
        reply: Reply,
        id: u64,
    ) -> Result<(f64, Option<PathBuf>, Option<BTreeMap<String, Option<f64>>>)> {
        match reply {
            Reply::Result { id: got, .. } if got != id => {
                Err(self.failure(format!("answered request {got}, expected {id}")))
            }
            Reply::Result { loss: Some(loss), grad, dots, .. } if loss.is_finite() => {
                Ok((loss, grad, dots))
            }
            Reply::Result { .. } => Err(self.failure("returned a non-finite loss (NaN or Inf)")),
            Reply::Error { message, .. } => Err(self.failure(format!("reported: {message}"))),
            other => Err(self.failure(format!("answered a request with {other:?}"))),
        }
    }

    /// Protocol 2: make the evaluator hold exactly `members`, then ask for the mixture.
    fn request_mix(
        &mut self,
        members: &[&Checkpoint],
        alpha: &[f64],
        want_grad: bool,
    ) -> Result<MixEvaluation> {
        if alpha.len() != members.len() || !alpha.iter().any(|a| *a > 0.0) {
            return Err(Error::Internal("mixing weights: one per member, some positive".into()));
        }
        self.with_session(|me, s| {
            if !s.abilities.mix {
                return Err(me.failure("does not take mixing requests (protocol 2, \"mix\")"));
            }
            let ids = me.sync_members(s, members)?;
            me.next_id += 1;
            let id = me.next_id;
            let ask_grad = want_grad && s.abilities.grad;
            let ints = me.int_source(&ids, alpha);
            me.send(s, &protocol::evaluate_mix(id, &ids, alpha, ask_grad, ints))?;
            let reply = me.receive(s, "timeout_s", me.config.timeout_s)?;
            let (loss, _, dots) = me.result(reply, id)?;
            let member_dots = match (ask_grad, dots) {
                (false, _) => None,
                (true, None) => return Err(me.failure("did not return the ∂F/∂α asked for")),
                (true, Some(d)) => {
                    Some(protocol::dots_in_order(&d, &ids).map_err(|e| me.failure(e))?)
                }
            };
            Ok(MixEvaluation { loss, member_dots })
        })
    }

    /// The member whose integer buffers the mixture carries, by `int_policy`.
    fn int_source<'i>(&self, ids: &'i [String], alpha: &[f64]) -> &'i str {
        let mut used = ids.iter().zip(alpha).filter(|(_, a)| **a > 0.0).map(|(i, _)| i);
        let pick = match self.int_policy {
            IntPolicy::First => used.next(),
            IntPolicy::Latest | IntPolicy::Error => used.next_back(),
        };
        pick.map_or("", String::as_str)
    }
}

impl Objective for CommandObjective {
    fn members_dtype(&mut self, dtype: Option<DType>) {
        self.candidate_dtype = match dtype {
            Some(DType::BF16) => Some((DType::BF16, "bf16")),
            Some(DType::F16) => Some((DType::F16, "f16")),
            _ => None,
        };
    }

    fn evaluate(&mut self, params: &Params, want_grad: bool) -> Result<Evaluation> {
        self.request(params, want_grad)
    }

    fn supports_grad(&self) -> bool {
        self.abilities.grad
    }

    fn describe(&self) -> String {
        format!("command evaluator {} ({})", self.abilities.name, self.config.command.join(" "))
    }

    fn mixes(&self) -> bool {
        self.abilities.mix
    }

    fn retry_after(&self) -> Option<Duration> {
        self.not_before.map(|t| t.saturating_duration_since(Instant::now()))
    }

    fn evaluate_mix(
        &mut self,
        members: &[&Checkpoint],
        alpha: &[f64],
        want_grad: bool,
    ) -> Result<MixEvaluation> {
        self.request_mix(members, alpha, want_grad)
    }
}

impl Drop for CommandObjective {
    fn drop(&mut self) {
        if let Some(s) = &mut self.session {
            // A polite goodbye; Process's drop stops its group if it lingers.
            let _ = s.process.send(&json!({"type": "shutdown"}), Duration::from_millis(100));
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline && !s.process.exited() {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A configured timeout as a `Duration`: at most a week (what `check` allows), so every wait on
/// the evaluator has a deadline even for a config built in code.
fn seconds(timeout_s: f64) -> Duration {
    let week = 7.0 * 86_400.0;
    Duration::from_secs_f64(if timeout_s > 0.0 { timeout_s.min(week) } else { 0.0 })
}
