//! Publisher: file and directory outputs, shards, manifest, atomic replacement, failure safety.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use sewa_checkpoint::{Checkpoint, DType};
use sewa_engine::average::{AverageOptions, AveragePlan};
use sewa_engine::manifest::{Manifest, Provenance};
use sewa_engine::publish::{PublishOptions, manifest_path, publish};

use crate::average::{f32_bytes, read_tensors};

/// Three inputs, steps 100/200/300: "a.weight" [4, 3] f32, "b.bias" [5] f32, "n" [1] i64.
/// Input i holds value i + 1 everywhere, except a NaN in `nan_in`'s "b.bias" if given.
pub fn inputs(nan_in: Option<usize>) -> Vec<Checkpoint> {
    (0..3)
        .map(|i| {
            let v = i as f32 + 1.0;
            let mut bias = vec![v; 5];
            if nan_in == Some(i) {
                bias[2] = f32::NAN;
            }
            let t = vec![
                ("a.weight".to_string(), DType::F32, vec![4, 3], f32_bytes(&[v; 12])),
                ("b.bias".to_string(), DType::F32, vec![5], f32_bytes(&bias)),
                ("n".to_string(), DType::I64, vec![1], (10 * i as i64).to_le_bytes().to_vec()),
            ];
            Checkpoint::from_memory(
                format!("run/step-{}.safetensors", (i + 1) * 100),
                Some((i as u64 + 1) * 100),
                t,
            )
            .unwrap()
        })
        .collect()
}

fn why() -> Provenance {
    Provenance {
        method: "test".into(),
        why: "because".into(),
        loss: Some(0.5),
        details: serde_json::json!({"k": 2}),
    }
}

fn run(
    ckpts: &[Checkpoint],
    weights: Option<&[f64]>,
    out: &Path,
    opts: &PublishOptions,
) -> sewa_engine::Result<()> {
    let plan = AveragePlan::new(ckpts.iter().collect(), weights, AverageOptions::default())?;
    publish(&plan, out, why(), opts, &mut |_| {}).map(|_| ())
}

/// Names in `dir`, sorted (to assert that no temp file or directory was left behind).
pub fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn file_output_with_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("avg.safetensors");
    run(&inputs(None), Some(&[1.0, 1.0, 2.0]), &out, &PublishOptions::default()).unwrap();

    let t = read_tensors(&out);
    // (1 + 2 + 2*3) / 4 = 2.25
    assert_eq!(t["a.weight"].1, f32_bytes(&[2.25; 12]));
    assert_eq!(t["n"].1, 20i64.to_le_bytes().to_vec(), "int policy latest: step 300");
    assert_eq!(mode(&out), 0o644);
    let bytes = fs::read(&out).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let md = meta.metadata().clone().unwrap();
    assert_eq!(md["format"], "pt");
    assert_eq!(md["sewa_method"], "test");
    assert_eq!(md["sewa_steps"], "100,200,300");

    let mpath = dir.path().join("avg.safetensors.manifest.json");
    assert_eq!(manifest_path(&out), mpath);
    assert_eq!(mode(&mpath), 0o644);
    let m: Manifest = serde_json::from_slice(&fs::read(&mpath).unwrap()).unwrap();
    assert_eq!(m.layout, "file");
    assert_eq!(m.files[0].bytes, bytes.len() as u64);
    assert_eq!(m.inputs.len(), 3);
    // Paths are made absolute so the manifest can be read from any directory.
    let cwd = std::env::current_dir().unwrap();
    assert_eq!(m.inputs[1].path, cwd.join("run/step-200.safetensors"));
    assert_eq!(m.output, out);
    assert_eq!(m.inputs[1].step, Some(200));
    assert_eq!(m.inputs[1].format, "memory");
    assert_eq!(m.weights, vec![0.25, 0.25, 0.5]);
    assert_eq!(m.selection.method, "test");
    assert_eq!(m.selection.loss, Some(0.5));
    assert_eq!(m.dtype, "keep");
    assert_eq!(m.int_policy, "latest");
    assert_eq!(m.int_source, Some(cwd.join("run/step-300.safetensors")));
    assert_eq!(m.sewa_version, env!("CARGO_PKG_VERSION"));
    for ts in [&m.started, &m.finished] {
        assert!(
            ts.len() >= 20 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
            "not RFC 3339: {ts}"
        );
    }
    assert!(m.started <= m.finished && m.wall_time_s >= 0.0);
    assert!(m.notes.iter().any(|n| n.contains("BatchNorm")));
    assert_eq!(listing(dir.path()), ["avg.safetensors", "avg.safetensors.manifest.json"]);
}

#[test]
fn nan_mid_stream_leaves_old_file_and_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("avg.safetensors");
    run(&inputs(None), None, &out, &PublishOptions::default()).unwrap();
    let (old, old_manifest) = (fs::read(&out).unwrap(), fs::read(manifest_path(&out)).unwrap());

    // "a.weight" is averaged and written before "b.bias" holds the NaN: a real mid-stream failure.
    let err = run(&inputs(Some(1)), None, &out, &PublishOptions::default()).unwrap_err();
    assert!(err.is_bad_input(), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("run/step-200.safetensors") && msg.contains("b.bias"), "{msg}");
    assert_eq!(fs::read(&out).unwrap(), old);
    assert_eq!(fs::read(manifest_path(&out)).unwrap(), old_manifest);
    assert_eq!(listing(dir.path()), ["avg.safetensors", "avg.safetensors.manifest.json"]);
}

#[test]
fn republishing_a_file_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("avg.safetensors");
    run(&inputs(None), Some(&[1.0, 0.0, 0.0]), &out, &PublishOptions::default()).unwrap();
    run(&inputs(None), Some(&[0.0, 0.0, 1.0]), &out, &PublishOptions::default()).unwrap();
    assert_eq!(read_tensors(&out)["a.weight"].1, f32_bytes(&[3.0; 12]));
    assert_eq!(listing(dir.path()), ["avg.safetensors", "avg.safetensors.manifest.json"]);
}

#[test]
fn directory_output_single_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("averaged");
    run(&inputs(None), None, &out, &PublishOptions::default()).unwrap();
    assert_eq!(listing(&out), ["manifest.json", "model.safetensors"]);
    assert_eq!(read_tensors(&out.join("model.safetensors"))["a.weight"].1, f32_bytes(&[2.0; 12]));
    assert_eq!(mode(&out.join("model.safetensors")), 0o644);
    let m: Manifest =
        serde_json::from_slice(&fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m.layout, "dir");
    assert_eq!(listing(dir.path()), ["averaged"]);
}

#[test]
fn sharded_directory_output_equals_single_file() {
    let dir = tempfile::tempdir().unwrap();
    let single = dir.path().join("single.safetensors");
    let sharded = dir.path().join("sharded");
    run(&inputs(None), None, &single, &PublishOptions::default()).unwrap();
    // 48 + 20 + 8 bytes of tensors with a 50-byte threshold: a.weight | b.bias + n.
    run(&inputs(None), None, &sharded, &PublishOptions { shard_bytes: 50 }).unwrap();
    assert_eq!(
        listing(&sharded),
        [
            "manifest.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json"
        ]
    );
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(sharded.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    assert_eq!(index["metadata"]["total_size"], 76);
    let want = read_tensors(&single);
    let mut got = std::collections::BTreeMap::new();
    for (name, shard) in index["weight_map"].as_object().unwrap() {
        let shard_tensors = read_tensors(&sharded.join(shard.as_str().unwrap()));
        got.insert(name.clone(), shard_tensors[name].clone());
    }
    assert_eq!(got, want);
}

#[test]
fn directory_republish_swaps_and_failure_keeps_old() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("averaged");
    run(&inputs(None), Some(&[1.0, 0.0, 0.0]), &out, &PublishOptions::default()).unwrap();
    run(&inputs(None), Some(&[0.0, 1.0, 0.0]), &out, &PublishOptions::default()).unwrap();
    assert_eq!(read_tensors(&out.join("model.safetensors"))["a.weight"].1, f32_bytes(&[2.0; 12]));
    // The replaced directory stays whole for its readers until the next publication.
    assert_eq!(listing(dir.path()), [".averaged.sewa-prev", "averaged"]);
    let previous = dir.path().join(".averaged.sewa-prev/model.safetensors");
    assert_eq!(read_tensors(&previous)["a.weight"].1, f32_bytes(&[1.0; 12]));

    let before = fs::read(out.join("model.safetensors")).unwrap();
    let manifest = fs::read(out.join("manifest.json")).unwrap();
    assert!(
        run(&inputs(Some(0)), None, &out, &PublishOptions::default()).unwrap_err().is_bad_input()
    );
    assert_eq!(fs::read(out.join("model.safetensors")).unwrap(), before);
    assert_eq!(fs::read(out.join("manifest.json")).unwrap(), manifest);
    let names = listing(dir.path());
    assert_eq!(
        names,
        [".averaged.sewa-prev", "averaged"],
        "temp directory removed after the failure"
    );
}

#[test]
fn refuses_to_replace_a_foreign_directory() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("runs");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("precious.txt"), "do not delete").unwrap();
    let err = run(&inputs(None), None, &out, &PublishOptions::default()).unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("not written by sewa"), "{err}");
    assert_eq!(listing(&out), ["precious.txt"]);
    assert_eq!(listing(dir.path()), ["runs"]);
}

#[test]
fn file_output_onto_a_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.safetensors");
    fs::create_dir(&out).unwrap();
    let err = run(&inputs(None), None, &out, &PublishOptions::default()).unwrap_err();
    assert!(err.to_string().contains("is a directory"), "{err}");
}
