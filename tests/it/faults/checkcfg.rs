//! `sewa check-config` runs every check `sewa watch` runs at start-up (issue 9 item 7), tries
//! the objective on request, and `sewa watch` waits for a directory that does not exist yet.
//! Also the progress of a long exhaustive search: drawn on a terminal only (item 12).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::evaluator::{mlp_params, write_data};
use crate::watch::{DEADLINE, Daemon, write};

fn sewa(args: &[&str], file: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sewa")).args(args).arg(file).output().unwrap()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn numpy_evaluator(mode: &str) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/evaluators/mlp_numpy.py");
    format!(
        "[objective]\nkind = \"command\"\ncommand = [\"python3\", {script:?}, \
         \"selection.safetensors\", \"--mode\", {mode:?}]\ntimeout_s = 60\n"
    )
}

/// `tensors` as a safetensors file at `path` (f32, row-major).
fn write_f32(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let bytes: Vec<Vec<u8>> =
        tensors.iter().map(|(_, _, d)| d.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views: Vec<(&str, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b);
            (n.as_str(), v.unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// A dir with `runs/` (one MLP checkpoint the numpy evaluator can score) and its data.
fn mlp_run() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    write_data(tmp.path());
    let runs = tmp.path().join("runs");
    std::fs::create_dir(&runs).unwrap();
    let params = mlp_params(5).into_iter().map(|t| (t.name, t.shape, t.data)).collect::<Vec<_>>();
    write_f32(&runs.join("step_100.safetensors"), &params);
    (tmp, runs)
}

const HEAD: &str = "[watch]\ndir = \"runs\"\n[publish]\nout = \"avg/model.safetensors\"\n";

/// Each of these passed `check-config` (or failed without a position) while `watch` refused
/// it or failed at its first selection: a missing `[watch] dir` key, an evaluator program
/// that is not there, unknown keys inside `[objective]` and `[select.sewa]`.
#[test]
fn check_config_refuses_what_watch_refuses_with_line_and_column() {
    let (tmp, _runs) = mlp_run();
    let sewa_method = "[select]\nmethod = \"sewa\"\n";
    let cases = [
        (
            "[watch]\npattern = \"*\"\n[publish]\nout = \"o.safetensors\"\n".to_string(),
            "missing field `dir`",
            "line 1, column 1",
        ),
        (
            format!(
                "{HEAD}{sewa_method}[objective]\nkind = \"command\"\ncommand = [\"./eval.py\"]\n"
            ),
            "eval.py",
            "does not exist",
        ),
        (
            format!(
                "{HEAD}{sewa_method}[objective]\nkind = \"command\"\ncommand = [\"no-such-evaluator\"]\n"
            ),
            "not an executable on PATH",
            "no-such-evaluator",
        ),
        (
            format!(
                "{HEAD}{sewa_method}[objective]\ndata = \"selection.safetensors\"\nmodle = \"mlp\"\n"
            ),
            "modle",
            "line 9, column 1",
        ),
        (
            format!(
                "{HEAD}{sewa_method}[select.sewa]\nsampels = 2\n[objective]\ndata = \"selection.safetensors\"\n"
            ),
            "sampels",
            "line 8, column 1",
        ),
        (
            // The acceptance evaluator starts like the main one: its program is checked too.
            "[watch]\ndir = \"runs\"\n[publish]\nout = \"avg/model.safetensors\"\n\
             policy = \"best\"\n[select]\nmethod = \"sewa\"\n[objective]\nkind = \"command\"\n\
             command = [\"python3\"]\nacceptance_command = [\"./accept.py\"]\n"
                .to_string(),
            "accept.py",
            "does not exist",
        ),
    ];
    for (i, (config, want, also)) in cases.iter().enumerate() {
        let path = tmp.path().join(format!("case{i}.toml"));
        std::fs::write(&path, config).unwrap();
        let out = sewa(&["check-config"], &path);
        let msg = text(&out);
        assert_eq!(out.status.code(), Some(78), "case {i}: {msg}");
        assert!(msg.contains(want) && msg.contains(also), "case {i}: {msg}");
        // `watch` refuses the same config at start-up, before watching anything.
        assert_eq!(watch_exit(&path), Some(78), "watch, case {i}");
    }
    // A watched directory that can never appear is refused too; one that does not exist yet is
    // fine (watch waits) and said so.
    std::fs::write(tmp.path().join("file"), "").unwrap();
    let path = tmp.path().join("blocked.toml");
    std::fs::write(&path, HEAD.replace("\"runs\"", "\"file/runs\"")).unwrap();
    let out = sewa(&["check-config"], &path);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    assert!(text(&out).contains("can never appear"), "{}", text(&out));
    std::fs::write(&path, HEAD.replace("\"runs\"", "\"later/runs\"")).unwrap();
    let out = sewa(&["check-config"], &path);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("waits for it to appear"), "{}", text(&out));
    // Builtin data is read at the first selection; missing at start-up, it is a note.
    let missing = "[select]\nmethod = \"sewa\"\n[objective]\ndata = \"gone.safetensors\"\n";
    std::fs::write(&path, format!("{HEAD}{missing}")).unwrap();
    let out = sewa(&["check-config"], &path);
    let msg = text(&out);
    assert_eq!(out.status.code(), Some(0), "{msg}");
    assert!(msg.contains("note: [objective] data") && msg.contains("gone.safetensors"), "{msg}");
}

/// How `sewa watch --config path` exits (killed after the deadline: `None`).
fn watch_exit(path: &Path) -> Option<i32> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sewa"))
        .args(["watch", "--config"])
        .arg(path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `check-config --objective` starts the evaluator, does one evaluation with gradient on the
/// first checkpoint of the watched directory and says how long each took; an evaluator whose
/// gradient is broken fails here, before the daemon runs.
#[test]
fn check_config_objective_starts_the_evaluator_and_times_one_evaluation() {
    let (tmp, _runs) = mlp_run();
    let path = tmp.path().join("sewa.toml");
    std::fs::write(&path, format!("{HEAD}[select]\nmethod = \"sewa\"\n{}", numpy_evaluator("ok")))
        .unwrap();
    let out = sewa(&["check-config", "--objective"], &path);
    let msg = text(&out);
    assert!(out.status.success(), "{msg}");
    let line = msg.lines().find(|l| l.starts_with("objective:")).unwrap_or_else(|| panic!("{msg}"));
    assert!(line.contains("ready in") && line.contains("one evaluation with gradient"), "{line}");
    assert!(line.contains("step_100.safetensors") && line.contains("(loss "), "{line}");
    let millis: Vec<f64> = line
        .split(" ms")
        .filter_map(|s| s.rsplit(' ').next().and_then(|n| n.parse().ok()))
        .collect();
    assert_eq!(millis.len(), 2, "startup and evaluation times: {line}");
    // Without the flag nothing is started.
    let out = sewa(&["check-config"], &path);
    assert!(out.status.success() && !text(&out).contains("objective:"), "{}", text(&out));

    std::fs::write(
        &path,
        format!("{HEAD}[select]\nmethod = \"sewa\"\n{}", numpy_evaluator("zero-grad")),
    )
    .unwrap();
    let out = sewa(&["check-config", "--objective"], &path);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("exactly zero"), "{}", text(&out));
}

/// Start `sewa watch` on a config whose `[watch] dir` (`runs`) does not exist yet.
fn daemon_before_its_directory() -> Daemon {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("later/runs");
    let out = tmp.path().join("averaged/model.safetensors");
    let config = tmp.path().join("sewa.toml");
    let text = format!(
        "[watch]\ndir = {runs:?}\nquiet_ms = 300\nrescan_s = 5\n[window]\nsize = 2\n[select]\n\
         k = 2\n[publish]\nout = {out:?}\n"
    );
    std::fs::write(&config, text).unwrap();
    Daemon::spawn(tmp, runs, out, config)
}

fn wait_for_log(d: &mut Daemon, what: &str) {
    let start = Instant::now();
    while !d.log().contains(what) {
        assert!(d.alive(), "sewa exited:\n{}", d.log());
        assert!(start.elapsed() < DEADLINE, "never logged {what:?}:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The sidecar may start before the trainer: `watch` on a directory that does not exist yet
/// used to exit 78; it waits (logged once), then publishes what the trainer writes.
#[test]
fn daemon_started_before_its_directory_exists_publishes_once_it_appears() {
    let mut d = daemon_before_its_directory();
    wait_for_log(&mut d, "waiting for the watched directory to appear");
    std::fs::create_dir_all(&d.runs).unwrap();
    write(&d.runs, &["--style", "st-rename", "--steps", "1,2,3", "--chunk-ms", "5"]);
    d.wait_published(&[2, 3]);
    let log = d.log();
    assert_eq!(log.matches("waiting for the watched directory").count(), 1, "{log}");
    d.terminate();
}

#[test]
fn sigterm_stops_a_daemon_waiting_for_its_directory() {
    let mut d = daemon_before_its_directory();
    wait_for_log(&mut d, "waiting for the watched directory to appear");
    let took = d.terminate();
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

/// `average --select exhaustive` through an evaluator slow enough that the search runs past
/// the meter's delay, on `stderr` as given (without the guard, whose rule calls would put
/// half the subsets in the cache before the search starts).
fn slow_exhaustive(tmp: &Path, wrap: &[&str]) -> Output {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/evaluators/sleepy.py");
    let config = tmp.join("sel.toml");
    std::fs::write(
        &config,
        format!(
            "[objective]\nkind = \"command\"\ncommand = [\"python3\", {script:?}, \
             \"--call-delay\", \"0.25\"]\n[select.sewa]\nmember_losses = false\nguard = false\n"
        ),
    )
    .unwrap();
    let inputs: Vec<PathBuf> = (1..=4)
        .map(|s| {
            let p = tmp.join(format!("step_{s}.safetensors"));
            write_f32(&p, &[("w".into(), vec![4], vec![s as f32; 4])]);
            p
        })
        .collect();
    let (program, pre) = match wrap.split_first() {
        Some((p, rest)) => (p.to_string(), rest.iter().map(|s| s.to_string()).collect()),
        None => (env!("CARGO_BIN_EXE_sewa").to_string(), Vec::<String>::new()),
    };
    let mut cmd = Command::new(program);
    cmd.args(pre);
    if !wrap.is_empty() {
        cmd.arg(env!("CARGO_BIN_EXE_sewa"));
    }
    cmd.args(["average", "--config"])
        .arg(&config)
        .args(["--select", "exhaustive", "--k", "2", "--out"])
        .arg(tmp.join(format!("out{}.safetensors", wrap.len())))
        .args(&inputs);
    cmd.stdin(Stdio::null()).output().unwrap()
}

/// Six subsets at 0.25 s each: past the one second after which a terminal gets a bar. Piped,
/// stderr has no bar fragments (carriage returns, escape sequences) at all.
#[test]
fn exhaustive_progress_is_drawn_on_a_terminal_only() {
    let tmp = tempfile::tempdir().unwrap();
    let out = slow_exhaustive(tmp.path(), &[]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{err}");
    assert!(!err.contains('\r') && !err.contains('\x1b'), "{err:?}");
    assert!(!err.contains("exhaustive search"), "{err}");

    // On a pseudo-terminal (python's pty module runs sewa on one) the bar is drawn.
    let spawn = "import pty, sys; sys.exit(pty.spawn(sys.argv[1:]) >> 8)";
    let out = slow_exhaustive(tmp.path(), &["python3", "-c", spawn]);
    let tty = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{tty}");
    assert!(tty.contains("exhaustive search") && tty.contains("/6 subsets"), "{tty:?}");
}

/// Run `sewa args… file` and wait for it under `limit`; a command still running then is
/// killed and the test fails (a FIFO config used to hang `check-config`, `status` and `watch`).
fn within(limit: Duration, args: &[&str], file: &Path) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_sewa"))
        .args(args)
        .arg(file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output().unwrap()));
    match rx.recv_timeout(limit) {
        Ok(out) => out,
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            panic!("sewa {args:?} {} still running after {limit:?}", file.display());
        }
    }
}

/// Issue 19 item 9: a config that is a FIFO (no writer), `/dev/zero` or a directory is refused
/// at once by every command that reads one, naming the file and what it is.
#[test]
fn special_files_as_config_are_refused_promptly_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("sewa.toml");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let link = tmp.path().join("zero.toml");
    std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
    let cases: [(&Path, &str); 4] = [
        (&fifo, "is a FIFO (named pipe), not a regular file"),
        (Path::new("/dev/zero"), "is a character device, not a regular file"),
        (&link, "is a character device, not a regular file"),
        (tmp.path(), "is a directory, not a regular file"),
    ];
    for (file, what) in cases {
        for args in [&["check-config"][..], &["status", "--config"], &["watch", "--config"]] {
            let out = within(DEADLINE, args, file);
            let msg = text(&out);
            assert_eq!(out.status.code(), Some(78), "{args:?} {}: {msg}", file.display());
            assert!(msg.contains(&file.display().to_string()) && msg.contains(what), "{msg}");
        }
    }
    // Bigger than any config: refused by size, not read.
    let big = tmp.path().join("big.toml");
    std::fs::write(&big, format!("{HEAD}# {}\n", "x".repeat(1 << 20))).unwrap();
    let out = within(DEADLINE, &["check-config"], &big);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    assert!(text(&out).contains("larger than 1048576 bytes"), "{}", text(&out));
}

/// Issue 19 item 14: `check-config` accepted a `staging_dir` sewa cannot create the evaluator's
/// directory in (`/proc`, a file), unbounded `threads`, and `k` with a method that ignores it.
#[test]
fn check_config_refuses_unusable_staging_dirs_and_threads_and_notes_an_ignored_k() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("runs")).unwrap();
    std::fs::write(tmp.path().join("file"), "").unwrap();
    std::fs::create_dir(tmp.path().join("staging")).unwrap();
    let path = tmp.path().join("sewa.toml");
    let evaluator = |staging: &str| {
        format!(
            "{HEAD}[select]\nmethod = \"sewa\"\n[objective]\nkind = \"command\"\n\
             command = [\"python3\"]\nstaging_dir = {staging:?}\n"
        )
    };
    for (staging, why) in
        [("/proc", "not a directory sewa can write to"), ("file", "not a directory")]
    {
        std::fs::write(&path, evaluator(staging)).unwrap();
        let out = sewa(&["check-config"], &path);
        let msg = text(&out);
        assert_eq!(out.status.code(), Some(78), "{staging}: {msg}");
        assert!(msg.contains("[objective] staging_dir") && msg.contains(why), "{msg}");
        assert_eq!(watch_exit(&path), Some(78), "watch refuses it too: {staging}");
    }
    std::fs::write(&path, evaluator("staging")).unwrap();
    let out = sewa(&["check-config"], &path);
    assert!(out.status.success(), "{}", text(&out));
    let left: Vec<_> = std::fs::read_dir(tmp.path().join("staging")).unwrap().collect();
    assert!(left.is_empty(), "the probe is removed: {left:?}");

    std::fs::write(&path, format!("{HEAD}[runtime]\nthreads = 100000\n")).unwrap();
    let out = sewa(&["check-config"], &path);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    assert!(text(&out).contains("threads = 100000 is more than 1024"), "{}", text(&out));
    std::fs::write(&path, format!("{HEAD}[runtime]\nthreads = 1024\n")).unwrap();
    let out = sewa(&["check-config"], &path);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("note: [runtime] threads = 1024 is more than the"),
        "{}",
        text(&out)
    );

    let uniform = "[window]\nsize = 4\n[select]\nmethod = \"uniform\"\n";
    std::fs::write(&path, format!("{HEAD}{uniform}k = 5\n")).unwrap();
    let out = sewa(&["check-config"], &path);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("note: [select] k = 5 is ignored"), "{}", text(&out));
    std::fs::write(&path, format!("{HEAD}{}", uniform.replace("uniform", "lawa") + "k = 5\n"))
        .unwrap();
    let out = sewa(&["check-config"], &path);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
}
