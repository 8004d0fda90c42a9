//! The `sewa` binary: exit codes, messages naming the file, "nothing written, old output
//! intact" on every error path.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::Dtype;

use crate::average::{f32_bytes, read_tensors, write_st};
use crate::publish::listing;

fn sewa(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sewa")).args(args).env("RUST_LOG", "warn").output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `step_00N00.safetensors` with "w" [2, 3] = value, "b" [3] = value, "steps" i64 = N.
fn ckpt(dir: &Path, n: u32, value: f32) -> PathBuf {
    let p = dir.join(format!("step_{:05}.safetensors", n * 100));
    write_st(
        &p,
        &[
            ("w", Dtype::F32, vec![2, 3], f32_bytes(&[value; 6])),
            ("b", Dtype::F32, vec![3], f32_bytes(&[value; 3])),
            ("steps", Dtype::I64, vec![1], (n as i64 * 100).to_le_bytes().to_vec()),
        ],
    );
    p
}

/// A directory with three good inputs and a previous output plus manifest.
struct Scene {
    dir: tempfile::TempDir,
    inputs: Vec<PathBuf>,
    out: PathBuf,
    old: Vec<u8>,
    old_manifest: Vec<u8>,
}

impl Scene {
    fn new() -> Scene {
        let dir = tempfile::tempdir().unwrap();
        let inputs = (1..=3).map(|n| ckpt(dir.path(), n, n as f32)).collect::<Vec<_>>();
        let out = dir.path().join("avg.safetensors");
        let o = sewa(&["average", "--out", s(&out), s(&inputs[0])]);
        assert!(o.status.success(), "{}", stderr(&o));
        let old = fs::read(&out).unwrap();
        let old_manifest = fs::read(dir.path().join("avg.safetensors.manifest.json")).unwrap();
        Scene { dir, inputs, out, old, old_manifest }
    }

    /// Run `sewa average --out OUT extra... inputs...`.
    fn average(&self, extra: &[&str], inputs: &[&Path]) -> Output {
        let mut args = vec!["average", "--out", s(&self.out)];
        args.extend_from_slice(extra);
        args.extend(inputs.iter().map(|p| s(p)));
        sewa(&args)
    }

    /// Exit 2, the message names `needles`, and nothing changed on disk.
    fn assert_refused(&self, o: &Output, needles: &[&str], files_before: &[String]) {
        let err = stderr(o);
        assert_eq!(o.status.code(), Some(2), "stderr: {err}");
        for n in needles {
            assert!(err.contains(n), "stderr lacks {n:?}: {err}");
        }
        assert_eq!(fs::read(&self.out).unwrap(), self.old, "old output changed");
        let manifest = fs::read(self.dir.path().join("avg.safetensors.manifest.json")).unwrap();
        assert_eq!(manifest, self.old_manifest, "old manifest changed");
        assert_eq!(listing(self.dir.path()), files_before, "files appeared or vanished");
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn average_success_prints_paths_and_writes_average() {
    let sc = Scene::new();
    let ins: Vec<&Path> = sc.inputs.iter().map(|p| p.as_path()).collect();
    let o = sc.average(&["--weights", "1,1,2", "--threads", "2"], &ins);
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("avg.safetensors") && stdout.contains("manifest"), "{stdout}");
    let t = read_tensors(&sc.out);
    assert_eq!(t["w"].1, f32_bytes(&[2.25; 6])); // (1 + 2 + 2*3) / 4
    assert_eq!(t["steps"].1, 300i64.to_le_bytes().to_vec());
}

#[test]
fn last_n_takes_the_latest_steps() {
    let sc = Scene::new();
    // Given out of order: --last 2 must pick steps 200 and 300 → (2 + 3) / 2.
    let ins = [sc.inputs[2].as_path(), sc.inputs[0].as_path(), sc.inputs[1].as_path()];
    let o = sc.average(&["--last", "2", "--dtype", "bf16"], &ins);
    assert!(o.status.success(), "{}", stderr(&o));
    let t = read_tensors(&sc.out);
    assert_eq!(t["w"].0, "BF16 [2, 3]");
    assert_eq!(t["w"].1, half::bf16::from_f32(2.5).to_le_bytes().repeat(6));
}

#[test]
fn truncated_input_is_refused() {
    let sc = Scene::new();
    let bad = sc.dir.path().join("step_00400.safetensors");
    let bytes = fs::read(&sc.inputs[0]).unwrap();
    fs::write(&bad, &bytes[..bytes.len() - 7]).unwrap();
    let before = listing(sc.dir.path());
    let o = sc.average(&[], &[&sc.inputs[0], &bad]);
    sc.assert_refused(&o, &["step_00400.safetensors"], &before);
}

#[test]
fn zero_filled_input_is_refused() {
    let sc = Scene::new();
    let bad = sc.dir.path().join("step_00400.safetensors");
    fs::write(&bad, vec![0u8; fs::metadata(&sc.inputs[0]).unwrap().len() as usize]).unwrap();
    let before = listing(sc.dir.path());
    let o = sc.average(&[], &[&sc.inputs[0], &bad]);
    sc.assert_refused(&o, &["step_00400.safetensors"], &before);
}

#[test]
fn header_lying_about_sizes_is_refused() {
    let sc = Scene::new();
    let bad = sc.dir.path().join("step_00400.safetensors");
    let bytes = fs::read(&sc.inputs[0]).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    // Claim "b" has shape [4] (16 bytes) while its offsets still span 12: same header length.
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    let lie = header.replacen("\"shape\":[3]", "\"shape\":[4]", 1);
    assert_ne!(lie, header, "fixture header changed shape: {header}");
    let mut forged = bytes[..8].to_vec();
    forged.extend_from_slice(lie.as_bytes());
    forged.extend_from_slice(&bytes[8 + n..]);
    fs::write(&bad, forged).unwrap();
    let before = listing(sc.dir.path());
    let o = sc.average(&[], &[&sc.inputs[0], &bad]);
    sc.assert_refused(&o, &["step_00400.safetensors"], &before);
}

#[test]
fn mismatched_shapes_are_refused_naming_both_files() {
    let sc = Scene::new();
    let bad = sc.dir.path().join("step_00400.safetensors");
    write_st(
        &bad,
        &[
            ("w", Dtype::F32, vec![3, 2], f32_bytes(&[1.0; 6])),
            ("b", Dtype::F32, vec![3], f32_bytes(&[1.0; 3])),
            ("steps", Dtype::I64, vec![1], 4i64.to_le_bytes().to_vec()),
        ],
    );
    let before = listing(sc.dir.path());
    let o = sc.average(&[], &[&sc.inputs[0], &bad]);
    sc.assert_refused(
        &o,
        &["step_00400.safetensors", "step_00100.safetensors", "tensor w", "[3, 2]", "[2, 3]"],
        &before,
    );
}

#[test]
fn nan_input_is_refused_naming_file_and_tensor() {
    let sc = Scene::new();
    let bad = sc.dir.path().join("step_00400.safetensors");
    write_st(
        &bad,
        &[
            ("w", Dtype::F32, vec![2, 3], f32_bytes(&[1.0; 6])),
            ("b", Dtype::F32, vec![3], f32_bytes(&[1.0, f32::NAN, 1.0])),
            ("steps", Dtype::I64, vec![1], 4i64.to_le_bytes().to_vec()),
        ],
    );
    let before = listing(sc.dir.path());
    let o = sc.average(&[], &[&sc.inputs[0], &bad]);
    sc.assert_refused(&o, &["step_00400.safetensors", "tensor b", "NaN"], &before);
}

#[test]
fn usage_errors_exit_2_and_write_nothing() {
    let sc = Scene::new();
    let before = listing(sc.dir.path());
    let ins: Vec<&Path> = sc.inputs.iter().map(|p| p.as_path()).collect();
    for (extra, needle) in [
        (&["--weights", "1,2"][..], "2 weights given for 3 inputs"),
        (&["--weights", "1,-2,1"][..], "non-negative"),
        (&["--weights", "0,0,0"][..], "all weights are zero"),
        (&["--dtype", "f8"][..], "f8"),
        (&["--int-policy", "error"][..], "steps"),
        (&["--last", "0"][..], "--last"),
    ] {
        let o = sc.average(extra, &ins);
        sc.assert_refused(&o, &[needle], &before);
    }
    let missing = sc.dir.path().join("nope.safetensors");
    let o = sc.average(&[], &[&sc.inputs[0], &missing]);
    sc.assert_refused(&o, &["nope.safetensors"], &before);
}

#[test]
fn inspect_lists_tensors_and_step() {
    let sc = Scene::new();
    let o = sewa(&["inspect", s(&sc.inputs[1])]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("safetensors") && text.contains("step:    200"), "{text}");
    assert!(text.contains("w ") && text.contains("[2, 3]") && text.contains("i64"), "{text}");
    let o = sewa(&["inspect", "--json", s(&sc.inputs[1])]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["step"], 200);
    assert_eq!(v["tensors"].as_array().unwrap().len(), 3);
    let o = sewa(&["inspect", s(&sc.dir.path().join("absent.pt"))]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("absent.pt"));
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

#[test]
fn torch_inputs_average_and_unreadable_ones_are_refused() {
    let sc = Scene::new();
    let out = sc.dir.path().join("torch.safetensors");
    let (ckpt, pt) = (fixture("lightning.ckpt"), fixture("state_dict.pt"));
    let o = sewa(&["average", "--out", s(&out), s(&ckpt), s(&pt)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(read_tensors(&out), read_tensors(&fixture("state_dict.safetensors")));
    fs::remove_file(&out).unwrap();
    fs::remove_file(sc.dir.path().join("torch.safetensors.manifest.json")).unwrap();

    let before = listing(sc.dir.path());
    for bad in ["legacy.pt", "complex.pt"] {
        let o = sc.average(&[], &[&pt, &fixture(bad)]);
        sc.assert_refused(&o, &[bad], &before);
    }
}

/// VmHWM of a running process, KiB.
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn peak_rss_does_not_grow_with_the_number_of_inputs() {
    // 40 inputs of one 4 MiB tensor: holding their pages would take 160 MiB; streaming with
    // page release keeps the process near accumulator + output buffer + binary.
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..1u32 << 20).flat_map(|i| (i as f32 * 1e-6).to_le_bytes()).collect();
    let inputs: Vec<PathBuf> = (0..40)
        .map(|i| {
            let p = dir.path().join(format!("step_{i:03}.safetensors"));
            write_st(&p, &[("w", Dtype::F32, vec![1 << 20], data.clone())]);
            p
        })
        .collect();
    let out = dir.path().join("avg.safetensors");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sewa"))
        .args(["average", "--out", s(&out)])
        .args(&inputs)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut peak = 0;
    let status = loop {
        peak = peak.max(vm_hwm_kib(child.id()).unwrap_or(0));
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    };
    assert!(status.success());
    // The average of equal inputs is the input, up to f32 rounding of 40 weighted terms.
    let got = &read_tensors(&out)["w"].1;
    for (i, (g, w)) in got.chunks_exact(4).zip(data.chunks_exact(4)).enumerate() {
        let (g, w) =
            (f32::from_le_bytes(g.try_into().unwrap()), f32::from_le_bytes(w.try_into().unwrap()));
        assert!((g - w).abs() <= 1e-5 * w.abs().max(1e-3), "element {i}: {g} vs {w}");
    }
    assert!(peak > 0, "never sampled the child");
    assert!(peak < 80 * 1024, "peak RSS {peak} KiB for 40 x 4 MiB inputs");
}

#[test]
fn missing_shard_and_escaping_shard_path_are_refused() {
    let sc = Scene::new();
    let sharded = sc.dir.path().join("sharded");
    fs::create_dir(&sharded).unwrap();
    write_st(
        &sharded.join("model-00001-of-00002.safetensors"),
        &[("w", Dtype::F32, vec![2, 3], f32_bytes(&[1.0; 6]))],
    );
    let index = |second: &str| {
        serde_json::json!({
            "metadata": {"total_size": 44},
            "weight_map": {"w": "model-00001-of-00002.safetensors", "b": second, "steps": second},
        })
        .to_string()
    };
    let index_path = sharded.join("model.safetensors.index.json");
    let before = listing(sc.dir.path());
    for (second, needle) in [
        ("model-00002-of-00002.safetensors", "model-00002-of-00002"),
        ("../step_00100.safetensors", "../"),
    ] {
        fs::write(&index_path, index(second)).unwrap();
        let o = sc.average(&[], &[&sc.inputs[0], &index_path]);
        sc.assert_refused(&o, &[needle], &before);
    }
}

/// An f16 export beside f32 checkpoints (and an f64 one) used to be refused even with an output
/// dtype given; with `--dtype` each input is decoded in its own dtype. Without it the error says
/// how to proceed.
#[test]
fn mixed_float_dtypes_average_when_an_output_dtype_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let vals = [0.5f32, -1.25, 3.0, 1024.0];
    let f16: Vec<u8> =
        vals.iter().flat_map(|v| half::f16::from_f32(*v + 1.0).to_le_bytes()).collect();
    let f64b: Vec<u8> = vals.iter().flat_map(|v| (*v as f64 - 2.0).to_le_bytes()).collect();
    let a = dir.path().join("step_1.safetensors");
    let b = dir.path().join("step_2.safetensors");
    let c = dir.path().join("step_3.safetensors");
    write_st(&a, &[("w", Dtype::F32, vec![4], f32_bytes(&vals))]);
    write_st(&b, &[("w", Dtype::F16, vec![4], f16)]);
    write_st(&c, &[("w", Dtype::F64, vec![4], f64b)]);
    let out = dir.path().join("avg.safetensors");
    let o = sewa(&["average", "--out", s(&out), s(&a), s(&b)]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--dtype f32"), "{}", stderr(&o));
    for (inputs, want) in [(vec![&a, &b], 0.5f64), (vec![&a, &b, &c], -1.0 / 3.0)] {
        let mut args = vec!["average", "--dtype", "f32", "--out", s(&out)];
        args.extend(inputs.iter().map(|p| s(p)));
        let o = sewa(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let (dtype, bytes) = read_tensors(&out)["w"].clone();
        assert_eq!(dtype, "F32 [4]");
        let got: Vec<f32> =
            bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        for (g, v) in got.iter().zip(vals) {
            let expect = v as f64 + want;
            let tol = 1e-6 * expect.abs().max(1.0);
            assert!((*g as f64 - expect).abs() < tol, "{got:?} vs {vals:?} + {want}");
        }
    }
}
