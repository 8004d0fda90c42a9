//! Checkpoint readers, validation and identity, on real files: safetensors written here with
//! the safetensors crate, torch/Lightning fixtures from `scripts/make_fixtures.py`.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use safetensors::Dtype as SDtype;
use safetensors::tensor::TensorView;
use sewa_checkpoint::{
    Checkpoint, DType, Format, Identity, OpenOptions, is_temp_name, parse_step, quick_check,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

fn open(p: &Path) -> sewa_checkpoint::Result<Checkpoint> {
    Checkpoint::open(p, &OpenOptions::default())
}

/// The error message of a failed open, which must name the file.
fn open_err(p: &Path) -> String {
    let msg = match open(p) {
        Ok(_) => panic!("{} opened but should not", p.display()),
        Err(e) => e.to_string(),
    };
    assert!(msg.contains(&p.display().to_string()), "error does not name the file: {msg}");
    msg
}

type T = (&'static str, SDtype, Vec<usize>, Vec<u8>);

fn write_st(path: &Path, tensors: &[T], meta: Option<&[(&str, &str)]>) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let meta = meta
        .map(|m| m.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>());
    safetensors::serialize_to_file(views, meta, path).unwrap();
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn sample() -> Vec<T> {
    let f16: Vec<u8> =
        [1.5f32, -2.0].iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect();
    let bf16: Vec<u8> =
        [0.25f32, 3.0, -1.0].iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect();
    vec![
        ("w.f32", SDtype::F32, vec![2, 2], f32s(&[1.0, 2.0, 3.0, 4.0])),
        ("w.f16", SDtype::F16, vec![2], f16),
        ("w.bf16", SDtype::BF16, vec![3, 1], bf16),
        ("w.f64", SDtype::F64, vec![1], 2.5f64.to_le_bytes().to_vec()),
        ("n.i64", SDtype::I64, vec![], 500i64.to_le_bytes().to_vec()),
        ("m.bool", SDtype::BOOL, vec![2], vec![1, 0]),
    ]
}

#[test]
fn safetensors_file_opens_and_reads_every_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.safetensors");
    write_st(&p, &sample(), Some(&[("step", "7"), ("note", "hi")]));
    let ck = open(&p).unwrap();
    assert_eq!(ck.format(), Format::Safetensors);
    let names: Vec<_> = ck.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["m.bool", "n.i64", "w.bf16", "w.f16", "w.f32", "w.f64"]);
    for (name, dtype, shape, bytes) in sample() {
        let t = ck.tensor(name).unwrap();
        assert_eq!(t.dtype.to_safetensors(), dtype, "{name}");
        assert_eq!(t.shape, shape, "{name}");
        assert_eq!(&*ck.data(name).unwrap(), bytes.as_slice(), "{name}");
        // Read on demand from the file, in pieces as small as one element of any dtype.
        assert!(ck.reader(name).unwrap().in_memory().is_none(), "{name} held in memory");
        let mut pieces = Vec::new();
        ck.for_each_chunk(name, 8, &mut Vec::new(), |offset, b| {
            assert_eq!(offset, pieces.len());
            pieces.extend_from_slice(b);
            Ok(())
        })
        .unwrap();
        assert_eq!(pieces, bytes, "{name} in pieces");
    }
    assert_eq!(ck.tensor("n.i64").unwrap().dtype, DType::I64);
    assert_eq!(ck.step(), Some(7), "step from metadata");
    assert_eq!(ck.metadata()["note"], "hi");
    assert!(ck.still_valid());
    assert!(ck.data("nope").is_err());
}

#[test]
fn step_from_name_wins_over_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("step_0000042.safetensors");
    write_st(&p, &sample(), Some(&[("step", "7")]));
    assert_eq!(open(&p).unwrap().step(), Some(42));
    let g = dir.path().join("model.safetensors");
    write_st(&g, &sample(), Some(&[("global_step", "9")]));
    assert_eq!(open(&g).unwrap().step(), Some(9), "global_step metadata");
}

#[test]
fn orig_mod_prefix_is_stripped_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("compiled.safetensors");
    let t: Vec<T> = vec![
        ("_orig_mod.fc.weight", SDtype::F32, vec![1], f32s(&[1.0])),
        ("head.bias", SDtype::F32, vec![1], f32s(&[2.0])),
    ];
    write_st(&p, &t, None);
    let ck = open(&p).unwrap();
    let names: Vec<_> = ck.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["fc.weight", "head.bias"]);
    assert_eq!(ck.renamed_keys(), [("_orig_mod.fc.weight".to_string(), "fc.weight".to_string())]);
    assert_eq!(&*ck.data("fc.weight").unwrap(), f32s(&[1.0]).as_slice());
    // Without stripping, the original names stay.
    let raw = Checkpoint::open(&p, &OpenOptions { strip_prefixes: vec![], ..Default::default() })
        .unwrap();
    assert!(raw.tensor("_orig_mod.fc.weight").is_some());

    let c = dir.path().join("collide.safetensors");
    let t: Vec<T> = vec![
        ("_orig_mod.a", SDtype::F32, vec![1], f32s(&[1.0])),
        ("a", SDtype::F32, vec![1], f32s(&[2.0])),
    ];
    write_st(&c, &t, None);
    assert!(open_err(&c).contains("both become"));
}

/// Every tensor of `a` equals the same tensor of `b` (names, dtypes, shapes, bytes).
fn assert_same_tensors(a: &Checkpoint, b: &Checkpoint) {
    assert_eq!(a.tensors(), b.tensors());
    for t in a.tensors() {
        assert_eq!(a.data(&t.name).unwrap(), b.data(&t.name).unwrap(), "{}", t.name);
    }
}

#[test]
fn torch_pt_equals_safetensors_twin() {
    let pt = open(&fixture("state_dict.pt")).unwrap();
    let st = open(&fixture("state_dict.safetensors")).unwrap();
    assert_eq!(pt.format(), Format::TorchZip);
    assert_same_tensors(&pt, &st);
    let dtypes: Vec<_> =
        ["fc1.weight", "half.weight", "bf.weight", "dbl.weight", "bn.num_batches_tracked"]
            .iter()
            .map(|n| pt.tensor(n).unwrap().dtype)
            .collect();
    assert_eq!(dtypes, [DType::F32, DType::F16, DType::BF16, DType::F64, DType::I64]);
    assert_eq!(pt.tensor("bn.num_batches_tracked").unwrap().shape, Vec::<usize>::new());
    assert_eq!(&*pt.data("bn.num_batches_tracked").unwrap(), 500i64.to_le_bytes().as_slice());
    // Tied pair: both keys, same bytes. Transposed view: made contiguous.
    assert_eq!(pt.data("embed.weight").unwrap(), pt.data("lm_head.weight").unwrap());
    assert_eq!(pt.tensor("proj.weight").unwrap().shape, [2, 3]);
    let want: Vec<f32> = vec![10.0, 12.0, 14.0, 11.0, 13.0, 15.0];
    assert_eq!(&*pt.data("proj.weight").unwrap(), f32s(&want).as_slice());
    assert_eq!(
        &*pt.data("tail.weight").unwrap(),
        f32s(&[104.0, 105.0, 106.0, 107.0, 108.0, 109.0]).as_slice()
    );
    assert!(pt.still_valid());
}

#[test]
fn pickle_protocol_4_reads_the_same() {
    let p4 = open(&fixture("state_dict_p4.pt")).unwrap();
    assert_same_tensors(&p4, &open(&fixture("state_dict.safetensors")).unwrap());
}

#[test]
fn checkpoints_can_move_between_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Checkpoint>();
}

#[test]
fn lightning_ckpt_reads_state_dict() {
    let ck = open(&fixture("lightning.ckpt")).unwrap();
    let st = open(&fixture("state_dict.safetensors")).unwrap();
    assert_eq!(ck.format(), Format::Lightning);
    assert_same_tensors(&ck, &st);
    assert_eq!(ck.step(), Some(500), "global_step");
    assert_eq!(ck.metadata()["epoch"], "3");
    assert_eq!(ck.metadata()["pytorch-lightning_version"], "2.4.0");
    // ModelCheckpoint's current_score (a 0-d f32 tensor read from the zip) and its monitor.
    assert_eq!(ck.metadata()["metric"].parse::<f32>().unwrap(), 0.3);
    assert_eq!(ck.metadata()["metric_name"], "val_loss");
}

fn write_sharded(dir: &Path, map: &[(&str, &str)]) -> PathBuf {
    write_st(&dir.join("model-00001-of-00002.safetensors"), &sample()[..3], None);
    write_st(&dir.join("model-00002-of-00002.safetensors"), &sample()[3..], None);
    let wm: serde_json::Map<_, _> =
        map.iter().map(|(t, s)| (t.to_string(), serde_json::Value::from(*s))).collect();
    let index = serde_json::json!({"metadata": {"total_size": 60}, "weight_map": wm});
    let p = dir.join("model.safetensors.index.json");
    fs::write(&p, serde_json::to_vec(&index).unwrap()).unwrap();
    p
}

fn good_map() -> Vec<(&'static str, &'static str)> {
    let names: Vec<&'static str> = sample().iter().map(|t| t.0).collect();
    names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            (
                *n,
                if i < 3 {
                    "model-00001-of-00002.safetensors"
                } else {
                    "model-00002-of-00002.safetensors"
                },
            )
        })
        .collect()
}

#[test]
fn sharded_index_opens_all_shards() {
    let dir = tempfile::tempdir().unwrap();
    let idx = write_sharded(dir.path(), &good_map());
    let ck = open(&idx).unwrap();
    assert_eq!(ck.format(), Format::ShardedSafetensors);
    assert_eq!(ck.tensors().len(), 6);
    for (name, _, _, bytes) in sample() {
        assert_eq!(&*ck.data(name).unwrap(), bytes.as_slice(), "{name}");
    }
    assert_eq!(ck.metadata()["total_size"], "60");
    quick_check(&idx, "").unwrap();
}

#[test]
fn sharded_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let mut map = good_map();
    map[0].1 = "model-00003-of-00003.safetensors";
    let idx = write_sharded(dir.path(), &map);
    let msg = open_err(&idx);
    assert!(msg.contains("model-00003-of-00003.safetensors is missing"), "{msg}");
    assert!(quick_check(&idx, "").is_err());

    for evil in ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"] {
        let mut map = good_map();
        map[0].1 = evil;
        let idx = write_sharded(dir.path(), &map);
        let msg = open_err(&idx);
        assert!(msg.contains("leaves the checkpoint directory"), "{evil}: {msg}");
    }

    let mut map = good_map();
    map[0].1 = "model-00002-of-00002.safetensors"; // tensor not in that shard
    let idx = write_sharded(dir.path(), &map);
    let msg = open(&idx).err().unwrap().to_string();
    assert!(msg.contains("tensor w.f32"), "{msg}");
    assert!(msg.contains("not in this shard"), "{msg}");
}

fn trainer_state(dir: &Path, step: u64, eval_loss: f64) {
    let s = serde_json::json!({
        "global_step": step, "best_metric": 0.1,
        "log_history": [
            {"loss": 1.0, "step": step - 1},
            {"eval_loss": eval_loss, "eval_accuracy": 0.5, "eval_runtime": 1.5, "step": step},
            {"train_runtime": 10.0, "step": step}
        ]
    });
    fs::write(dir.join("trainer_state.json"), s.to_string()).unwrap();
}

#[test]
fn hf_dir_single_sharded_and_bin() {
    let root = tempfile::tempdir().unwrap();
    let single = root.path().join("checkpoint-100");
    fs::create_dir(&single).unwrap();
    write_st(&single.join("model.safetensors"), &sample(), None);
    fs::write(single.join("config.json"), "{}").unwrap();
    assert!(
        quick_check(&single, "trainer_state.json")
            .unwrap_err()
            .to_string()
            .contains("trainer_state.json")
    );
    trainer_state(&single, 100, 0.75);
    quick_check(&single, "trainer_state.json").unwrap();
    let ck = open(&single).unwrap();
    assert_eq!(ck.format(), Format::HfDir);
    assert_eq!(ck.step(), Some(100));
    assert_eq!(ck.side_dir(), Some(single.as_path()));
    assert_eq!(ck.metadata()["metric"], "0.75");
    assert_eq!(ck.metadata()["metric_name"], "eval_loss");
    assert_eq!(ck.metadata()["eval_loss"], "0.75");
    assert_eq!(ck.metadata()["eval_accuracy"], "0.5");
    assert_eq!(ck.metadata()["metric_step"], "100");
    assert_eq!(ck.tensors().len(), 6);

    let sharded = root.path().join("final"); // no step in the name: trainer_state gives it
    fs::create_dir(&sharded).unwrap();
    write_sharded(&sharded, &good_map());
    trainer_state(&sharded, 300, 0.5);
    let ck = open(&sharded).unwrap();
    assert_eq!((ck.format(), ck.step()), (Format::HfDir, Some(300)));
    assert_eq!(&*ck.data("w.f32").unwrap(), f32s(&[1.0, 2.0, 3.0, 4.0]).as_slice());
    fs::remove_file(sharded.join("model-00002-of-00002.safetensors")).unwrap();
    assert!(quick_check(&sharded, "trainer_state.json").is_err());

    let bin = root.path().join("checkpoint-200");
    fs::create_dir(&bin).unwrap();
    fs::copy(fixture("state_dict.pt"), bin.join("pytorch_model.bin")).unwrap();
    trainer_state(&bin, 200, 0.5);
    quick_check(&bin, "trainer_state.json").unwrap();
    let ck = open(&bin).unwrap();
    assert_eq!((ck.format(), ck.step()), (Format::HfDir, Some(200)));
    assert_same_tensors(&ck, &open(&fixture("state_dict.safetensors")).unwrap());

    let empty = root.path().join("checkpoint-300");
    fs::create_dir(&empty).unwrap();
    assert!(open_err(&empty).contains("no model weights"));
}

#[test]
fn truncated_and_zero_filled_safetensors_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.safetensors");
    write_st(&good, &sample(), None);
    let bytes = fs::read(&good).unwrap();

    let cut = dir.path().join("cut.safetensors");
    fs::write(&cut, &bytes[..bytes.len() - 3]).unwrap();
    assert!(open_err(&cut).contains("truncated"));
    assert!(quick_check(&cut, "").is_err());

    let tiny = dir.path().join("tiny.safetensors");
    fs::write(&tiny, &bytes[..5]).unwrap();
    assert!(open_err(&tiny).contains("truncated"));

    let zeros = dir.path().join("zeros.safetensors");
    fs::write(&zeros, vec![0u8; bytes.len()]).unwrap();
    assert!(open_err(&zeros).contains("zero-filled"));
    let msg = quick_check(&zeros, "").unwrap_err().to_string();
    assert!(msg.contains("zeros.safetensors") && msg.contains("zero-filled"), "{msg}");

    let long = dir.path().join("long.safetensors");
    let mut extra = bytes.clone();
    extra.extend_from_slice(&[0; 4]);
    fs::write(&long, &extra).unwrap();
    assert!(open_err(&long).contains("trailing bytes"));
    quick_check(&good, "").unwrap();
}

/// A safetensors file with a hand-written header.
fn raw_st(path: &Path, header: &str, data_len: usize) {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend(std::iter::repeat_n(0u8, data_len));
    fs::write(path, out).unwrap();
}

#[test]
fn lying_header_and_unsupported_dtype_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let lie = dir.path().join("lie.safetensors");
    raw_st(&lie, r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}"#, 8);
    let msg = open_err(&lie);
    assert!(msg.contains("tensor w") && msg.contains("lies about sizes"), "{msg}");

    let overlap = dir.path().join("overlap.safetensors");
    raw_st(
        &overlap,
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
        12,
    );
    assert!(open_err(&overlap).contains("overlap"));

    let fp8 = dir.path().join("fp8.safetensors");
    write_st(&fp8, &[("q.weight", SDtype::F8_E4M3, vec![4], vec![1, 2, 3, 4])], None);
    let msg = open_err(&fp8);
    assert!(msg.contains("tensor q.weight") && msg.contains("F8_E4M3 is not supported"), "{msg}");

    let garbage = dir.path().join("garbage.safetensors");
    raw_st(&garbage, "{not json", 0);
    assert!(open_err(&garbage).contains("not valid JSON"));
}

#[test]
fn torch_error_paths() {
    let msg = open_err(&fixture("legacy.pt"));
    assert!(msg.contains("legacy") && msg.contains("_use_new_zipfile_serialization=True"), "{msg}");
    assert!(quick_check(&fixture("legacy.pt"), "").is_err());

    let msg = open_err(&fixture("complex.pt"));
    assert!(
        msg.contains("tensor z") && msg.contains("ComplexFloatStorage is not supported"),
        "{msg}"
    );

    let dir = tempfile::tempdir().unwrap();
    let bytes = fs::read(fixture("state_dict.pt")).unwrap();
    let half = dir.path().join("half.pt");
    fs::write(&half, &bytes[..bytes.len() / 2]).unwrap();
    assert!(open_err(&half).contains("still being written"));
    let msg = quick_check(&half, "").unwrap_err().to_string();
    assert!(msg.contains("half.pt") && msg.contains("incomplete"), "{msg}");
    quick_check(&fixture("state_dict.pt"), "").unwrap();
    quick_check(&fixture("lightning.ckpt"), "").unwrap();

    let zeros = dir.path().join("zeros.pt");
    fs::write(&zeros, vec![0u8; bytes.len()]).unwrap();
    assert!(open_err(&zeros).contains("not a torch zip"));
    assert!(quick_check(&zeros, "").is_err());
}

#[test]
fn in_place_rewrite_is_detected_and_rename_over_is_safe() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("last.safetensors");
    write_st(&p, &sample(), None);
    let id0 = Identity::of(&p).unwrap();
    let ck = open(&p).unwrap();
    assert_eq!(ck.identity(), &id0);
    assert_eq!(Identity::of(&p).unwrap(), id0, "identity is stable");

    // Rename a new file over the path: the held inode is untouched and still readable.
    let other = dir.path().join(".tmpnew");
    write_st(&other, &sample(), Some(&[("v", "2")]));
    fs::rename(&other, &p).unwrap();
    assert!(ck.still_valid(), "rename-over does not invalidate the open file");
    assert_ne!(Identity::of(&p).unwrap(), id0, "but the path now holds something else");
    assert_eq!(&*ck.data("w.f32").unwrap(), f32s(&[1.0, 2.0, 3.0, 4.0]).as_slice());

    // In-place rewrite of the file we hold: same size, new bytes, new mtime.
    let ck = open(&p).unwrap();
    let len = fs::metadata(&p).unwrap().len() as usize;
    let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &vec![0u8; len], 0).unwrap();
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5)).unwrap();
    assert!(!ck.still_valid(), "in-place rewrite must be detected");
    assert_ne!(Identity::of(&p).unwrap(), *ck.identity());

    // Same for torch files, which are read on demand.
    let pt = dir.path().join("model.pt");
    fs::copy(fixture("state_dict.pt"), &pt).unwrap();
    let ck = open(&pt).unwrap();
    assert!(ck.still_valid());
    fs::OpenOptions::new().append(true).open(&pt).unwrap().set_len(10).unwrap();
    assert!(!ck.still_valid());
}

#[test]
fn directory_identity_tracks_weight_files() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("checkpoint-5");
    fs::create_dir(&ck).unwrap();
    write_st(&ck.join("model.safetensors"), &sample(), None);
    let a = Identity::of(&ck).unwrap();
    assert_eq!(a, Identity::of(&ck).unwrap());
    fs::write(ck.join("notes.txt"), "ignored").unwrap();
    assert_eq!(a, Identity::of(&ck).unwrap(), "non-weight files do not count");
    trainer_state(&ck, 5, 1.0);
    let b = Identity::of(&ck).unwrap();
    assert_ne!(a, b, "the marker counts");
    let tmp = ck.join(".tmpX");
    write_st(&tmp, &sample(), None);
    fs::rename(&tmp, ck.join("model.safetensors")).unwrap();
    assert_ne!(b, Identity::of(&ck).unwrap(), "replaced weights change the identity");
}

/// Whether this process has `path` mapped, from /proc/self/smaps.
fn is_mapped(path: &Path) -> bool {
    let want = fs::canonicalize(path).unwrap().display().to_string();
    let smaps = fs::read_to_string("/proc/self/smaps").unwrap();
    smaps.lines().any(|line| line.ends_with(&want))
}

/// Reading tensors leaves none of the file's pages in our memory: nothing is mapped, so RSS
/// does not grow with the inputs (and truncation cannot SIGBUS us, see faults::reads).
#[test]
fn tensor_reads_map_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big.safetensors");
    let big = vec![1u8; 16 << 20];
    write_st(&p, &[("big", SDtype::U8, vec![big.len()], big)], None);
    let ck = open(&p).unwrap();
    let mut sum = 0u64;
    ck.for_each_chunk("big", 1 << 20, &mut Vec::new(), |_, b| {
        sum += b.iter().map(|&x| x as u64).sum::<u64>();
        Ok(())
    })
    .unwrap();
    assert_eq!(sum, 16 << 20);
    assert_eq!(ck.data("big").unwrap().len(), 16 << 20);
    assert!(!is_mapped(&p), "the checkpoint file is mapped");
}

/// The names real trainers write, as the watcher sees them (more cases in `names.rs`).
#[test]
fn step_and_temp_names_of_real_writers() {
    let steps = [
        ("checkpoint-500", Some(500)),           // HF Trainer
        ("epoch=3-step=500.ckpt", Some(500)),    // Lightning
        ("step=500.ckpt", Some(500)),            // Lightning, custom filename
        ("step_0000500.safetensors", Some(500)), // custom loops
        ("model_500.safetensors", Some(500)),
        ("global_step500", Some(500)), // DeepSpeed
        ("iter_0000500", Some(500)),   // Megatron-LM
        ("last.ckpt", None),
        ("model-00001-of-00003.safetensors", None),
    ];
    for (name, want) in steps {
        assert_eq!(parse_step(name), want, "{name}");
    }
    let temps = [".tmpA8f3kq", "tmp-checkpoint-500", "model.pt.part", "x.safetensors.tmp"];
    for name in temps {
        assert!(is_temp_name(name), "{name}");
    }
    assert!(!is_temp_name("checkpoint-500") && !is_temp_name("epoch=3-step=500.ckpt"));
}

/// Megatron-LM `torch_dist` (`iter_NNNNNNN/`, written by megatron-core itself: see
/// `scripts/make_megatron_fixtures.py`): the model's ShardedTensor keys, with the bytes torch
/// read back from the same files; Adam's moments (`optimizer.state.*`) skipped; `common.pt`
/// (pickled args) never read. A DCP directory without megatron-core's files stays DCP.
#[test]
fn megatron_torch_dist_reads_the_models_keys_as_torch_does() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("iter_0000010");
    fs::create_dir(&dir).unwrap();
    for e in fs::read_dir(fixture("megatron/run/iter_0000010")).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    // Whatever common.pt holds, it is not opened: here, not even a pickle.
    fs::write(dir.join("common.pt"), b"\x80\x04not a pickle").unwrap();
    let ck = open(&dir).unwrap();
    assert_eq!(ck.format(), Format::Megatron);
    assert_eq!(parse_step("iter_0000010"), Some(10));
    let want = open(&fixture("megatron/expected/iter_0000010.safetensors")).unwrap();
    let mut got: Vec<_> = ck.tensors().to_vec();
    got.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(got, want.tensors());
    for t in want.tensors() {
        assert_eq!(ck.data(&t.name).unwrap(), want.data(&t.name).unwrap(), "{}", t.name);
    }
    assert!(ck.tensors().iter().all(|t| !t.name.starts_with("optimizer.")));
    assert_eq!(ck.metadata()["megatron_backend"], "torch_dist 1");
    // Another tool's metadata.json beside a plain DCP checkpoint does not make it Megatron.
    let titan = tmp.path().join("step-10");
    fs::create_dir(&titan).unwrap();
    for e in fs::read_dir(fixture("dcp/torchtitan/step-10")).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), titan.join(e.file_name())).unwrap();
    }
    fs::write(titan.join("metadata.json"), br#"{"format": "dcp", "step": 10}"#).unwrap();
    assert_eq!(open(&titan).unwrap().format(), Format::Dcp);
    // Unfinished: megatron-core writes metadata.json last.
    fs::remove_file(dir.join("metadata.json")).unwrap();
    let err = quick_check(&dir, "").unwrap_err().to_string();
    assert!(err.contains("metadata.json") && err.contains("not there yet"), "{err}");
    assert!(open_err(&dir).contains("not there yet"));
}
