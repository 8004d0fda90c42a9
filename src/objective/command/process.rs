//! One running evaluator process: its pipes, a reader thread per output stream (stdout lines
//! for the protocol, stderr lines logged and kept as a tail for error messages), JSON lines
//! out and in with a timeout, and the byte counts of both. It knows nothing of what the lines
//! mean (`protocol`) or when to restart (`CommandObjective`).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::CommandConfig;
use crate::error::{Error, Result};

const STDERR_LINES_KEPT: usize = 20;
/// Longest protocol line accepted (protocol 2's K dot products take ~25 bytes each): an
/// evaluator printing without newlines cannot make sewa buffer without bound.
const MAX_LINE: usize = 16 << 20;
/// Longest stderr line kept (longer ones are cut: they are for people to read).
const MAX_STDERR_LINE: usize = 64 << 10;
/// After the evaluator exits, how long to wait for its stderr to reach EOF before composing the
/// error (a grandchild can keep the pipe open; its last lines are what a user debugs with).
const STDERR_DRAIN: Duration = Duration::from_secs(2);

/// The last stderr lines of the current process, shared with its reader thread.
pub type Tail = Arc<Mutex<VecDeque<String>>>;

/// Why a line could not be had.
pub enum RecvError {
    Unreadable(std::io::Error),
    Timeout,
    /// The process closed stdout; its exit status.
    Exited(String),
}

/// A running evaluator process. Dropping it kills the process.
pub struct Process {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<std::io::Result<String>>,
    /// Disconnects when the stderr reader has read its pipe to EOF.
    stderr_eof: Receiver<()>,
    /// Protocol bytes written to stdin and read from stdout.
    pub bytes_out: u64,
    pub bytes_in: u64,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    /// Start `config.command` with `SEWA_PROTOCOL` set to the highest version sewa speaks.
    pub fn spawn(config: &CommandConfig, protocol: u32, tail: &Tail) -> Result<Process> {
        let mut cmd = Command::new(&config.command[0]);
        cmd.args(&config.command[1..])
            .envs(&config.env)
            .env("SEWA_PROTOCOL", protocol.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(dir) = &config.cwd {
            cmd.current_dir(dir);
        }
        let mut child = cmd.spawn().map_err(|e| {
            Error::Evaluator(format!(
                "cannot start evaluator {}: {e} (check [objective] command and cwd)",
                config.command.join(" ")
            ))
        })?;
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        tail.lock().map(|mut t| t.clear()).ok();
        let stderr_eof = spawn_stderr_logger(stderr, tail.clone());
        let lines = spawn_line_reader(stdout);
        Ok(Process { child, stdin, lines, stderr_eof, bytes_out: 0, bytes_in: 0 })
    }

    /// Write one JSON line.
    pub fn send(&mut self, msg: &serde_json::Value) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(msg).expect("json values serialise");
        line.push(b'\n');
        self.bytes_out += line.len() as u64;
        self.stdin.write_all(&line)?;
        self.stdin.flush()
    }

    /// The next stdout line, within `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> std::result::Result<String, RecvError> {
        match self.lines.recv_timeout(timeout) {
            Ok(Ok(line)) => {
                self.bytes_in += line.len() as u64 + 1;
                Ok(line)
            }
            Ok(Err(e)) => Err(RecvError::Unreadable(e)),
            Err(RecvTimeoutError::Timeout) => Err(RecvError::Timeout),
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.child.wait().map(|st| st.to_string()).unwrap_or_default();
                self.drain_stderr();
                Err(RecvError::Exited(status))
            }
        }
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Wait (bounded) until the stderr reader has stored everything the exited process wrote.
    pub fn drain_stderr(&self) {
        let _ = self.stderr_eof.recv_timeout(STDERR_DRAIN);
    }
}

fn spawn_line_reader(stdout: std::process::ChildStdout) -> Receiver<std::io::Result<String>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        loop {
            let line = match read_line_bounded(&mut reader, MAX_LINE) {
                Ok(None) => break,
                Ok(Some((_, true))) => Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("a protocol line longer than {MAX_LINE} bytes"),
                )),
                Ok(Some((line, false))) => String::from_utf8(line)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
                Err(e) => Err(e),
            };
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
fn spawn_stderr_logger(stderr: std::process::ChildStderr, tail: Tail) -> Receiver<()> {
    let (eof_tx, eof_rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        let _eof = eof_tx; // dropped after the last line is stored
        let mut reader = BufReader::new(stderr);
        while let Ok(Some((bytes, _))) = read_line_bounded(&mut reader, MAX_STDERR_LINE) {
            let line = String::from_utf8_lossy(&bytes).into_owned();
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

/// The next line of `r` without its newline, keeping at most `max` bytes of it (the rest of
/// the line is read and dropped; `true` says so); `None` at end of stream.
fn read_line_bounded(r: &mut impl BufRead, max: usize) -> std::io::Result<Option<(Vec<u8>, bool)>> {
    let (mut line, mut cut, mut any) = (Vec::new(), false, false);
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            break;
        }
        any = true;
        let (chunk, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        let room = max.saturating_sub(line.len());
        cut |= chunk.len() > room;
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let used = done.unwrap_or(buf.len());
        r.consume(used);
        if done.is_some() {
            break;
        }
    }
    if !any {
        return Ok(None);
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some((line, cut)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_read_whole_up_to_the_bound_and_cut_beyond_it() {
        let text = b"short\r\nexactly8\n0123456789abc\nlast".to_vec();
        let mut r = BufReader::with_capacity(4, &text[..]); // lines span several buffer fills
        let mut next = || read_line_bounded(&mut r, 8).unwrap();
        assert_eq!(next(), Some((b"short".to_vec(), false)));
        assert_eq!(next(), Some((b"exactly8".to_vec(), false)));
        assert_eq!(next(), Some((b"01234567".to_vec(), true)), "cut, and the rest dropped");
        assert_eq!(next(), Some((b"last".to_vec(), false)));
        assert_eq!(next(), None);
    }
}
