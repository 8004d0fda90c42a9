//! Issue 19 items 3, 4, 12, 15 and 16: evaluators that close stdout and live on, fork helpers
//! that outlive them, flood stderr, get relative member paths, or leave staging copies behind.
//!
//! The misbehaving evaluator is `tests/evaluators/unruly.py`; it writes its pid, its process
//! group and its forked helper's pid to a file, and a group counts as gone when /proc shows no
//! live process in it (an orphan that died stays a zombie until its new parent reaps it, which
//! this container's init never does). Every wait polls under a deadline.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sewa_engine::objective::command::{CommandConfig, CommandObjective};
use sewa_engine::objective::{NamedTensor, Objective};

use crate::evaluator::{mlp_params, write_data};
use crate::watch::{DEADLINE, Daemon, write};

const UNRULY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/evaluators/unruly.py");

fn unruly(args: &[&str], pids: &Path, timeout_s: f64) -> CommandConfig {
    let mut command = vec!["python3".to_string(), UNRULY.to_string()];
    command.extend(args.iter().map(|a| a.to_string()));
    command.extend(["--pids".to_string(), pids.display().to_string()]);
    CommandConfig {
        command,
        timeout_s,
        startup_timeout_s: 60.0,
        env: Default::default(),
        cwd: None,
        staging_dir: None,
        one_shot: true,
    }
}

/// The evaluator's (leader pid, process group, helper pid), once it wrote them.
fn pids(file: &Path) -> (u32, u32, u32) {
    let start = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(file) {
            let v: Vec<u32> = text.split_whitespace().map(|x| x.parse().unwrap()).collect();
            return (v[0], v[1], v[2]);
        }
        assert!(start.elapsed() < DEADLINE, "the evaluator never wrote {}", file.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Live (not zombie) processes of group `pgid`, from /proc.
fn live_in_group(pgid: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        let Some(close) = stat.rfind(')') else { continue };
        let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        if f.len() > 2 && f[0] != "Z" && f[0] != "X" && f[2] == pgid.to_string() {
            out.push((pid, stat[..close + 1].to_string()));
        }
    }
    out
}

/// The process group of this test process.
fn own_group() -> u32 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 1..];
    after.split_whitespace().nth(2).unwrap().parse().unwrap()
}

/// Wait until no process of `pgid` is alive; on failure, kill the group (so a failed run
/// leaves nothing behind either) and say who survived.
fn assert_group_gone(pgid: u32, within: Duration, what: &str) {
    // An evaluator left in the test's own group could be neither waited for nor killed.
    assert_ne!(pgid, own_group(), "{what}: the evaluator is not in a process group of its own");
    let start = Instant::now();
    loop {
        let live = live_in_group(pgid);
        if live.is_empty() {
            return;
        }
        if start.elapsed() > within {
            let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pgid}")]).status();
            panic!("{what}: processes of the evaluator's group survived: {live:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn params() -> Vec<NamedTensor> {
    vec![NamedTensor { name: "w".into(), shape: vec![4], data: vec![0.5; 4] }]
}

// ---------------------------------------------------------------------------------------
// Item 3: timeout_s bounds every wait on an evaluator

#[test]
fn an_evaluator_that_closes_stdout_and_lives_on_is_stopped_at_timeout_s() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("pids");
    let mut obj = CommandObjective::start(unruly(&["--close-stdout"], &file, 1.0)).unwrap();
    let (_, pgid, _) = pids(&file);
    // Run the request on its own thread so a hang fails the test instead of stalling it.
    let (tx, rx) = std::sync::mpsc::channel();
    let t0 = Instant::now();
    std::thread::spawn(move || {
        let r = obj.evaluate(&params(), false).map(|e| e.loss).map_err(|e| e.to_string());
        drop(obj);
        let _ = tx.send(r);
    });
    let got = rx.recv_timeout(DEADLINE).expect("sewa hung on an evaluator that closed stdout");
    let err = got.expect_err("no answer is an error");
    assert!(err.contains("closed its stdout but was still running after timeout_s = 1"), "{err}");
    // timeout_s, then at most the SIGTERM grace: never an unbounded wait.
    assert!(t0.elapsed() < Duration::from_secs(10), "took {:?}", t0.elapsed());
    assert_group_gone(pgid, DEADLINE, "after the timeout");
}

// ---------------------------------------------------------------------------------------
// Item 4: the whole process group is stopped, gracefully then by force

#[test]
fn a_timeout_stops_the_evaluator_and_the_helpers_it_forked() {
    for stubborn in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("pids");
        let mut args = vec!["--fork", "--hang"];
        if stubborn {
            args.push("--stubborn"); // ignores SIGTERM: only SIGKILL ends it
        }
        let mut obj = CommandObjective::start(unruly(&args, &file, 1.0)).unwrap();
        let (leader, pgid, helper) = pids(&file);
        assert_eq!(leader, pgid, "the evaluator leads its own process group");
        assert!(helper > 0);
        let err = obj.evaluate(&params(), false).unwrap_err().to_string();
        assert!(err.contains("did not answer within timeout_s"), "{err}");
        // Stopped as part of the failed request, before the objective is dropped.
        assert_group_gone(pgid, DEADLINE, &format!("after a timeout (stubborn: {stubborn})"));
        drop(obj);
    }
}

#[test]
fn dropping_the_objective_stops_helpers_that_survive_the_evaluators_exit() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("pids");
    let mut obj = CommandObjective::start(unruly(&["--fork"], &file, 30.0)).unwrap();
    let (_, pgid, _) = pids(&file);
    assert_eq!(obj.evaluate(&params(), false).unwrap().loss, 1.0);
    // The evaluator leaves on "shutdown"; its helper (a torchrun worker) would live on.
    drop(obj);
    assert_group_gone(pgid, DEADLINE, "after the objective was dropped");
}

/// `[objective]` for unruly.py with `args`, staging in `staging`.
fn daemon_objective(args: &[&str], pids: &Path, staging: &Path) -> String {
    let mut command = vec!["python3".to_string(), UNRULY.to_string()];
    command.extend(args.iter().map(|a| a.to_string()));
    command.extend(["--pids".to_string(), pids.display().to_string()]);
    let command: Vec<String> = command.iter().map(|a| format!("{a:?}")).collect();
    format!(
        "[select]\nmethod = \"exhaustive\"\nk = 2\n[objective]\nkind = \"command\"\n\
         command = [{}]\ntimeout_s = 600\nstaging_dir = {staging:?}\n",
        command.join(", ")
    )
}

fn staged_dirs(staging: &Path) -> Vec<PathBuf> {
    let entries = std::fs::read_dir(staging).unwrap().flatten();
    entries.map(|e| e.path()).filter(|p| p.to_string_lossy().contains("sewa-eval-")).collect()
}

#[test]
fn sigterm_mid_selection_leaves_no_evaluator_process_and_no_staging_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let (file, staging) = (tmp.path().join("pids"), tmp.path().join("staging"));
    std::fs::create_dir(&staging).unwrap();
    let objective = daemon_objective(&["--fork", "--hang"], &file, &staging);
    let mut d = Daemon::start(&objective);
    write(&d.runs, &["--style", "st-rename", "--steps", "1,2,3", "--chunk-ms", "5"]);
    // The selection is stuck in its first request (timeout_s = 600) when SIGTERM comes.
    let (_, pgid, _) = pids(&file);
    assert_eq!(staged_dirs(&staging).len(), 1, "{}", d.log());
    let took = d.terminate();
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert_group_gone(pgid, Duration::from_secs(1), "after sewa exited");
    assert!(staged_dirs(&staging).is_empty(), "staging left: {:?}", staged_dirs(&staging));
    // The abandoned selection's pipeline never got to say so: the stopping daemon did.
    let state = d.status().unwrap()["state"].clone();
    assert_eq!(state, "stopped", "{}", d.log());
}

/// Issue 20: the status file's documented "stopping" is what it says while a SIGTERM'd daemon
/// stops its evaluator — here one whose forked helper ignores SIGTERM, so the stop takes the
/// group's grace period — and "stopped" once sewa is gone, with no evaluator process left.
#[test]
fn the_status_says_stopping_while_sigterm_stops_the_evaluator_then_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let (file, staging) = (tmp.path().join("pids"), tmp.path().join("staging"));
    std::fs::create_dir(&staging).unwrap();
    let objective = daemon_objective(&["--fork", "--stubborn"], &file, &staging);
    let mut d = Daemon::start(&objective);
    write(&d.runs, &["--style", "st-rename", "--steps", "1,2,3", "--chunk-ms", "5"]);
    let (_, pgid, _) = pids(&file);
    // Idle between selections: the window holds step 3 and its selection was recorded.
    let start = Instant::now();
    let selected = |s: &serde_json::Value| {
        let steps = s["members"].as_array().map(|m| m.iter().filter(|m| m["step"] == 3).count());
        steps == Some(1) && s["counters"]["publishes"].as_u64() >= Some(1)
    };
    while !d.status().is_some_and(|s| selected(&s)) {
        assert!(d.alive(), "sewa exited:\n{}", d.log());
        assert!(start.elapsed() < DEADLINE, "no selection over step 3:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = d.child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let (t0, mut seen) = (Instant::now(), Vec::new());
    let exit = loop {
        if let Some(state) = d.status().and_then(|s| s["state"].as_str().map(str::to_string))
            && seen.last() != Some(&state)
        {
            seen.push(state);
        }
        if let Some(exit) = d.child.try_wait().unwrap() {
            break exit;
        }
        assert!(t0.elapsed() < DEADLINE, "sewa did not stop; states {seen:?}\n{}", d.log());
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(exit.success(), "{exit:?}\n{}", d.log());
    let last = d.status().unwrap()["state"].clone();
    assert_eq!(last, "stopped", "states seen: {seen:?}");
    assert!(seen.iter().any(|s| s == "stopping"), "states seen: {seen:?}");
    assert_group_gone(pgid, Duration::from_secs(1), "after sewa exited");
}

// ---------------------------------------------------------------------------------------
// Item 16: staging left by a sewa that was killed

#[test]
fn a_staging_directory_left_by_a_killed_sewa_is_removed_at_the_next_start() {
    let tmp = tempfile::tempdir().unwrap();
    let (file, staging) = (tmp.path().join("pids"), tmp.path().join("staging"));
    std::fs::create_dir(&staging).unwrap();
    let cfg = tmp.path().join("sewa.toml");
    std::fs::write(&cfg, daemon_objective(&["--hang"], &file, &staging)).unwrap();
    let inputs: Vec<PathBuf> = (1..=2).map(|i| write_member(tmp.path(), i)).collect();
    let mut sewa = Command::new(env!("CARGO_BIN_EXE_sewa"))
        .args(["average", "--select", "greedy", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(tmp.path().join("avg.safetensors"))
        .args(&inputs)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (leader, pgid, _) = pids(&file);
    let left = staged_dirs(&staging);
    assert_eq!(left.len(), 1);
    sewa.kill().unwrap(); // SIGKILL: nothing of sewa's runs
    sewa.wait().unwrap();
    // The hanging evaluator is no business of this test: stop it (never the test's own group).
    let target = if pgid == own_group() { leader.to_string() } else { format!("-{pgid}") };
    let _ = Command::new("kill").args(["-KILL", "--", &target]).status();
    assert!(left[0].exists(), "a killed sewa cleans nothing");
    let mut first = unruly(&[], &tmp.path().join("pids3"), 30.0);
    first.staging_dir = Some(staging.clone());
    let one = CommandObjective::start(first.clone()).unwrap();
    assert!(!left[0].exists(), "the dead sewa's staging directory is still there");
    // A live sewa's directory (here: this process's) next to a new one is kept.
    let two = CommandObjective::start(first).unwrap();
    assert!(one.scratch_dir().exists() && two.scratch_dir().exists(), "live ones are kept");
    let name = one.scratch_dir().file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with(&format!("sewa-eval-{}-", std::process::id())), "{name}");
    let dirs = [one.scratch_dir().to_path_buf(), two.scratch_dir().to_path_buf()];
    drop((one, two));
    assert!(dirs.iter().all(|d| !d.exists()), "dropped objectives remove their staging");
    assert_group_gone(pgid, DEADLINE, "the killed sewa's evaluator");
}

#[test]
fn ctrl_c_of_average_select_stops_the_evaluator_group_and_its_staging() {
    let tmp = tempfile::tempdir().unwrap();
    let (file, staging) = (tmp.path().join("pids"), tmp.path().join("staging"));
    std::fs::create_dir(&staging).unwrap();
    let cfg = tmp.path().join("sewa.toml");
    std::fs::write(&cfg, daemon_objective(&["--fork", "--hang"], &file, &staging)).unwrap();
    let inputs: Vec<PathBuf> = (1..=2).map(|i| write_member(tmp.path(), i)).collect();
    let mut sewa = Command::new(env!("CARGO_BIN_EXE_sewa"))
        .args(["average", "--select", "greedy", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(tmp.path().join("avg.safetensors"))
        .args(&inputs)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (_, pgid, _) = pids(&file);
    // The evaluator is in its own group, so a terminal's SIGINT reaches sewa alone.
    Command::new("kill").args(["-INT", &sewa.id().to_string()]).status().unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(st) = sewa.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > DEADLINE {
            let _ = sewa.kill();
            panic!("sewa ignored SIGINT");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(130), "{status:?}");
    assert_group_gone(pgid, Duration::from_secs(1), "after Ctrl-C of sewa average");
    assert!(staged_dirs(&staging).is_empty(), "staging left: {:?}", staged_dirs(&staging));
}

/// A one-tensor member `step_{i}.safetensors` in `dir`.
fn write_member(dir: &Path, i: u32) -> PathBuf {
    let path = dir.join(format!("step_{i}.safetensors"));
    let bytes: Vec<u8> = [i as f32; 4].iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4], &bytes).unwrap();
    safetensors::serialize_to_file(vec![("w", view)], None, &path).unwrap();
    path
}

// ---------------------------------------------------------------------------------------
// Item 12: stderr floods

/// Run `sewa average --select greedy` over two members with unruly.py's `--flood n`: its
/// stderr (sewa's log).
fn average_with_flood(n: u32) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let (file, staging) = (tmp.path().join("pids"), tmp.path().join("staging"));
    std::fs::create_dir(&staging).unwrap();
    let cfg = tmp.path().join("sewa.toml");
    let flood = n.to_string();
    // Without the selection guard's rule calls: the request count stays that of greedy alone.
    let objective = daemon_objective(&["--flood", &flood], &file, &staging);
    std::fs::write(&cfg, format!("{objective}[select.sewa]\nguard = false\n")).unwrap();
    let inputs: Vec<PathBuf> = (1..=2).map(|i| write_member(tmp.path(), i)).collect();
    let out = Command::new(env!("CARGO_BIN_EXE_sewa"))
        .args(["average", "--select", "greedy", "--k", "1", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(tmp.path().join("avg.safetensors"))
        .args(&inputs)
        .env("RUST_LOG", "info,sewa::evaluator=debug") // progress bars are DEBUG lines
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{log}");
    log
}

#[test]
fn a_stderr_flood_is_rate_limited_and_summarised() {
    // Each request prints 20,000 lines and a 20,000-frame progress bar (about 1 MB).
    let log = average_with_flood(20_000);
    let lines = log.lines().filter(|l| l.contains("flood line")).count();
    assert!((100..=400).contains(&lines), "{lines} flood lines logged");
    assert!(log.contains("lines / ") && log.contains("bytes of evaluator stderr suppressed"));
    assert!(log.len() < 200_000, "{} bytes of log", log.len());
}

#[test]
fn a_progress_bar_redrawn_with_carriage_returns_is_logged_as_its_last_frame() {
    let log = average_with_flood(50);
    let frames: Vec<&str> = log.lines().filter(|l| l.contains("progress frame")).collect();
    assert!(!frames.is_empty(), "{log}");
    // One log line per bar, holding only its last frame (not 50 frames joined by `\r`).
    let last_only = |l: &&str| l.matches("progress frame").count() == 1 && !l.contains('\r');
    assert!(frames.iter().all(last_only), "{frames:?}");
    assert!(frames.iter().all(|l| l.ends_with("progress frame 50/50")), "{frames:?}");
    // At DEBUG: a bar per evaluation stays out of the default (INFO) log.
    assert!(frames.iter().all(|l| l.contains("DEBUG")), "{frames:?}");
    assert!(!log.contains("suppressed"), "50 lines a request are under the limit: {log}");
}

// ---------------------------------------------------------------------------------------
// Item 15: paths crossing the process boundary are absolute

#[test]
fn relative_member_paths_reach_a_protocol_2_evaluator_started_elsewhere() {
    // The command: `sewa average --config cfg/sewa.toml --select … run/ckpts/…`, typed
    // in a shell whose working directory is neither the config's nor the evaluator's.
    let root = tempfile::tempdir().unwrap();
    let (cfg_dir, ckpts) = (root.path().join("cfg"), root.path().join("run/ckpts"));
    std::fs::create_dir_all(&cfg_dir).unwrap();
    std::fs::create_dir_all(&ckpts).unwrap();
    write_data(&cfg_dir); // selection.safetensors, next to the config
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/evaluators/mlp_numpy.py");
    std::fs::write(
        cfg_dir.join("sewa.toml"),
        format!(
            "[objective]\nkind = \"command\"\ncommand = [\"python3\", {script:?}, \
             \"selection.safetensors\", \"--protocol\", \"2\"]\ntimeout_s = 60\n"
        ),
    )
    .unwrap();
    let mut inputs = Vec::new();
    for i in 0..3u64 {
        let name = format!("checkpoint-{}", 1000 + i);
        let p = mlp_params(10 * i + 3);
        let bytes: Vec<Vec<u8>> =
            p.iter().map(|t| t.data.iter().flat_map(|v| v.to_le_bytes()).collect()).collect();
        let views = p.iter().zip(&bytes).map(|(t, b)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, t.shape.clone(), b);
            (t.name.clone(), view.unwrap())
        });
        let path = ckpts.join(format!("{name}.safetensors"));
        safetensors::serialize_to_file(views, None, &path).unwrap();
        inputs.push(format!("run/ckpts/{name}.safetensors"));
    }
    let out = Command::new(env!("CARGO_BIN_EXE_sewa"))
        .current_dir(root.path())
        .args(["average", "--config", "cfg/sewa.toml", "--select", "greedy", "--k", "2"])
        .args(["--out", "avg.safetensors"])
        .args(&inputs)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(root.path().join("avg.safetensors").exists());
}
