//! The window under production conditions (issue 19): HF-directory outputs while the trainer's
//! rotation deletes selected members (side files), a limit on open files too low for the
//! window (descriptors), and a stale checkpoint of another layout present at start-up.
//! Each runs the real `sewa watch` binary against real writers.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::watch::{DEADLINE, Daemon, check_final, input_steps, write};

/// Quarantine entries of the status file that are warnings (not skipped, not incomplete).
fn quarantined(d: &Daemon) -> Vec<Value> {
    let status = d.status().unwrap_or_default();
    let all = status["quarantined"].as_array().cloned().unwrap_or_default();
    all.into_iter().filter(|q| q["skipped"] == false && q["incomplete"] == false).collect()
}

/// Issue 19 item 2: with `save_total_limit = 2` and a selection of the window's *oldest*
/// members (best-metric, highest eval_loss), every selected directory is deleted before the
/// publication that needs its config. The side files come from what sewa read at admission.
#[test]
fn hf_dir_output_publishes_side_files_of_selected_members_rotation_deleted() {
    let cfg = "[window]\nsize = 4\n[select]\nmethod = \"best-metric\"\nk = 2\n\
               metric = \"eval_loss\"\nmetric_mode = \"max\"\n";
    let mut d = Daemon::start_with_out(cfg, "averaged");
    // eval_loss = 1000 / step: the oldest two of the window are "best"; rotation keeps 2.
    let steps = "10,20,30,40,50,60";
    let args = ["--style", "hf-dir", "--steps", steps, "--keep", "2", "--interval-ms", "500"];
    write(&d.runs, &args);
    let m = d.wait_published(&[30, 40]);
    for step in [30, 40] {
        assert!(!d.runs.join(format!("checkpoint-{step}")).exists(), "rotation deleted it");
    }
    check_final(&d);
    let config = std::fs::read_to_string(d.out.join("config.json")).unwrap();
    assert_eq!(config, r#"{"model_type": "toy"}"#, "the side file, from memory");
    assert_eq!(m["side_files"], serde_json::json!(["config.json"]));
    let source = m["side_source"].as_str().unwrap();
    assert!(source.ends_with("checkpoint-40"), "the newest selected member: {source}");
    let notes = m["notes"].to_string();
    assert!(notes.contains("deleted since"), "{notes}");
    let status = d.status().unwrap();
    assert!(status["errors"].as_array().is_none_or(|e| e.is_empty()), "{status:#}");
    assert!(!d.log().contains("publish failed"), "{}", d.log());
}

/// A safetensors file of `tensors` (name, shape; f32 filled with `value`) written by rename.
fn write_st(path: &Path, tensors: &[(&str, Vec<usize>)], value: f32) {
    let data: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, s)| (0..s.iter().product::<usize>()).flat_map(|_| value.to_le_bytes()).collect())
        .collect();
    let views: Vec<_> = tensors
        .iter()
        .zip(&data)
        .map(|((n, s), d)| {
            let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d);
            (n.to_string(), v.unwrap())
        })
        .collect();
    let tmp = path.with_file_name(".tmp-sewa-test");
    safetensors::serialize_to_file(views, None, &tmp).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Issue 19 item 7: a stale file with other shapes, alone at start-up, is published; the real
/// run's checkpoints that follow must replace it (before the fix: all quarantined against it,
/// and the stale file stayed published).
#[test]
fn a_stale_checkpoint_of_another_layout_at_start_up_gives_way_to_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    std::fs::create_dir(&runs).unwrap();
    let stale = runs.join("model_step_1.safetensors");
    write_st(&stale, &[("w", vec![4, 4]), ("b", vec![16])], 1.0);
    let out = runs.join("averaged/model.safetensors");
    let config = tmp.path().join("sewa.toml");
    let text = format!(
        "[watch]\ndir = {runs:?}\nquiet_ms = 300\nrescan_s = 5\n[window]\nsize = 4\n\
         [select]\nmethod = \"lawa\"\nk = 2\nmin_members = 1\n[publish]\nout = {out:?}\n"
    );
    std::fs::write(&config, text).unwrap();
    let mut d = Daemon::spawn(tmp, runs, out, config);
    d.wait_published(&[1]);
    write(&d.runs, &["--style", "st-rename", "--steps", "100,200,300,400,500,600"]);
    d.wait_published(&[500, 600]);
    check_final(&d);
    let log = d.log();
    let changes: Vec<&str> = log.lines().filter(|l| l.contains("changed layout")).collect();
    assert_eq!(changes.len(), 1, "reported once:\n{log}");
    // The new file is whichever of the run's first two arrived second (one batch or two).
    let new = ["model_step_100.safetensors", "model_step_200.safetensors"];
    assert!(
        new.iter().any(|n| changes[0].contains(n))
            && changes[0].contains("model_step_1.safetensors")
            && changes[0].contains("WARN"),
        "names both files, loudly: {}",
        changes[0]
    );
    assert!(quarantined(&d).is_empty(), "{:#}", d.status().unwrap());
    let status = d.status().unwrap();
    let stale_entry = status["quarantined"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["path"].as_str().is_some_and(|p| p.ends_with("model_step_1.safetensors")));
    let stale_entry = stale_entry.expect("the stale file is listed as skipped");
    assert_eq!(stale_entry["skipped"], true, "{stale_entry}");
    assert_eq!(status["counters"]["relayouts"], 1);
}

/// An HF checkpoint directory of `shards` safetensors shards (one tensor `t{i}` = [4] of
/// `step` each) with its index, `trainer_state.json` (the marker) last.
fn write_sharded(runs: &Path, step: u64, shards: usize) -> PathBuf {
    let dir = runs.join(format!("checkpoint-{step}"));
    std::fs::create_dir(&dir).unwrap();
    let mut map = serde_json::Map::new();
    for i in 0..shards {
        let file = format!("model-{:05}-of-{shards:05}.safetensors", i + 1);
        write_st(&dir.join(&file), &[(&format!("t{i}"), vec![4])], step as f32);
        map.insert(format!("t{i}"), Value::String(file));
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let state = serde_json::json!({ "global_step": step, "log_history": [] });
    std::fs::write(dir.join("trainer_state.json"), state.to_string()).unwrap();
    dir
}

/// Issue 19 item 6: under `ulimit -n 64` (soft and hard: nothing to raise), a window of 20
/// checkpoints of 8 shards cannot be held. Loads that run out of descriptors are never
/// quarantined; the oldest members make room, so the newest checkpoints keep being admitted
/// and published.
#[test]
fn out_of_descriptors_never_quarantines_and_the_window_moves_on() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    std::fs::create_dir(&runs).unwrap();
    let out = runs.join("averaged/model.safetensors");
    let config = tmp.path().join("sewa.toml");
    let text = format!(
        "[watch]\ndir = {runs:?}\nquiet_ms = 200\nrescan_s = 2\n[window]\nsize = 20\n\
         [select]\nmethod = \"lawa\"\nk = 2\n[publish]\nout = {out:?}\n"
    );
    std::fs::write(&config, text).unwrap();
    let log = std::fs::File::create(tmp.path().join("sewa.log")).unwrap();
    let child = Command::new("sh")
        .args(["-c", "ulimit -n 64 && exec \"$0\" \"$@\"", env!("CARGO_BIN_EXE_sewa")])
        .args(["watch", "--config"])
        .arg(&config)
        .env("RUST_LOG", "sewa=debug,info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut d = Daemon { child, tmp, runs, out, config };
    let start = Instant::now();
    for step in 1..=12u64 {
        write_sharded(&d.runs, step, 8);
        // The next one once this one is in the window or refused (never a fixed sleep).
        loop {
            let status = d.status().unwrap_or_default();
            let seen = |key: &str| {
                status[key].as_array().is_some_and(|a| {
                    a.iter().any(|m| {
                        m["path"].as_str().is_some_and(|p| p.ends_with(&format!("-{step}")))
                    })
                })
            };
            if seen("members") || seen("quarantined") {
                break;
            }
            assert!(d.alive(), "sewa exited:\n{}", d.log());
            assert!(start.elapsed() < DEADLINE * 2, "step {step} never seen\n{}", d.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    d.wait_published(&[11, 12]);
    let log = d.log();
    assert!(log.contains("out of file descriptors"), "the limit was never reached:\n{log}");
    assert!(quarantined(&d).is_empty(), "{:#}", d.status().unwrap());
    let members = d.status().unwrap()["members"].as_array().unwrap().len();
    assert!((1..20).contains(&members), "the window holds what the limit allows: {members}");
    assert_eq!(input_steps(&d.manifest().unwrap()), [11, 12]);
}
