//! The run on a dashboard from the daemon itself: a real `sewa watch` child writes TensorBoard
//! event files (`[publish] tensorboard_dir`), read back by TensorBoard's own
//! `EventAccumulator`, and serves Prometheus text (`[runtime] metrics_addr`), parsed by
//! `prometheus_client`'s parser; both compared with the status file and the manifest. Each
//! test skips, saying why, when its Python package is missing (`.ci/run` installs both).

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::watch::{DEADLINE, Daemon, write_mlp, write_selection_data};

/// A model-based selector (greedy over the builtin objective), so every figure has a value.
const GREEDY: &str = "[select]\nmethod = \"greedy\"\n\
                      [objective]\nkind = \"builtin\"\ndata = \"sel.safetensors\"\n";

/// Why the test cannot run here: `python3` lacks `module`.
fn missing_python(module: &str) -> Option<String> {
    let out = Command::new("python3").args(["-c", &format!("import {module}")]).output();
    match out {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "python3 cannot import {module}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("no python3: {e}")),
    }
}

/// Run a Python script with `arg`, feeding `stdin`; its stdout as JSON.
fn python_json(script: &str, arg: &str, stdin: &str) -> Value {
    let mut child = Command::new("python3")
        .args(["-c", script, arg])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Every scalar of the event files in `dir`, by tag: `[[step, value], ...]`, as TensorBoard's
/// reader sees them.
const READ_TENSORBOARD: &str = r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
acc.Reload()
print(json.dumps({t: [[e.step, e.value] for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}))
"#;

/// Every sample of the exposition text on stdin, by sample name, with each family's type.
const PARSE_PROMETHEUS: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out[s.name] = {"type": fam.type, "value": s.value}
print(json.dumps(out))
"#;

/// Write members 1..=n, each better than the last (so each selection differs from the
/// published one and is published), one by one, each admitted before the next.
fn feed(d: &mut Daemon, n: u64) {
    write_selection_data(&d.tmp.path().join("sel.safetensors"));
    for step in 1..=n {
        write_mlp(&d.runs, step, step as f32);
        let start = Instant::now();
        while d.status().map(|s| s["members"].as_array().unwrap().len()) != Some(step as usize) {
            assert!(
                start.elapsed() < DEADLINE && d.alive(),
                "step {step} not admitted\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * b.abs().max(1.0) // scalars are f32 in TensorBoard
}

#[test]
fn tensorboard_reads_each_selections_scalars_at_the_newest_step() {
    if let Some(why) = missing_python("tensorboard") {
        eprintln!("skipped: {why}");
        return;
    }
    let mut d =
        Daemon::start_full(GREEDY, "averaged/model.safetensors", "tensorboard_dir = \"tb\"");
    feed(&mut d, 4);
    // Relative to the config file's directory.
    let tb = d.tmp.path().join("tb");
    let start = Instant::now();
    let (scalars, status) = loop {
        let status = d.status().unwrap();
        let selections = status["counters"]["selections"].as_u64().unwrap();
        if tb.is_dir() && selections > 0 {
            let s = python_json(READ_TENSORBOARD, tb.to_str().unwrap(), "");
            let points = s["sewa/window_size"].as_array().map_or(0, |p| p.len()) as u64;
            let last = s["sewa/window_size"].as_array().and_then(|p| p.last().cloned());
            // The selection over the whole window is written, and nothing since.
            if points == selections
                && last.is_some_and(|l| l[0] == 4)
                && d.status() == Some(status.clone())
            {
                break (s, status);
            }
        }
        assert!(start.elapsed() < 3 * DEADLINE && d.alive(), "no scalars\n{}", d.log());
        std::thread::sleep(Duration::from_millis(200));
    };
    let tags: Vec<&str> = scalars.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    let want = [
        "sewa/k",
        "sewa/newest_member_loss",
        "sewa/oracle_calls",
        "sewa/published_loss",
        "sewa/selection_loss",
        "sewa/window_size",
    ];
    assert_eq!(tags, want, "{scalars}");
    let series = |tag: &str| -> Vec<(u64, f64)> {
        let points = scalars[tag].as_array().unwrap();
        points.iter().map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap())).collect()
    };
    // Steps 1..4, one member each, window size 20: the window holds as many members as the
    // newest step, at every selection.
    for (step, size) in series("sewa/window_size") {
        assert_eq!(step as f64, size, "{scalars}");
    }
    let calls: f64 = series("sewa/oracle_calls").iter().map(|p| p.1).sum();
    assert_eq!(calls as u64, status["counters"]["oracle_calls"].as_u64().unwrap(), "{status}");
    let last = |tag: &str| series(tag).last().unwrap().1;
    let selection = &status["last_selection"];
    assert!(close(last("sewa/selection_loss"), selection["loss"].as_f64().unwrap()), "{status}");
    let published = status["published"]["loss"].as_f64().unwrap();
    assert!(close(last("sewa/published_loss"), published), "{status}");
    let m = d.manifest().unwrap();
    // policy = "latest": the last selection is the published one, and its manifest says what
    // the last event does.
    assert_eq!(selection["published"], true, "{status}");
    let details = &m["selection"]["details"];
    let own = details["member_losses"].as_array().unwrap();
    assert!(close(last("sewa/newest_member_loss"), own.last().unwrap().as_f64().unwrap()));
    let calls = details["oracle_calls"].as_u64().unwrap_or(0)
        + details["oracle_calls_report"].as_u64().unwrap_or(0);
    assert_eq!(last("sewa/oracle_calls") as u64, calls, "{m}");
    assert_eq!(last("sewa/k") as usize, m["inputs"].as_array().unwrap().len(), "{m}");
    assert!(close(m["selection"]["loss"].as_f64().unwrap(), published), "{m}");
    let files: Vec<_> = std::fs::read_dir(&tb).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(files.len(), 1, "one event file per daemon start: {files:?}");
    d.terminate();
}

/// `GET /metrics` over a plain TCP connection; the body.
fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK") && head.contains("version=0.0.4"), "{head}");
    body.to_string()
}

#[test]
fn prometheus_endpoint_serves_the_status_figures_on_loopback() {
    if let Some(why) = missing_python("prometheus_client") {
        eprintln!("skipped: {why}");
        return;
    }
    // Port 0: the system picks a free one, and the status file names it.
    let extra = format!("{GREEDY}[runtime]\nmetrics_addr = \"127.0.0.1:0\"\n");
    let mut d = Daemon::start_full(&extra, "averaged/model.safetensors", "");
    feed(&mut d, 3);
    let start = Instant::now();
    let (body, parsed, status) = loop {
        let before = d.status().unwrap();
        let addr = before["metrics_addr"].as_str().expect("the bound address is in the status");
        assert!(addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"), "{addr}");
        let body = scrape(addr);
        let parsed = python_json(PARSE_PROMETHEUS, "", &body);
        // The pipeline is at rest (the selection over all 3 members made, the status file the
        // same before and after the scrape; the endpoint is fed just before each write).
        let selections = before["counters"]["selections"].as_f64();
        let at_rest = parsed["sewa_newest_step"]["value"] == 3.0
            && parsed["sewa_selections_total"]["value"].as_f64() == selections
            && before["last_selection"]["loss"].is_f64()
            && d.status() == Some(before.clone());
        if at_rest {
            break (body, parsed, before);
        }
        assert!(start.elapsed() < DEADLINE && d.alive(), "not at rest: {body}\n{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    };
    let value =
        |name: &str| parsed[name]["value"].as_f64().unwrap_or_else(|| panic!("{name}: {parsed}"));
    let c = &status["counters"];
    for (sample, key) in [
        ("sewa_selections_total", "selections"),
        ("sewa_publishes_total", "publishes"),
        ("sewa_quarantined_total", "quarantined"),
        ("sewa_loaded_total", "loaded"),
        ("sewa_failed_selections_total", "failed_selections"),
        ("sewa_oracle_calls_total", "oracle_calls"),
    ] {
        assert_eq!(value(sample), c[key].as_f64().unwrap(), "{sample}: {body}");
        assert_eq!(parsed[sample]["type"], "counter", "{sample}");
    }
    let members = status["members"].as_array().unwrap();
    assert_eq!(value("sewa_window_members"), members.len() as f64);
    assert_eq!(value("sewa_newest_step"), 3.0);
    assert_eq!(value("sewa_published_loss"), status["published"]["loss"].as_f64().unwrap());
    assert_eq!(
        value("sewa_last_selection_loss"),
        status["last_selection"]["loss"].as_f64().unwrap()
    );
    assert_eq!(value("sewa_held_bytes"), status["disk"]["held_bytes"].as_f64().unwrap_or(0.0));
    assert_eq!(parsed["sewa_published_loss"]["type"], "gauge");
    assert!(value("sewa_oracle_calls_total") > 0.0, "{body}");
    // Only the one path is answered.
    let addr = status["metrics_addr"].as_str().unwrap();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");
    d.terminate();
}

#[test]
fn a_metrics_address_off_loopback_is_refused_at_its_line() {
    let dir = tempfile::tempdir().unwrap();
    for addr in ["0.0.0.0:9464", "10.0.0.1:1"] {
        let path = dir.path().join("sewa.toml");
        let text = format!(
            "[watch]\ndir = \"runs\"\n[publish]\nout = \"avg/model.safetensors\"\n\
             [runtime]\nthreads = 1\nmetrics_addr = \"{addr}\"\n"
        );
        std::fs::write(&path, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_sewa"))
            .arg("check-config")
            .arg(&path)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(78), "{addr}: {text}");
        assert!(
            text.contains("line 7, column 16") && text.contains("not a loopback address"),
            "{addr}: {text}"
        );
        assert!(text.contains(addr) && text.contains(&path.display().to_string()), "{text}");
    }
}

#[test]
fn an_unwritable_tensorboard_dir_is_a_warning_per_selection_and_publishing_goes_on() {
    // A regular file where the directory's parent should be: every write fails.
    let tb = "tensorboard_dir = \"blocker/tb\"";
    let mut d = Daemon::start_full("", "averaged/model.safetensors", tb);
    std::fs::write(d.tmp.path().join("blocker"), b"not a directory").unwrap();
    crate::watch::write(&d.runs, &["--style", "st-rename", "--steps", "1,2,3,4,5"]);
    d.wait_published(&[1, 2, 3, 4, 5]);
    let start = Instant::now();
    let selections = loop {
        let s = d.status().unwrap()["counters"]["selections"].as_u64().unwrap();
        let warned = d.log().matches("tensorboard_dir: cannot write the event file").count() as u64;
        // The manifest is renamed in before the status file counts its selection: wait for
        // the count, not only for the two to agree (0 = 0 right after the publish).
        if s >= 1 && warned == s {
            break s;
        }
        assert!(
            start.elapsed() < DEADLINE && d.alive(),
            "{s} selections, {warned} warnings\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(selections >= 1 && d.alive());
    d.terminate();
}

#[test]
fn a_metrics_port_in_use_is_an_error_in_the_status_and_the_daemon_runs_without_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let extra = format!("[runtime]\nmetrics_addr = \"{addr}\"\n");
    let mut d = Daemon::start_full(&extra, "averaged/model.safetensors", "");
    crate::watch::write(&d.runs, &["--style", "st-rename", "--steps", "1,2,3,4,5"]);
    d.wait_published(&[1, 2, 3, 4, 5]);
    let status = d.status().unwrap();
    assert!(status["metrics_addr"].is_null(), "{status}");
    let errors = status["errors"].to_string();
    assert!(errors.contains("metrics_addr") && errors.contains(&addr.to_string()), "{errors}");
    assert!(d.log().contains("cannot listen"), "{}", d.log());
    d.terminate();
}
