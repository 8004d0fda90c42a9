//! DeepSpeed ZeRO checkpoints written by DeepSpeed itself (scripts/make_ds_peft_fixtures.py:
//! CPU, gloo, two ranks, bf16, ZeRO-2 and ZeRO-3, steps 2 and 4), read by `sewa inspect`,
//! `average` and `watch` and compared with what DeepSpeed's own zero_to_fp32.py and torch
//! computed when the fixtures were made (tests/fixtures/deepspeed/expected.safetensors).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::average::read_tensors;
use crate::watch::Daemon;

pub(crate) fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

pub(crate) fn sewa(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sewa")).args(args).env("RUST_LOG", "warn").output().unwrap()
}

pub(crate) fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub(crate) fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Little-endian tensor bytes of dtype `dtype` (as safetensors' Debug names it) as f64.
fn decode(dtype: &str, b: &[u8]) -> Vec<f64> {
    match dtype {
        "F32" => {
            b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect()
        }
        "BF16" => b
            .chunks_exact(2)
            .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16) as f64)
            .collect(),
        "I64" => {
            b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect()
        }
        other => panic!("dtype {other} not expected in these fixtures"),
    }
}

/// Every tensor of `out` equals `expected`'s `prefix.<name>` (same dtype and shape, values
/// within `rel` of each other relative to their size), and `out` has no other tensor.
pub(crate) fn assert_matches(out: &Path, expected: &Path, prefix: &str, rel: f64) {
    let got = read_tensors(out);
    let want: BTreeMap<String, _> = read_tensors(expected)
        .into_iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(&format!("{prefix}."))?.to_string(), v)))
        .collect();
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{prefix}");
    for (name, (desc, bytes)) in &got {
        let (wdesc, wbytes) = &want[name];
        assert_eq!(desc, wdesc, "{prefix}.{name}: dtype and shape");
        let dtype = desc.split(' ').next().unwrap();
        for (g, w) in decode(dtype, bytes).iter().zip(decode(dtype, wbytes)) {
            assert!((g - w).abs() <= rel * w.abs().max(1e-3), "{prefix}.{name}: {g} vs {w}");
        }
    }
}

fn expected() -> PathBuf {
    fixture("deepspeed/expected.safetensors")
}

fn steps(stage: &str) -> [PathBuf; 2] {
    [
        fixture(&format!("deepspeed/{stage}/global_step2")),
        fixture(&format!("deepspeed/{stage}/global_step4")),
    ]
}

/// `sewa average --out DIR/avg.safetensors extra... inputs...`, which must succeed.
fn average(dir: &Path, extra: &[&str], inputs: &[PathBuf]) -> PathBuf {
    let out = dir.join("avg.safetensors");
    let mut args = vec!["average", "--out", s(&out)];
    args.extend_from_slice(extra);
    args.extend(inputs.iter().map(|p| s(p)));
    let o = sewa(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    out
}

#[test]
fn zero2_module_weights_average_like_torch() {
    let tmp = tempfile::tempdir().unwrap();
    let out = average(tmp.path(), &[], &steps("z2"));
    // The module is bf16 here (the fp32 masters are elsewhere): the average stays bf16.
    assert_matches(&out, &expected(), "z2_module", 0.0);
    let o = sewa(&["inspect", "--json", s(&steps("z2")[1])]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((v["format"].as_str(), v["step"].as_u64()), (Some("deepspeed"), Some(4)));
}

#[test]
fn zero2_fp32_masters_match_zero_to_fp32() {
    let tmp = tempfile::tempdir().unwrap();
    let out = average(tmp.path(), &["--deepspeed-weights", "fp32"], &steps("z2"));
    assert_matches(&out, &expected(), "z2_fp32", 0.0);
    // One input is a conversion; the parent directory is read through its `latest` tag.
    let one = tempfile::tempdir().unwrap();
    let out = average(one.path(), &["--deepspeed-weights", "fp32"], &[fixture("deepspeed/z2")]);
    assert_matches(&out, &expected(), "z2_fp32_step4", 0.0);
}

#[test]
fn zero3_fp32_masters_match_zero_to_fp32() {
    let tmp = tempfile::tempdir().unwrap();
    let out = average(tmp.path(), &["--deepspeed-weights", "fp32"], &steps("z3"));
    assert_matches(&out, &expected(), "z3_fp32", 0.0);
}

#[test]
fn zero3_module_placeholders_are_refused_pointing_to_fp32() {
    let dir = &steps("z3")[0];
    let o = sewa(&["inspect", s(dir)]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains(s(dir)) && err.contains("--deepspeed-weights fp32"), "{err}");
}

/// A copy of `deepspeed/<stage>/global_step2` in a temp dir, to break.
fn copy_step(stage: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("global_step2");
    copy_dir(&steps(stage)[0], &dir);
    (tmp, dir)
}

pub(crate) fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn fp32_inspect_fails(path: &Path) -> String {
    let o = sewa(&["inspect", "--deepspeed-weights", "fp32", s(path)]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    stderr(&o)
}

#[test]
fn missing_rank_file_is_named() {
    for stage in ["z2", "z3"] {
        let (_tmp, dir) = copy_step(stage);
        fs::remove_file(dir.join("bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt")).unwrap();
        let err = fp32_inspect_fails(&dir);
        assert!(
            err.contains(s(&dir)) && err.contains("zero_pp_rank_1_mp_rank_00_optim_states.pt"),
            "{err}"
        );
    }
    // ZeRO-3 also needs every rank's model states; a gap in the ranks is named too.
    let (_tmp, dir) = copy_step("z3");
    fs::remove_file(dir.join("zero_pp_rank_0_mp_rank_00_model_states.pt")).unwrap();
    let err = fp32_inspect_fails(&dir);
    assert!(err.contains("rank 0"), "{err}");
}

#[test]
fn short_rank_file_is_refused_naming_it() {
    for stage in ["z2", "z3"] {
        let (_tmp, dir) = copy_step(stage);
        let victim = dir.join("bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt");
        let len = fs::metadata(&victim).unwrap().len();
        fs::OpenOptions::new().write(true).open(&victim).unwrap().set_len(len / 2).unwrap();
        let err = fp32_inspect_fails(&dir);
        assert!(err.contains(s(&victim)), "{err}");
        // The watcher's completeness check refuses it the same way (still being written).
        let o = sewa(&[
            "average",
            "--deepspeed-weights",
            "fp32",
            "--out",
            s(&dir.with_file_name("o.safetensors")),
            s(&dir),
        ]);
        assert_eq!(o.status.code(), Some(2));
    }
}

#[test]
fn watch_publishes_the_fp32_average_of_zero3_steps() {
    let cfg = "deepspeed_weights = \"fp32\"\n[select]\nmethod = \"uniform\"\n";
    let mut d = Daemon::start(cfg);
    // DeepSpeed writes into global_stepN/ then `latest`; copy each step beside the watched
    // directory and rename it in, so the watcher sees whole directories.
    for step in steps("z3") {
        let staged = d.tmp.path().join(step.file_name().unwrap());
        copy_dir(&step, &staged);
        fs::rename(&staged, d.runs.join(step.file_name().unwrap())).unwrap();
    }
    let m = d.wait_published(&[2, 4]);
    assert!(m["inputs"].as_array().unwrap().iter().all(|i| i["format"] == "deepspeed"), "{m:#}");
    assert_matches(&d.model_file(), &expected(), "z3_fp32", 1e-6);
}

#[test]
fn quick_check_waits_for_every_rank_the_weights_need() {
    use sewa_checkpoint::{DeepSpeedWeights, OpenOptions, quick_check_with};
    let fp32 = OpenOptions { deepspeed_weights: DeepSpeedWeights::Fp32, ..Default::default() };
    let module = OpenOptions::default();
    let (_tmp, dir) = copy_step("z2");
    assert!(quick_check_with(&dir, "trainer_state.json", &fp32).is_ok(), "no HF marker needed");
    let rank1 = dir.join("bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt");
    let full = fs::read(&rank1).unwrap();
    fs::write(&rank1, &full[..full.len() - 100]).unwrap(); // still being written: no end record
    let err = quick_check_with(&dir, "", &fp32).unwrap_err().to_string();
    assert!(err.contains(s(&rank1)), "{err}");
    assert!(quick_check_with(&dir, "", &module).is_ok(), "the module alone is complete");
    fs::remove_file(&rank1).unwrap();
    assert!(quick_check_with(&dir, "", &fp32).is_err());
    fs::write(&rank1, &full).unwrap();
    assert!(quick_check_with(&dir, "", &fp32).is_ok());
    let model = dir.join("mp_rank_00_model_states.pt");
    let full = fs::read(&model).unwrap();
    fs::write(&model, &full[..full.len() / 2]).unwrap();
    assert!(quick_check_with(&dir, "", &module).is_err());
}

#[test]
fn watch_publishes_the_module_average_of_zero2_steps_written_in_place() {
    let mut d = Daemon::start("[select]\nmethod = \"uniform\"\n");
    // Written file by file into global_stepN/ and `latest` last, as DeepSpeed does; the
    // watcher's quiet period and completeness check decide when a step is whole.
    for step in steps("z2") {
        copy_dir(&step, &d.runs.join(step.file_name().unwrap()));
        fs::write(d.runs.join("latest"), step.file_name().unwrap().as_encoded_bytes()).unwrap();
    }
    let m = d.wait_published(&[2, 4]);
    assert!(m["inputs"].as_array().unwrap().iter().all(|i| i["format"] == "deepspeed"), "{m:#}");
    assert_matches(&d.model_file(), &expected(), "z2_module", 0.0);
}

#[test]
fn rewriting_a_rank_file_changes_the_step_directory_identity() {
    use sewa_checkpoint::Identity;
    let (_tmp, dir) = copy_step("z2");
    let before = Identity::of(&dir).unwrap();
    // Same size, new bytes and mtime: DeepSpeed re-saving the same tag.
    let rank1 = dir.join("bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt");
    let bytes = fs::read(&rank1).unwrap();
    fs::remove_file(&rank1).unwrap();
    fs::write(&rank1, &bytes).unwrap();
    let f = fs::File::options().write(true).open(&rank1).unwrap();
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5)).unwrap();
    assert_ne!(Identity::of(&dir).unwrap(), before);
}

#[test]
fn latest_never_leads_out_of_the_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    fs::create_dir(&run).unwrap();
    // A tag that is a symlink to a step elsewhere, then a tag that climbs out.
    std::os::unix::fs::symlink(&steps("z2")[1], run.join("global_step4")).unwrap();
    fs::write(run.join("latest"), "global_step4").unwrap();
    let o = sewa(&["inspect", s(&run)]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("not a directory here"), "{}", stderr(&o));
    fs::write(run.join("latest"), "../z2/global_step4").unwrap();
    let o = sewa(&["inspect", s(&run)]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("not a plain directory name"), "{}", stderr(&o));
}

/// Issue 19, item 8: `latest = "evil/"` (or `evil/.`) with `evil` a symlink to another run's
/// step used to pass: the trailing `/` made the "not a symlink" check look through the link.
/// The tag must be one plain directory name, spelled exactly.
#[test]
fn issue19_latest_with_a_trailing_separator_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    fs::create_dir(&run).unwrap();
    std::os::unix::fs::symlink(&steps("z2")[1], run.join("evil")).unwrap();
    copy_dir(&steps("z2")[1], &run.join("global_step4"));
    for tag in ["evil/", "evil/.", "evil//", "./evil", "global_step4/", ".", ".."] {
        fs::write(run.join("latest"), tag).unwrap();
        let o = sewa(&["inspect", s(&run)]);
        assert_eq!(o.status.code(), Some(2), "{tag}: {}", stderr(&o));
        assert!(stderr(&o).contains("not a plain directory name"), "{tag}: {}", stderr(&o));
    }
    fs::write(run.join("latest"), "global_step4\n").unwrap();
    let o = sewa(&["inspect", s(&run)]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Rewrite the torch zip `file` with `from` replaced by `to` in its pickle (entries stored,
/// as torch writes them; the CRCs are recomputed).
fn patch_pickle(file: &Path, from: &[u8], to: &[u8]) {
    use std::io::{Read, Write};
    let mut zip = zip::ZipArchive::new(fs::File::open(file).unwrap()).unwrap();
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for i in 0..zip.len() {
        let mut e = zip.by_index(i).unwrap();
        let name = e.name().unwrap().to_string();
        let mut bytes = Vec::new();
        e.read_to_end(&mut bytes).unwrap();
        if name.ends_with("data.pkl") {
            let at = bytes.windows(from.len()).position(|w| w == from).unwrap();
            bytes.splice(at..at + from.len(), to.iter().copied());
        }
        out.start_file(name, stored).unwrap();
        out.write_all(&bytes).unwrap();
    }
    fs::write(file, out.finish().unwrap().into_inner()).unwrap();
}

/// Issue 19, item 14: rank files that state different world sizes. `average` used to read
/// them (the optimizer states' count won) while `watch` waited forever for ranks the model
/// states promised. One rule now: every rank file must state the same world size, else the
/// checkpoint is refused naming two files that differ — by `average`, and by `watch`, which
/// quarantines it.
#[test]
fn issue19_inconsistent_world_sizes_are_refused_by_average_and_quarantined_by_watch() {
    use sewa_checkpoint::{DeepSpeedWeights, OpenOptions, quick_check_with};
    let fp32 = OpenOptions { deepspeed_weights: DeepSpeedWeights::Fp32, ..Default::default() };
    let z2_model = "mp_rank_00_model_states.pt";
    let z3_optim1 = "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt";
    // (stage, file changed, its pickle bytes before and after, the file it disagrees with)
    let cases = [
        (
            "z2",
            z2_model,
            &b"dp_world_sizeq\xa0K\x02"[..],
            &b"dp_world_sizeq\xa0K\x04"[..],
            "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
        ),
        (
            "z3",
            z3_optim1,
            b"partition_countq\x0fK\x02",
            b"partition_countq\x0fK\x01",
            "zero_pp_rank_0_mp_rank_00_model_states.pt",
        ),
    ];
    for (stage, file, from, to, other) in cases {
        let (_tmp, dir) = copy_step(stage);
        patch_pickle(&dir.join(file), from, to);
        assert!(quick_check_with(&dir, "", &fp32).is_ok(), "{stage}: nothing to wait for");
        let out = dir.with_file_name("o.safetensors");
        let o = sewa(&["average", "--deepspeed-weights", "fp32", "--out", s(&out), s(&dir)]);
        assert_eq!(o.status.code(), Some(2), "{stage}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(err.contains("world size") && err.contains(file), "{stage}: {err}");
        assert!(err.contains(other), "{stage}: {err}");
    }
    let mut d = Daemon::start("deepspeed_weights = \"fp32\"\n[select]\nmethod = \"uniform\"\n");
    let staged = d.tmp.path().join("global_step2");
    copy_dir(&steps("z2")[0], &staged);
    patch_pickle(&staged.join(z2_model), cases[0].2, cases[0].3);
    fs::rename(&staged, d.runs.join("global_step2")).unwrap();
    let start = std::time::Instant::now();
    loop {
        let q = d.status().map(|s| s["quarantined"].to_string()).unwrap_or_default();
        if q.contains("world size") {
            break;
        }
        assert!(d.alive(), "sewa exited:\n{}", d.log());
        assert!(start.elapsed() < crate::watch::DEADLINE, "never quarantined: {q}\n{}", d.log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    d.terminate();
}
