//! `sewa report --history`: a real `sewa watch` child publishes several times, each
//! publication lands in the history beside the status file, and the report draws every member
//! loss and every publication as SVG that parses as XML (Python's `xml.etree`). Hostile history
//! files give one clear error or skip lines, never a panic or a hang.

use std::os::unix::fs::FileTypeExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::watch::{DEADLINE, Daemon, write_mlp, write_selection_data};

fn sewa_report(args: &[&std::ffi::OsStr]) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_sewa"))
        .arg("report")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // A hang (a FIFO read without O_NONBLOCK) fails the test instead of stalling it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output().unwrap()));
    rx.recv_timeout(DEADLINE).unwrap_or_else(|_| {
        Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap();
        panic!("sewa report {args:?} hung")
    })
}

/// Per fill colour, the `<circle>`s of the SVG, parsed by Python's XML parser (which fails on
/// anything that is not well-formed XML); and every `<text>`.
fn parse_svg(svg: &Path) -> Value {
    let script = r#"
import json, sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
ns = "{http://www.w3.org/2000/svg}"
assert root.tag == ns + "svg", root.tag
fills = {}
for c in root.iter(ns + "circle"):
    fills[c.get("fill")] = fills.get(c.get("fill"), 0) + 1
texts = [(t.text or "").strip() for t in root.iter(ns + "text")]
print(json.dumps({"fills": fills, "texts": texts}))
"#;
    let out = Command::new("python3").args(["-c", script]).arg(svg).output().unwrap();
    assert!(out.status.success(), "not XML: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn history_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn report_history_draws_every_publication_of_a_real_watch_run() {
    let cfg = "[window]\nsize = 4\n[select]\nmethod = \"greedy\"\nk = 2\n\
               [objective]\nkind = \"builtin\"\ndata = \"sel.safetensors\"\n";
    let mut d = Daemon::start(cfg);
    write_selection_data(&d.tmp.path().join("sel.safetensors"));
    let history = d.out.parent().unwrap().join(".sewa/status.history.jsonl");
    let publishes = |d: &Daemon| d.status().and_then(|s| s["counters"]["publishes"].as_u64());
    for (step, a) in [(1, 1.0), (2, 3.0), (3, -2.0), (4, 0.5), (5, -4.0), (6, 0.1)] {
        write_mlp(&d.runs, step, a);
        let start = Instant::now();
        // Each checkpoint is admitted before the next one arrives.
        while d.status().and_then(|s| s["members"].as_array()?.last()?["step"].as_u64())
            != Some(step)
        {
            assert!(start.elapsed() < DEADLINE && d.alive(), "step {step}\n{}", d.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let start = Instant::now();
    while publishes(&d).unwrap_or(0) < 3
        || history_lines(&history).len() as u64 != publishes(&d).unwrap()
    {
        assert!(
            start.elapsed() < DEADLINE && d.alive(),
            "{:?} publications\n{}",
            publishes(&d),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    d.terminate();
    let entries = history_lines(&history);
    assert_eq!(entries.len() as u64, publishes(&d).unwrap(), "one line per publication");
    // The newest line is what the manifest says is published.
    let manifest = d.manifest().unwrap();
    let steps = |v: &Value, key: &str| -> Vec<u64> {
        v[key].as_array().unwrap().iter().map(|m| m["step"].as_u64().unwrap()).collect()
    };
    let last = entries.last().unwrap();
    assert_eq!(steps(last, "members"), crate::watch::input_steps(&manifest));
    assert_eq!(last["loss"], manifest["selection"]["loss"]);

    let svg = d.tmp.path().join("run.svg");
    let out = sewa_report(&[
        "--history".as_ref(),
        "--config".as_ref(),
        d.config.as_os_str(),
        "--out".as_ref(),
        svg.as_os_str(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let parsed = parse_svg(&svg);
    let count = |fill: &str| parsed["fills"][fill].as_u64().unwrap_or(0);
    // Each member's loss once (by step), each publication's loss, each member it used.
    let mut member_steps: Vec<u64> = entries.iter().flat_map(|e| steps(e, "window")).collect();
    member_steps.sort();
    member_steps.dedup();
    assert!(member_steps.len() >= 4, "{member_steps:?}");
    let used: usize = entries.iter().map(|e| e["members"].as_array().unwrap().len()).sum();
    let with_loss = entries.iter().filter(|e| e["loss"].is_f64()).count();
    assert_eq!(count("#646464"), member_steps.len() as u64, "{parsed}");
    assert_eq!(count("#DC1E1E"), with_loss as u64, "{parsed}");
    assert_eq!(count("#1E50DC"), used as u64, "{parsed}");
    let texts: Vec<&str> =
        parsed["texts"].as_array().unwrap().iter().filter_map(|t| t.as_str()).collect();
    for (i, e) in entries.iter().enumerate() {
        let row = format!("#{} at step {}", i + 1, e["step"]);
        assert!(texts.contains(&row.as_str()), "no row {row:?} in {texts:?}");
    }
}

/// A history of good lines around bad ones: the bad are skipped with a count on stderr, the
/// good drawn. Only bad lines, a FIFO, a huge file or a missing one: one error naming the file.
#[test]
fn hostile_history_files_are_skipped_or_refused_never_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let good = r#"{"at":"t","step":5,"method":"lawa","loss":0.5,"members":[{"path":"s5","step":5,"weight":1.0,"loss":0.5}],"window":[{"step":5,"loss":0.5}]}"#;
    let mut bytes = Vec::new();
    bytes.extend_from_slice(good.as_bytes());
    bytes.extend_from_slice(b"\n{\"at\":\"t\",\"ste\n"); // torn
    bytes.extend_from_slice(b"{\"at\":\"\xff\xfe\"}\n"); // not UTF-8
    bytes.extend(std::iter::repeat_n(b'[', 300 << 10)); // a huge line
    bytes.extend_from_slice(b"\n");
    bytes.extend_from_slice(good.replace("\"step\":5,\"method", "\"step\":6,\"method").as_bytes());
    bytes.extend_from_slice(b"\n{\"at\":\"t\",\"step\":7"); // torn, last
    let mixed = tmp.path().join("mixed.jsonl");
    std::fs::write(&mixed, &bytes).unwrap();
    let svg = tmp.path().join("m.svg");
    let out =
        sewa_report(&["--history".as_ref(), mixed.as_os_str(), "--out".as_ref(), svg.as_os_str()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("skipped 4 bad lines (line 2:"), "{stderr}");
    assert_eq!(parse_svg(&svg)["fills"]["#1E50DC"], 2);

    let bad_only = tmp.path().join("bad.jsonl");
    std::fs::write(&bad_only, b"\xff\n{}\n").unwrap();
    let fifo = tmp.path().join("fifo.jsonl");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let huge = tmp.path().join("huge.jsonl");
    std::fs::File::create(&huge).unwrap().set_len(64 << 20).unwrap();
    let missing = tmp.path().join("missing.jsonl");
    let cases: [(&PathBuf, &str); 4] = [
        (&bad_only, "no publication recorded yet"),
        (&fifo, "FIFO"),
        (&huge, "larger than"),
        (&missing, "cannot read"),
    ];
    for (path, want) in cases {
        let out = sewa_report(&[
            "--history".as_ref(),
            path.as_os_str(),
            "--out".as_ref(),
            svg.as_os_str(),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}: {stderr}", path.display());
        assert!(
            stderr.contains(want) && stderr.contains(&*path.file_name().unwrap().to_string_lossy()),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// A FIFO in the history's place while the daemon publishes: the publication stands, the
/// failure is listed among the status file's errors, the daemon keeps publishing, and
/// nothing blocks on the FIFO (it has no reader).
#[test]
fn a_fifo_in_place_of_the_history_does_not_stop_publishing() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let state = runs.join("averaged/.sewa");
    std::fs::create_dir_all(&state).unwrap();
    let fifo = state.join("status.history.jsonl");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let out = runs.join("averaged/model.safetensors");
    let config = tmp.path().join("sewa.toml");
    let text = format!(
        "[watch]\ndir = {runs:?}\nquiet_ms = 300\n[select]\nmethod = \"lawa\"\nk = 2\n\
         [publish]\nout = {out:?}\n"
    );
    std::fs::write(&config, text).unwrap();
    let mut d = Daemon::spawn(tmp, runs, out, config);
    crate::watch::write(&d.runs, &["--style", "st-rename", "--steps", "1,2"]);
    d.wait_published(&[1, 2]);
    let start = Instant::now();
    let errors = loop {
        let errors = d.status().map(|s| s["errors"].to_string()).unwrap_or_default();
        if errors.contains("publication history not recorded") {
            break errors;
        }
        assert!(start.elapsed() < DEADLINE && d.alive(), "no error recorded\n{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(errors.contains("status.history.jsonl"), "{errors}");
    crate::watch::write(&d.runs, &["--style", "st-rename", "--steps", "3"]);
    d.wait_published(&[2, 3]);
    assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo(), "left as it was");
    d.terminate();
}
