//! One running evaluator process: its pipes, a reader thread per output stream (stdout lines
//! for the protocol; stderr relayed by `stderr`), a writer thread for stdin, JSON lines out and
//! in, each within a deadline whatever the process does with its pipes, and the byte counts
//! of both. It runs as the leader of its own process group, and stopping it stops the group
//! (`group`). It knows nothing of what the lines mean (`protocol`) or when to restart
//! (`CommandObjective`).

use std::io::{BufReader, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use super::CommandConfig;
use super::group::{self, Enlisted, Group};
use super::lines::read_bounded;
use super::stderr::{self, Tail};
use crate::error::{Error, Result};

/// Longest protocol line accepted (protocol 2's K dot products take ~25 bytes each): an
/// evaluator printing without newlines cannot make sewa buffer without bound.
const MAX_LINE: usize = 16 << 20;
/// After the evaluator exits, how long to wait for its stderr to reach EOF before composing the
/// error (a grandchild can keep the pipe open; its last lines are what a user debugs with).
const STDERR_DRAIN: Duration = Duration::from_secs(2);
/// How long a stopped group's leader may take to be reaped once nothing of it is alive.
const REAP: Duration = Duration::from_secs(1);
const POLL: Duration = Duration::from_millis(10);

/// Why a line could not be had.
pub enum RecvError {
    Unreadable(std::io::Error),
    Timeout,
    /// The process closed stdout; its exit status.
    Exited(String),
    /// The process closed stdout but was still running at the deadline.
    ClosedStdout,
}

/// A running evaluator process. Dropping it stops its whole process group.
pub struct Process {
    child: Child,
    group: Group,
    /// Lines to write to stdin, and the writer's answer for each.
    stdin: Sender<Vec<u8>>,
    written: Receiver<std::io::Result<()>>,
    lines: Receiver<std::io::Result<String>>,
    /// Disconnects when the stderr reader has read its pipe to EOF.
    stderr_eof: Receiver<()>,
    /// Protocol bytes written to stdin and read from stdout.
    pub bytes_out: u64,
    pub bytes_in: u64,
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Process {
    /// Start `config.command` with `SEWA_PROTOCOL` set to the highest version sewa speaks, as
    /// the leader of a new process group.
    pub fn spawn(config: &CommandConfig, protocol: u32, tail: &Tail) -> Result<Process> {
        let mut cmd = Command::new(&config.command[0]);
        cmd.args(&config.command[1..])
            .envs(&config.env)
            .env("SEWA_PROTOCOL", protocol.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group: everything it starts can be stopped with it. It also leaves the
            // terminal's foreground group, so a Ctrl-C reaches sewa, which stops it.
            .process_group(0);
        if let Some(dir) = &config.cwd {
            cmd.current_dir(dir);
        }
        let shown = || config.command.join(" ");
        let started = group::enlist(
            || cmd.spawn(),
            |r| match r.as_ref().ok().and_then(|c| Group::of_leader(c.id())) {
                Some(g) => Enlisted::Group(g),
                None => Enlisted::Nothing,
            },
        );
        let Some(started) = started else {
            return Err(Error::Evaluator(format!("{}: not started: sewa is stopping", shown())));
        };
        let mut child = started.map_err(|e| {
            Error::Evaluator(format!(
                "cannot start evaluator {}: {e} (check [objective] command and cwd)",
                shown()
            ))
        })?;
        let group = Group::of_leader(child.id()).expect("a child's pid is positive");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let errors = child.stderr.take().expect("piped stderr");
        tail.lock().map(|mut t| t.clear()).ok();
        let stderr_eof = stderr::relay(errors, tail.clone());
        let lines = spawn_line_reader(stdout);
        let (stdin, written) = spawn_writer(stdin);
        Ok(Process { child, group, stdin, written, lines, stderr_eof, bytes_out: 0, bytes_in: 0 })
    }

    /// Write one JSON line, within `timeout`: an evaluator that stops reading its stdin
    /// cannot block sewa on a full pipe.
    pub fn send(&mut self, msg: &serde_json::Value, timeout: Duration) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(msg).expect("json values serialise");
        line.push(b'\n');
        self.bytes_out += line.len() as u64;
        let gone = || std::io::Error::new(std::io::ErrorKind::BrokenPipe, "stdin closed");
        self.stdin.send(line).map_err(|_| gone())?;
        match self.written.recv_timeout(timeout) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("it did not read its stdin within {:.1} s", timeout.as_secs_f64()),
            )),
            Err(RecvTimeoutError::Disconnected) => Err(gone()),
        }
    }

    /// The next stdout line, within `timeout`. A closed stdout is waited on no longer than
    /// that either: the process may close it and live on.
    pub fn recv(&mut self, timeout: Duration) -> std::result::Result<String, RecvError> {
        let deadline = Instant::now().checked_add(timeout);
        match self.lines.recv_timeout(timeout) {
            Ok(Ok(line)) => {
                self.bytes_in += line.len() as u64 + 1;
                Ok(line)
            }
            Ok(Err(e)) => Err(RecvError::Unreadable(e)),
            Err(RecvTimeoutError::Timeout) => Err(RecvError::Timeout),
            Err(RecvTimeoutError::Disconnected) => match self.wait_exit(deadline) {
                Some(status) => {
                    self.drain_stderr();
                    Err(RecvError::Exited(status))
                }
                None => Err(RecvError::ClosedStdout),
            },
        }
    }

    /// Poll for the exit until `deadline` (`None`: a deadline past what `Instant` holds).
    fn wait_exit(&mut self, deadline: Option<Instant>) -> Option<String> {
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => return Some(st.to_string()),
                Ok(None) => {}
                Err(e) => return Some(format!("exit status unknown: {e}")),
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return None;
            }
            std::thread::sleep(POLL);
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

    /// Stop the whole group (SIGTERM, grace, SIGKILL: `group::stop`) and reap the leader, all
    /// within bounded time.
    fn stop(&mut self) {
        if !group::stop(&[self.group]) {
            tracing::warn!(group = self.group.id(), "evaluator processes survived SIGKILL");
        }
        if self.wait_exit(Instant::now().checked_add(REAP)).is_none() {
            // Not reaped yet (a process stuck in the kernel): a zombie until sewa exits.
            tracing::warn!(pid = self.child.id(), "evaluator not reaped after SIGKILL");
        }
        group::discharge_group(self.group);
    }
}

/// A thread that writes lines to the evaluator's stdin and answers each with its result; it
/// ends when the process closes the pipe or the `Process` is dropped.
fn spawn_writer(mut stdin: ChildStdin) -> (Sender<Vec<u8>>, Receiver<std::io::Result<()>>) {
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in rx {
            let r = stdin.write_all(&line).and_then(|()| stdin.flush());
            let failed = r.is_err();
            if done_tx.send(r).is_err() || failed {
                break;
            }
        }
    });
    (tx, done_rx)
}

fn spawn_line_reader(stdout: std::process::ChildStdout) -> Receiver<std::io::Result<String>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        loop {
            let line = match read_bounded(&mut reader, MAX_LINE, false) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_read_whole_up_to_the_bound_and_cut_beyond_it() {
        let text = b"short\r\nexactly8\n0123456789abc\nlast".to_vec();
        let mut r = BufReader::with_capacity(4, &text[..]); // lines span several buffer fills
        let mut next = || read_bounded(&mut r, 8, false).unwrap();
        assert_eq!(next(), Some((b"short".to_vec(), false)));
        assert_eq!(next(), Some((b"exactly8".to_vec(), false)));
        assert_eq!(next(), Some((b"01234567".to_vec(), true)), "cut, and the rest dropped");
        assert_eq!(next(), Some((b"last".to_vec(), false)));
        assert_eq!(next(), None);
    }
}
