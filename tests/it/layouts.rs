//! Common run-directory layouts (issue 9 items 8, 9 and 12): torch checkpoint dicts with the
//! step inside and custom keys (`--state-key`, `[watch] state_key`), optimizer files and a
//! `last.pt` beside the checkpoints under the default pattern, and `--out` in a directory
//! that does not exist. Torch files are written at test time by tests/writers/torch_zip.py
//! (standard library only, no torch) so every layout here is reproducible on any machine.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::watch::{DEADLINE, Daemon, check_final, input_steps, write};

const TORCH_ZIP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/writers/torch_zip.py");

/// `torch_zip.py PATH --layout LAYOUT --step STEP` (see its LAYOUTS for the shapes).
fn torch_file(path: &Path, layout: &str, step: u64) -> PathBuf {
    let out = Command::new("python3")
        .arg(TORCH_ZIP)
        .arg(path)
        .args(["--layout", layout, "--step", &step.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "torch_zip.py: {}", String::from_utf8_lossy(&out.stderr));
    path.to_path_buf()
}

fn sewa(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sewa")).args(args).env("RUST_LOG", "info").output().unwrap()
}

fn run(args: &[&str], paths: &[&Path]) -> Output {
    let mut all: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
    all.extend(paths.iter().map(|p| p.as_os_str()));
    sewa(&all)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn inspect_step(path: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["inspect", "--json"];
    args.extend_from_slice(extra);
    let o = run(&args, &[path]);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["step"].clone()
}

#[test]
fn step_stored_in_a_torch_dict_is_used_and_the_name_wins() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases = [("model-global-step", "a.pt", 500), ("iteration", "b.pt", 700)];
    for (layout, name, step) in cases {
        assert_eq!(inspect_step(&torch_file(&d.join(name), layout, step), &[]), step, "{layout}");
    }
    // {"state_dict": sd, "epoch": 9}: the epoch, as a last resort.
    assert_eq!(inspect_step(&torch_file(&d.join("c.pt"), "epoch", 9), &[]), 9);
    // {"model": sd, "global_step": 500, "epoch": 3}: global_step beats epoch.
    assert_eq!(inspect_step(&d.join("a.pt"), &[]), 500);
    let net = torch_file(&d.join("d.pt"), "net-step", 300);
    assert_eq!(inspect_step(&net, &["--state-key", "net"]), 300);
    // A step in the name beats the one inside (documented on Checkpoint::step).
    let named = torch_file(&d.join("ckpt_7.pt"), "model-global-step", 500);
    assert_eq!(inspect_step(&named, &[]), 7);
    assert!(inspect_step(&torch_file(&d.join("e.pt"), "plain", 1), &[]).is_null());
}

#[test]
fn custom_state_key_is_refused_listing_the_keys_and_read_with_state_key() {
    let dir = tempfile::tempdir().unwrap();
    let net = torch_file(&dir.path().join("net.pt"), "net-step", 500);
    let o = run(&["inspect"], &[&net]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("net.pt") && err.contains("\"net\" (dict of 3 tensors)"), "{err}");
    assert!(err.contains("\"step\" (500)") && err.contains("--state-key net"), "{err}");
    let o = run(&["inspect", "--state-key", "nope"], &[&net]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(err.contains("\"nope\" is not in the file") && err.contains("\"net\""), "{err}");
    // `sewa average --state-key` reads them: the mean of steps 100 and 300 is step 200's.
    let a = torch_file(&dir.path().join("a.pt"), "net-step", 100);
    let b = torch_file(&dir.path().join("b.pt"), "net-step", 300);
    let out = dir.path().join("avg.safetensors");
    let o = run(&["average", "--state-key", "net", "--out"], &[&out, &a, &b]);
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let w: Vec<f32> = st
        .tensor("w")
        .unwrap()
        .data()
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(w[..3], [200.0, 200.125, 200.25]);
}

#[test]
fn optimizer_state_is_refused_as_not_model_weights() {
    let dir = tempfile::tempdir().unwrap();
    for layout in ["optimizer", "optimizer-nested"] {
        let p = torch_file(&dir.path().join(format!("{layout}.pt")), layout, 5);
        let o = run(&["inspect"], &[&p]);
        assert_eq!(o.status.code(), Some(2));
        assert!(stderr(&o).contains("optimizer state, not model weights"), "{}", stderr(&o));
    }
    // A state dict under "state" (without "param_groups") is weights under an unknown key.
    let p = torch_file(&dir.path().join("state.pt"), "state", 5);
    let o = run(&["inspect"], &[&p]);
    assert!(stderr(&o).contains("--state-key state"), "{}", stderr(&o));
}

#[test]
fn out_in_a_missing_directory_is_refused_unless_parents() {
    let dir = tempfile::tempdir().unwrap();
    let input = torch_file(&dir.path().join("a.pt"), "plain", 1);
    let out = dir.path().join("no/such/dir/avg.safetensors");
    let o = run(&["average", "--out"], &[&out, &input]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("does not exist") && stderr(&o).contains("--parents"));
    assert!(!dir.path().join("no").exists(), "nothing created");
    let o = run(&["average", "--parents", "--out"], &[&out, &input]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.exists() && stderr(&o).contains("created (--parents)"), "{}", stderr(&o));
    let help = sewa(&["average".as_ref(), "--help".as_ref()]);
    assert!(String::from_utf8_lossy(&help.stdout).contains("--parents"));
}

/// Lines of the daemon log at `level` (" WARN ", " INFO "...) containing `what`.
fn lines<'a>(log: &'a str, level: &str, what: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(level) && l.contains(what)).collect()
}

/// Run a torch-run trainer (ckpt_N.pt, optim_N.pt, last.pt rewritten each save) for 8 saves
/// under the default `pattern = "*"`, then a last checkpoint written after the final last.pt:
/// once it is published, every file before it has been judged.
fn torch_run(embed_step: bool) -> Daemon {
    let mut d = Daemon::start("[select]\nmethod = \"lawa\"\nk = 3\n");
    let steps = "100,200,300,400,500,600,700,800";
    // Saves further apart than the quiet period: each rewrite of last.pt is seen on its own.
    let mut args = vec!["--style", "torch-run", "--steps", steps, "--interval-ms", "450"];
    args.extend(["--chunks", "2", "--chunk-ms", "10"]);
    if embed_step {
        args.push("--embed-step");
    }
    write(&d.runs, &args);
    torch_file(&d.runs.join("ckpt_900.pt"), "plain", 900);
    d.wait_published(&[700, 800, 900]);
    d
}

#[test]
fn run_dir_with_optimizer_files_and_last_pt_warns_once_with_a_pattern_hint() {
    let mut d = torch_run(false);
    check_final(&d);
    let log = d.log();
    // last.pt has no step: one warning for its first version, none for the 7 rewrites.
    let warns = lines(&log, " WARN ", "");
    assert_eq!(warns.len(), 1, "{log}");
    assert!(warns[0].contains("last.pt") && warns[0].contains("no training step"), "{log}");
    assert!(warns[0].contains("pattern = \"ckpt_*.pt\""), "hint names the pattern:\n{log}");
    assert!(lines(&log, "DEBUG", "rejected again for the same reason").len() >= 2, "{log}");
    // Eight optimizer files: one info line for the pattern, the others at debug level.
    let skips = lines(&log, " INFO ", "skipping files like this");
    assert_eq!(skips.len(), 1, "{log}");
    assert!(skips[0].contains("optim_*.pt") && skips[0].contains("optimizer state"), "{log}");
    assert_eq!(lines(&log, "DEBUG", "optimizer state").len(), 7, "{log}");
    let status = d.status().unwrap();
    assert_eq!(status["counters"]["quarantined"], 1, "{status:#}");
    assert!(d.alive());
}

/// `{"model": sd, "step": N}` in last.pt too: it now has a step, and is the newest
/// checkpoint again; it must neither warn nor be averaged a second time.
#[test]
fn last_pt_with_the_step_inside_is_a_copy_not_a_second_member() {
    let mut d = torch_run(true);
    check_final(&d);
    let m = d.manifest().unwrap();
    let paths: Vec<&str> =
        m["inputs"].as_array().unwrap().iter().map(|i| i["path"].as_str().unwrap()).collect();
    assert!(paths.iter().all(|p| !p.ends_with("last.pt")), "{paths:?}");
    let log = d.log();
    assert!(lines(&log, " WARN ", "").is_empty(), "{log}");
    let skips = lines(&log, " INFO ", "skipping files like this");
    assert_eq!(skips.len(), 2, "optim_*.pt and last.pt:\n{log}");
    assert!(skips.iter().any(|l| l.contains("files=last.pt") && l.contains("a copy of")), "{log}");
    assert!(d.alive());
}

#[test]
fn daemon_reads_a_custom_state_key_and_the_step_inside() {
    let mut d = Daemon::start("state_key = \"net\"\n[select]\nmethod = \"lawa\"\nk = 2\n");
    for (name, step) in [("weights_a.pt", 10), ("weights_b.pt", 20), ("weights_c.pt", 30)] {
        torch_file(&d.runs.join(name), "net-step", step);
    }
    let m = d.wait_published(&[20, 30]);
    assert_eq!(input_steps(&m), [20, 30]);
    check_final(&d);
    assert!(lines(&d.log(), " WARN ", "").is_empty(), "{}", d.log());
}

#[test]
fn watch_logs_once_that_it_created_the_output_directory() {
    let mut d =
        Daemon::start_with_out("[select]\nmethod = \"lawa\"\nk = 1\n", "new/deeper/m.safetensors");
    write(&d.runs, &["--style", "st-rename", "--steps", "1", "--chunk-ms", "5"]);
    d.wait_published(&[1]);
    let start = Instant::now();
    while !d.log().contains("created the directory") {
        assert!(start.elapsed() < DEADLINE, "{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = d.log();
    let created = lines(&log, " INFO ", "created the directory of [publish] out");
    assert_eq!(created.len(), 1, "{log}");
    assert!(created[0].contains("new"), "{}", created[0]);
}
