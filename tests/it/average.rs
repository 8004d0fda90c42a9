//! Averaging real checkpoint files end to end through the library (the kernel's numerics are
//! checked against the f64 twin in the unit tests; here: formats, dtypes, policies, files).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;

use safetensors::Dtype;

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Every tensor of a safetensors file: name → ("dtype shape", bytes).
pub fn read_tensors(path: &Path) -> BTreeMap<String, (String, Vec<u8>)> {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, (format!("{:?} {:?}", v.dtype(), v.shape()), v.data().to_vec())))
        .collect()
}

/// Write a safetensors file with the safetensors crate: `(name, dtype, shape, bytes)`.
pub fn write_st(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (n.to_string(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None::<HashMap<String, String>>, path).unwrap();
}

use sewa_checkpoint::{Checkpoint, OpenOptions};
use sewa_engine::average::{AverageOptions, AveragePlan};
use sewa_engine::manifest::{Manifest, Provenance};
use sewa_engine::publish::{PublishOptions, publish};

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn open(p: &Path) -> Checkpoint {
    Checkpoint::open(p, &OpenOptions::default()).unwrap_or_else(|e| panic!("{e}"))
}

/// Uniform average of `inputs` published at `out` with default options.
fn average_to(inputs: &[&Checkpoint], out: &Path, shard_bytes: u64) -> Manifest {
    let plan = AveragePlan::new(inputs.to_vec(), None, AverageOptions::default()).unwrap();
    let why = Provenance {
        method: "uniform".into(),
        why: "test".into(),
        loss: None,
        details: Default::default(),
    };
    publish(&plan, out, why, &PublishOptions { shard_bytes }, &mut |_| {}).unwrap().manifest
}

#[test]
fn torch_zip_equals_its_safetensors_twin() {
    // The same weights (f32, f16, bf16, f64, i64, i32, bool, tied and strided views) as a
    // torch.save zip and as safetensors: their average is each of them, bit for bit.
    let (pt, st) = (open(&fixture("state_dict.pt")), open(&fixture("state_dict.safetensors")));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("avg.safetensors");
    let m = average_to(&[&pt, &st], &out, u64::MAX);
    assert_eq!(read_tensors(&out), read_tensors(&fixture("state_dict.safetensors")));
    assert_eq!(m.inputs[0].format, "torch-zip");
    assert_eq!(m.int_source.as_deref(), Some(st.path()), "no steps: latest = last given");
}

#[test]
fn lightning_ckpt_and_protocol_4_pickle_equal_the_twin() {
    let st = open(&fixture("state_dict.safetensors"));
    let want = read_tensors(&fixture("state_dict.safetensors"));
    for name in ["lightning.ckpt", "state_dict_p4.pt"] {
        let other = open(&fixture(name));
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("avg.safetensors");
        average_to(&[&other, &st], &out, u64::MAX);
        assert_eq!(read_tensors(&out), want, "{name}");
    }
}

fn hf_checkpoint(root: &Path, step: u32, value: f32, side: &str) -> std::path::PathBuf {
    let dir = root.join(format!("checkpoint-{step}"));
    fs::create_dir(&dir).unwrap();
    write_st(&dir.join("model.safetensors"), &[("w", Dtype::F32, vec![3], f32_bytes(&[value; 3]))]);
    fs::write(dir.join("config.json"), format!("{{\"from\": \"{side}\"}}")).unwrap();
    fs::write(dir.join("tokenizer.json"), side).unwrap();
    fs::write(dir.join("optimizer.pt"), "not copied").unwrap();
    fs::write(dir.join("trainer_state.json"), format!("{{\"global_step\": {step}}}")).unwrap();
    dir
}

#[test]
fn hf_directories_in_directory_out_with_side_files() {
    let root = tempfile::tempdir().unwrap();
    // Given newest first: side files must still come from the highest step.
    let new = open(&hf_checkpoint(root.path(), 200, 3.0, "new"));
    let old = open(&hf_checkpoint(root.path(), 100, 1.0, "old"));
    let out = root.path().join("averaged");
    let m = average_to(&[&new, &old], &out, u64::MAX);
    assert_eq!(
        crate::publish::listing(&out),
        ["config.json", "manifest.json", "model.safetensors", "tokenizer.json"]
    );
    assert_eq!(fs::read_to_string(out.join("tokenizer.json")).unwrap(), "new");
    assert_eq!(read_tensors(&out.join("model.safetensors"))["w"].1, f32_bytes(&[2.0; 3]));
    assert_eq!(m.side_files, ["config.json", "tokenizer.json"]);
    assert_eq!(m.side_source.as_deref(), Some(root.path().join("checkpoint-200").as_path()));
    assert_eq!(m.inputs[0].step, Some(200));
    // The published directory is itself a valid input (what `from_pretrained(PATH)` reads).
    assert_eq!(open(&out).tensors(), new.tensors());
}

#[test]
fn sharded_output_reads_back_as_sharded_input() {
    let (pt, st) = (open(&fixture("state_dict.pt")), open(&fixture("state_dict.safetensors")));
    let dir = tempfile::tempdir().unwrap();
    let sharded = dir.path().join("sharded");
    let m = average_to(&[&pt, &st], &sharded, 64);
    assert!(m.files.len() > 3, "expected several shards: {:?}", m.files);
    let reopened = open(&sharded);
    let out = dir.path().join("again.safetensors");
    average_to(&[&reopened, &st], &out, u64::MAX);
    assert_eq!(read_tensors(&out), read_tensors(&fixture("state_dict.safetensors")));
}

#[test]
fn input_rewritten_in_place_is_refused_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.safetensors"), dir.path().join("b.safetensors"));
    write_st(&a, &[("w", Dtype::F32, vec![3], f32_bytes(&[1.0; 3]))]);
    write_st(&b, &[("w", Dtype::F32, vec![3], f32_bytes(&[2.0; 3]))]);
    let (ca, cb) = (open(&a), open(&b));
    // Rewrite b in place (same size, as torch.save or safetensors <= 0.7 would) after opening.
    let f = fs::OpenOptions::new().write(true).open(&b).unwrap();
    f.set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
    let plan = AveragePlan::new(vec![&ca, &cb], None, AverageOptions::default()).unwrap();
    let err = plan.average_tensor(0, &mut Default::default()).unwrap_err();
    assert!(err.is_bad_input() && err.to_string().contains("b.safetensors"), "{err}");
    assert!(err.to_string().contains("changed on disk"), "{err}");
}

/// Peak RSS (KiB) of `sewa ARGS`, from getrusage(RUSAGE_CHILDREN) in a small python parent
/// that has no other children (never by sampling /proc), and whether it succeeded.
fn sewa_peak_rss_kib(args: &[&std::ffi::OsStr]) -> (u64, bool, String) {
    let script = "import resource, subprocess, sys\n\
                  r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)\n\
                  print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n\
                  sys.stdout.write(r.stderr.decode(errors='replace'))";
    let out = std::process::Command::new("python3")
        .args(["-c", script, env!("CARGO_BIN_EXE_sewa")])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut words = text.split_whitespace();
    let ok = words.next() == Some("0");
    let kib = words.next().and_then(|w| w.parse().ok());
    (kib.unwrap_or_else(|| panic!("no measurement: {text}")), ok, text)
}

#[test]
fn peak_rss_is_bounded_whatever_the_largest_tensor() {
    // Two inputs holding one 32 MiB bf16 tensor: the whole-tensor path held an f32
    // accumulator and an output buffer of the tensor (96 MiB, over 100 MiB of RSS with the
    // binary); streamed window by window, `sewa average` stays under 64 MiB (the bound
    // for any tensor is 96 MiB) and writes the kernel's bytes.
    let dir = tempfile::tempdir().unwrap();
    let (n, period) = (16 << 20, 4096);
    let value = |i: u16, k: u16| half::bf16::from_f32(f32::from(k) * 0.01 - f32::from(i) * 1.5);
    let inputs: Vec<std::path::PathBuf> = (0..2u16)
        .map(|i| {
            let pattern: Vec<u8> = (0..period).flat_map(|k| value(i, k).to_le_bytes()).collect();
            let p = dir.path().join(format!("step_{i}.safetensors"));
            write_st(&p, &[("embed", Dtype::BF16, vec![n], pattern.repeat(n / period as usize))]);
            p
        })
        .collect();
    let out = dir.path().join("avg.safetensors");
    let args = [std::ffi::OsStr::new("average"), "--out".as_ref(), out.as_os_str()];
    let args: Vec<&std::ffi::OsStr> =
        args.into_iter().chain(inputs.iter().map(|p| p.as_os_str())).collect();
    let (kib, ok, text) = sewa_peak_rss_kib(&args);
    assert!(ok, "sewa average failed: {text}");
    assert!(kib < 64 * 1024, "peak RSS {kib} KiB for one 32 MiB tensor (bound 64 MiB)");
    // The kernel's arithmetic, element by element: f32 `w * x0`, then `+ w * x1`, as bf16
    // (bit-identity with the whole-tensor path on every dtype is the unit tests' business).
    let want: Vec<u8> = (0..period)
        .flat_map(|k| {
            let a = 0.5f32 * value(0, k).to_f32();
            half::bf16::from_f32(a + 0.5f32 * value(1, k).to_f32()).to_le_bytes()
        })
        .collect();
    let got = &read_tensors(&out)["embed"].1;
    assert_eq!(got.len(), n * 2);
    assert!(got.chunks(want.len()).all(|c| c == want), "output differs from the kernel's");
}
