//! Service behaviour: panics, watchdog, reload, non-finite losses, policies.
//!
//! Each test runs the real `sewa watch` binary. The watchdog tests bind their own
//! `NOTIFY_SOCKET` (a unix datagram socket, as systemd does) and start sewa with
//! `WATCHDOG_USEC` and `WATCHDOG_PID` set to its own pid (`sh -c 'exec ...'` keeps the pid).
//! The slow and hanging evaluators are `tests/evaluators/sleepy.py`, which reports each request
//! to another socket of the test (so every time is on the test's monotonic clock) and leaves
//! as soon as sewa closes its stdin.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::watch::{DEADLINE, Daemon, input_steps, write};

/// A fresh temp dir with `runs/` and the output path inside it (as `Daemon::start` lays out).
struct Setup {
    tmp: tempfile::TempDir,
    runs: PathBuf,
    out: PathBuf,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    std::fs::create_dir(&runs).unwrap();
    let out = runs.join("averaged/model.safetensors");
    Setup { tmp, runs, out }
}

impl Setup {
    /// The config `Daemon::start_full` writes, watching `dir`.
    fn config(&self, dir: &Path, extra: &str) -> String {
        let out = &self.out;
        format!(
            "[watch]\ndir = {dir:?}\nquiet_ms = 300\nrescan_s = 5\n{extra}\n[publish]\nout = {out:?}\n"
        )
    }

    /// Start `sewa watch` on `config` with extra arguments and environment. The pid systemd
    /// would put in WATCHDOG_PID is sewa's own: `sh` execs it.
    fn launch(self, config: &str, args: &[&str], env: &[(&str, String)]) -> Daemon {
        let path = self.tmp.path().join("sewa.toml");
        std::fs::write(&path, config).unwrap();
        let log = std::fs::File::create(self.tmp.path().join("sewa.log")).unwrap();
        let child = Command::new("sh")
            .args(["-c", "WATCHDOG_PID=$$ exec \"$0\" \"$@\"", env!("CARGO_BIN_EXE_sewa")])
            .args(["watch", "--config"])
            .arg(&path)
            .args(args)
            .env("RUST_LOG", "sewa=debug,info")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Daemon { child, tmp: self.tmp, runs: self.runs, out: self.out, config: path }
    }
}

/// Poll `cond` until it holds, failing with `what` and the daemon's log after `DEADLINE`.
fn wait_until(d: &mut Daemon, what: &str, mut cond: impl FnMut(&mut Daemon) -> bool) {
    let start = Instant::now();
    while !cond(d) {
        assert!(d.alive(), "sewa exited while waiting for {what}:\n{}", d.log());
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn hangup(d: &Daemon) {
    Command::new("kill").args(["-HUP", &d.child.id().to_string()]).status().unwrap();
}

/// A one-tensor checkpoint `w = [value; 4]`, written to a temp name and renamed into place.
fn write_value(dir: &Path, name: &str, value: f32) {
    let bytes: Vec<u8> = [value; 4].iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4], &bytes).unwrap();
    let tmp = dir.join(format!(".tmp-{name}"));
    safetensors::serialize_to_file(vec![("w", view)], None, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// `w[0]` of the published model, if it can be read.
fn published_w0(d: &Daemon) -> Option<f32> {
    let bytes = std::fs::read(d.model_file()).ok()?;
    let st = safetensors::SafeTensors::deserialize(&bytes).ok()?;
    let data = st.tensor("w").ok()?.data().to_vec();
    Some(f32::from_le_bytes(data[..4].try_into().ok()?))
}

fn quarantined(d: &Daemon, name: &str) -> Option<String> {
    let status = d.status()?;
    let q = status["quarantined"].as_array()?.clone();
    let hit = q.into_iter().find(|x| x["path"].as_str().is_some_and(|p| p.ends_with(name)))?;
    Some(hit["reason"].as_str().unwrap_or_default().to_string())
}

// ---------------------------------------------------------------------------------------
// Item 6: panics

#[test]
fn a_checkpoint_whose_name_panicked_sewa_is_quarantined_and_publishing_goes_on() {
    let s = setup();
    let cfg = s.config(&s.runs, "[select]\nmethod = \"lawa\"\nk = 2\n");
    let mut d = s.launch(&cfg, &[], &[]);
    write_value(&d.runs, "step_1.safetensors", 1.0);
    write_value(&d.runs, "step_2.safetensors", 2.0);
    d.wait_published(&[1, 2]);
    // A multi-byte last character made the step parser slice inside a char (a panic that
    // killed the daemon, and every restart). Whatever the parser does with it now, the daemon
    // must survive it: a quarantine, never an exit.
    write_value(&d.runs, "modèle_final_é.safetensors", 3.0);
    wait_until(&mut d, "the odd name to be quarantined", |d| {
        quarantined(d, "modèle_final_é.safetensors").is_some()
    });
    write_value(&d.runs, "step_3.safetensors", 3.0);
    d.wait_published(&[2, 3]);
    assert!(d.alive(), "{}", d.log());
}

// ---------------------------------------------------------------------------------------
// Item 13: what is watched

fn inotify_watches(pid: u32) -> usize {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else { return 0 };
    let text = fds.flatten().filter_map(|e| std::fs::read_to_string(e.path()).ok());
    text.map(|t| t.lines().filter(|l| l.starts_with("inotify wd:")).count()).sum()
}

#[test]
fn a_symlinked_tree_costs_no_watches_and_hf_dirs_written_file_by_file_still_publish() {
    let s = setup();
    // A big tree elsewhere, linked into the run directory (`ln -s /usr runs/data`).
    let big = s.tmp.path().join("big");
    for i in 0..20 {
        for j in 0..15 {
            std::fs::create_dir_all(big.join(format!("d{i}/e{j}"))).unwrap();
        }
    }
    std::os::unix::fs::symlink(&big, s.runs.join("data")).unwrap();
    let cfg = s.config(&s.runs, "[select]\nmethod = \"lawa\"\nk = 2\n");
    let mut d = s.launch(&cfg, &[], &[]);
    let args = ["--style", "hf-dir", "--steps", "10,20,30", "--keep", "2", "--chunk-ms", "40"];
    write(&d.runs, &args);
    d.wait_published(&[20, 30]);
    // The run directory plus the checkpoint directories on disk; not the 321 linked ones,
    // nor sewa's own output directory.
    let pid = d.child.id();
    let on_disk = || {
        let dirs = std::fs::read_dir(&d.runs).unwrap().flatten();
        dirs.filter(|e| e.file_name().to_string_lossy().starts_with("checkpoint-")).count()
    };
    let expected = 1 + on_disk();
    let start = Instant::now();
    while inotify_watches(pid) > expected {
        let n = inotify_watches(pid);
        assert!(start.elapsed() < DEADLINE, "{n} inotify watches, expected {expected}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(inotify_watches(pid) >= 1, "the run directory itself is watched");
    assert!(d.alive(), "{}", d.log());
}

// ---------------------------------------------------------------------------------------
// Item 16: the systemd watchdog

/// A unix datagram socket recording what arrives, timed on the test's monotonic clock: systemd's
/// side of `NOTIFY_SOCKET`, or sleepy.py's `--report` socket.
struct Recorder {
    path: PathBuf,
    got: Arc<Mutex<Vec<(Instant, String)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Recorder {
    fn bind(path: PathBuf) -> Recorder {
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (g, st) = (got.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !st.load(Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    g.lock().unwrap().push((Instant::now(), text));
                }
            }
        });
        Recorder { path, got, stop, thread: Some(thread) }
    }

    /// The environment systemd gives a `Type=notify` service with `WatchdogSec`.
    fn systemd_env(&self, watchdog: Duration) -> Vec<(&'static str, String)> {
        vec![
            ("NOTIFY_SOCKET", self.path.display().to_string()),
            ("WATCHDOG_USEC", watchdog.as_micros().to_string()),
        ]
    }

    /// Arrival times of the messages containing `needle`.
    fn times(&self, needle: &str) -> Vec<Instant> {
        let got = self.got.lock().unwrap();
        got.iter().filter(|(_, m)| m.contains(needle)).map(|(t, _)| *t).collect()
    }

    fn pings(&self) -> Vec<Instant> {
        self.times("WATCHDOG=1")
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.take().map(|t| t.join());
    }
}

/// `[select]` and `[objective]` for a search through sleepy.py reporting to `report`.
fn evaluator_config(sleepy_args: &[&str], report: &Recorder, extra: &str) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/evaluators/sleepy.py");
    let mut command = vec!["python3".to_string(), script.to_string()];
    command.extend(sleepy_args.iter().map(|a| a.to_string()));
    command.extend(["--report".to_string(), report.path.display().to_string()]);
    let command: Vec<String> = command.iter().map(|a| format!("{a:?}")).collect();
    format!(
        "[select]\nmethod = \"exhaustive\"\nk = 2\n\
         [objective]\nkind = \"command\"\ncommand = [{}]\n{extra}\n",
        command.join(", ")
    )
}

#[test]
fn watchdog_is_fed_through_a_selection_three_times_longer_than_its_period() {
    let s = setup();
    let watchdog = Duration::from_secs(2);
    let systemd = Recorder::bind(s.tmp.path().join("notify.sock"));
    let evaluator = Recorder::bind(s.tmp.path().join("evaluator.sock"));
    // Written before start-up: one batch, one exhaustive search over C(5,2) = 10 subsets plus
    // the members' own losses, 0.7 s each, far longer than stall_s (each call is progress).
    write(&s.runs, &["--style", "st-rename", "--steps", "1,2,3,4,5", "--chunk-ms", "5"]);
    let eval = evaluator_config(&["--call-delay", "0.7"], &evaluator, "timeout_s = 60");
    let cfg = s.config(&s.runs, &format!("{eval}[runtime]\nstall_s = 2\n"));
    let mut d = s.launch(&cfg, &[], &systemd.systemd_env(watchdog));
    wait_until(&mut d, "a publication", |d| d.manifest().is_some());
    let calls = evaluator.times("call");
    let (first, last) = (calls[0], *calls.last().unwrap());
    let ran = last - first;
    assert!(ran >= 3 * watchdog, "the selection ran {ran:?}, not 3× WatchdogSec");
    // systemd kills the service when WATCHDOG_USEC passes without a ping.
    let mut marks = vec![first];
    marks.extend(systemd.pings().into_iter().filter(|t| *t > first && *t < last));
    marks.push(last);
    let gap = marks.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    assert!(gap < watchdog, "{gap:?} without WATCHDOG=1 during a {ran:?} selection\n{}", d.log());
    assert!(!systemd.times("READY=1").is_empty());
}

#[test]
fn watchdog_is_not_fed_while_the_pipeline_is_stuck() {
    let s = setup();
    let watchdog = Duration::from_secs(1);
    let systemd = Recorder::bind(s.tmp.path().join("notify.sock"));
    let evaluator = Recorder::bind(s.tmp.path().join("evaluator.sock"));
    write(&s.runs, &["--style", "st-rename", "--steps", "1,2", "--chunk-ms", "5"]);
    // The evaluator never answers and its timeout is far beyond the test: the pipeline is
    // stuck in one call, longer than stall_s allows.
    let eval = evaluator_config(&["--hang"], &evaluator, "timeout_s = 600");
    let cfg = s.config(&s.runs, &format!("{eval}[runtime]\nstall_s = 2\n"));
    let mut d = s.launch(&cfg, &[], &systemd.systemd_env(watchdog));
    wait_until(&mut d, "the evaluator's first request", |_| !evaluator.times("call").is_empty());
    let hung = evaluator.times("call")[0];
    // Fed while the call is young (the batch does not stop the pings)...
    wait_until(&mut d, "a ping during the stuck call", |_| {
        systemd.pings().iter().any(|t| *t > hung)
    });
    // ...then starved: three watchdog periods without a ping, sewa still running (systemd,
    // not sewa, ends it), and systemctl status says why.
    wait_until(&mut d, "the pings to stop", |_| {
        let last = systemd.pings().last().copied().unwrap();
        last.elapsed() > 3 * watchdog && !systemd.times("STATUS=stalled").is_empty()
    });
    let fed = systemd.pings().last().copied().unwrap() - hung;
    assert!(fed < Duration::from_secs(2) + watchdog, "fed {fed:?} into a stuck call");
    assert!(d.log().contains("stuck"), "{}", d.log());
    assert!(d.alive());
}

// ---------------------------------------------------------------------------------------
// Item 17: SIGHUP

#[test]
fn sighup_during_a_slow_evaluator_start_still_answers_sigterm_at_once() {
    let s = setup();
    let evaluator = Recorder::bind(s.tmp.path().join("evaluator.sock"));
    let lawa = s.config(&s.runs, "[select]\nmethod = \"lawa\"\nk = 2\n");
    let slow = evaluator_config(&["--start-delay", "30"], &evaluator, "startup_timeout_s = 60");
    let slow = s.config(&s.runs, &slow);
    let mut d = s.launch(&lawa, &[], &[]);
    write(&d.runs, &["--style", "st-rename", "--steps", "1,2", "--chunk-ms", "5"]);
    d.wait_published(&[1, 2]);
    // The reload selects with a model-based method whose evaluator takes 30 s to say hello.
    std::fs::write(&d.config, slow).unwrap();
    hangup(&d);
    wait_until(&mut d, "the evaluator to start", |_| !evaluator.times("start").is_empty());
    std::thread::sleep(Duration::from_millis(200)); // well inside the 30 s start
    let took = d.terminate();
    assert!(took < Duration::from_secs(3), "SIGTERM took {took:?} during a reload");
}

#[test]
fn dir_given_on_the_command_line_survives_sighup() {
    let s = setup();
    let configured = s.tmp.path().join("configured");
    std::fs::create_dir(&configured).unwrap();
    let runs = s.runs.display().to_string();
    let cfg = s.config(&configured, "[select]\nmethod = \"lawa\"\nk = 3\n");
    let mut d = s.launch(&cfg, &["--dir", &runs], &[]);
    write(&d.runs, &["--style", "st-rename", "--steps", "1,2,3", "--chunk-ms", "5"]);
    d.wait_published(&[1, 2, 3]);
    let text = std::fs::read_to_string(&d.config).unwrap().replace("k = 3", "k = 2");
    std::fs::write(&d.config, text).unwrap();
    hangup(&d);
    // Still watching --dir: the kept window is reselected with the new k, new steps arrive.
    d.wait_published(&[2, 3]);
    write(&d.runs, &["--style", "st-rename", "--steps", "4", "--chunk-ms", "5"]);
    d.wait_published(&[3, 4]);
    let status = d.status().unwrap();
    let dir = PathBuf::from(status["dir"].as_str().unwrap());
    assert_eq!(dir.canonicalize().unwrap(), d.runs.canonicalize().unwrap(), "{status:#}");
}

// ---------------------------------------------------------------------------------------
// Items 20 and 21: what counts as already published

#[test]
fn member_replaced_at_the_same_path_is_published_again() {
    let s = setup();
    let cfg = s.config(&s.runs, "[select]\nmethod = \"uniform\"\n");
    let mut d = s.launch(&cfg, &[], &[]);
    write_value(&d.runs, "step_1.safetensors", 1.0);
    write_value(&d.runs, "step_2.safetensors", 2.0);
    d.wait_published(&[1, 2]);
    wait_until(&mut d, "the average of 1 and 2", |d| published_w0(d) == Some(1.5));
    let before = d.manifest().unwrap()["inputs"][1]["identity"].clone();
    // Same path, same step, new weights (a re-save replacing the file by rename).
    write_value(&d.runs, "step_2.safetensors", 4.0);
    // The manifest is renamed into place after the model: once it names the new file
    // version, the model beside it is the new average.
    wait_until(&mut d, "a manifest naming the replaced step 2", |d| {
        d.manifest().is_some_and(|m| m["inputs"][1]["identity"] != before)
    });
    assert_eq!(published_w0(&d), Some(2.5), "the average with the replaced step 2");
    assert_eq!(input_steps(&d.manifest().unwrap()), [1, 2]);
}

#[test]
fn latest_policy_publishes_older_steps_of_a_newly_configured_directory() {
    let s = setup();
    let other = s.tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let cfg = s.config(&s.runs, "[select]\nmethod = \"lawa\"\nk = 2\n");
    let moved = s.config(&other, "[select]\nmethod = \"lawa\"\nk = 2\n");
    let mut d = s.launch(&cfg, &[], &[]);
    write(&d.runs, &["--style", "st-rename", "--steps", "4,5", "--chunk-ms", "5"]);
    d.wait_published(&[4, 5]);
    // The published step 5 is still on disk but no longer watched: it does not hold back the
    // new directory's older steps (`latest` only refuses to go back within what it watches).
    write(&other, &["--style", "st-rename", "--steps", "1,2", "--chunk-ms", "5"]);
    std::fs::write(&d.config, moved).unwrap();
    hangup(&d);
    d.wait_published(&[1, 2]);
}

// ---------------------------------------------------------------------------------------
// Issue 19 items 9, 13 and 14: special-file configs, early signals, retries, rotation

/// Item 9: the config swapped for a FIFO (no writer), then SIGHUP: the reload opened it on the
/// async worker and blocked there for good (SIGTERM ignored). The reload now fails at once,
/// logged and recorded; the daemon keeps watching and stops on SIGTERM.
#[test]
fn a_config_swapped_for_a_fifo_fails_its_reload_and_sigterm_still_stops_the_daemon() {
    let s = setup();
    let cfg = s.config(&s.runs, "[select]\nmethod = \"lawa\"\nk = 2\n");
    let mut d = s.launch(&cfg, &[], &[]);
    write_value(&d.runs, "step_1.safetensors", 1.0);
    write_value(&d.runs, "step_2.safetensors", 2.0);
    d.wait_published(&[1, 2]);
    std::fs::remove_file(&d.config).unwrap();
    assert!(Command::new("mkfifo").arg(&d.config).status().unwrap().success());
    hangup(&d);
    wait_until(&mut d, "the failed reload in the status", |d| {
        let errors = d.status().map(|s| s["errors"].to_string()).unwrap_or_default();
        errors.contains("reload failed") && errors.contains("FIFO")
    });
    assert!(d.log().contains("keeping the running configuration"), "{}", d.log());
    // Still watching with the running configuration.
    write_value(&d.runs, "step_3.safetensors", 3.0);
    d.wait_published(&[2, 3]);
    let took = d.terminate();
    assert!(took < Duration::from_secs(3), "SIGTERM took {took:?}");
}

/// Whether `pid` has a handler for signal `sig` (the `SigCgt` mask of /proc/PID/status).
fn catches(pid: u32, sig: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let mask = status.lines().find_map(|l| l.strip_prefix("SigCgt:"));
    mask.and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .is_some_and(|m| m & 1 << (sig - 1) != 0)
}

/// Item 13: a SIGHUP within milliseconds of exec killed the daemon (SIGHUP's default action,
/// before tokio's handler existed). SIGHUPs are sent from the moment the process runs Rust
/// code — the standard library's start-up installs its SIGSEGV handler just before `main` —
/// until it is watching: none may kill the daemon, and they are answered with a reload.
#[test]
fn a_sighup_right_after_exec_is_a_reload_not_a_death() {
    let s = setup();
    let config = s.tmp.path().join("sewa.toml");
    std::fs::write(&config, s.config(&s.runs, "[select]\nmethod = \"lawa\"\nk = 2\n")).unwrap();
    // Started directly (no `sh` in front, whose own handlers would show in its place).
    let mut d = Daemon::spawn(s.tmp, s.runs, s.out, config);
    let pid = d.child.id();
    let start = Instant::now();
    while !catches(pid, 11) {
        assert!(start.elapsed() < DEADLINE, "sewa never started:\n{}", d.log());
        std::hint::spin_loop();
    }
    let mut sent = 0;
    loop {
        hangup(&d);
        sent += 1;
        if d.log().contains("watching") {
            break; // at least one was sent; each must become a reload, none a death
        }
        assert!(d.alive(), "a SIGHUP during start-up (of {sent}) killed sewa:\n{}", d.log());
        assert!(start.elapsed() < DEADLINE, "sewa never watched:\n{}", d.log());
    }
    wait_until(&mut d, "the reload", |d| d.log().contains("configuration reloaded"));
    write_value(&d.runs, "step_1.safetensors", 1.0);
    write_value(&d.runs, "step_2.safetensors", 2.0);
    d.wait_published(&[1, 2]);
    let took = d.terminate();
    assert!(took < Duration::from_secs(3), "SIGTERM took {took:?}");
}

/// Item 14: a selection whose evaluator failed waited for the next checkpoint to be tried
/// again. The evaluator here fails its first start (a marker file says it has), then works:
/// the selection is retried after the backoff and published with no new checkpoint.
#[test]
fn a_selection_whose_evaluator_failed_is_retried_without_a_new_checkpoint() {
    let s = setup();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/evaluators/sleepy.py");
    let marker = s.tmp.path().join("failed-once");
    let once = format!(
        "if [ ! -e {marker:?} ]; then touch {marker:?}; echo 'first start fails' >&2; exit 3; fi; \
         exec python3 {script:?}"
    );
    let eval = format!(
        "[select]\nmethod = \"exhaustive\"\nk = 2\n[objective]\nkind = \"command\"\n\
         command = [\"sh\", \"-c\", {once:?}]\n"
    );
    let cfg = s.config(&s.runs, &eval);
    let mut d = s.launch(&cfg, &[], &[]);
    write_value(&d.runs, "step_1.safetensors", 1.0);
    write_value(&d.runs, "step_2.safetensors", 2.0);
    d.wait_published(&[1, 2]);
    let log = d.log();
    assert!(marker.exists() && log.contains("first start fails"), "{log}");
    assert!(log.contains("the selection is tried again"), "{log}");
    let status = d.status().unwrap();
    assert_eq!(status["counters"]["failed_selections"], 1, "{status:#}");
}

/// Item 14: every `checkpoint-N/` a trainer's rotation deleted logged notify's `WARN Unable to
/// remove the path from the watches: WatchNotFound` — a normal event, not a warning. Each
/// directory here is watched (sewa has seen it, still without its marker file) before `rm -rf`
/// removes it, as rotation does.
#[test]
fn rotated_checkpoint_directories_leave_no_watch_warnings() {
    let s = setup();
    let cfg = s.config(&s.runs, "[select]\nmethod = \"lawa\"\nk = 2\n");
    let mut d = s.launch(&cfg, &[], &[]);
    let seen = |d: &Daemon, name: &str| quarantined(d, name).is_some();
    for step in 1..=5 {
        let name = format!("checkpoint-{step}");
        let dir = d.runs.join(&name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("model.safetensors"), b"partial").unwrap();
        wait_until(&mut d, "the directory to be seen", |d| seen(d, &name));
        assert!(Command::new("rm").arg("-rf").arg(&dir).status().unwrap().success());
        wait_until(&mut d, "the directory to be gone", |d| !seen(d, &name));
    }
    let log = d.log();
    assert!(!log.contains("WatchNotFound") && !log.contains("WARN"), "{log}");
}
