//! `[runtime] metrics_addr`: the daemon's figures as a Prometheus text endpoint (`GET
//! /metrics`, exposition format 0.0.4) on a loopback address (`checked::LoopbackAddr` refuses
//! any other at its line; nothing else is ever bound).
//!
//! The pipeline hands a `Snapshot` (plain numbers taken from its status) to a `watch` channel
//! each time it writes its status file; the server, a tokio task, copies the latest snapshot
//! out (no lock is held while it renders or writes) and answers. It cannot block the pipeline
//! or signals: each connection is its own task, reads at most `MAX_REQUEST_BYTES`, lives at most
//! `CONNECTION_TIME`, and at most `MAX_CONNECTIONS` are served at once (more are closed at
//! once), so slow or many clients cannot pin memory.
//!
//! The text is written here rather than with `prometheus-client`: that crate keeps live metric
//! objects updated at their source, while these figures are a snapshot of the status; the
//! families carry no labels, so there are no label values to escape.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tracing::{debug, info, warn};

use crate::status::Status;

/// A request line and headers longer than this are refused (a scraper sends a few hundred).
const MAX_REQUEST_BYTES: usize = 8 << 10;
/// A connection is closed this long after it was accepted, answered or not.
const CONNECTION_TIME: Duration = Duration::from_secs(5);
/// Connections served at once; beyond it new ones are closed unanswered.
const MAX_CONNECTIONS: usize = 16;

/// The figures the endpoint serves, copied from the status.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub selections: u64,
    pub publishes: u64,
    pub quarantined: u64,
    pub loaded: u64,
    pub failed_selections: u64,
    pub oracle_calls: u64,
    pub window_members: u64,
    pub published_loss: Option<f64>,
    pub last_selection_loss: Option<f64>,
    pub newest_step: Option<u64>,
    pub held_bytes: u64,
}

impl Snapshot {
    pub fn of(s: &Status) -> Snapshot {
        let c = &s.counters;
        let held = s
            .disk
            .as_ref()
            .map_or_else(|| s.members.iter().map(|m| m.held_bytes).sum(), |d| d.held_bytes);
        Snapshot {
            selections: c.selections,
            publishes: c.publishes,
            quarantined: c.quarantined,
            loaded: c.loaded,
            failed_selections: c.failed_selections,
            oracle_calls: c.oracle_calls,
            window_members: s.members.len() as u64,
            published_loss: s.published.as_ref().and_then(|p| p.summary.loss),
            last_selection_loss: s.last_selection.as_ref().and_then(|l| l.summary.loss),
            newest_step: s.members.iter().map(|m| m.step).max(),
            held_bytes: held,
        }
    }

    /// The exposition text (format 0.0.4): `# HELP`, `# TYPE` and one sample per family; a
    /// gauge with no value yet (no published loss) has no sample.
    pub fn render(&self) -> String {
        let counters = [
            ("sewa_selections_total", "Selections made.", self.selections),
            ("sewa_publishes_total", "Averages published.", self.publishes),
            ("sewa_quarantined_total", "Checkpoints quarantined.", self.quarantined),
            ("sewa_loaded_total", "Checkpoints loaded into the window.", self.loaded),
            (
                "sewa_failed_selections_total",
                "Selections that failed (nothing was published from them).",
                self.failed_selections,
            ),
            (
                "sewa_oracle_calls_total",
                "Objective (loss) calls of all selections.",
                self.oracle_calls,
            ),
        ];
        let gauges = [
            ("sewa_window_members", "Checkpoints in the window.", Some(self.window_members as f64)),
            ("sewa_published_loss", "Loss of the published average.", self.published_loss),
            ("sewa_last_selection_loss", "Loss of the last selection.", self.last_selection_loss),
            (
                "sewa_newest_step",
                "Training step of the window's newest member.",
                self.newest_step.map(|s| s as f64),
            ),
            (
                "sewa_held_bytes",
                "Bytes of deleted checkpoint files sewa keeps allocated.",
                Some(self.held_bytes as f64),
            ),
        ];
        let mut out = String::new();
        for (name, help, v) in counters {
            let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n");
        }
        for (name, help, v) in gauges {
            let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n");
            if let Some(v) = v {
                let _ = writeln!(out, "{name} {}", number(v));
            }
        }
        out
    }
}

/// A sample value as the format spells it (Rust's `{}` of a finite f64 is a plain decimal the
/// format accepts, and round-trips).
fn number(v: f64) -> String {
    match v {
        v if v.is_nan() => "NaN".into(),
        v if v == f64::INFINITY => "+Inf".into(),
        v if v == f64::NEG_INFINITY => "-Inf".into(),
        v => format!("{v}"),
    }
}

/// What the pipeline feeds: the latest snapshot (a `watch` channel keeps only the newest).
pub type Feed = watch::Sender<Snapshot>;

/// The bound endpoint: its address (port 0 resolved) and the pipeline's side of the channel.
pub struct Endpoint {
    pub addr: SocketAddr,
    pub feed: Feed,
}

/// Bind `addr` and serve until the returned task is aborted. `addr` is a `LoopbackAddr`'s:
/// loopback only, checked at parse.
pub async fn serve(addr: SocketAddr) -> std::io::Result<(Endpoint, tokio::task::JoinHandle<()>)> {
    debug_assert!(addr.ip().is_loopback(), "only loopback is ever bound");
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let (feed, latest) = watch::channel(Snapshot::default());
    info!(%addr, "metrics endpoint listening (GET /metrics)");
    let task = tokio::spawn(accept_loop(listener, latest));
    Ok((Endpoint { addr, feed }, task))
}

async fn accept_loop(listener: TcpListener, latest: watch::Receiver<Snapshot>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and the like: wait a little rather than spin.
                warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "metrics endpoint: too many connections; closing this one");
            continue; // dropped: closed
        };
        let snapshot = *latest.borrow();
        tokio::spawn(async move {
            let _slot = slot;
            if tokio::time::timeout(CONNECTION_TIME, answer(stream, snapshot)).await.is_err() {
                debug!(%peer, "metrics endpoint: connection timed out");
            }
        });
    }
}

/// Read one request (bounded) and answer it; errors end the connection.
async fn answer(mut stream: TcpStream, snapshot: Snapshot) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        if let Some(end) = find_head_end(&buf) {
            break Some(end);
        }
        if buf.len() >= MAX_REQUEST_BYTES {
            break None;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(()); // closed before a whole request
        }
        buf.extend_from_slice(&chunk[..n.min(MAX_REQUEST_BYTES - buf.len())]);
    };
    let response = match head_end {
        None => reply(431, "Request Header Fields Too Large", "request too large\n"),
        Some(end) => route(&buf[..end], &snapshot),
    };
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Where the request's head ends (the blank line), if it has.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .or_else(|| buf.windows(2).position(|w| w == b"\n\n"))
}

/// The response to a request head (pure).
pub fn route(head: &[u8], snapshot: &Snapshot) -> String {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => {
            let body = snapshot.render();
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        }
        (_, "/metrics") => reply(405, "Method Not Allowed", "only GET /metrics\n"),
        _ => reply(404, "Not Found", "sewa serves GET /metrics only\n"),
    }
}

fn reply(code: u16, reason: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap() -> Snapshot {
        Snapshot {
            selections: 3,
            publishes: 2,
            oracle_calls: 41,
            window_members: 4,
            published_loss: Some(0.125),
            newest_step: Some(400),
            ..Snapshot::default()
        }
    }

    #[test]
    fn every_family_has_help_and_type_and_unknown_gauges_have_no_sample() {
        let text = snap().render();
        assert!(text.contains("# TYPE sewa_selections_total counter\nsewa_selections_total 3\n"));
        assert!(text.contains("# TYPE sewa_published_loss gauge\nsewa_published_loss 0.125\n"));
        assert!(text.contains("sewa_newest_step 400\n"));
        assert!(text.contains("# TYPE sewa_last_selection_loss gauge\n# HELP sewa_newest_step"));
        let names: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).collect();
        assert_eq!(names.len(), 11);
        for l in text.lines().filter(|l| l.starts_with("# HELP")) {
            assert!(l.split(' ').count() > 3, "HELP without text: {l}");
        }
    }

    #[test]
    fn numbers_are_spelled_as_the_format_wants() {
        assert_eq!(number(0.1), "0.1");
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(1e-300).parse::<f64>().unwrap(), 1e-300);
    }

    #[test]
    fn only_get_metrics_is_answered() {
        let ok = route(b"GET /metrics HTTP/1.1\r\nHost: x", &snap());
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n") && ok.contains("version=0.0.4"), "{ok}");
        let body = ok.split("\r\n\r\n").nth(1).unwrap();
        assert!(ok.contains(&format!("Content-Length: {}\r\n", body.len())));
        assert!(route(b"GET /metrics?x=1 HTTP/1.0", &snap()).starts_with("HTTP/1.1 200"));
        assert!(route(b"POST /metrics HTTP/1.1", &snap()).starts_with("HTTP/1.1 405"));
        assert!(route(b"GET / HTTP/1.1", &snap()).starts_with("HTTP/1.1 404"));
        assert!(route(b"\xff\xfe garbage", &snap()).starts_with("HTTP/1.1 404"));
    }

    #[tokio::test]
    async fn a_request_too_large_is_refused_and_a_scrape_answered() {
        let (endpoint, task) = serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
        endpoint.feed.send_replace(snap());
        let mut big = TcpStream::connect(endpoint.addr).await.unwrap();
        big.write_all(&vec![b'a'; MAX_REQUEST_BYTES]).await.unwrap();
        let mut answer = String::new();
        big.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
        let mut good = TcpStream::connect(endpoint.addr).await.unwrap();
        good.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await.unwrap();
        let mut answer = String::new();
        good.read_to_string(&mut answer).await.unwrap();
        assert!(answer.contains("sewa_oracle_calls_total 41\n"), "{answer}");
        task.abort();
    }
}
