//! `[objective] kind = "command"`: the loss comes from a long-running evaluator process the
//! user writes (their own model and held-out data, any framework), spoken to over JSON lines.
//!
//! Owns the process: start, versioned handshake, requests with a timeout, stderr capture,
//! restart with backoff after a failure. Candidates and gradients travel as safetensors files in
//! a private temporary directory (in memory under /dev/shm when it exists). Does not choose
//! checkpoints; a failed call is an error the selector gives up on, never a made-up loss.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::json;

use super::{Evaluation, NamedTensor, Objective, Params};
use crate::checkpoint::DType;
use crate::error::{Error, Result};

/// Protocol version sewa speaks; the evaluator's hello must carry the same.
pub const PROTOCOL: u32 = 1;
const STDERR_LINES_KEPT: usize = 20;
const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// After the evaluator exits, how long to wait for its stderr to reach EOF before composing the
/// error (a grandchild can keep the pipe open; its last lines are what a user debugs with).
const STDERR_DRAIN: Duration = Duration::from_secs(2);
/// The longest `timeout_s` / `startup_timeout_s` accepted: a week (larger values are typos, and
/// `Duration` cannot hold arbitrary floats).
const MAX_TIMEOUT_S: f64 = 7.0 * 86_400.0;

/// `[objective]` keys for `kind = "command"`.
#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CommandConfig {
    /// Program and arguments, e.g. `["python3", "eval.py"]`.
    pub command: Vec<String>,
    /// Longest a single request (or the handshake) may take before the evaluator is killed.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: f64,
    /// Longest the evaluator may take to start and answer the hello (imports, loading data).
    #[serde(default = "default_startup_timeout_s")]
    pub startup_timeout_s: f64,
    /// Extra environment variables for the evaluator.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory of the evaluator (default: sewa's).
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// Serving one command: a failure ends it, so no restart is announced (not a TOML key).
    #[serde(skip)]
    pub one_shot: bool,
}

/// `deserialize_with` for an optional `timeout_s` / `startup_timeout_s`: out of range is an
/// error at its line (`CommandConfig::check` repeats the rule for configs built in code).
pub fn opt_timeout_s<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<f64>, D::Error> {
    let v = f64::deserialize(d)?;
    if !(v.is_finite() && v > 0.0 && v <= MAX_TIMEOUT_S) {
        return Err(serde::de::Error::custom(timeout_range(v)));
    }
    Ok(Some(v))
}

fn timeout_range(v: f64) -> String {
    format!("{v} must be > 0 and at most {MAX_TIMEOUT_S} (a week)")
}

fn default_timeout_s() -> f64 {
    300.0
}

fn default_startup_timeout_s() -> f64 {
    120.0
}

impl CommandConfig {
    pub fn check(&self, config_path: &Path) -> Result<()> {
        if self.command.is_empty() || self.command[0].is_empty() {
            return Err(Error::config(config_path, "[objective] command must name a program"));
        }
        for (key, v) in
            [("timeout_s", self.timeout_s), ("startup_timeout_s", self.startup_timeout_s)]
        {
            if !(v.is_finite() && v > 0.0 && v <= MAX_TIMEOUT_S) {
                let msg = format!("[objective] {key} = {}", timeout_range(v));
                return Err(Error::config(config_path, msg));
            }
        }
        Ok(())
    }
}

/// A line the evaluator sends.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Reply {
    Hello {
        protocol: u32,
        #[serde(default)]
        grad: bool,
        #[serde(default)]
        name: Option<String>,
    },
    Result {
        id: u64,
        loss: Option<f64>,
        #[serde(default)]
        grad: Option<PathBuf>,
    },
    Error {
        message: String,
    },
}

/// A running evaluator process.
struct Session {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<std::io::Result<String>>,
    /// Disconnects when the stderr reader has read its pipe to EOF.
    stderr_eof: Receiver<()>,
    supports_grad: bool,
    name: String,
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The evaluator objective. Restarts its process after any failure, with exponential backoff.
pub struct CommandObjective {
    config: CommandConfig,
    session: Option<Session>,
    scratch: tempfile::TempDir,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    next_id: u64,
    failures: u32,
    not_before: Option<Instant>,
    supports_grad: bool,
    name: String,
}

impl CommandObjective {
    /// Start the evaluator and complete the handshake.
    pub fn start(config: CommandConfig) -> Result<Self> {
        let scratch = scratch_dir()?;
        let mut me = CommandObjective {
            config,
            session: None,
            scratch,
            stderr_tail: Arc::new(Mutex::new(VecDeque::new())),
            next_id: 0,
            failures: 0,
            not_before: None,
            supports_grad: false,
            name: String::new(),
        };
        me.ensure_session()?;
        Ok(me)
    }

    /// Where candidates are written (for tests and logs).
    pub fn scratch_dir(&self) -> &Path {
        self.scratch.path()
    }

    fn program(&self) -> PathBuf {
        PathBuf::from(&self.config.command[0])
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
        Error::Internal(format!("{}: {msg}", self.config.command.join(" ")))
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
                self.supports_grad = s.supports_grad;
                self.name = s.name.clone();
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
        self.session = None;
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

    fn spawn(&mut self) -> Result<Session> {
        let mut cmd = Command::new(self.program());
        cmd.args(&self.config.command[1..])
            .envs(&self.config.env)
            .env("SEWA_PROTOCOL", PROTOCOL.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(dir) = &self.config.cwd {
            cmd.current_dir(dir);
        }
        let mut child = cmd.spawn().map_err(|e| {
            Error::Internal(format!(
                "cannot start evaluator {}: {e} (check [objective] command and cwd)",
                self.config.command.join(" ")
            ))
        })?;
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        self.stderr_tail.lock().map(|mut t| t.clear()).ok();
        let stderr_eof = spawn_stderr_logger(stderr, self.stderr_tail.clone());
        let lines = spawn_line_reader(stdout);
        let mut session =
            Session { child, stdin, lines, stderr_eof, supports_grad: false, name: String::new() };
        self.handshake(&mut session)?;
        Ok(session)
    }

    fn handshake(&self, s: &mut Session) -> Result<()> {
        send(s, &json!({"type": "hello", "protocol": PROTOCOL}))
            .map_err(|e| self.failure(format!("did not accept the hello: {e}")))?;
        match self.receive(s, "startup_timeout_s", self.config.startup_timeout_s)? {
            Reply::Hello { protocol, grad, name } if protocol == PROTOCOL => {
                s.supports_grad = grad;
                s.name = name.unwrap_or_else(|| self.config.command.join(" "));
                tracing::info!(evaluator = %s.name, grad, "evaluator ready");
                Ok(())
            }
            Reply::Hello { protocol, .. } => Err(self.failure(format!(
                "speaks protocol version {protocol}, sewa speaks {PROTOCOL}: update the \
                 evaluator client (clients/python/sewa_evaluator.py) or sewa"
            ))),
            other => Err(self.failure(format!("answered the hello with {other:?}"))),
        }
    }

    /// Next reply line, within the timeout.
    fn receive(&self, s: &mut Session, key: &str, timeout_s: f64) -> Result<Reply> {
        let timeout = Duration::try_from_secs_f64(timeout_s).unwrap_or(Duration::MAX);
        let line = match s.lines.recv_timeout(timeout) {
            Ok(Ok(line)) => line,
            Ok(Err(e)) => return Err(self.failure(format!("stdout unreadable: {e}"))),
            Err(RecvTimeoutError::Timeout) => {
                return Err(self.failure(format!("did not answer within {key} = {timeout_s}")));
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = s.child.wait().map(|st| st.to_string()).unwrap_or_default();
                drain_stderr(s);
                return Err(self.failure(format!("exited ({status})")));
            }
        };
        serde_json::from_str(&line).map_err(|e| {
            let shown: String = line.chars().take(200).collect();
            self.failure(format!("sent a malformed line ({e}): {shown:?}"))
        })
    }

    fn request(&mut self, params: &Params, want_grad: bool) -> Result<Evaluation> {
        self.ensure_session()?;
        self.next_id += 1;
        let id = self.next_id;
        let weights = self.scratch.path().join(format!("candidate-{id}.safetensors"));
        let grad_path = self.scratch.path().join(format!("grad-{id}.safetensors"));
        write_params(params, &weights)?;
        let ask_grad = want_grad && self.supports_grad;
        let req = json!({"type": "evaluate", "id": id, "weights": weights,
                         "grad": ask_grad, "grad_path": grad_path});
        let mut s = self.session.take().expect("session ensured");
        let result = self.exchange(&mut s, &req, id, params, ask_grad);
        let _ = std::fs::remove_file(&weights);
        let _ = std::fs::remove_file(&grad_path);
        match result {
            Ok(ev) => {
                self.session = Some(s);
                self.failures = 0;
                Ok(ev)
            }
            Err(e) => {
                drop(s); // kills the process: after a failure its state is unknown
                self.note_failure(&e);
                Err(e)
            }
        }
    }

    fn exchange(
        &self,
        s: &mut Session,
        req: &serde_json::Value,
        id: u64,
        params: &Params,
        ask_grad: bool,
    ) -> Result<Evaluation> {
        if let Err(e) = send(s, req) {
            // Most likely it died: let its last words reach the error.
            drain_stderr(s);
            return Err(self.failure(format!("closed its stdin: {e}")));
        }
        match self.receive(s, "timeout_s", self.config.timeout_s)? {
            Reply::Result { id: got, .. } if got != id => {
                Err(self.failure(format!("answered request {got}, expected {id}")))
            }
            Reply::Result { loss: None, .. } => {
                Err(self.failure("returned a non-finite loss (NaN or Inf)"))
            }
            Reply::Result { loss: Some(loss), .. } if !loss.is_finite() => {
                Err(self.failure("returned a non-finite loss (NaN or Inf)"))
            }
            Reply::Result { loss: Some(loss), grad, .. } => {
                let grad = match (ask_grad, grad) {
                    (false, _) => None,
                    (true, None) => {
                        return Err(self.failure("did not return the gradient asked for"));
                    }
                    (true, Some(p)) => Some(read_grad(&p, params)?),
                };
                Ok(Evaluation { loss, grad })
            }
            Reply::Error { message, .. } => Err(self.failure(format!("reported: {message}"))),
            Reply::Hello { .. } => Err(self.failure("sent a hello in reply to a request")),
        }
    }
}

impl Objective for CommandObjective {
    fn evaluate(&mut self, params: &Params, want_grad: bool) -> Result<Evaluation> {
        self.request(params, want_grad)
    }

    fn supports_grad(&self) -> bool {
        self.supports_grad
    }

    fn describe(&self) -> String {
        format!("command evaluator {} ({})", self.name, self.config.command.join(" "))
    }
}

impl Drop for CommandObjective {
    fn drop(&mut self) {
        if let Some(s) = &mut self.session {
            // A polite goodbye; Session's drop kills the process if it lingers.
            let _ = send(s, &json!({"type": "shutdown"}));
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = s.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A private directory for candidates: in memory when /dev/shm is usable.
fn scratch_dir() -> Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    let builder = || {
        let mut b = tempfile::Builder::new();
        b.prefix("sewa-eval-");
        b
    };
    if shm.is_dir()
        && let Ok(dir) = builder().tempdir_in(shm)
    {
        return Ok(dir);
    }
    builder().tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))
}

fn send(s: &mut Session, msg: &serde_json::Value) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(msg).expect("json values serialise");
    line.push(b'\n');
    s.stdin.write_all(&line)?;
    s.stdin.flush()
}

fn spawn_line_reader(stdout: std::process::ChildStdout) -> Receiver<std::io::Result<String>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let stop = line.is_err();
            if tx.send(line).is_err() || stop {
                break;
            }
        }
    });
    rx
}

/// Log the evaluator's stderr and keep its last lines; the returned receiver disconnects once
/// the pipe reached EOF and every line is in `tail`.
fn spawn_stderr_logger(
    stderr: std::process::ChildStderr,
    tail: Arc<Mutex<VecDeque<String>>>,
) -> Receiver<()> {
    let (eof_tx, eof_rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        let _eof = eof_tx; // dropped after the last line is stored
        for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
            tracing::info!(target: "sewa::evaluator", "{line}");
            if let Ok(mut t) = tail.lock() {
                if t.len() == STDERR_LINES_KEPT {
                    t.pop_front();
                }
                t.push_back(line);
            }
        }
    });
    eof_rx
}

/// Wait (bounded) until the stderr reader has stored everything the exited process wrote.
fn drain_stderr(s: &Session) {
    let _ = s.stderr_eof.recv_timeout(STDERR_DRAIN);
}

/// Write a candidate as f32 safetensors (what every client can load).
fn write_params(params: &Params, path: &Path) -> Result<()> {
    let views = params.iter().map(|t| {
        let view = safetensors::tensor::TensorView::new(
            safetensors::Dtype::F32,
            t.shape.clone(),
            bytemuck::cast_slice(&t.data),
        );
        (t.name.as_str(), view.expect("shape matches data by construction"))
    });
    safetensors::serialize_to_file(views, None, path)
        .map_err(|e| Error::Internal(format!("{}: cannot write candidate: {e}", path.display())))
}

/// Read a gradient file and check it covers every parameter with the right shape. The file
/// is read into memory (never mapped: the evaluator may still be writing it) and only up to
/// the largest size a gradient of `params` can have, so a runaway evaluator cannot make us
/// allocate more.
fn read_grad(path: &Path, params: &Params) -> Result<Params> {
    use std::io::Read;
    // f64 elements at most, plus the safetensors length prefix and its 100 MB header cap.
    let numel: u64 = params.iter().map(|p| p.data.len() as u64).sum();
    let limit = numel.saturating_mul(8).saturating_add(8 + 100_000_000);
    let mut bytes = Vec::new();
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    file.take(limit + 1).read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(Error::Internal(format!(
            "{}: gradient file is larger than any gradient of these {numel} parameters",
            path.display()
        )));
    }
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
        Error::Internal(format!("{}: gradient file unreadable: {e}", path.display()))
    })?;
    params
        .iter()
        .map(|p| {
            let bad = |msg: String| Error::Internal(format!("{}: {msg}", path.display()));
            let view = st
                .tensor(&p.name)
                .map_err(|_| bad(format!("gradient has no tensor {}", p.name)))?;
            if view.shape() != p.shape.as_slice() {
                return Err(bad(format!(
                    "gradient of {} has shape {:?}, weights have {:?}",
                    p.name,
                    view.shape(),
                    p.shape
                )));
            }
            let data = DType::from_safetensors(view.dtype())
                .and_then(|d| crate::dtype::to_f32_vec(d, view.data()))
                .ok_or_else(|| {
                    bad(format!("gradient of {} is {:?}, not float", p.name, view.dtype()))
                })?;
            if crate::dtype::first_non_finite(bytemuck::cast_slice(&data), DType::F32).is_some() {
                return Err(bad(format!("gradient of {} has NaN or Inf", p.name)));
            }
            Ok(NamedTensor { name: p.name.clone(), shape: p.shape.clone(), data })
        })
        .collect()
}
