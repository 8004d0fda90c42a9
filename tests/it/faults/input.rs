//! Hostile input: names, headers, pickles, strides, FIFOs, symlinks, control characters.
//! Regression tests for issue 8, items 1, 3, 4, 5, 12, 14 and 15, on real files written here
//! (safetensors by hand or with the safetensors crate, torch zips with the `zip` crate and a
//! hand-written pickle). Each test is named after what it guards.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sewa_checkpoint::{Checkpoint, OpenOptions};

use crate::watch::{DEADLINE, Daemon, write};

fn sewa_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sewa"))
}

/// Run sewa, killing it (and failing the test) if it has not exited within `DEADLINE`: the
/// faults here used to hang forever.
fn run_bounded(args: &[&OsStr]) -> Output {
    let mut child =
        sewa_bin().args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > DEADLINE {
            child.kill().unwrap();
            panic!("sewa {args:?} hung (killed after {DEADLINE:?})");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A valid one-tensor safetensors file; `value` makes files distinguishable.
fn good_st(path: &Path, value: f32) {
    let bytes: Vec<u8> = [value; 4].iter().flat_map(|x| x.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4], &bytes);
    safetensors::serialize_to_file([("w", view.unwrap())], None, path).unwrap();
}

/// A safetensors file with a hand-written header and `data_len` data bytes.
fn raw_st(path: &Path, header: &str, data_len: usize) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.resize(bytes.len() + data_len, 0);
    fs::write(path, bytes).unwrap();
}

fn open_err(p: &Path) -> String {
    match Checkpoint::open(p, &OpenOptions::default()) {
        Ok(_) => panic!("{} opened but should not", p.display()),
        Err(e) => {
            assert!(e.is_bad_input(), "{e}");
            e.to_string()
        }
    }
}

fn mkfifo(path: &Path) {
    assert!(Command::new("mkfifo").arg(path).status().unwrap().success());
}

// ---- item 1: non-ASCII and non-UTF-8 names ---------------------------------------------

#[test]
fn non_ascii_and_non_utf8_file_names_are_inspected_not_panicked() {
    let dir = tempfile::tempdir().unwrap();
    let names: [&[u8]; 4] = [
        "café.safetensors".as_bytes(),
        "modèle_final_é.safetensors".as_bytes(),
        b"model_\xfe\xff_step_7.safetensors",
        b"\xe9t\xe9.safetensors", // Latin-1 "été": not UTF-8
    ];
    for name in names {
        let path = dir.path().join(OsStr::from_bytes(name));
        good_st(&path, 1.0);
        for json in [false, true] {
            let mut args = vec![os("inspect"), path.as_os_str()];
            if json {
                args.push(os("--json"));
            }
            let out = run_bounded(&args);
            assert!(
                out.status.success(),
                "{name:?} json={json}: {:?} {}",
                out.status,
                stderr(&out)
            );
        }
    }
    let seven = dir.path().join(OsStr::from_bytes(names[2]));
    let out = run_bounded(&[os("inspect"), seven.as_os_str()]);
    assert!(stdout(&out).contains("step:    7"), "{}", stdout(&out));
}

// ---- item 5: FIFOs and other non-regular files ------------------------------------------

#[test]
fn fifo_given_to_inspect_or_average_is_refused_not_hung() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("step_000400.safetensors");
    mkfifo(&fifo);
    let good = dir.path().join("step_000300.safetensors");
    good_st(&good, 1.0);
    let out_path = dir.path().join("avg.safetensors");
    for args in [
        vec![os("inspect"), fifo.as_os_str()],
        vec![os("average"), os("--out"), out_path.as_os_str(), good.as_os_str(), fifo.as_os_str()],
    ] {
        let out = run_bounded(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("FIFO"), "{}", stderr(&out));
        assert!(stderr(&out).contains("step_000400.safetensors"), "{}", stderr(&out));
    }
    assert!(!out_path.exists());
}

#[test]
fn fifos_inside_checkpoint_directories_are_refused_not_hung() {
    let dir = tempfile::tempdir().unwrap();
    // HF dir whose trainer_state.json (read for the step) is a FIFO.
    let state_fifo = dir.path().join("checkpoint-5");
    fs::create_dir(&state_fifo).unwrap();
    good_st(&state_fifo.join("model.safetensors"), 1.0);
    mkfifo(&state_fifo.join("trainer_state.json"));
    // HF dir whose weights are a FIFO.
    let weights_fifo = dir.path().join("checkpoint-6");
    fs::create_dir(&weights_fifo).unwrap();
    mkfifo(&weights_fifo.join("model.safetensors"));
    // A shard index naming a FIFO shard.
    let sharded = dir.path().join("sharded");
    fs::create_dir(&sharded).unwrap();
    mkfifo(&sharded.join("model-00001-of-00001.safetensors"));
    let index = sharded.join("model.safetensors.index.json");
    let map = r#"{"weight_map": {"w": "model-00001-of-00001.safetensors"}}"#;
    fs::write(&index, map).unwrap();
    for (path, culprit) in [
        (&state_fifo, "trainer_state.json"),
        (&weights_fifo, "model.safetensors"),
        (&index, "model-00001-of-00001.safetensors"),
    ] {
        let out = run_bounded(&[os("inspect"), path.as_os_str()]);
        assert_eq!(out.status.code(), Some(2), "{}: {}", path.display(), stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("FIFO") && err.contains(culprit), "{err}");
    }
}

/// Items 1, 5 and 14 against the running daemon: a FIFO with a checkpoint name, names that
/// are not ASCII or not UTF-8, and a name holding terminal controls are dropped into the
/// watched directory. The daemon must stay alive, keep its log free of raw control
/// characters, and publish the next good checkpoint.
#[test]
fn hostile_entries_in_the_watched_dir_leave_the_daemon_publishing() {
    let mut d = Daemon::start("[select]\nmethod = \"uniform\"\n");
    write(&d.runs, &["--style", "st-rename", "--steps", "1", "--chunk-ms", "5"]);
    d.wait_published(&[1]);
    mkfifo(&d.runs.join("step_000400.safetensors"));
    good_st(&d.runs.join("modèle_final_é.safetensors"), 9.0); // no step: refused, not fatal
    fs::write(d.runs.join(OsStr::from_bytes(b"bad_\xfe_step_3.safetensors")), b"garbage!").unwrap();
    fs::write(d.runs.join("step_8\x1b[31m\x07.safetensors"), b"garbage!garbage!").unwrap();
    write(&d.runs, &["--style", "st-rename", "--steps", "2", "--chunk-ms", "5"]);
    d.wait_published(&[1, 2]);
    // The refusals are logged once they settle; wait for the last one, then look at the log.
    let start = Instant::now();
    while !d.log().contains("step_8") {
        assert!(d.alive(), "sewa died:\n{}", d.log());
        assert!(start.elapsed() < DEADLINE, "hostile names never reported:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(d.alive(), "sewa died:\n{}", d.log());
    let log = d.log();
    assert!(!log.contains('\x1b') && !log.contains('\x07'), "raw control characters:\n{log}");
    assert!(log.contains("step_8\\x1b[31m\\x07"), "{log}");
    assert!(!log.contains("step_000400"), "the FIFO must not even be a candidate:\n{log}");
    // The status file stays current (it is written after the manifest: poll), listing the
    // refused names, lossily where they are not UTF-8.
    let start = Instant::now();
    let current = |s: &serde_json::Value| {
        let q = s["quarantined"].to_string();
        s["members"].as_array().is_some_and(|m| m.len() == 2)
            && q.contains("bad_\u{fffd}_step_3.safetensors")
            && q.contains("modèle_final_é.safetensors")
    };
    loop {
        match d.status() {
            Some(s) if current(&s) => break,
            last => assert!(start.elapsed() < DEADLINE, "status never current: {last:#?}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let report = run_bounded(&[os("status"), os("--config"), d.config.as_os_str()]);
    let text = stdout(&report);
    assert!(text.contains("step_8\\x1b[31m\\x07"), "{text}");
    assert!(!text.contains('\x1b') && !text.contains('\x07'), "raw controls in {text:?}");
    d.terminate();
}

// ---- item 3: broadcast views and storage sizes in torch zips ----------------------------

/// A protocol-2 pickle of `{"w": _rebuild_tensor_v2(storage '0' of `numel` floats, 0, size,
/// stride, False, OrderedDict())}`, as torch.save writes one tensor.
fn tensor_pickle(numel: i32, size: &[i32], stride: &[i32]) -> Vec<u8> {
    let s =
        |text: &str| [&[b'X'][..], &(text.len() as u32).to_le_bytes(), text.as_bytes()].concat();
    let int = |v: i32| [&[b'J'][..], &v.to_le_bytes()].concat();
    let tuple = |vals: &[i32]| {
        let mut t = vec![b'('];
        vals.iter().for_each(|&v| t.extend(int(v)));
        t.push(b't');
        t
    };
    let mut p = b"\x80\x02}".to_vec();
    p.extend(s("w"));
    p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n((");
    p.extend(s("storage"));
    p.extend(b"ctorch\nFloatStorage\n");
    p.extend(s("0"));
    p.extend(s("cpu"));
    p.extend(int(numel));
    p.extend(b"tQ");
    p.extend(int(0));
    p.extend(tuple(size));
    p.extend(tuple(stride));
    p.extend(b"\x89ccollections\nOrderedDict\n)RtRs.");
    p
}

/// A torch.save-style zip: `archive/data.pkl`, `archive/byteorder`, `archive/data/0`.
fn torch_zip(path: &Path, pickle: &[u8], storage: &[u8]) {
    use std::io::Write;
    let mut z = zip::ZipWriter::new(fs::File::create(path).unwrap());
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, bytes) in [
        ("archive/data.pkl", pickle),
        ("archive/byteorder", b"little"),
        ("archive/data/0", storage),
    ] {
        z.start_file(name, opts).unwrap();
        z.write_all(bytes).unwrap();
    }
    z.finish().unwrap();
}

#[test]
fn broadcast_views_in_torch_files_are_refused_without_allocating() {
    let dir = tempfile::tempdir().unwrap();
    // 1 float of storage viewed as [2^24, 2^24] with strides (0, 0): 1024 TiB as a tensor.
    let huge = dir.path().join("huge.pt");
    torch_zip(&huge, &tensor_pickle(1, &[1 << 24, 1 << 24], &[0, 0]), &1f32.to_le_bytes());
    // The plain version of the same file opens: the fixture itself is sound.
    let plain = dir.path().join("plain.pt");
    torch_zip(&plain, &tensor_pickle(1, &[1], &[1]), &1f32.to_le_bytes());
    assert_eq!(Checkpoint::open(&plain, &OpenOptions::default()).unwrap().tensors().len(), 1);
    let out = dir.path().join("avg.safetensors");
    for args in [
        vec![os("inspect"), huge.as_os_str()],
        vec![os("average"), os("--out"), out.as_os_str(), huge.as_os_str(), huge.as_os_str()],
    ] {
        let o = run_bounded(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {:?} {}", o.status, stderr(&o));
        assert!(stderr(&o).contains("repeats storage elements"), "{}", stderr(&o));
    }
    // An overlapping view that is not a broadcast ([2^20, 2^20] over 2^20+1 elements).
    let overlap = dir.path().join("overlap.pt");
    let storage = vec![0u8; ((1 << 20) + 1) * 4];
    torch_zip(&overlap, &tensor_pickle((1 << 20) + 1, &[1 << 20, 1 << 20], &[1, 1]), &storage);
    assert!(open_err(&overlap).contains("repeats storage elements"));
}

#[test]
fn storage_sizes_past_the_end_of_the_zip_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lying.pt");
    let n = 1 << 28; // a 1 GiB storage, in a file of a few hundred bytes
    torch_zip(&path, &tensor_pickle(n, &[n], &[1]), &[0u8; 4]);
    // Make the zip's own records claim the 1 GiB: local header and central directory sizes.
    let mut bytes = fs::read(&path).unwrap();
    let claimed = (n as u32 * 4).to_le_bytes();
    let name = b"archive/data/0";
    let mut patched = 0;
    for (sig, at) in [(b"PK\x03\x04", 18), (b"PK\x01\x02", 20)] {
        let name_at = if at == 18 { 30 } else { 46 };
        let hits: Vec<usize> = (0..bytes.len() - 4)
            .filter(|&i| &bytes[i..i + 4] == sig && bytes[i + name_at..].starts_with(name))
            .collect();
        for i in hits {
            bytes[i + at..i + at + 4].copy_from_slice(&claimed);
            bytes[i + at + 4..i + at + 8].copy_from_slice(&claimed);
            patched += 1;
        }
    }
    assert_eq!(patched, 2, "zip layout not as expected");
    fs::write(&path, &bytes).unwrap();
    let err = open_err(&path);
    assert!(err.contains("past the end"), "{err}");
}

// ---- item 4: pickle memory amplification -------------------------------------------------

/// Peak RSS (KiB) and output of `sewa ARGS`, measured with getrusage(RUSAGE_CHILDREN) in a
/// small python parent that has no other children.
fn peak_rss_kib(args: &[&OsStr]) -> (u64, Output) {
    let script = "import resource, subprocess, sys\n\
                  r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)\n\
                  print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)";
    let out = Command::new("python3")
        .args(["-c", script, env!("CARGO_BIN_EXE_sewa")])
        .args(args)
        .output()
        .unwrap();
    let text = stdout(&out);
    let kib = text.split_whitespace().nth(1).and_then(|s| s.parse().ok());
    (kib.unwrap_or_else(|| panic!("no measurement: {text} {}", stderr(&out))), out)
}

#[test]
fn pickle_floods_are_refused_with_memory_bounded_by_their_size() {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small.pt");
    torch_zip(&small, &tensor_pickle(1, &[1], &[1]), &1f32.to_le_bytes());
    let (base, out) = peak_rss_kib(&[os("inspect"), small.as_os_str()]);
    assert!(stdout(&out).starts_with("0 "), "{}", stdout(&out));
    let len = 6 << 20;
    // EMPTY_LIST keeps an object per byte: over the budget's rate, refused as such. NONE
    // keeps a stack slot per byte, within it: it decodes (to None, not a state dict).
    for (what, op, why) in
        [("EMPTY_LIST", b']', "corrupt or hostile"), ("NONE", b'N', "not a dict of tensors")]
    {
        let path = dir.path().join(format!("{what}.pt"));
        let pickle = [&b"\x80\x02"[..], &vec![op; len], b"."].concat();
        torch_zip(&path, &pickle, &[]);
        let (peak, out) = peak_rss_kib(&[os("inspect"), path.as_os_str()]);
        let err = stderr(&out);
        assert!(stdout(&out).starts_with("2 "), "{what}: {} {err}", stdout(&out));
        assert!(err.contains(why), "{what}: {err}");
        eprintln!("{what}: peak {peak} KiB, base {base} KiB");
        // Documented bound: 32 bytes of decoder state per pickle byte, plus allocator slack;
        // unbounded, EMPTY_LIST took ~100 bytes per byte.
        let bound = base + 48 * len as u64 / 1024;
        assert!(peak < bound, "{what}: peak {peak} KiB, bound {bound} KiB (base {base})");
    }
}

// ---- item 12: symlinks inside checkpoint directories ------------------------------------

fn hf_dir(root: &Path, step: u64) -> PathBuf {
    let dir = root.join(format!("checkpoint-{step}"));
    fs::create_dir(&dir).unwrap();
    good_st(&dir.join("model.safetensors"), step as f32);
    fs::write(dir.join("trainer_state.json"), format!("{{\"global_step\": {step}}}")).unwrap();
    fs::write(dir.join("config.json"), "{}").unwrap();
    dir
}

#[test]
fn symlinked_side_files_are_refused_not_copied() {
    let root = tempfile::tempdir().unwrap();
    let secret = root.path().join("secret");
    fs::write(&secret, "TOP SECRET").unwrap();
    let ckpt = hf_dir(root.path(), 7);
    std::os::unix::fs::symlink(&secret, ckpt.join("tokenizer.json")).unwrap();
    let out = root.path().join("avg");
    let o = run_bounded(&[os("average"), os("--out"), out.as_os_str(), ckpt.as_os_str()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("tokenizer.json") && stderr(&o).contains("symbolic link"));
    assert!(!out.join("tokenizer.json").exists(), "the secret was copied");
    // The same directory with a regular tokenizer.json publishes with its side files.
    fs::remove_file(ckpt.join("tokenizer.json")).unwrap();
    fs::write(ckpt.join("tokenizer.json"), "{\"tok\": 1}").unwrap();
    let o = run_bounded(&[os("average"), os("--out"), out.as_os_str(), ckpt.as_os_str()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(fs::read_to_string(out.join("tokenizer.json")).unwrap(), "{\"tok\": 1}");
}

#[test]
fn symlinked_shards_and_weights_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let outside = root.path().join("outside.safetensors");
    good_st(&outside, 3.0);
    // A shard index whose shard is a symlink to a valid file outside the directory.
    let sharded = root.path().join("sharded");
    fs::create_dir(&sharded).unwrap();
    std::os::unix::fs::symlink(&outside, sharded.join("link.safetensors")).unwrap();
    let index = sharded.join("model.safetensors.index.json");
    fs::write(&index, r#"{"weight_map": {"w": "link.safetensors"}}"#).unwrap();
    let err = open_err(&index);
    assert!(err.contains("link.safetensors") && err.contains("symbolic link"), "{err}");
    // A shard below a symlinked subdirectory.
    std::os::unix::fs::symlink(root.path(), sharded.join("sub")).unwrap();
    fs::write(&index, r#"{"weight_map": {"w": "sub/outside.safetensors"}}"#).unwrap();
    let err = open_err(&index);
    assert!(err.contains("symbolic link"), "{err}");
    // An HF directory whose weights are a symlink.
    let ckpt = hf_dir(root.path(), 3);
    fs::remove_file(ckpt.join("model.safetensors")).unwrap();
    std::os::unix::fs::symlink(&outside, ckpt.join("model.safetensors")).unwrap();
    let err = open_err(&ckpt);
    assert!(err.contains("model.safetensors") && err.contains("symbolic link"), "{err}");
}

#[test]
fn a_shard_that_is_not_safetensors_does_not_leak_its_first_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = b"root:x:0:0:root:/root:/bin/bash\n";
    fs::write(dir.path().join("shard.safetensors"), passwd).unwrap();
    let index = dir.path().join("model.safetensors.index.json");
    fs::write(&index, r#"{"weight_map": {"w": "shard.safetensors"}}"#).unwrap();
    let err = open_err(&index);
    let leaked = u64::from_le_bytes(passwd[..8].try_into().unwrap()).to_string();
    assert!(err.contains("not a safetensors file"), "{err}");
    assert!(!err.contains(&leaked), "the first 8 bytes leaked as {leaked}: {err}");
}

// ---- item 14: control characters in names and metadata ----------------------------------

#[test]
fn control_characters_in_names_and_metadata_print_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let evil = "\x1b[31mred\x07\r";
    let path = dir.path().join("evil.safetensors");
    let header = format!(
        r#"{{"__metadata__":{{"note\u001b]0;pwned\u0007":"a\u009bb"}},"{}":{{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}}}"#,
        "\\u001b[31mred\\u0007\\r"
    );
    raw_st(&path, &header, 4);
    let ckpt = Checkpoint::open(&path, &OpenOptions::default()).unwrap();
    assert_eq!(ckpt.tensors()[0].name, evil, "the name itself is kept exactly");
    let o = run_bounded(&[os("inspect"), path.as_os_str()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    for raw in ['\x1b', '\x07', '\r', '\u{9b}'] {
        assert!(!text.contains(raw), "raw {raw:?} in inspect output:\n{text:?}");
    }
    assert!(text.contains("\\x1b[31mred\\x07\\r"), "{text}");
    assert!(text.contains("note\\x1b]0;pwned\\x07: a\\u{9b}b"), "{text}");
    // The same name in an error message (an unsupported dtype names its tensor).
    let bad = dir.path().join("bad\x1b[2J.safetensors");
    raw_st(&bad, &header.replace("F32", "F8_E4M3").replace("[0,4]", "[0,1]"), 1);
    let o = run_bounded(&[os("inspect"), bad.as_os_str()]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(!err.contains('\x1b') && !err.contains('\x07'), "raw controls in {err:?}");
    assert!(err.contains("bad\\x1b[2J.safetensors") && err.contains("\\x1b[31mred"), "{err}");
}

// ---- item 15: as strict as the safetensors library ---------------------------------------

#[test]
fn safetensors_headers_with_duplicates_gaps_or_no_tensors_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let t = |name: &str, a: usize, b: usize| {
        format!(r#""{name}":{{"dtype":"U8","shape":[{}],"data_offsets":[{a},{b}]}}"#, b - a)
    };
    let cases = [
        ("dup_tensor", format!("{{{},{}}}", t("a", 0, 4), t("a", 0, 4)), 4, "appears twice"),
        (
            "dup_meta",
            format!(r#"{{"__metadata__":{{"step":"1","step":"9"}},{}}}"#, t("a", 0, 4)),
            4,
            "appears twice",
        ),
        (
            "dup_field",
            r#"{"a":{"dtype":"U8","dtype":"F32","shape":[4],"data_offsets":[0,4]}}"#.into(),
            4,
            "duplicate field",
        ),
        ("gap", format!("{{{},{}}}", t("a", 0, 4), t("b", 8, 12)), 12, "gap"),
        ("leading_gap", format!("{{{}}}", t("a", 4, 8)), 8, "gap"),
        ("overlap", format!("{{{},{}}}", t("a", 0, 8), t("b", 4, 12)), 12, "overlaps"),
        ("empty", "{}".into(), 0, "no tensors"),
        ("only_meta", r#"{"__metadata__":{"step":"1"}}"#.into(), 0, "no tensors"),
    ];
    for (name, header, data_len, want) in cases {
        let path = dir.path().join(format!("{name}.safetensors"));
        raw_st(&path, &header, data_len);
        let err = open_err(&path);
        assert!(err.contains(want), "{name}: {err}");
        assert!(sewa_checkpoint::quick_check(&path, "").is_err(), "{name}: quick check passed");
    }
    // Zero-size tensors sharing an offset are not a gap or an overlap (the library agrees).
    let ok = dir.path().join("zero_sized.safetensors");
    let header = format!("{{{},{},{}}}", t("a", 0, 0), t("b", 0, 4), t("c", 4, 4));
    raw_st(&ok, &header, 4);
    assert_eq!(Checkpoint::open(&ok, &OpenOptions::default()).unwrap().tensors().len(), 3);
    // An empty model is not averaged into an empty output.
    let empty = dir.path().join("empty.safetensors");
    let out = dir.path().join("avg.safetensors");
    let o = run_bounded(&[os("average"), os("--out"), out.as_os_str(), empty.as_os_str()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(!out.exists());
}
