//! Issue 9 items 5 and 12: `sewa status` shows the published selection apart from the last
//! (unpublished) one and marks members whose file is gone; LAWA (and every method that averages
//! k members) waits for k checkpoints; `policy = "best"` can judge on a separate acceptance
//! split.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::watch::{DEADLINE, Daemon, input_steps, write_mlp, write_selection_data};

/// Poll the status file until `ok` holds, and return it.
fn wait_status(d: &mut Daemon, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        if let Some(s) = d.status().filter(|s| ok(s)) {
            return s;
        }
        let last = d.status().map(|s| s.to_string()).unwrap_or_default();
        assert!(d.alive(), "sewa exited waiting for {what}\n{}", d.log());
        assert!(start.elapsed() < DEADLINE, "never saw {what}; last status {last}\n{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The window holds `step` (the status is written after the selection over it).
fn has_step(s: &Value, step: u64) -> bool {
    s["members"].as_array().is_some_and(|m| m.iter().any(|m| m["step"] == step))
}

fn member(list: &Value, step: u64) -> &Value {
    let list = list.as_array().unwrap();
    list.iter().find(|m| m["step"] == step).unwrap_or_else(|| panic!("no step {step}: {list:?}"))
}

fn status_text(d: &Daemon) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_sewa"))
        .args(["status", "--config"])
        .arg(&d.config)
        .output();
    let out = out.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The `sewa status` line of step `step` in the block that starts with `header`.
fn line_in<'a>(text: &'a str, header: &str, step: u64) -> &'a str {
    let block = &text[text.find(header).unwrap_or_else(|| panic!("no {header:?} in\n{text}"))..];
    let block = block.split("\n\n").next().unwrap();
    let needle = format!("step {step:>8}");
    block.lines().find(|l| l.contains(&needle)).unwrap_or_else(|| panic!("{needle} in\n{block}"))
}

/// Under `policy = "best"` the status used to show, as "weight", the last selection — which was
/// not published — and nothing of the published members once they left the window.
#[test]
fn status_shows_the_published_selection_apart_from_the_last_one_and_deleted_members() {
    // Window of 2, greedy: the best member alone. Step 1 is good; 2 and 3 are worse.
    let cfg = "[window]\nsize = 2\n[select]\nmethod = \"greedy\"\nk = 1\n\
               [objective]\nkind = \"builtin\"\ndata = \"sel.safetensors\"\n";
    let mut d = Daemon::start_full(cfg, "averaged/model.safetensors", "policy = \"best\"");
    write_selection_data(&d.tmp.path().join("sel.safetensors"));
    write_mlp(&d.runs, 1, 3.0);
    d.wait_published(&[1]);
    write_mlp(&d.runs, 2, -2.0);
    wait_status(&mut d, "step 2", |s| has_step(s, 2));
    write_mlp(&d.runs, 3, -3.0);
    // Step 1 left the window; {2} is selected and loses to the published {1}.
    let s = wait_status(&mut d, "step 3", |s| has_step(s, 3));
    assert_eq!(input_steps(&d.manifest().unwrap()), [1]);
    let last = &s["last_selection"];
    assert_eq!(last["published"], false, "{last}");
    assert!(last["outcome"].as_str().unwrap().contains("does not beat"), "{last}");
    let p = &s["published"];
    assert_eq!(p["members"].as_array().unwrap().len(), 1, "{p}");
    let one = member(&p["members"], 1);
    assert_eq!((one["weight"].as_f64(), &one["in_window"]), (Some(1.0), &Value::Bool(false)));
    assert!(one["loss"].as_f64().is_some(), "greedy records members' losses: {one}");
    assert_eq!(p["loss"], d.manifest().unwrap()["selection"]["loss"]);
    // The window: weight is the last selection's, published_weight what consumers have.
    let two = member(&s["members"], 2);
    assert_eq!((two["weight"].as_f64(), two["published_weight"].as_f64()), (Some(1.0), Some(0.0)));
    // The trainer's rotation deletes step 1 (published) and step 3 (in the window).
    std::fs::remove_file(d.runs.join("step_1.safetensors")).unwrap();
    std::fs::remove_file(d.runs.join("step_3.safetensors")).unwrap();
    let s = wait_status(&mut d, "step 3 deleted", |s| {
        has_step(s, 3) && member(&s["members"], 3)["on_disk"] == "deleted"
    });
    assert_eq!(member(&s["members"], 2)["on_disk"], "present");
    assert_eq!(member(&s["published"]["members"], 1)["on_disk"], "deleted");
    let text = status_text(&d);
    eprintln!("{text}"); // the README's sample: cargo test … -- --nocapture
    let published = line_in(&text, "\npublished ", 1);
    assert!(published.contains("weight 1.0000") && published.contains("loss "), "{text}");
    assert!(published.contains("left the window") && published.contains("deleted"), "{text}");
    let two = line_in(&text, "\nwindow:", 2);
    assert!(two.contains("published 0.0000  last selection 1.0000"), "{text}");
    assert!(line_in(&text, "\nwindow:", 3).contains("deleted"), "{text}");
    assert!(text.contains("does not beat"), "{text}");
}

/// LAWA with k = 3 used to publish a 1-checkpoint, then a 2-checkpoint "average of the last 3".
#[test]
fn lawa_publishes_nothing_until_k_checkpoints_exist() {
    let mut d = Daemon::start("[window]\nsize = 5\n[select]\nmethod = \"lawa\"\nk = 3\n");
    for step in [1, 2] {
        write_mlp(&d.runs, step, step as f32);
        let s = wait_status(&mut d, "the window", |s| has_step(s, step));
        assert!(d.manifest().is_none(), "published before k checkpoints existed");
        assert!(s["waiting"].as_str().unwrap().contains("min_members"), "{s}");
    }
    assert!(status_text(&d).contains("waits for 3 window members"));
    write_mlp(&d.runs, 3, 3.0);
    d.wait_published(&[1, 2, 3]);
    let s = wait_status(&mut d, "the publication", |s| s["counters"]["publishes"] == 1);
    assert!(s["waiting"].is_null(), "{s}");
    assert_eq!(s["counters"]["selections"], 1, "the first selection is the k-average: {s}");
}

#[test]
fn lawa_with_min_members_1_publishes_at_once() {
    let mut d = Daemon::start("[select]\nmethod = \"lawa\"\nk = 3\nmin_members = 1\n");
    write_mlp(&d.runs, 1, 1.0);
    d.wait_published(&[1]);
}

/// `write_selection_data`'s rows (labelled by x0 > x1), labelled the other way: there a
/// negative `a` (see `write_mlp`) is good and a large one bad.
fn write_flipped_data(path: &Path) {
    let n = 64;
    let xs: Vec<f32> = (0..2 * n).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
    let ys: Vec<i64> = xs.chunks(2).map(|p| if p[0] > p[1] { 1 } else { 0 }).collect();
    let xb: Vec<u8> = xs.iter().flat_map(|v| v.to_le_bytes()).collect();
    let yb: Vec<u8> = ys.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        |dtype, shape, bytes| safetensors::tensor::TensorView::new(dtype, shape, bytes).unwrap();
    let views = vec![
        ("inputs", view(safetensors::Dtype::F32, vec![n, 2], &xb[..])),
        ("targets", view(safetensors::Dtype::I64, vec![n], &yb[..])),
    ];
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// `policy = "best"` compared a selection with the published model on the split the selection
/// optimised. With `acceptance_data` the comparison uses the other split; the published model's
/// loss there is computed from the published file after a restart.
#[test]
fn policy_best_accepts_on_the_acceptance_data_when_given() {
    let objective = "kind = \"builtin\"\ndata = \"sel.safetensors\"\n\
                     acceptance_data = \"acc.safetensors\"";
    let d = accepts_on_the_other_split(objective);
    restart_judges_the_published_file(d);
}

/// The same with evaluator processes: `acceptance_command` is a second evaluator on the other
/// split (the protocol never names data).
#[test]
fn policy_best_accepts_with_a_second_evaluator_when_given_acceptance_command() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/evaluators/mlp_numpy.py");
    let objective = format!(
        "kind = \"command\"\ncommand = [\"python3\", {script:?}, \"sel.safetensors\"]\n\
         acceptance_command = [\"python3\", {script:?}, \"acc.safetensors\"]"
    );
    accepts_on_the_other_split(&objective);
}

/// Steps 1 (published), 2 (better on the selection data, worse on the acceptance data: held
/// back) and 3 (the other way round: published).
fn accepts_on_the_other_split(objective: &str) -> Daemon {
    // Window of one, k = 1: each selection is the newest checkpoint alone.
    let cfg = format!(
        "[window]\nsize = 1\n[select]\nmethod = \"sewa\"\nk = 1\n[objective]\n{objective}\n"
    );
    let mut d = Daemon::start_full(&cfg, "averaged/model.safetensors", "policy = \"best\"");
    write_selection_data(&d.tmp.path().join("sel.safetensors"));
    write_flipped_data(&d.tmp.path().join("acc.safetensors"));
    write_mlp(&d.runs, 1, 1.0);
    let first = d.wait_published(&[1]);
    let calls = &first["selection"]["details"]["oracle_calls_acceptance"];
    assert_eq!(calls, 1, "one acceptance call, counted apart: {}", first["selection"]);
    // Better on the selection data, worse on the acceptance data: not published.
    write_mlp(&d.runs, 2, 3.0);
    let s = wait_status(&mut d, "step 2", |s| has_step(s, 2));
    let last = &s["last_selection"];
    assert!(last["loss"].as_f64().unwrap() < first["selection"]["loss"].as_f64().unwrap());
    let outcome = last["outcome"].as_str().unwrap();
    assert!(outcome.contains("does not beat") && outcome.contains("acceptance data"), "{last}");
    assert_eq!(input_steps(&d.manifest().unwrap()), [1]);
    // Worse on the selection data, better on the acceptance data: published.
    write_mlp(&d.runs, 3, -1.0);
    let third = d.wait_published(&[3]);
    let loss = |m: &Value| m["selection"]["loss"].as_f64().unwrap();
    assert!(loss(&third) > loss(&first), "{third}");
    d
}

/// After a restart the published model's acceptance loss is not known: it is computed from the
/// published file, and a selection worse there is held back.
fn restart_judges_the_published_file(mut d: Daemon) {
    let m = d.manifest().unwrap();
    let accepted = m["selection"]["details"]["acceptance_loss"].as_f64().unwrap();
    d.terminate();
    let log = std::fs::File::create(d.tmp.path().join("sewa2.log")).unwrap();
    d.child = Command::new(env!("CARGO_BIN_EXE_sewa"))
        .args(["watch", "--config"])
        .arg(&d.config)
        .stderr(log)
        .spawn()
        .unwrap();
    // Better on the selection data than step 3, worse on the acceptance data.
    write_mlp(&d.runs, 4, -0.5);
    let s = wait_status(&mut d, "step 4 after the restart", |s| {
        has_step(s, 4) && !s["last_selection"].is_null()
    });
    assert!(s["last_selection"]["outcome"].as_str().unwrap().contains("does not beat"), "{s}");
    let known = s["published"]["acceptance_loss"].as_f64().expect("computed from the file");
    assert!((known - accepted).abs() < 1e-6, "{known} vs {accepted}");
    assert_eq!(input_steps(&d.manifest().unwrap()), [3]);
}

/// Issue 19 item 14: `sewa status` right after start said "no status file": the first status
/// was written once the daemon watched, after the start-up clean-up. Here an interrupted
/// publish left a temp directory of 20,000 files, so that clean-up takes a while; the status
/// file says "starting" before it.
#[test]
fn the_status_file_says_starting_before_the_slow_start_up_work() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let out = runs.join("averaged/model.safetensors");
    let leftover = runs.join("averaged/.model.safetensors.Ab12x9.sewa-tmp");
    std::fs::create_dir_all(&leftover).unwrap();
    for i in 0..20_000 {
        std::fs::File::create(leftover.join(i.to_string())).unwrap();
    }
    let config = tmp.path().join("sewa.toml");
    let text = format!("[watch]\ndir = {runs:?}\nquiet_ms = 300\n[publish]\nout = {out:?}\n");
    std::fs::write(&config, text).unwrap();
    let mut d = Daemon::spawn(tmp, runs, out, config);
    let start = Instant::now();
    let first = loop {
        if let Some(s) = d.status() {
            break s;
        }
        assert!(d.alive(), "sewa exited:\n{}", d.log());
        assert!(start.elapsed() < DEADLINE, "no status file:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(2));
    };
    assert_eq!(first["state"], "starting", "{first:#}");
    assert_eq!(first["pid"], d.child.id());
    let s = wait_status(&mut d, "watching", |s| s["state"] == "watching");
    assert!(!leftover.exists(), "the clean-up ran: {s}");
    assert!(status_text(&d).contains("watching"));
}
