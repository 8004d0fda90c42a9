//! Megatron-LM `torch_dist` checkpoints (issue 22, item 3), on fixtures written by the real
//! megatron-core package (`scripts/make_megatron_fixtures.py`: a tiny GPTModel, tensor
//! parallelism 2 over gloo, bf16 and f32 parameters, Adam moments as `optimizer.state.*`
//! ShardedTensors) and compared with what torch.distributed.checkpoint itself read from the
//! same files (`tests/fixtures/megatron/expected/`). Hostile directories are copies of
//! `iter_0000010/` with one thing changed.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::average::read_tensors;
use crate::dcp::{assert_same_tensors, average, refused, sewa, stderr};
use crate::watch::Daemon;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/megatron").join(rel)
}

const ITER_10: &str = "run/iter_0000010";
const ITER_20: &str = "run/iter_0000020";

/// A copy of a fixture directory (its `.metadata` included) at `to`.
fn copy_to(rel: &str, to: &Path) -> PathBuf {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(fixture(rel)).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    to.to_path_buf()
}

/// Same names, dtypes, shapes and bytes as what torch read from the same files.
fn assert_same_as_torch(made: &Path, expected: &str) {
    assert_same_tensors(made, &fixture("expected").join(expected));
}

fn names(v: &serde_json::Value) -> Vec<String> {
    let tensors = v["tensors"].as_array().unwrap();
    tensors.iter().map(|t| t["name"].as_str().unwrap().to_string()).collect()
}

#[test]
fn inspect_shows_the_models_sharded_tensor_keys_and_skips_the_optimizer() {
    let o = sewa(&["inspect", "--json"], &[&fixture(ITER_10)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((v["format"].as_str(), v["step"].as_u64()), (Some("megatron"), Some(10)), "{v}");
    let want: Vec<String> =
        read_tensors(&fixture("expected/iter_0000010.safetensors")).into_keys().collect();
    assert_eq!(names(&v), want, "the model's keys as megatron-core saved them, nothing else");
    assert!(want.contains(&"decoder.layers.self_attention.linear_qkv.weight".to_string()));
    let md = &v["metadata"];
    assert_eq!(md["megatron_backend"], "torch_dist 1");
    assert_eq!(md["dcp_ranks"], "2");
    // exp_avg and exp_avg_sq of all 17 parameters.
    assert_eq!(md["dcp_skipped_tensors"], "34");
    // Layers stacked on a leading axis, each layer's [48, 16] split over the 2 TP ranks.
    let qkv = v["chunks"]["decoder.layers.self_attention.linear_qkv.weight"].as_array().unwrap();
    assert_eq!(qkv.len(), 4);
    let ranks: Vec<u64> = qkv.iter().map(|c| c["rank"].as_u64().unwrap()).collect();
    assert_eq!(ranks.iter().filter(|&&r| r == 1).count(), 2, "{qkv:?}");
    // The optimizer's moments are there for whoever names them.
    let o = sewa(
        &["inspect", "--json", "--state-key", "optimizer.state.exp_avg"],
        &[&fixture(ITER_10)],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(names(&v), want);
}

#[test]
fn averages_of_megatron_checkpoints_match_torch_reading_the_same_files() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("avg.safetensors");
    average(&out, &[&fixture(ITER_10), &fixture(ITER_20)]);
    assert_same_as_torch(&out, "avg.safetensors");
    // One input: the torch_dist → safetensors conversion.
    let one = tmp.path().join("iter10.safetensors");
    average(&one, &[&fixture(ITER_10)]);
    assert_same_as_torch(&one, "iter_0000010.safetensors");
}

#[test]
fn unfinished_and_hostile_megatron_directories_are_refused_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let case = |name: &str| copy_to(ITER_10, &tmp.path().join(name).join("iter_0000010"));
    // Megatron writes metadata.json last, with a plain json.dump.
    let unfinished = case("unfinished");
    fs::remove_file(unfinished.join("metadata.json")).unwrap();
    refused(&unfinished, "metadata.json", "is not there yet");
    let torn = case("torn");
    fs::write(torn.join("metadata.json"), br#"{"sharded_backend": "torch_d"#).unwrap();
    refused(&torn, "metadata.json", "incomplete JSON");
    let zarr = case("zarr");
    fs::write(zarr.join("metadata.json"), br#"{"sharded_backend": "zarr"}"#).unwrap();
    refused(&zarr, "metadata.json", "\"zarr\"");
    let big = case("big");
    let f = fs::OpenOptions::new().write(true).open(big.join("metadata.json")).unwrap();
    f.set_len(64 << 20).unwrap(); // sparse: refused by its size, not read
    refused(&big, "metadata.json", "larger than");
    // A rank file cut short (the model's chunks come first in each file).
    let short = case("short");
    let f = fs::OpenOptions::new().write(true).open(short.join("__0_0.distcp")).unwrap();
    f.set_len(1000).unwrap();
    refused(&short, "__0_0.distcp", "truncated");
    // megatron-core's own .metadata (with its all_local_plans), edited by torch.
    let escape = case("escape");
    fs::copy(fixture("errors/escape.metadata"), escape.join(".metadata")).unwrap();
    fs::write(tmp.path().join("escape").join("escape.distcp"), vec![0u8; 1 << 16]).unwrap();
    refused(&escape, "escape.distcp", "not a plain name");
    // 2^40 elements claimed: refused from the file sizes, nothing of that size allocated.
    let huge = case("huge");
    fs::copy(fixture("errors/huge.metadata"), huge.join(".metadata")).unwrap();
    refused(&huge, ".metadata", "too few");
    // The watcher's check says the same before anything is opened.
    for (dir, says) in
        [(&unfinished, "not there yet"), (&torn, "incomplete"), (&short, "truncated")]
    {
        let err = sewa_checkpoint::quick_check(dir, "").unwrap_err().to_string();
        assert!(err.contains(says), "{err}");
    }
}

/// Copy `rel` into `to` in the order megatron-core writes it, up to (not including)
/// `metadata.json`: `common.pt`, the rank files, `.metadata` by rename.
fn write_like_megatron_core(rel: &str, to: &Path) {
    fs::create_dir(to).unwrap();
    fs::copy(fixture(rel).join("common.pt"), to.join("common.pt")).unwrap();
    for e in fs::read_dir(fixture(rel)).unwrap() {
        let e = e.unwrap();
        if e.file_name().to_string_lossy().ends_with(".distcp") {
            fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
    fs::copy(fixture(rel).join(".metadata"), to.join(".metadata.tmp")).unwrap();
    fs::rename(to.join(".metadata.tmp"), to.join(".metadata")).unwrap();
}

/// Poll the status file until `dir` is recorded as incomplete for a reason containing `why`.
fn wait_incomplete(d: &mut Daemon, dir: &Path, why: &str) {
    let start = Instant::now();
    loop {
        let status = d.status().unwrap_or_default();
        let listed = status["quarantined"].as_array().into_iter().flatten().find(|q| {
            q["path"].as_str().is_some_and(|p| Path::new(p).ends_with(dir.file_name().unwrap()))
        });
        if let Some(q) = listed.filter(|q| q["reason"].as_str().is_some_and(|r| r.contains(why))) {
            assert_eq!(q["incomplete"], true, "{q}");
            return;
        }
        assert!(d.alive(), "sewa exited:\n{}", d.log());
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{} never recorded as incomplete ({why}): {status:#}\n{}",
            dir.display(),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The save directory of a Megatron-LM run: `iter_NNNNNNN/` filled as megatron-core fills
/// it, `metadata.json` last (first torn, as a plain `json.dump` leaves it mid-write), then the
/// tracker file. Nothing is read before `metadata.json` is complete; the tracker is no
/// candidate; the published average is torch's.
#[test]
fn watch_publishes_megatron_iterations_once_megatron_core_has_finished_them() {
    let mut d = Daemon::start("[select]\nmethod = \"lawa\"\nk = 2\n");
    let tracker = d.runs.join("latest_checkpointed_iteration.txt");
    let first = d.runs.join("iter_0000010");
    write_like_megatron_core(ITER_10, &first);
    wait_incomplete(&mut d, &first, "is not there yet");
    let config = fs::read(fixture(ITER_10).join("metadata.json")).unwrap();
    fs::write(first.join("metadata.json"), &config[..config.len() / 2]).unwrap();
    wait_incomplete(&mut d, &first, "incomplete JSON");
    fs::write(first.join("metadata.json"), &config).unwrap();
    fs::write(&tracker, "10").unwrap();
    let second = d.runs.join("iter_0000020");
    write_like_megatron_core(ITER_20, &second);
    fs::copy(fixture(ITER_20).join("metadata.json"), second.join("metadata.json")).unwrap();
    fs::write(&tracker, "20").unwrap();
    let m = d.wait_published(&[10, 20]);
    assert_eq!(m["inputs"][0]["format"], "megatron", "{m:#}");
    assert_same_as_torch(&d.model_file(), "avg.safetensors");
    let status = d.status().unwrap();
    let listed = status["quarantined"].as_array().unwrap();
    assert!(listed.iter().all(|q| !q["path"].to_string().contains("latest_")), "{status:#}");
    d.terminate();
}
