//! `sewa watch` against real writer processes (tests/writers/trainer.py), with a reader thread
//! that keeps re-reading the published output and checks it against a manifest. Every wait
//! polls a condition under a generous deadline; nothing sleeps a fixed time to "let it settle".

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

pub(crate) const DEADLINE: Duration = Duration::from_secs(30);

/// A running `sewa watch` over a fresh temp dir.
pub(crate) struct Daemon {
    pub(crate) child: Child,
    pub(crate) tmp: tempfile::TempDir,
    pub(crate) runs: PathBuf,
    pub(crate) out: PathBuf,
    pub(crate) config: PathBuf,
}

impl Daemon {
    /// Start with `[select]`/`[window]` lines given by the test.
    pub(crate) fn start(extra: &str) -> Daemon {
        Daemon::start_with_out(extra, "averaged/model.safetensors")
    }

    /// `out` relative to the runs dir: `*.safetensors` is a file, anything else an HF dir.
    pub(crate) fn start_with_out(extra: &str, out: &str) -> Daemon {
        Daemon::start_full(extra, out, "")
    }

    /// `publish` adds keys to the `[publish]` table.
    pub(crate) fn start_full(extra: &str, out: &str, publish: &str) -> Daemon {
        let tmp = tempfile::tempdir().unwrap();
        let runs = tmp.path().join("runs");
        std::fs::create_dir(&runs).unwrap();
        let out = runs.join(out);
        let config = tmp.path().join("sewa.toml");
        let text = format!(
            "[watch]\ndir = {runs:?}\nquiet_ms = 300\nrescan_s = 5\n{extra}\n\
             [publish]\nout = {out:?}\n{publish}\n"
        );
        std::fs::write(&config, text).unwrap();
        Daemon::spawn(tmp, runs, out, config)
    }

    /// Start `sewa watch --config config` (already written), logging to `tmp/sewa.log`.
    pub(crate) fn spawn(
        tmp: tempfile::TempDir,
        runs: PathBuf,
        out: PathBuf,
        config: PathBuf,
    ) -> Daemon {
        let log = std::fs::File::create(tmp.path().join("sewa.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_sewa"))
            .args(["watch", "--config"])
            .arg(&config)
            .env("RUST_LOG", "sewa=debug,info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Daemon { child, tmp, runs, out, config }
    }

    pub(crate) fn manifest_path(&self) -> PathBuf {
        if self.out.extension().is_some_and(|e| e == "safetensors") {
            PathBuf::from(format!("{}.manifest.json", self.out.display()))
        } else {
            self.out.join("manifest.json")
        }
    }

    pub(crate) fn manifest(&self) -> Option<Value> {
        read_json(&self.manifest_path())
    }

    pub(crate) fn status(&self) -> Option<Value> {
        read_json(&self.out.parent().unwrap().join(".sewa/status.json"))
    }

    /// The published model file (inside the directory for a directory output).
    pub(crate) fn model_file(&self) -> PathBuf {
        if self.out.extension().is_some_and(|e| e == "safetensors") {
            self.out.clone()
        } else {
            self.out.join("model.safetensors")
        }
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.tmp.path().join("sewa.log")).unwrap_or_default()
    }

    /// Poll until the log contains `what`.
    pub(crate) fn wait_log(&mut self, what: &str) {
        let start = Instant::now();
        while !self.log().contains(what) {
            assert!(self.alive(), "sewa exited:\n{}", self.log());
            assert!(start.elapsed() < DEADLINE, "no {what:?} in the log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Poll until the published manifest's input steps are `steps`.
    pub(crate) fn wait_published(&mut self, steps: &[u64]) -> Value {
        let start = Instant::now();
        loop {
            if let Some(m) = self.manifest().filter(|m| input_steps(m) == steps) {
                return m;
            }
            assert!(self.alive(), "sewa exited:\n{}", self.log());
            let last = self.manifest().map(|m| input_steps(&m));
            assert!(
                start.elapsed() < DEADLINE,
                "never published {steps:?} (last {last:?})\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn terminate(&mut self) -> Duration {
        let t0 = Instant::now();
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "sewa exited with {status:?}\n{}", self.log());
                return t0.elapsed();
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "sewa ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

pub(crate) fn input_steps(m: &Value) -> Vec<u64> {
    let inputs = m["inputs"].as_array().cloned().unwrap_or_default();
    let mut steps: Vec<u64> = inputs.iter().filter_map(|i| i["step"].as_u64()).collect();
    steps.sort();
    steps
}

/// Start the fake trainer; returns when it has finished writing.
pub(crate) fn write(dir: &Path, args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/writers/trainer.py");
    let out = Command::new("python3").arg(script).arg(dir).args(args).output().unwrap();
    assert!(out.status.success(), "writer failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// The values the writer puts in step `s` (see trainer.py), averaged with the manifest weights.
pub(crate) fn expected(m: &Value) -> (Vec<f64>, Vec<f64>, i64) {
    let inputs = m["inputs"].as_array().unwrap();
    let total: f64 = inputs.iter().map(|i| i["weight"].as_f64().unwrap()).sum();
    let (mut w, mut b) = (vec![0.0; 64], vec![0.0; 16]);
    for i in inputs {
        let (s, wt) = (i["step"].as_f64().unwrap(), i["weight"].as_f64().unwrap() / total);
        w.iter_mut().enumerate().for_each(|(j, v)| *v += wt * (s + j as f64 / 8.0));
        b.iter_mut().enumerate().for_each(|(j, v)| *v += wt * (-s / 2.0 + j as f64));
    }
    let latest = inputs.iter().map(|i| i["step"].as_i64().unwrap()).max().unwrap();
    (w, b, latest)
}

/// Whether the output bytes are exactly the average the manifest describes.
pub(crate) fn matches(bytes: &[u8], m: &Value) -> Result<(), String> {
    let st =
        safetensors::SafeTensors::deserialize(bytes).map_err(|e| format!("unparsable: {e}"))?;
    let f32s = |name: &str| -> Result<Vec<f64>, String> {
        let t = st.tensor(name).map_err(|e| e.to_string())?;
        let v = t.data().chunks_exact(4);
        Ok(v.map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect())
    };
    let (w, b, n) = expected(m);
    for (name, want) in [("w", w), ("b", b)] {
        let got = f32s(name)?;
        let close = got.len() == want.len()
            && got.iter().zip(&want).all(|(g, e)| (g - e).abs() <= 1e-4 * e.abs().max(1.0));
        if !close {
            let (g, e) = (got.first(), want.first());
            let steps = input_steps(m);
            return Err(format!("tensor {name}[0] = {g:?}, manifest {steps:?} implies {e:?}"));
        }
    }
    let n_got = i64::from_le_bytes(st.tensor("n").unwrap().data().try_into().unwrap());
    if n_got != n {
        return Err(format!("int tensor n = {n_got}, latest input is {n}"));
    }
    Ok(())
}

/// Re-reads the output continuously: every read must parse and be exactly the average of the
/// steps and weights it names in its own safetensors metadata (the same record as its
/// manifest, which a starved reader thread may no longer find current). Each test also checks
/// the final output against the final manifest.
pub(crate) struct Reader {
    stop: Arc<AtomicBool>,
    checked: Arc<AtomicUsize>,
    handle: Option<JoinHandle<Result<(), String>>>,
}

impl Reader {
    pub(crate) fn start(out: PathBuf) -> Reader {
        let stop = Arc::new(AtomicBool::new(false));
        let checked = Arc::new(AtomicUsize::new(0));
        let (s, c) = (stop.clone(), checked.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok(bytes) = std::fs::read(&out) else { continue };
                matches(&bytes, &self_described(&bytes)?)?;
                c.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        });
        Reader { stop, checked, handle: Some(handle) }
    }

    /// Stop and return how many reads were checked (fails the test on any bad read).
    pub(crate) fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap().unwrap();
        self.checked.load(Ordering::Relaxed)
    }
}

/// The `inputs` record (steps, weights) an output carries in its `__metadata__`.
pub(crate) fn self_described(bytes: &[u8]) -> Result<Value, String> {
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(|e| format!("unparsable: {e}"))?;
    let md = meta.metadata().clone().ok_or("no __metadata__")?;
    let list = |k: &str| md.get(k).cloned().unwrap_or_default();
    let (steps, weights) = (list("sewa_steps"), list("sewa_weights"));
    let inputs: Vec<Value> = steps
        .split(',')
        .zip(weights.split(','))
        .map(|(s, w)| serde_json::json!({"step": s.parse::<u64>().unwrap(), "weight": w.parse::<f64>().unwrap()}))
        .collect();
    Ok(serde_json::json!({ "inputs": inputs }))
}

/// The final output is the average its final manifest describes.
pub(crate) fn check_final(d: &Daemon) {
    let bytes = std::fs::read(d.model_file()).unwrap();
    matches(&bytes, &d.manifest().unwrap()).unwrap();
}

#[test]
fn temp_then_rename_writer_with_rotation() {
    let mut d = Daemon::start("[window]\nsize = 4\n[select]\nmethod = \"lawa\"\nk = 3\n");
    let reader = Reader::start(d.out.clone());
    // save_total_limit = 2 deletes window members while they are in use.
    write(&d.runs, &["--style", "st-rename", "--steps", "100,200,300,400,500", "--keep", "2"]);
    d.wait_published(&[300, 400, 500]);
    assert!(reader.finish() > 0, "the reader never saw an output");
    check_final(&d);
    let status = d.status().unwrap();
    assert_eq!(status["quarantined"].as_array().unwrap().len(), 0, "{status:#}");
    assert!(!d.log().contains("runs/.tmp"), "a temp name reached validation:\n{}", d.log());
}

#[test]
fn slow_in_place_writer_is_never_read_half_written() {
    let mut d = Daemon::start("[select]\nmethod = \"uniform\"\n");
    // Chunks every 100 ms (< quiet 300 ms): the settler must wait for the end.
    let args = ["--style", "inplace", "--steps", "10,20,30", "--chunks", "6", "--chunk-ms", "100"];
    write(&d.runs, &args);
    d.wait_published(&[10, 20, 30]);
    let status = d.status().unwrap();
    assert_eq!(status["quarantined"].as_array().unwrap().len(), 0, "{status:#}");
}

#[test]
fn torch_save_in_place_and_lightning_rename_in() {
    let mut d = Daemon::start("[select]\nmethod = \"uniform\"\n");
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let pt = format!("{fixtures}/state_dict.pt");
    // A zip written in slow chunks has no end record until the last one: never admitted early.
    let args = ["--style", "inplace", "--steps", "1,2", "--chunks", "6", "--chunk-ms", "100"];
    write(&d.runs, &[&args[..], &["--fixture", &pt]].concat());
    let m = d.wait_published(&[1, 2]);
    assert!(m["inputs"].as_array().unwrap().iter().all(|i| i["format"] == "torch-zip"), "{m:#}");
    let status = d.status().unwrap();
    assert_eq!(status["quarantined"].as_array().unwrap().len(), 0, "{status:#}");
    drop(d);
    let mut d = Daemon::start("[select]\nmethod = \"uniform\"\n");
    let ckpt = format!("{fixtures}/lightning.ckpt");
    write(&d.runs, &["--style", "rename-in", "--steps", "10,20", "--fixture", &ckpt]);
    let m = d.wait_published(&[10, 20]);
    assert!(m["inputs"].as_array().unwrap().iter().all(|i| i["format"] == "lightning"), "{m:#}");
}

#[test]
fn rename_in_from_another_directory() {
    let mut d = Daemon::start("[select]\nmethod = \"lawa\"\nk = 2\n");
    write(&d.runs, &["--style", "rename-in", "--steps", "5,6,7"]);
    let m = d.wait_published(&[6, 7]);
    assert_eq!(m["selection"]["method"], "lawa");
}

#[test]
fn hf_dirs_written_file_by_file_with_best_metric_and_rotation() {
    let cfg =
        "[window]\nsize = 3\n[select]\nmethod = \"best-metric\"\nk = 2\nmetric = \"eval_loss\"\n";
    let mut d = Daemon::start(cfg);
    let reader = Reader::start(d.out.clone());
    // eval_loss = 1000 / step: the newest are best. Rotation keeps 2 dirs on disk.
    write(
        &d.runs,
        &["--style", "hf-dir", "--steps", "100,200,300,400", "--keep", "2", "--chunk-ms", "80"],
    );
    d.wait_published(&[300, 400]);
    reader.finish();
    check_final(&d);
    let status = d.status().unwrap();
    let broken: Vec<_> = status["quarantined"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|q| q["incomplete"] == false)
        .collect();
    assert!(broken.is_empty(), "{status:#}");
}

#[test]
fn hf_dirs_to_a_directory_output_with_side_files() {
    let mut d = Daemon::start_with_out("[select]\nmethod = \"lawa\"\nk = 2\n", "averaged");
    write(&d.runs, &["--style", "hf-dir", "--steps", "10,20,30", "--chunk-ms", "5"]);
    d.wait_published(&[20, 30]);
    check_final(&d);
    assert!(d.out.join("config.json").exists(), "side files copied for from_pretrained");
}

#[test]
fn corrupt_and_nan_checkpoints_are_quarantined_while_publishing_continues() {
    let mut d = Daemon::start("[select]\nmethod = \"lawa\"\nk = 3\n");
    let reader = Reader::start(d.out.clone());
    let args = ["--style", "st-rename", "--steps", "1,2,3,4,5", "--corrupt", "3", "--nan", "4"];
    write(&d.runs, &args);
    d.wait_published(&[1, 2, 5]);
    reader.finish();
    check_final(&d);
    let status = d.status().unwrap();
    let q = status["quarantined"].as_array().unwrap();
    let reason = |name: &str| {
        q.iter()
            .find(|x| x["path"].as_str().unwrap().ends_with(name))
            .map(|x| x["reason"].to_string())
    };
    assert!(reason("model_step_3.safetensors").is_some(), "{status:#}");
    assert!(reason("model_step_4.safetensors").unwrap().contains("NaN"), "{status:#}");
    let log = d.log();
    assert_eq!(log.matches("quarantined").count(), 2, "one log line per bad file:\n{log}");
    assert!(d.alive());
}

#[test]
fn member_rewritten_in_place_is_dropped_without_sigbus() {
    let mut d = Daemon::start("[select]\nmethod = \"uniform\"\n");
    write(&d.runs, &["--style", "inplace", "--steps", "1,2,3", "--chunk-ms", "20"]);
    d.wait_published(&[1, 2, 3]);
    // Truncate step 2 under the open checkpoint and rewrite it slowly (~1 s) while step 4
    // arrives and forces a re-average: reading member 2 through a map now would SIGBUS.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/writers/trainer.py");
    let mut rewriter = Command::new("python3")
        .arg(script)
        .arg(&d.runs)
        .args(["--style", "inplace", "--rewrite", "2", "--chunks", "10", "--chunk-ms", "100"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    write(&d.runs, &["--style", "inplace", "--steps", "4", "--chunk-ms", "5"]);
    assert!(rewriter.wait().unwrap().success());
    // The rewritten file (same content, new identity) is admitted again once quiet.
    d.wait_published(&[1, 2, 3, 4]);
    assert!(d.alive(), "sewa died:\n{}", d.log());
    assert!(d.log().contains("rewritten in place"), "the rewrite went unnoticed:\n{}", d.log());
}

#[test]
fn sighup_reloads_config_and_keeps_the_window() {
    let mut d = Daemon::start("[select]\nmethod = \"lawa\"\nk = 3\n");
    write(&d.runs, &["--style", "st-rename", "--steps", "1,2,3,4", "--chunk-ms", "5"]);
    d.wait_published(&[2, 3, 4]);
    let text = std::fs::read_to_string(&d.config).unwrap().replace("k = 3", "k = 2");
    std::fs::write(&d.config, text).unwrap();
    Command::new("kill").args(["-HUP", &d.child.id().to_string()]).status().unwrap();
    // No new checkpoint: the kept window is re-selected with the new k.
    d.wait_published(&[3, 4]);
    // A broken config is refused and the daemon keeps running with the last good one.
    std::fs::write(&d.config, "[watch]\nbogus = 1\n").unwrap();
    Command::new("kill").args(["-HUP", &d.child.id().to_string()]).status().unwrap();
    write(&d.runs, &["--style", "st-rename", "--steps", "5", "--chunk-ms", "5"]);
    d.wait_published(&[4, 5]);
    assert!(d.log().contains("reload failed"), "{}", d.log());
}

/// Issue 20: a reload applies `[watch] rescan_s` (the timer was built once, at start) and names
/// the changed keys that wait for a restart (`[runtime] threads`). Events are off here (a poll
/// watcher that looks once an hour), so a checkpoint written after the reload's own rescan is
/// found only by the periodic rescan: with the old 1-hour period, never within the deadline.
#[test]
fn sighup_applies_rescan_s_and_names_the_keys_that_need_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    std::fs::create_dir(&runs).unwrap();
    let out = runs.join("averaged/model.safetensors");
    let config = tmp.path().join("sewa.toml");
    let (r, o) = (runs.clone(), out.clone());
    let text = move |rescan_s: u64, threads: u64| {
        let (runs, out) = (&r, &o);
        format!(
            "[watch]\ndir = {runs:?}\nquiet_ms = 200\npoll_interval_ms = 3600000\n\
             rescan_s = {rescan_s}\n[select]\nmethod = \"uniform\"\n[publish]\nout = {out:?}\n\
             [runtime]\nthreads = {threads}\n"
        )
    };
    std::fs::write(&config, text(3600, 1)).unwrap();
    let mut d = Daemon::spawn(tmp, runs, out, config);
    d.wait_log("watching");
    std::fs::write(&d.config, text(1, 2)).unwrap();
    Command::new("kill").args(["-HUP", &d.child.id().to_string()]).status().unwrap();
    // The reload's own rescan is done: from here on only the periodic one finds a new file.
    d.wait_log("why=config reload");
    let log = d.log();
    let warned =
        log.lines().filter(|l| l.contains("apply only after a restart")).collect::<Vec<_>>();
    assert_eq!(warned.len(), 1, "{log}");
    assert!(warned[0].contains("WARN") && warned[0].contains("[runtime] threads"), "{log}");
    write(&d.runs, &["--style", "st-rename", "--steps", "1", "--chunk-ms", "5"]);
    d.wait_published(&[1]);
    check_final(&d);
    // Start-up, the reload's, then the periodic one that found it (the status file is written
    // after the publication: polled).
    let start = Instant::now();
    loop {
        let status = d.status().unwrap_or_default();
        let counters = &status["counters"];
        if counters["publishes"].as_u64() == Some(1) {
            assert!(counters["rescans"].as_u64().unwrap() >= 3, "{status}");
            break;
        }
        assert!(start.elapsed() < DEADLINE, "{status}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Issue 20: `sewa watch` reads its config file once (`main` used to read it for the thread
/// cap, then the command again). Counted with inotify: the file's opens until the daemon
/// watches, in order before a sentinel file the test creates afterwards in the same directory.
#[test]
fn watch_reads_its_config_file_once() {
    use notify::Watcher;
    use notify::event::{AccessKind, EventKind};
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let etc = tmp.path().join("etc");
    std::fs::create_dir(&runs).unwrap();
    std::fs::create_dir(&etc).unwrap();
    let out = runs.join("averaged/model.safetensors");
    let config = etc.join("sewa.toml");
    let text =
        format!("[watch]\ndir = {runs:?}\n[publish]\nout = {out:?}\n[runtime]\nthreads = 2\n");
    std::fs::write(&config, text).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let mut watcher = notify::recommended_watcher(tx).unwrap();
    watcher.watch(&etc, notify::RecursiveMode::NonRecursive).unwrap();
    let mut d = Daemon::spawn(tmp, runs, out, config);
    d.wait_log("watching");
    std::fs::write(etc.join("sentinel"), b"").unwrap();
    let mut opens = 0;
    loop {
        let event = rx.recv_timeout(DEADLINE).expect("the sentinel's event").unwrap();
        if event.paths.iter().any(|p| p.ends_with("sentinel")) {
            break;
        }
        let config = event.paths.iter().any(|p| p.ends_with("sewa.toml"));
        if config && matches!(event.kind, EventKind::Access(AccessKind::Open(_))) {
            opens += 1;
        }
    }
    assert_eq!(opens, 1, "the config file was opened {opens} times\n{}", d.log());
}

#[test]
fn restart_rebuilds_the_window_without_republishing() {
    let mut d = Daemon::start("[select]\nmethod = \"lawa\"\nk = 2\n");
    write(&d.runs, &["--style", "st-rename", "--steps", "1,2,3", "--chunk-ms", "5"]);
    let before = d.wait_published(&[2, 3]);
    d.terminate();
    d.child = Command::new(env!("CARGO_BIN_EXE_sewa"))
        .args(["watch", "--config"])
        .arg(&d.config)
        .stderr(std::fs::File::create(d.tmp.path().join("sewa2.log")).unwrap())
        .spawn()
        .unwrap();
    // The window comes back from the directory; the same selection is not published again.
    let start = Instant::now();
    while d.status().map(|s| s["members"].as_array().unwrap().len()) != Some(3) {
        assert!(start.elapsed() < DEADLINE && d.alive(), "window not rebuilt");
        std::thread::sleep(Duration::from_millis(50));
    }
    let start = Instant::now();
    while d.status().map(|s| s["last_selection"].is_null()) != Some(false) {
        assert!(start.elapsed() < DEADLINE && d.alive(), "no selection after restart");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        d.manifest().unwrap()["finished"],
        before["finished"],
        "republished the same average"
    );
    write(&d.runs, &["--style", "st-rename", "--steps", "4", "--chunk-ms", "5"]);
    d.wait_published(&[3, 4]);
}

#[test]
fn sigterm_during_publishing_leaves_old_or_new_never_torn() {
    for delay_ms in [0u64, 150, 400] {
        let mut d = Daemon::start("[select]\nmethod = \"uniform\"\n[window]\nsize = 50\n");
        write(&d.runs, &["--style", "st-rename", "--steps", "1,2", "--chunk-ms", "5"]);
        d.wait_published(&[1, 2]);
        let steps: Vec<String> = (3..30).map(|s| s.to_string()).collect();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/writers/trainer.py");
        let mut writer = Command::new("python3")
            .arg(script)
            .arg(&d.runs)
            .args(["--style", "st-rename", "--chunk-ms", "1", "--interval-ms", "20", "--steps"])
            .arg(steps.join(","))
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        // Wait for publishing to be under way, then stop it at some point inside.
        let start = Instant::now();
        while d.manifest().map(|m| input_steps(&m).len()).unwrap_or(0) < 3 {
            assert!(start.elapsed() < DEADLINE, "{}", d.log());
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        let took = d.terminate();
        assert!(took < Duration::from_secs(5), "stop took {took:?}");
        let _ = writer.kill();
        let _ = writer.wait();
        let bytes = std::fs::read(&d.out).unwrap();
        let m = d.manifest().unwrap();
        matches(&bytes, &m).unwrap_or_else(|e| panic!("after SIGTERM at +{delay_ms} ms: {e}"));
    }
}

#[test]
fn status_command_prints_the_window() {
    let mut d = Daemon::start("[select]\nmethod = \"lawa\"\nk = 2\n");
    write(&d.runs, &["--style", "st-rename", "--steps", "7,8", "--chunk-ms", "5"]);
    d.wait_published(&[7, 8]);
    // The status file is rewritten after the manifest appears: polled, not read once.
    let start = Instant::now();
    loop {
        let out = Command::new(env!("CARGO_BIN_EXE_sewa"))
            .args(["status", "--config"])
            .arg(&d.config)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        if text.contains("window: 2 members") && text.contains("last publish") {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A one-layer classifier `0.weight = a·[[1, -1], [-1, 1]]`, `0.bias = 0`: larger `a` is better
/// on data labelled by `x0 > x1`, negative `a` is worse than chance.
pub(crate) fn write_mlp(dir: &Path, step: u64, a: f32) {
    let w: Vec<u8> = [a, -a, -a, a].iter().flat_map(|v| v.to_le_bytes()).collect();
    let b: Vec<u8> = [0f32, 0.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let views = vec![
        (
            "0.weight",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 2], &w).unwrap(),
        ),
        (
            "0.bias",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &b).unwrap(),
        ),
    ];
    let tmp = dir.join(format!(".tmp-step_{step}"));
    safetensors::serialize_to_file(views, None, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join(format!("step_{step}.safetensors"))).unwrap();
}

pub(crate) fn write_selection_data(path: &Path) {
    let n = 64;
    let xs: Vec<f32> = (0..2 * n).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
    let ys: Vec<i64> = xs.chunks(2).map(|p| if p[0] > p[1] { 0 } else { 1 }).collect();
    let xb: Vec<u8> = xs.iter().flat_map(|v| v.to_le_bytes()).collect();
    let yb: Vec<u8> = ys.iter().flat_map(|v| v.to_le_bytes()).collect();
    let views = vec![
        (
            "inputs",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![n, 2], &xb).unwrap(),
        ),
        (
            "targets",
            safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![n], &yb).unwrap(),
        ),
    ];
    safetensors::serialize_to_file(views, None, path).unwrap();
}

#[test]
fn model_based_selector_in_the_daemon_with_policy_best() {
    let cfg = "[select]\nmethod = \"greedy\"\nk = 2\n\
               [objective]\nkind = \"builtin\"\ndata = \"sel.safetensors\"\n";
    let mut d = Daemon::start_full(cfg, "averaged/model.safetensors", "policy = \"best\"");
    write_selection_data(&d.tmp.path().join("sel.safetensors"));
    let mut losses: Vec<f64> = Vec::new();
    let note = |d: &Daemon, losses: &mut Vec<f64>| {
        let loss = d.manifest().and_then(|m| m["selection"]["loss"].as_f64());
        if let Some(l) = loss.filter(|l| losses.last() != Some(l)) {
            losses.push(l);
        }
    };
    for (step, a) in [(1, 1.0), (2, 3.0), (3, -2.0), (4, 0.5), (5, -4.0), (6, 0.1)] {
        write_mlp(&d.runs, step, a);
        let start = Instant::now();
        while d.status().map(|s| s["members"].as_array().unwrap().len()) != Some(step as usize) {
            note(&d, &mut losses);
            assert!(
                start.elapsed() < DEADLINE && d.alive(),
                "step {step} not admitted\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        note(&d, &mut losses);
    }
    assert!(!losses.is_empty(), "nothing published\n{}", d.log());
    assert!(losses.windows(2).all(|w| w[1] < w[0]), "published a worse model: {losses:?}");
    // The later, worse checkpoints produced selections that were held back.
    assert!(d.log().contains("selection not published"), "{}", d.log());
}

#[test]
fn on_publish_hook_sees_the_manifest_and_its_failure_is_not_fatal() {
    // The hook copies the manifest it is told about, then fails: the daemon must log the
    // failure and keep publishing.
    let hook = r#"on_publish = ["sh", "-c", "cp \"$SEWA_MANIFEST\" \"$SEWA_OUTPUT.hook-saw.json\"; echo hook-ran >&2; exit 3"]"#;
    let mut d = Daemon::start_full(
        "[select]\nmethod = \"lawa\"\nk = 2\n",
        "averaged/model.safetensors",
        hook,
    );
    write(&d.runs, &["--style", "st-rename", "--steps", "1,2"]);
    d.wait_published(&[1, 2]);
    let saw = PathBuf::from(format!("{}.hook-saw.json", d.out.display()));
    let start = Instant::now();
    let copied = loop {
        if let Some(v) = read_json(&saw).filter(|v| input_steps(v) == [1, 2]) {
            break v;
        }
        assert!(start.elapsed() < DEADLINE, "the hook never saw the manifest\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(copied["selection"]["method"], "lawa");
    while !d.log().contains("on_publish failed") {
        assert!(start.elapsed() < DEADLINE, "the hook's failure was not logged\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(d.log().contains("hook-ran"), "{}", d.log());
    write(&d.runs, &["--style", "st-rename", "--steps", "3"]);
    d.wait_published(&[2, 3]);
    assert!(d.alive());
}

/// Publications while a slow hook runs are coalesced into one more run for the latest: the
/// final publication gets its hook (it used to be skipped and never run).
#[test]
fn on_publish_runs_again_for_the_latest_publication_after_a_slow_run() {
    // Each run saves the manifest it was told about, then the first waits for a release file.
    let hook = r#"on_publish = ["sh", "-c", "cp \"$SEWA_MANIFEST\" \"$SEWA_OUTPUT.run-$(date +%s%N).json\"; while [ ! -e \"$SEWA_OUTPUT.release\" ]; do sleep 0.05; done"]"#;
    let mut d = Daemon::start_full(
        "[select]\nmethod = \"lawa\"\nk = 2\n",
        "averaged/model.safetensors",
        hook,
    );
    let runs = |d: &Daemon| -> Vec<Value> {
        let dir = d.out.parent().unwrap();
        let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.to_string_lossy().contains(".run-"))
            .collect();
        names.sort();
        names.iter().filter_map(|p| read_json(p)).collect()
    };
    write(&d.runs, &["--style", "st-rename", "--steps", "1,2"]);
    d.wait_published(&[1, 2]);
    let start = Instant::now();
    while runs(&d).is_empty() {
        assert!(start.elapsed() < DEADLINE, "the hook never started\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Two more publications while the first run is blocked.
    write(&d.runs, &["--style", "st-rename", "--steps", "3"]);
    d.wait_published(&[2, 3]);
    write(&d.runs, &["--style", "st-rename", "--steps", "4"]);
    d.wait_published(&[3, 4]);
    std::fs::write(format!("{}.release", d.out.display()), b"").unwrap();
    while runs(&d).len() < 2 {
        assert!(start.elapsed() < DEADLINE, "no run for the latest publication\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    while d.log().matches("on_publish finished").count() < 2 {
        assert!(start.elapsed() < DEADLINE, "second run did not finish\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let seen = runs(&d);
    let steps: Vec<Vec<u64>> = seen.iter().map(input_steps).collect();
    assert_eq!(
        seen.len(),
        2,
        "one run, then one coalesced run for the latest: {steps:?}\n{}",
        d.log()
    );
    assert_eq!(input_steps(&seen[1]), [3, 4], "the coalesced run saw the final publication");
    assert!(d.alive());
}

#[test]
fn checkpoint_of_another_model_is_quarantined_naming_the_tensor() {
    let mut d = Daemon::start("[select]\nmethod = \"lawa\"\nk = 2\n");
    write(&d.runs, &["--style", "st-rename", "--steps", "1,2"]);
    d.wait_published(&[1, 2]);
    // A checkpoint from a different model lands in the same directory.
    write_mlp(&d.runs, 3, 1.0);
    let start = Instant::now();
    let reason = loop {
        let q = d.status().map(|s| s["quarantined"].clone()).unwrap_or_default();
        let hit = q.as_array().and_then(|q| {
            q.iter().find(|x| x["path"].as_str().is_some_and(|p| p.ends_with("step_3.safetensors")))
        });
        if let Some(x) = hit {
            break x["reason"].as_str().unwrap_or_default().to_string();
        }
        assert!(start.elapsed() < DEADLINE, "never quarantined\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(reason.contains("the window") && reason.contains("tensor"), "{reason}");
    assert_eq!(input_steps(&d.manifest().unwrap()), [1, 2], "the old publication stays");
    assert!(d.alive());
}
