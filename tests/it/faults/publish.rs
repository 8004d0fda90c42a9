//! Publishing guarantees: model and manifest change together, locks, temp litter, overflow.

use std::ffi::OsString;
use std::fs;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use safetensors::Dtype;
use serde_json::Value;
use sewa_engine::manifest::Manifest;
use sewa_engine::publish::{lock::lock_path, model_started};

use crate::average::{f32_bytes, write_st};
use crate::watch::{DEADLINE, Daemon, input_steps, read_json, write};

fn sewa(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sewa")).args(args).env("RUST_LOG", "warn").output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn raw(bytes: &[u8]) -> OsString {
    OsString::from_vec(bytes.to_vec())
}

/// A small safetensors input whose tensors all hold `value`.
fn input(path: &Path, value: f32) -> PathBuf {
    write_st(path, &[("w", Dtype::F32, vec![2, 3], f32_bytes(&[value; 6]))]);
    path.to_path_buf()
}

fn average(out: &Path, inputs: &[&Path]) -> Output {
    let mut args = vec!["average".as_ref(), "--out".as_ref(), out.as_os_str()];
    args.extend(inputs.iter().map(|p| p.as_os_str()));
    sewa(&args)
}

fn manifest_of(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".manifest.json");
    PathBuf::from(s)
}

/// A model and a manifest belong together: the model's `__metadata__.sewa_started` is the
/// manifest's `started` (what a reader checks).
fn assert_paired(model: &Path, manifest: &Path) -> Value {
    let m = read_json(manifest).unwrap_or_else(|| panic!("{} unreadable", manifest.display()));
    let started = model_started(model).unwrap();
    assert_eq!(started.as_deref(), m["started"].as_str(), "model and manifest are not one pair");
    m
}

/// Hidden entries ending in `.sewa-tmp` or `.sewa-old` in `dir`.
fn litter(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".sewa-tmp") || n.ends_with(".sewa-old"))
        .collect();
    v.sort();
    v
}

fn poll(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---- item 1: non-UTF-8 names ------------------------------------------------------------

#[test]
fn non_utf8_output_and_input_names_are_recorded_losslessly_in_the_manifest() {
    let dir = tempfile::tempdir().unwrap();
    // A non-UTF-8 directory above an input, and a non-UTF-8 output name.
    let run = dir.path().join(raw(b"run_\xff"));
    fs::create_dir(&run).unwrap();
    let a = input(&run.join("step_100.safetensors"), 1.0);
    let b = input(&dir.path().join("step_200.safetensors"), 3.0);
    let out = dir.path().join(raw(b"out_\xfe.safetensors"));
    let o = average(&out, &[&a, &b]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mpath = manifest_of(&out);
    let json = assert_paired(&out, &mpath);
    assert_eq!(json["output"]["bytes_hex"].as_str().unwrap(), hex(out.as_os_str().as_bytes()));
    let m: Manifest = serde_json::from_slice(&fs::read(&mpath).unwrap()).unwrap();
    assert_eq!(m.output, out, "the output path decodes to the exact bytes");
    assert_eq!(m.inputs[0].path, a);
    assert_eq!(m.inputs[1].path, b);
    assert_eq!(m.files[0].name, PathBuf::from(raw(b"out_\xfe.safetensors")));
    assert_eq!(json["inputs"][1]["path"], b.to_str().unwrap(), "UTF-8 paths stay strings");
    // The same for a directory output.
    let out_dir = dir.path().join(raw(b"avg_\xfe"));
    let o = average(&out_dir, &[&a, &b]);
    assert!(o.status.success(), "{}", stderr(&o));
    let m: Manifest =
        serde_json::from_slice(&fs::read(out_dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!((m.output, &m.inputs[0].path), (out_dir, &a));
}

#[test]
fn non_utf8_input_file_names_are_recorded_losslessly_by_the_publisher() {
    use sewa_checkpoint::{Checkpoint, DType};
    use sewa_engine::average::{AverageOptions, AveragePlan};
    let dir = tempfile::tempdir().unwrap();
    let names = [raw(b"in_\xff.safetensors"), raw(b"in_\xfe.safetensors")];
    let ckpts: Vec<Checkpoint> = (names.iter().enumerate())
        .map(|(i, n)| {
            let t = vec![("w".to_string(), DType::F32, vec![2], f32_bytes(&[i as f32; 2]))];
            Checkpoint::from_memory(dir.path().join(n), Some(i as u64), t).unwrap()
        })
        .collect();
    let plan = AveragePlan::new(ckpts.iter().collect(), None, AverageOptions::default()).unwrap();
    let out = dir.path().join(raw(b"out_\xfd.safetensors"));
    let (why, opts) = test_publish();
    sewa_engine::publish::publish(&plan, &out, why, &opts, &mut |_| {}).unwrap();
    let m: Manifest = serde_json::from_slice(&fs::read(manifest_of(&out)).unwrap()).unwrap();
    // Two names that read alike once lossy (both "in_\u{fffd}...") stay two names.
    assert_eq!(m.inputs[0].path, dir.path().join(&names[0]));
    assert_eq!(m.inputs[1].path, dir.path().join(&names[1]));
    assert_eq!(m.int_source, None);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---- item 8: disk full between model and manifest ---------------------------------------

/// A tmpfs of `bytes` mounted on a temp dir (we run as root in CI); `None`, with the reason
/// printed, where mounting is not allowed.
pub(crate) struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    pub(crate) fn mount(bytes: u64) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match o {
            Ok(o) if o.status.success() => Some(Tmpfs(dir)),
            Ok(o) => {
                eprintln!("skipping: cannot mount a tmpfs here: {}", stderr(&o).trim());
                None
            }
            Err(e) => {
                eprintln!("skipping: cannot run mount: {e}");
                None
            }
        }
    }

    pub(crate) fn path(&self) -> &Path {
        self.0.path()
    }

    /// Leave exactly `bytes` free (a page multiple) by writing a filler file; returns it.
    fn fill_leaving(&self, bytes: u64) -> PathBuf {
        let st = rustix::fs::statvfs(self.path()).unwrap();
        let free = st.f_bavail * st.f_frsize;
        assert!(free > bytes, "tmpfs too small: {free} free");
        let filler = self.path().join("filler");
        fs::write(&filler, vec![0xa5u8; (free - bytes) as usize]).unwrap();
        let st = rustix::fs::statvfs(self.path()).unwrap();
        assert_eq!(st.f_bavail * st.f_frsize, bytes, "filler did not leave {bytes} bytes");
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
    }
}

const PAGE: u64 = 4096;

#[test]
fn disk_full_while_writing_the_manifest_keeps_the_old_model_and_manifest() {
    let Some(fs_) = Tmpfs::mount(1 << 20) else { return };
    let inputs = tempfile::tempdir().unwrap();
    let a = input(&inputs.path().join("step_100.safetensors"), 1.0);
    let b = input(&inputs.path().join("step_200.safetensors"), 3.0);
    let out = fs_.path().join("avg.safetensors");
    let mpath = manifest_of(&out);
    let o = average(&out, &[&a]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (old_model, old_manifest) = (fs::read(&out).unwrap(), fs::read(&mpath).unwrap());
    // A consumer has the model open: its blocks stay allocated even once it is renamed over.
    let _reader = fs::File::open(&out).unwrap();
    // Room for the new model (under a page) but none for its manifest.
    let filler = fs_.fill_leaving(PAGE);
    let o = average(&out, &[&a, &b]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("No space left") && err.contains(".manifest.json."), "{err}");
    assert_eq!(fs::read(&out).unwrap(), old_model, "the model changed without its manifest");
    assert_eq!(fs::read(&mpath).unwrap(), old_manifest);
    assert_paired(&out, &mpath);
    assert!(litter(fs_.path()).is_empty(), "{:?}", litter(fs_.path()));
    // With room again, both change.
    fs::remove_file(filler).unwrap();
    let o = average(&out, &[&a, &b]);
    assert!(o.status.success(), "{}", stderr(&o));
    let m = assert_paired(&out, &mpath);
    assert_eq!(m["inputs"].as_array().unwrap().len(), 2);
}

#[test]
fn daemon_with_a_full_disk_keeps_publishing_pairs_and_logs_what_is_published() {
    let Some(fs_) = Tmpfs::mount(1 << 20) else { return };
    let state = tempfile::tempdir().unwrap();
    // Status files elsewhere, so only the output's files use the tmpfs.
    let extra =
        format!("[runtime]\nstate_dir = {:?}\n[select]\nmethod = \"lawa\"\nk = 3\n", state.path());
    let out = fs_.path().join("model.safetensors");
    let mut d = Daemon::start_full(&extra, out.to_str().unwrap(), "");
    let mpath = manifest_of(&out);
    write(&d.runs, &["--style", "st-rename", "--steps", "1,2,3", "--chunk-ms", "5"]);
    d.wait_published(&[1, 2, 3]);
    let (old_model, old_manifest) = (fs::read(&out).unwrap(), fs::read(&mpath).unwrap());
    // A consumer has the model open: its blocks stay allocated even once it is renamed over.
    let _reader = fs::File::open(&out).unwrap();
    let filler = fs_.fill_leaving(PAGE);
    write(&d.runs, &["--style", "st-rename", "--steps", "4", "--chunk-ms", "5"]);
    poll("the failed publish", || d.log().contains("No space left"));
    assert!(d.alive(), "{}", d.log());
    assert_eq!(fs::read(&out).unwrap(), old_model, "model replaced without its manifest");
    assert_eq!(fs::read(&mpath).unwrap(), old_manifest);
    assert_paired(&out, &mpath);
    let line = d.log().lines().find(|l| l.contains("No space left")).unwrap().to_string();
    assert!(line.contains("the previous output stays"), "{line}");
    assert!(litter(fs_.path()).is_empty(), "{:?}", litter(fs_.path()));
    fs::remove_file(filler).unwrap();
    write(&d.runs, &["--style", "st-rename", "--steps", "5", "--chunk-ms", "5"]);
    let m = d.wait_published(&[3, 4, 5]);
    assert_eq!(input_steps(&assert_paired(&out, &mpath)), input_steps(&m));
}

#[test]
fn a_manifest_that_cannot_be_replaced_after_the_model_is_reported_and_completed_later() {
    use sewa_checkpoint::{Checkpoint, DType};
    use sewa_engine::average::{AverageOptions, AveragePlan};
    let dir = tempfile::tempdir().unwrap();
    let t = vec![("w".to_string(), DType::F32, vec![2], f32_bytes(&[1.0, 2.0]))];
    let ckpt = Checkpoint::from_memory(dir.path().join("a.safetensors"), Some(1), t).unwrap();
    let plan = AveragePlan::new(vec![&ckpt], None, AverageOptions::default()).unwrap();
    let out = dir.path().join("m.safetensors");
    let mpath = manifest_of(&out);
    // A directory where the manifest goes: the model's rename works, the manifest's cannot.
    fs::create_dir_all(mpath.join("blocker")).unwrap();
    let (why, opts) = test_publish();
    let err = sewa_engine::publish::publish(&plan, &out, why, &opts, &mut |_| {}).unwrap_err();
    assert!(sewa_engine::publish::is_partly_published(&err), "{err}");
    let msg = err.to_string();
    let started = model_started(&out).unwrap().unwrap();
    assert!(msg.contains("now holds the new model") && msg.contains(&started), "{msg}");
    assert!(msg.contains("still describes the previous model"), "{msg}");
    // The complete manifest was kept; with the obstacle gone, start-up recovery renames it in.
    fs::remove_dir_all(&mpath).unwrap();
    let lock = sewa_engine::publish::hold(&out).unwrap();
    let done = sewa_engine::publish::recover(&lock);
    assert!(matches!(done[..], [sewa_engine::publish::Recovered::Completed { .. }]), "{done:?}");
    assert_paired(&out, &mpath);
    assert!(litter(dir.path()).is_empty(), "{:?}", litter(dir.path()));
}

// ---- item 10: one publisher per output --------------------------------------------------

fn wait_exit(child: &mut std::process::Child) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(start.elapsed() < DEADLINE, "the second publisher hangs instead of refusing");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The daemon has taken its lock (its pid is in the lock file) and finished start-up.
fn wait_started(d: &mut Daemon) {
    let (lock, pid) = (lock_path(&d.out), d.child.id().to_string());
    poll("the daemon's lock", || {
        fs::read_to_string(&lock).is_ok_and(|s| s.trim() == pid) && d.status().is_some()
    });
}

#[test]
fn a_second_daemon_on_the_same_output_is_refused_naming_the_first() {
    let mut first = Daemon::start("[select]\nmethod = \"uniform\"\n");
    wait_started(&mut first);
    let mut second = Daemon::start_full("", first.out.to_str().unwrap(), "");
    let status = wait_exit(&mut second.child);
    let log = second.log();
    assert_eq!(status.code(), Some(78), "{log}");
    let pid = first.child.id();
    assert!(log.contains(&format!("pid {pid}")), "the refusal names the holder: {log}");
    assert!(first.alive(), "{}", first.log());
    // The first daemon's status file is its own.
    assert_eq!(first.status().unwrap()["pid"], pid);
    write(&first.runs, &["--style", "st-rename", "--steps", "1,2", "--chunk-ms", "5"]);
    first.wait_published(&[1, 2]);
}

#[test]
fn sewa_average_to_an_output_a_daemon_publishes_is_refused_naming_the_daemon() {
    let mut d = Daemon::start("[select]\nmethod = \"uniform\"\n");
    wait_started(&mut d);
    let elsewhere = tempfile::tempdir().unwrap();
    let a = input(&elsewhere.path().join("step_100.safetensors"), 1.0);
    let o = average(&d.out, &[&a]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains(&format!("pid {}", d.child.id())), "{err}");
    assert!(!d.out.exists(), "sewa average published beside the daemon");
    assert!(d.alive());
}

#[test]
fn a_daemon_does_not_start_while_another_process_holds_the_output_lock() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model.safetensors");
    let lock = lock_path(&out);
    fs::create_dir_all(lock.parent().unwrap()).unwrap();
    let held = fs::File::create(&lock).unwrap();
    held.try_lock().unwrap();
    fs::write(&lock, format!("{}\n", std::process::id())).unwrap();
    let mut d = Daemon::start_full("", out.to_str().unwrap(), "");
    let status = wait_exit(&mut d.child);
    assert_eq!(status.code(), Some(78), "{}", d.log());
    assert!(d.log().contains(&format!("pid {}", std::process::id())), "{}", d.log());
    // Released (as when its holder exits, even by SIGKILL): the next start succeeds.
    drop(held);
    let mut d = Daemon::start_full("", out.to_str().unwrap(), "");
    wait_started(&mut d);
}

#[test]
fn a_reload_onto_an_output_another_process_holds_does_not_publish_there() {
    let mut d = Daemon::start("[select]\nmethod = \"uniform\"\n");
    write(&d.runs, &["--style", "st-rename", "--steps", "1,2", "--chunk-ms", "5"]);
    d.wait_published(&[1, 2]);
    let other = d.tmp.path().join("elsewhere/model.safetensors");
    let lock = lock_path(&other);
    fs::create_dir_all(lock.parent().unwrap()).unwrap();
    let held = fs::File::create(&lock).unwrap();
    held.try_lock().unwrap();
    fs::write(&lock, format!("{}\n", std::process::id())).unwrap();
    let text = fs::read_to_string(&d.config).unwrap();
    let text = text.replace(d.out.to_str().unwrap(), other.to_str().unwrap());
    fs::write(&d.config, text).unwrap();
    Command::new("kill").args(["-HUP", &d.child.id().to_string()]).status().unwrap();
    let refusal = format!("pid {}", std::process::id());
    poll("the refused publish", || d.log().contains(&refusal));
    assert!(d.alive(), "{}", d.log());
    assert!(!other.exists(), "published to an output another process holds");
    // Once the holder is gone, the next publication goes there, under this daemon's lock.
    drop(held);
    write(&d.runs, &["--style", "st-rename", "--steps", "3", "--chunk-ms", "5"]);
    poll("a publication at the new output", || read_json(&manifest_of(&other)).is_some());
    assert_paired(&other, &manifest_of(&other));
    assert_eq!(fs::read_to_string(&lock).unwrap().trim(), d.child.id().to_string());
}

// ---- item 11: leftovers of a killed run --------------------------------------------------

/// Stop `d` and start it again on the same config and directories.
fn restart(d: &mut Daemon, between: impl FnOnce()) {
    if d.alive() {
        d.terminate();
    }
    between();
    let log = fs::OpenOptions::new().append(true).open(d.tmp.path().join("sewa.log")).unwrap();
    d.child = Command::new(env!("CARGO_BIN_EXE_sewa"))
        .args(["watch", "--config"])
        .arg(&d.config)
        .env("RUST_LOG", "sewa=debug,info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
}

/// Wait for a fresh status file: written only after start-up clean-up.
fn restart_and_wait(d: &mut Daemon, between: impl FnOnce()) {
    let status = d.out.parent().unwrap().join(".sewa/status.json");
    restart(d, || {
        let _ = fs::remove_file(&status);
        between();
    });
    // The status says "starting" from before the clean-up; what follows it comes after.
    poll("start-up", || read_json(&status).is_some_and(|s| s["state"] != "starting"));
}

#[test]
fn fresh_temp_leftovers_of_our_output_are_removed_at_start_up_and_others_kept() {
    let mut d = Daemon::start("");
    wait_started(&mut d);
    let dir = d.out.parent().unwrap().to_path_buf();
    let ours =
        [".model.safetensors.Ab12x9.sewa-tmp", ".model.safetensors.manifest.json.Zx9cv8.sewa-tmp"];
    let theirs = [".model.safetensors.x.Ab12x9.sewa-tmp", ".other.safetensors.Ab12x9.sewa-tmp"];
    restart_and_wait(&mut d, || {
        for n in ours.iter().chain(&theirs) {
            fs::write(dir.join(n), vec![0u8; 1 << 16]).unwrap();
        }
        fs::create_dir(dir.join(".model.safetensors.Qw3rty.sewa-tmp")).unwrap();
        fs::write(dir.join(".model.safetensors.Qw3rty.sewa-tmp/model.safetensors"), b"x").unwrap();
    });
    assert_eq!(litter(&dir), theirs.map(String::from), "{}", d.log());
    assert!(d.log().contains("cleaned up after an interrupted publish"), "{}", d.log());
}

#[test]
fn kill_9_mid_publish_leaves_temps_that_the_next_start_removes_at_once() {
    let dir = tempfile::tempdir().unwrap();
    // 64 MiB of output: writing it takes long enough to be killed in the middle.
    let big: Vec<PathBuf> = (0..2)
        .map(|i| {
            let p = dir.path().join(format!("step_{i}.safetensors"));
            let t: Vec<_> = (0..16)
                .map(|j| {
                    (
                        format!("w{j}"),
                        Dtype::F32,
                        vec![1024, 1024],
                        f32_bytes(&vec![i as f32; 1 << 20]),
                    )
                })
                .collect();
            let refs: Vec<_> =
                t.iter().map(|(n, d, s, b)| (n.as_str(), *d, s.clone(), b.clone())).collect();
            write_st(&p, &refs);
            p
        })
        .collect();
    let out_dir = dir.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("avg.safetensors");
    for _ in 0..3 {
        let before = litter(&out_dir);
        let mut child = Command::new(env!("CARGO_BIN_EXE_sewa"))
            .args(["average", "--out"])
            .arg(&out)
            .args(&big)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        poll("a new temp file mid-publish", || {
            litter(&out_dir).iter().any(|n| !before.contains(n))
        });
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
    assert!(!litter(&out_dir).is_empty(), "the kills left nothing to clean");
    let small = input(&dir.path().join("small.safetensors"), 2.0);
    let o = average(&out, &[&small]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(litter(&out_dir).is_empty(), "{:?}", litter(&out_dir));
    assert_paired(&out, &manifest_of(&out));
}

#[test]
fn a_directory_output_parked_by_an_interrupted_swap_is_put_back() {
    let mut d = Daemon::start_with_out("", "averaged");
    wait_started(&mut d);
    let inputs = tempfile::tempdir().unwrap();
    let a = input(&inputs.path().join("step_100.safetensors"), 1.0);
    // Published before the daemon, as by a previous run of it.
    d.terminate();
    let o = average(&d.out, &[&a]);
    assert!(o.status.success(), "{}", stderr(&o));
    let old_manifest = fs::read(d.out.join("manifest.json")).unwrap();
    let (out, parent) = (d.out.clone(), d.out.parent().unwrap().to_path_buf());
    restart_and_wait(&mut d, || {
        // Killed between "rename the old output away" and "rename the new one in".
        fs::rename(&out, parent.join(".averaged.4242.sewa-old")).unwrap();
        fs::create_dir(parent.join(".averaged.Ab12x9.sewa-tmp")).unwrap();
    });
    assert_eq!(fs::read(d.out.join("manifest.json")).unwrap(), old_manifest, "{}", d.log());
    assert_paired(&d.out.join("model.safetensors"), &d.out.join("manifest.json"));
    assert!(litter(&parent).is_empty(), "{:?}", litter(&parent));
}

/// A model's bytes and its manifest's.
type Pair = (Vec<u8>, Vec<u8>);

/// Pair A published at `out`, pair B (another average) at a scratch path.
fn two_pairs(out: &Path, scratch: &Path) -> (Pair, Pair) {
    let a = input(&scratch.join("a.safetensors"), 1.0);
    let b = input(&scratch.join("b.safetensors"), 5.0);
    let o = average(out, &[&a]);
    assert!(o.status.success(), "{}", stderr(&o));
    let other = scratch.join("b_avg.safetensors");
    let o = average(&other, &[&a, &b]);
    assert!(o.status.success(), "{}", stderr(&o));
    let read = |p: &Path| (fs::read(p).unwrap(), fs::read(manifest_of(p)).unwrap());
    (read(out), read(&other))
}

#[test]
fn a_crash_between_the_model_and_manifest_renames_is_completed_at_start_up() {
    let mut d = Daemon::start("");
    wait_started(&mut d);
    d.terminate();
    let scratch = tempfile::tempdir().unwrap();
    let (_, (new_model, new_manifest)) = two_pairs(&d.out, scratch.path());
    let dir = d.out.parent().unwrap().to_path_buf();
    let (out, mpath) = (d.out.clone(), manifest_of(&d.out));
    restart_and_wait(&mut d, || {
        // The new model renamed in; its (complete, fsynced) manifest still under its temp name.
        fs::write(&out, &new_model).unwrap();
        fs::write(dir.join(".model.safetensors.manifest.json.Ab12x9.sewa-tmp"), &new_manifest)
            .unwrap();
    });
    assert_eq!(fs::read(&mpath).unwrap(), new_manifest, "{}", d.log());
    assert_paired(&d.out, &mpath);
    assert!(litter(&dir).is_empty(), "{:?}", litter(&dir));
}

#[test]
fn a_crash_before_the_model_rename_keeps_the_old_pair_at_start_up() {
    let mut d = Daemon::start("");
    wait_started(&mut d);
    d.terminate();
    let scratch = tempfile::tempdir().unwrap();
    let ((old_model, old_manifest), (_, new_manifest)) = two_pairs(&d.out, scratch.path());
    let dir = d.out.parent().unwrap().to_path_buf();
    restart_and_wait(&mut d, || {
        fs::write(dir.join(".model.safetensors.manifest.json.Ab12x9.sewa-tmp"), &new_manifest)
            .unwrap();
        fs::write(dir.join(".model.safetensors.Cd34y8.sewa-tmp"), b"half a model").unwrap();
    });
    assert_eq!(fs::read(&d.out).unwrap(), old_model);
    assert_eq!(fs::read(manifest_of(&d.out)).unwrap(), old_manifest);
    assert!(litter(&dir).is_empty(), "{:?}", litter(&dir));
}

/// The provenance and options the library-level publish tests use.
fn test_publish() -> (sewa_engine::manifest::Provenance, sewa_engine::publish::PublishOptions) {
    let why = sewa_engine::manifest::Provenance {
        method: "test".into(),
        why: "test".into(),
        loss: None,
        details: Value::Null,
    };
    (why, sewa_engine::publish::PublishOptions::default())
}
