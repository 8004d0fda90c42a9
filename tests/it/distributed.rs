//! `sewa average --distributed`: real processes of the built binary, launched as torchrun or
//! srun would (one per rank, the rank in flags or the launcher's variables), writing one output
//! on this file system. 1, 2 and 4 ranks give the single-process tensors bit for bit; a rank
//! killed with SIGKILL at random points leaves the previous output whole, and a rerun
//! recovers; ranks that disagree, damaged shards and planted links are refused.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use safetensors::Dtype;

use crate::average::{read_tensors, write_st};

type Tensors = BTreeMap<String, (String, Vec<u8>)>;

/// `n` HF checkpoint directories `checkpoint-S` (a config.json beside the weights) with
/// tensors of several dtypes and sizes; `scale` multiplies the element counts.
fn inputs(root: &Path, n: usize, scale: usize) -> Vec<PathBuf> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    (0..n)
        .map(|i| {
            let dir = root.join(format!("checkpoint-{}", (i + 1) * 10));
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("config.json"), b"{\"model_type\": \"toy\"}").unwrap();
            let mut f32s = |len: usize| -> Vec<u8> {
                (0..len).flat_map(|_| rng.random_range(-1.0f32..1.0).to_le_bytes()).collect()
            };
            let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = (0..9)
                .map(|l| {
                    let len = (l + 1) * 1000 * scale;
                    (format!("layers.{l}.weight"), Dtype::F32, vec![len], f32s(len))
                })
                .collect();
            let bf16: Vec<u8> = f32s(3000 * scale)
                .chunks(4)
                .flat_map(|c| [c[2], c[3]]) // the top half of an f32 is a bf16
                .collect();
            tensors.push(("embed.weight".into(), Dtype::BF16, vec![3000 * scale], bf16));
            tensors.push(("steps".into(), Dtype::I64, vec![1], (i as i64).to_le_bytes().to_vec()));
            let views: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> =
                tensors.iter().map(|(n, d, s, b)| (n.as_str(), *d, s.clone(), b.clone())).collect();
            write_st(&dir.join("model.safetensors"), &views);
            dir
        })
        .collect()
}

fn command(out: &Path, inputs: &[PathBuf], extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sewa"));
    c.args(["average", "--int-policy", "latest", "--max-shard-size", "40KiB", "--out"])
        .arg(out)
        .args(extra)
        .args(inputs)
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .env_remove("SLURM_PROCID")
        .env_remove("SLURM_NTASKS");
    c
}

fn spawn_rank(out: &Path, inputs: &[PathBuf], rank: usize, world: usize, extra: &[&str]) -> Child {
    let (r, w) = (rank.to_string(), world.to_string());
    let mut args = vec!["--distributed", "--rank", &r, "--world-size", &w];
    args.extend_from_slice(extra);
    command(out, inputs, &args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

/// All ranks at once, as a launcher starts them; their outputs in rank order.
fn run_ranks(out: &Path, inputs: &[PathBuf], world: usize, extra: &[&str]) -> Vec<Output> {
    let children: Vec<Child> =
        (0..world).map(|r| spawn_rank(out, inputs, r, world, extra)).collect();
    children.into_iter().map(|c| c.wait_with_output().unwrap()).collect()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Exit status 1, with `says` in what the process printed.
fn failed(o: &Output, says: &str) {
    assert_eq!(o.status.code(), Some(1), "{}", text(o));
    assert!(text(o).contains(says), "want {says:?} in: {}", text(o));
}

fn all_succeed(outs: &[Output]) {
    for (r, o) in outs.iter().enumerate() {
        assert!(o.status.success(), "rank {r}: {}", text(o));
    }
}

/// Every tensor of a directory output, checked against its index: each tensor in exactly one
/// file, the file the index names.
fn dir_tensors(dir: &Path) -> Tensors {
    let mut all = Tensors::new();
    let mut owner = BTreeMap::new();
    for e in fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "safetensors") {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            for (k, v) in read_tensors(&path) {
                assert!(all.insert(k.clone(), v).is_none(), "{k} twice");
                owner.insert(k, name.clone());
            }
        }
    }
    let index = dir.join("model.safetensors.index.json");
    if owner.values().any(|f| f != "model.safetensors") {
        let v: serde_json::Value = serde_json::from_slice(&fs::read(index).unwrap()).unwrap();
        let map: BTreeMap<String, String> =
            serde_json::from_value(v["weight_map"].clone()).unwrap();
        assert_eq!(map, owner, "the index names each tensor's file");
    }
    all
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

/// Names in `root` other than the inputs: the output, its lock directory, the previous output
/// kept for readers; never a staging directory after a commit.
fn leftovers(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| [".sewa-dist", ".sewa-commit", ".sewa-tmp"].iter().any(|s| n.ends_with(s)))
        .collect();
    v.sort();
    v
}

/// Every file of a directory, by name.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (p.file_name().unwrap().to_string_lossy().into_owned(), fs::read(&p).unwrap())
        })
        .collect()
}

#[test]
fn one_two_and_four_ranks_write_the_single_process_tensors_bit_for_bit() {
    let root = tempfile::tempdir().unwrap();
    let ins = inputs(root.path(), 4, 1);
    let single = root.path().join("single");
    let o = command(&single, &ins, &["--weights", "1,2,3,4"]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let want = dir_tensors(&single);
    assert_eq!(want.len(), 11);
    // 13 ranks for 11 tensors: two ranks have nothing to write.
    for world in [1, 2, 4, 13] {
        let out = root.path().join(format!("w{world}"));
        let outs = run_ranks(&out, &ins, world, &["--weights", "1,2,3,4"]);
        all_succeed(&outs);
        assert_eq!(dir_tensors(&out), want, "{world} ranks");
        let m = manifest(&out);
        assert_eq!(m["distributed"]["world_size"], world);
        let ranks = m["distributed"]["ranks"].as_array().unwrap();
        // Ranks that own files; with more ranks than tensors some have none.
        match world {
            13 => assert!((1..=11).contains(&ranks.len()), "{ranks:?}"),
            _ => assert_eq!(ranks.len(), world, "every rank owns files"),
        }
        assert_eq!(m["inputs"].as_array().unwrap().len(), 4, "the manifest lists every input");
        let files: Vec<&str> =
            m["files"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
        let shards = files.iter().filter(|f| f.ends_with(".safetensors")).count();
        assert!(shards >= ranks.len(), "{world} ranks, shards of 40 KiB: {files:?}");
        assert!(world > 2 || shards > world, "split into shards of 40 KiB: {files:?}");
        assert_eq!(fs::read(out.join("config.json")).unwrap(), b"{\"model_type\": \"toy\"}");
        for (r, o) in outs.iter().enumerate().skip(1) {
            assert!(text(o).contains(&format!("rank {r} of {world}")), "{}", text(o));
        }
        assert!(leftovers(root.path()).is_empty(), "{:?}", leftovers(root.path()));
    }
}

#[test]
fn ranks_come_from_torchrun_or_slurm_variables_only_under_the_flag() {
    let root = tempfile::tempdir().unwrap();
    let ins = inputs(root.path(), 2, 1);
    let single = root.path().join("single");
    // A `sewa average` started inside a launched job inherits RANK/WORLD_SIZE: ignored.
    let o = command(&single, &ins, &[]).env("RANK", "1").env("WORLD_SIZE", "2").output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(manifest(&single).get("distributed").is_none());
    let want = dir_tensors(&single);
    for (rank, world) in
        [(["RANK", "WORLD_SIZE"]), (["SLURM_PROCID", "SLURM_NTASKS"])].iter().map(|v| (v[0], v[1]))
    {
        let out = root.path().join(format!("from-{rank}"));
        let children: Vec<Child> = (0..2)
            .map(|r| {
                command(&out, &ins, &["--distributed"])
                    .env(rank, r.to_string())
                    .env(world, "2")
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let outs: Vec<Output> =
            children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
        all_succeed(&outs);
        assert_eq!(dir_tensors(&out), want, "{rank}/{world}");
        assert_eq!(manifest(&out)["distributed"]["world_size"], 2);
    }
    let o = command(&root.path().join("x"), &ins, &["--distributed"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("RANK, WORLD_SIZE"), "{}", text(&o));
    let file = root.path().join("x.safetensors");
    let o = command(&file, &ins, &["--distributed", "--rank", "0", "--world-size", "1"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("writes a directory"), "{}", text(&o));
}

/// Issue 22: kill -9 of one rank at random points leaves the previous output intact (whole,
/// byte for byte) or, when the kill came after that rank's part was done, the complete new one;
/// never a mix. A rerun then publishes the new average.
#[test]
fn a_rank_killed_at_random_points_leaves_the_previous_output_and_a_rerun_recovers() {
    let root = tempfile::tempdir().unwrap();
    let ins = inputs(root.path(), 3, 40);
    let out = root.path().join("avg");
    let o = command(&out, &ins, &["--weights", "1,0,0"]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let mut previous = snapshot(&out);
    // How long an unkilled run takes, to spread the kills over it.
    let (new_weights, timeout) = (["--weights", "1,1,1"], ["--commit-timeout", "2"]);
    let extra: Vec<&str> = new_weights.iter().chain(&timeout).copied().collect();
    let scratch = root.path().join("timing");
    let t = Instant::now();
    all_succeed(&run_ranks(&scratch, &ins, 2, &extra));
    let new = dir_tensors(&scratch);
    let span = t.elapsed().as_secs_f64();
    let seed = rand::rng().random::<u64>();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (mut kept, mut replaced) = (0, 0);
    for round in 0..8 {
        let victim = rng.random_range(0..2usize);
        let delay = Duration::from_secs_f64(rng.random_range(0.0..span));
        let mut children: Vec<Child> =
            (0..2).map(|r| spawn_rank(&out, &ins, r, 2, &extra)).collect();
        std::thread::sleep(delay);
        children[victim].kill().unwrap();
        let outs: Vec<Output> =
            children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
        let why = format!("seed {seed} round {round}: killed rank {victim} after {delay:?}");
        if snapshot(&out) == previous {
            kept += 1;
            if victim == 1 && !outs[0].status.success() {
                assert!(
                    text(&outs[0]).contains("no completion marker from rank 1"),
                    "{why}: {}",
                    text(&outs[0])
                );
            }
        } else {
            // The kill came late: the new output is complete.
            assert_eq!(dir_tensors(&out), new, "{why}");
            replaced += 1;
            // Put the previous output back for the next round.
            all_succeed(&[command(&out, &ins, &["--weights", "1,0,0"]).output().unwrap()]);
            previous = snapshot(&out);
        }
    }
    eprintln!("seed {seed}: span {span:.3} s, previous kept {kept}, replaced {replaced}");
    assert!(kept > 0, "seed {seed}: no kill landed before the commit ({replaced} late)");
    let outs = run_ranks(&out, &ins, 2, &extra);
    all_succeed(&outs);
    assert_eq!(dir_tensors(&out), new, "seed {seed}: the rerun publishes the new average");
    assert!(leftovers(root.path()).is_empty(), "{:?}", leftovers(root.path()));
}

#[test]
fn a_rerun_reuses_complete_shards_and_a_finished_plan_is_not_redone() {
    let root = tempfile::tempdir().unwrap();
    let ins = inputs(root.path(), 2, 1);
    let out = root.path().join("avg");
    let short = ["--commit-timeout", "1"];
    // Rank 0 alone: its shards are written, rank 1's never come.
    let o = spawn_rank(&out, &ins, 0, 2, &short).wait_with_output().unwrap();
    failed(&o, "no completion marker from rank 1");
    assert!(!out.exists(), "nothing published");
    // Both again: rank 0's shards are reused, rank 1 waits for the commit and says so.
    let outs = run_ranks(&out, &ins, 2, &short);
    all_succeed(&outs);
    assert!(text(&outs[1]).contains("published by rank 0"), "{}", text(&outs[1]));
    let m = manifest(&out);
    assert!(text(&outs[0]).contains("earlier run of this plan: reused"), "{}", text(&outs[0]));
    assert!(!text(&outs[1]).contains("reused"), "{}", text(&outs[1]));
    let written = |r: usize| m["distributed"]["ranks"][r]["written"].as_str().unwrap().to_string();
    assert!(written(0) < written(1), "rank 0's shards are the first run's");
    let before = snapshot(&out);
    let outs = run_ranks(&out, &ins, 2, &short);
    all_succeed(&outs);
    for o in &outs {
        assert!(text(o).contains("already holds this average"), "{}", text(o));
    }
    assert_eq!(snapshot(&out), before);

    // A rank 0 killed while committing leaves the staging directory renamed to
    // `.sewa-commit` (here made by hand from rank 1's finished part): the rerun's rank 0 takes
    // it back, and rank 1's shards are reused.
    let w = ["--weights", "1,4", "--commit-timeout", "2"];
    let o = spawn_rank(&out, &ins, 1, 2, &w).wait_with_output().unwrap();
    failed(&o, "");
    let dir = staging(root.path(), "avg");
    let marker: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("rank-1.json")).unwrap()).unwrap();
    let commit = PathBuf::from(dir.to_string_lossy().replace(".sewa-dist", ".sewa-commit"));
    fs::rename(&dir, &commit).unwrap();
    let outs = run_ranks(&out, &ins, 2, &w);
    all_succeed(&outs);
    // Rank 1 reused its shards, or found them already published by a rank 0 that was quicker.
    let said = text(&outs[1]);
    assert!(said.contains("reused") || said.contains("already holds"), "{said}");
    let m = manifest(&out);
    assert_eq!(m["distributed"]["ranks"][1]["written"], marker["record"]["written"]);
    assert!(!commit.exists() && leftovers(root.path()).is_empty(), "{:?}", leftovers(root.path()));
    let before = snapshot(&out);
    assert_eq!(snapshot(&out), before);
    assert!(leftovers(root.path()).is_empty(), "{:?}", leftovers(root.path()));
}

/// The one staging directory of output `name` in `root`.
fn staging(root: &Path, name: &str) -> PathBuf {
    let prefix = format!(".{name}.");
    let found: Vec<PathBuf> = fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with(&prefix) && n.ends_with(".sewa-dist")
        })
        .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    found[0].clone()
}

#[test]
fn damaged_shards_planted_links_and_disagreeing_ranks_are_refused_naming_what() {
    let root = tempfile::tempdir().unwrap();
    let ins = inputs(root.path(), 2, 1);
    let out = root.path().join("avg");
    let short = ["--commit-timeout", "1"];
    // Rank 1 alone: its shards are complete, nobody publishes them, and it says so.
    let o = spawn_rank(&out, &ins, 1, 2, &short).wait_with_output().unwrap();
    failed(&o, "rank 0 did not publish this average within 1 s");
    // A shard cut short after its rank finished: rank 0 names it and publishes nothing.
    let dir = staging(root.path(), "avg");
    let marker: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("rank-1.json")).unwrap()).unwrap();
    let shard = dir.join(marker["record"]["files"][0].as_str().unwrap());
    let len = fs::metadata(&shard).unwrap().len();
    fs::OpenOptions::new().write(true).open(&shard).unwrap().set_len(len - 8).unwrap();
    let o = spawn_rank(&out, &ins, 0, 2, &short).wait_with_output().unwrap();
    failed(&o, &format!("{} bytes where {len} are planned", len - 8));
    assert!(!out.exists());
    // The rerun: rank 1 sees its shard is not whole and writes it again; rank 0 commits.
    let outs = run_ranks(&out, &ins, 2, &short);
    all_succeed(&outs);
    assert!(!text(&outs[1]).contains("reused"), "{}", text(&outs[1]));
    let single = root.path().join("single");
    all_succeed(&[command(&single, &ins, &[]).output().unwrap()]);
    assert_eq!(dir_tensors(&out), dir_tensors(&single));

    // A marker planted as a link (to a genuine marker) is not a marker.
    let out2 = root.path().join("avg2");
    let w = ["--weights", "2,1", "--commit-timeout", "1"];
    let o = spawn_rank(&out2, &ins, 1, 2, &w).wait_with_output().unwrap();
    failed(&o, "");
    let dir = staging(root.path(), "avg2");
    fs::rename(dir.join("rank-1.json"), root.path().join("genuine.json")).unwrap();
    std::os::unix::fs::symlink(root.path().join("genuine.json"), dir.join("rank-1.json")).unwrap();
    let o = spawn_rank(&out2, &ins, 0, 2, &w).wait_with_output().unwrap();
    failed(&o, "no completion marker from rank 1");
    assert!(!out2.exists());

    // A link planted as the staging directory is refused, and nothing is written through it.
    let out4 = root.path().join("avg4");
    let w = ["--weights", "5,1", "--commit-timeout", "1"];
    let o = spawn_rank(&out4, &ins, 0, 2, &w).wait_with_output().unwrap();
    failed(&o, "");
    let planted = staging(root.path(), "avg4");
    fs::remove_dir_all(&planted).unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), &planted).unwrap();
    let o = spawn_rank(&out4, &ins, 1, 2, &w).wait_with_output().unwrap();
    failed(&o, "is a link or not a directory");
    assert_eq!(
        fs::read_dir(elsewhere.path()).unwrap().count(),
        0,
        "nothing written through the link"
    );

    // Ranks given other weights write other plans: rank 0 says so when it gives up.
    let out3 = root.path().join("avg3");
    let one = spawn_rank(&out3, &ins, 1, 2, &["--weights", "1,3", "--commit-timeout", "1"]);
    let zero = spawn_rank(&out3, &ins, 0, 2, &["--weights", "3,1", "--commit-timeout", "1"]);
    let (o, one) = (zero.wait_with_output().unwrap(), one.wait_with_output().unwrap());
    failed(&one, "");
    failed(&o, "other plans for this output");
    assert!(!out3.exists());
}

/// The trainers' own formats as inputs: Megatron-LM `torch_dist` iterations written by
/// megatron-core, torchtitan DCP steps written by torch, DeepSpeed ZeRO-2 steps written by
/// DeepSpeed. Two ranks write the single process's tensors, bit for bit.
#[test]
fn checkpoints_of_megatron_dcp_and_deepspeed_average_the_same_on_two_ranks() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let root = tempfile::tempdir().unwrap();
    for (name, dirs) in [
        ("megatron", ["megatron/run/iter_0000010", "megatron/run/iter_0000020"]),
        ("torchtitan", ["dcp/torchtitan/step-10", "dcp/torchtitan/step-20"]),
        ("deepspeed", ["deepspeed/z2/global_step2", "deepspeed/z2/global_step4"]),
    ] {
        let ins: Vec<PathBuf> = dirs.iter().map(|d| fixtures.join(d)).collect();
        let single = root.path().join(format!("{name}-single"));
        let o = command(&single, &ins, &[]).output().unwrap();
        assert!(o.status.success(), "{name}: {}", text(&o));
        let out = root.path().join(name);
        all_succeed(&run_ranks(&out, &ins, 2, &[]));
        let want = dir_tensors(&single);
        assert!(!want.is_empty());
        assert_eq!(dir_tensors(&out), want, "{name}");
        let ranks = manifest(&out)["distributed"]["ranks"].as_array().unwrap().len();
        assert_eq!(ranks, 2, "{name}: both ranks wrote shards");
    }
}
