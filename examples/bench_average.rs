//! Benchmark of `sewa average` (issues 2 and 22): the kernel's bandwidth against merely reading
//! the same bytes (positioned reads into a 256 KiB buffer: the `pread` floor), then the real
//! binary end to end against the job's physical floor measured in the same run (read every
//! input byte once from the page cache + write the output's bytes + fsync them), with the
//! binary's peak RSS from getrusage of its parent (a small python parent, never by sampling
//! /proc). Every measurement is repeated `--runs` times, interleaved with its floor, and the
//! ratios are reported as median, best and worst.
//!
//! ```text
//! cargo build --release && cargo run --release --example bench_average -- \
//!     [--inputs 8] [--mib 256] [--tensors 16] [--dtype f32|bf16] [--threads 1] [--runs 5] \
//!     [--dir DIR] [--format safetensors|dcp] [--ranks 4] [--distributed 1,2,4] \
//!     [--read-ahead auto|on|off]
//! ```
//! `--mib` is one input's size. Inputs are written to a fresh temp dir under `--dir`
//! (default `$TMPDIR`) and removed after; a safetensors input is written chunk by chunk, so a
//! 2 GiB tensor (`--inputs 2 --mib 2048 --tensors 1 --dtype bf16`) costs the bench no memory.
//! `--format dcp` writes each input as a torch.distributed.checkpoint directory instead
//! (`tests/writers/dcp.rs`, f32 only): every tensor `[numel / 256, 256]` split along dim 0
//! over `--ranks` ranks, one `__{rank}_0.distcp` per rank, so each tensor is read from
//! `--ranks` chunks. The binary is `target/release/sewa` (override with `SEWA_BIN`).
//! `--distributed 1,2,4` measures only `sewa average --distributed` end to end instead: for
//! each world size W, W processes started together (as torchrun starts them, the rank in
//! RANK/WORLD_SIZE) writing one sharded directory, interleaved run by run across the world
//! sizes; the wall time until the last rank exits, and each rank's peak RSS (`wait4`).
//! `--read-ahead` is passed to the binary (default: its own default, auto).

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sewa_checkpoint::{Checkpoint, OpenOptions};
use sewa_engine::average::{AverageOptions, AveragePlan, Workspace};

#[path = "../tests/writers/dcp.rs"]
mod dcp_writer;

struct Args {
    inputs: usize,
    mib: usize,
    tensors: usize,
    bf16: bool,
    threads: usize,
    runs: usize,
    dir: PathBuf,
    dcp: bool,
    ranks: usize,
    worlds: Vec<usize>,
    read_ahead: String,
}

fn parse_args() -> Args {
    let mut a = Args {
        inputs: 8,
        mib: 256,
        tensors: 16,
        bf16: false,
        threads: 1,
        runs: 5,
        dir: std::env::temp_dir(),
        dcp: false,
        ranks: 4,
        worlds: Vec::new(),
        read_ahead: "auto".into(),
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let value = pair.get(1).map(String::as_str).unwrap_or_default();
        let num =
            || value.parse::<usize>().unwrap_or_else(|_| panic!("{}: number expected", pair[0]));
        match pair[0].as_str() {
            "--inputs" => a.inputs = num(),
            "--mib" => a.mib = num(),
            "--tensors" => a.tensors = num(),
            "--threads" => a.threads = num(),
            "--runs" => a.runs = num().max(1),
            "--dir" => a.dir = PathBuf::from(value),
            "--ranks" => a.ranks = num(),
            "--read-ahead" => a.read_ahead = value.to_string(),
            "--distributed" => {
                a.worlds = value
                    .split(',')
                    .map(|w| w.parse().unwrap_or_else(|_| panic!("--distributed {value}: 1,2,4")))
                    .collect()
            }
            "--dtype" => {
                a.bf16 = match value {
                    "bf16" => true,
                    "f32" => false,
                    other => panic!("--dtype {other}: f32 or bf16"),
                }
            }
            "--format" => {
                a.dcp = match value {
                    "dcp" => true,
                    "safetensors" => false,
                    other => panic!("--format {other}: safetensors or dcp"),
                }
            }
            other => panic!("unknown flag {other}; see the header of examples/bench_average.rs"),
        }
    }
    assert!(!(a.dcp && a.bf16), "--format dcp writes f32 inputs only");
    a
}

fn main() {
    let args = parse_args();
    let work = tempfile::Builder::new().prefix("sewa-bench-").tempdir_in(&args.dir).unwrap();
    let size = if args.bf16 { 2 } else { 4 };
    let numel = args.mib * (1 << 20) / size / args.tensors / 256 * 256;
    let per_input = (numel * size * args.tensors) as u64;
    let layout = match args.dcp {
        true => format!("DCP dirs of {} ranks", args.ranks),
        false => "safetensors".to_string(),
    };
    println!(
        "inputs: {} x {:.0} MiB {} ({} tensors of {:.0} MiB each, {layout}) in {}; threads {}; \
         {} runs",
        args.inputs,
        per_input as f64 / (1 << 20) as f64,
        if args.bf16 { "bf16" } else { "f32" },
        args.tensors,
        (numel * size) as f64 / (1 << 20) as f64,
        work.path().display(),
        args.threads,
        args.runs,
    );
    let paths: Vec<PathBuf> = (0..args.inputs)
        .map(|i| match args.dcp {
            true => write_dcp_input(work.path(), i, args.tensors, numel, args.ranks as u64),
            false => write_input(work.path(), i, args.tensors, numel, args.bf16),
        })
        .collect();
    if !args.worlds.is_empty() {
        return distributed(work.path(), &paths, per_input, &args);
    }
    kernel_vs_read(&paths, args.threads, args.runs);
    end_to_end(work.path(), &paths, per_input, &args);
}

/// `sewa average --distributed` with each world size in `args.worlds`, interleaved run by
/// run, into one directory output (removed before each run, so every run writes it anew).
fn distributed(dir: &Path, paths: &[PathBuf], out_bytes: u64, args: &Args) {
    let bin = std::env::var_os("SEWA_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/sewa"));
    let ckpts: Vec<Checkpoint> =
        paths.iter().map(|p| Checkpoint::open(p, &OpenOptions::default()).unwrap()).collect();
    let bytes: u64 = ckpts.iter().map(|c| c.total_bytes()).sum();
    let out = dir.join("averaged");
    // Each world size's wall times and largest per-rank peak RSS; the job floor per run.
    let mut walls = vec![Vec::new(); args.worlds.len()];
    let mut peaks = vec![0u64; args.worlds.len()];
    let (mut floors, mut buf) = (Vec::new(), Vec::new());
    for _ in 0..args.runs {
        floors.push((read_floor(&ckpts, &mut buf) + fsync_time(dir, out_bytes)).as_secs_f64());
        for (i, &world) in args.worlds.iter().enumerate() {
            let _ = fs::remove_dir_all(&out);
            let (wall, kib) = run_ranks(&bin, &out, paths, args, world);
            walls[i].push(wall);
            peaks[i] = peaks[i].max(kib);
        }
    }
    let _ = fs::remove_dir_all(&out);
    let floor = spread(&mut floors);
    println!(
        "job floor (read once + write + fsync, one process): {:.3} s median ({:.3}-{:.3})",
        floor.0, floor.1, floor.2
    );
    println!(
        "| ranks | wall (median, best-worst) | input GB/s | speed-up over 1 rank | wall / floor | peak RSS per rank |"
    );
    println!("|---|---|---|---|---|---|");
    let base = spread(&mut walls[0].clone()).0;
    for (i, &world) in args.worlds.iter().enumerate() {
        let w = spread(&mut walls[i]);
        println!(
            "| {world} | {:.3} s ({:.3}-{:.3}) | {:.2} | {:.2}x | {:.2}x | {:.1} MiB |",
            w.0,
            w.1,
            w.2,
            bytes as f64 / w.0 / 1e9,
            base / w.0,
            w.0 / floor.0,
            peaks[i] as f64 / 1024.0
        );
    }
}

/// `world` ranks of `sewa average --distributed` started together under a python parent: the
/// wall time until the last exits and the largest peak RSS of one rank in KiB (`wait4`).
fn run_ranks(bin: &Path, out: &Path, paths: &[PathBuf], args: &Args, world: usize) -> (f64, u64) {
    run_children(bin, &["--distributed"], out, paths, args, world)
}

/// `world` processes of `sewa average EXTRA` started together under a small python parent
/// (ranks in RANK/WORLD_SIZE, which only `--distributed` reads), timed by the parent from the
/// first start to the last exit: that time in seconds and the largest peak RSS of one child in
/// KiB (`wait4`, never /proc sampling). Panics when a child fails.
fn run_children(
    bin: &Path,
    extra: &[&str],
    out: &Path,
    paths: &[PathBuf],
    args: &Args,
    world: usize,
) -> (f64, u64) {
    let script = "import os, subprocess, sys, time\n\
                  w = int(sys.argv[1]); cmd = sys.argv[2:]\n\
                  t = time.perf_counter()\n\
                  ps = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL,\n\
                        env=dict(os.environ, RANK=str(r), WORLD_SIZE=str(w))) for r in range(w)]\n\
                  rss, bad = 0, 0\n\
                  for p in ps:\n\
                  \x20   _, status, ru = os.wait4(p.pid, 0)\n\
                  \x20   rss = max(rss, ru.ru_maxrss); bad += status != 0\n\
                  print(bad, rss, time.perf_counter() - t)";
    let output = Command::new("python3")
        .args(["-c", script, &world.to_string()])
        .arg(bin)
        .arg("average")
        .args(extra)
        .args(["--threads", &args.threads.to_string()])
        .args(["--read-ahead", &args.read_ahead, "--out"])
        .arg(out)
        .args(paths)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let words: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(
        words.first(),
        Some(&"0"),
        "sewa average failed: {text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    (words[2].parse().unwrap(), words[1].parse().unwrap())
}

/// `step_0000i.safetensors` with `tensors` tensors of `numel` pseudo-random f32 or bf16
/// values, written a chunk at a time (the same values in every tensor of an input).
fn write_input(dir: &Path, i: usize, tensors: usize, numel: usize, bf16: bool) -> PathBuf {
    let (dtype, size) = if bf16 { ("BF16", 2) } else { ("F32", 4) };
    let bytes = numel * size;
    let entries: Vec<String> = (0..tensors)
        .map(|t| {
            let (lo, hi) = (t * bytes, (t + 1) * bytes);
            format!(
                r#""layers.{t:02}.weight":{{"dtype":"{dtype}","shape":[{numel}],"data_offsets":[{lo},{hi}]}}"#
            )
        })
        .collect();
    let mut header = format!("{{{}}}", entries.join(",")).into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    let path = dir.join(format!("step_{:05}.safetensors", (i + 1) * 100));
    let mut f = BufWriter::with_capacity(4 << 20, File::create(&path).unwrap());
    f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&header).unwrap();
    for _ in 0..tensors {
        let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ (i as u64 + 1);
        let mut chunk = Vec::with_capacity(1 << 22);
        let mut left = numel;
        while left > 0 {
            let n = left.min((1 << 22) / size);
            chunk.clear();
            for _ in 0..n {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let v = ((state >> 40) as f32) / (1u64 << 24) as f32 - 0.5;
                match bf16 {
                    true => chunk.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
                    false => chunk.extend_from_slice(&v.to_le_bytes()),
                }
            }
            f.write_all(&chunk).unwrap();
            left -= n;
        }
    }
    f.into_inner().unwrap().sync_all().unwrap();
    path
}

/// `step-{i}/`, a DCP directory with f32 tensors like `write_input`'s, `[numel / 256, 256]`
/// each, split along dim 0 over `ranks` ranks.
fn write_dcp_input(dir: &Path, i: usize, tensors: usize, numel: usize, ranks: u64) -> PathBuf {
    let path = dir.join(format!("step-{}", (i + 1) * 100));
    let shape = vec![(numel / 256) as u64, 256];
    let specs: Vec<(String, Vec<u64>)> =
        (0..tensors).map(|t| (format!("layers.{t:02}.weight"), shape.clone())).collect();
    dcp_writer::write(&path, &specs, ranks, |t, rows| {
        let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ ((i * tensors + t) as u64 + 1) ^ rows.start;
        (0..(rows.end - rows.start) * 256)
            .flat_map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (((state >> 40) as f32) / (1u64 << 24) as f32 - 0.5).to_le_bytes()
            })
            .collect()
    });
    path
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

/// Median, best and worst of `v` (sorted in place).
fn spread(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// Every input byte read once with positioned reads into a reused 256 KiB buffer, tensor by
/// tensor as the kernel goes: the `pread` floor (a copy out of the page cache).
fn read_floor(ckpts: &[Checkpoint], buf: &mut Vec<u8>) -> Duration {
    timed(|| {
        for t in ckpts[0].tensors() {
            for c in ckpts {
                let read = |_, b: &[u8]| {
                    std::hint::black_box(b);
                    Ok(())
                };
                c.for_each_chunk(&t.name, 256 << 10, buf, read).unwrap();
            }
        }
    })
}

/// The kernel (`stream_tensor`, as `sewa average` runs it, output bytes discarded) against
/// the `pread` floor over page-cached inputs, in one process, interleaved run by run (the
/// machine is shared: load changes between runs hit both); prints each run's ratio.
fn kernel_vs_read(paths: &[PathBuf], threads: usize, runs: usize) {
    let ckpts: Vec<Checkpoint> =
        paths.iter().map(|p| Checkpoint::open(p, &OpenOptions::default()).unwrap()).collect();
    let opts = AverageOptions { threads, ..Default::default() };
    let plan = AveragePlan::new(ckpts.iter().collect(), None, opts).unwrap();
    let bytes: u64 = ckpts.iter().map(|c| c.total_bytes()).sum();
    let n = plan.outputs().len();
    let (mut ws, mut buf) = (Workspace::default(), Vec::new());
    read_floor(&ckpts, &mut buf); // warm the page cache
    // Three interleaved: the kernel as `sewa average` runs it, with the reader thread, floor.
    let ahead = AveragePlan::new(ckpts.iter().collect(), None, opts).unwrap().with_read_ahead(true);
    let (mut ratios, mut ahead_ratios, mut kernel, mut floor) = (vec![], vec![], vec![], vec![]);
    let mut run = |plan: &AveragePlan<'_>| {
        timed(|| {
            for i in 0..n {
                let sink = &mut |b: &[u8]| {
                    std::hint::black_box(b);
                    Ok(())
                };
                plan.stream_tensor(i, &mut ws, sink).unwrap();
            }
        })
    };
    for _ in 0..runs {
        let k = run(&plan);
        let a = run(&ahead);
        let f = read_floor(&ckpts, &mut buf);
        ratios.push(f.as_secs_f64() / k.as_secs_f64());
        ahead_ratios.push(f.as_secs_f64() / a.as_secs_f64());
        kernel.push(gbps(bytes, k));
        floor.push(gbps(bytes, f));
    }
    let (r, k, f) = (spread(&mut ratios), spread(&mut kernel), spread(&mut floor));
    let a = spread(&mut ahead_ratios);
    println!("kernel: {:.2} GB/s median ({:.2}-{:.2}), {bytes} input bytes", k.0, k.1, k.2);
    println!("pread floor: {:.2} GB/s median ({:.2}-{:.2})", f.0, f.1, f.2);
    println!(
        "kernel / floor: {:.0} % median, {:.0} % worst, {:.0} % best (of {runs} interleaved runs)",
        100.0 * r.0,
        100.0 * r.1,
        100.0 * r.2
    );
    println!(
        "with a reader thread (with_read_ahead, threads 1): {:.0} % median, {:.0} % worst, {:.0} % best",
        100.0 * a.0,
        100.0 * a.1,
        100.0 * a.2
    );
}

fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

/// The real binary, run by run beside the job's floor measured just before it: every input
/// byte read once (the `pread` floor) + the output's bytes written and fsynced in the same
/// directory. Prints the wall / floor ratios and the peak RSS.
fn end_to_end(dir: &Path, paths: &[PathBuf], out_bytes: u64, args: &Args) {
    let runs = args.runs;
    let bin = std::env::var_os("SEWA_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/sewa"));
    if !bin.exists() {
        println!("end-to-end: skipped, {} missing (run `cargo build --release`)", bin.display());
        return;
    }
    let ckpts: Vec<Checkpoint> =
        paths.iter().map(|p| Checkpoint::open(p, &OpenOptions::default()).unwrap()).collect();
    let out = dir.join("averaged.safetensors");
    let mut buf = Vec::new();
    let (mut ratios, mut walls, mut floors, mut peak_kib) = (vec![], vec![], vec![], 0);
    for _ in 0..runs {
        // Removed first, so that the disk holds one output at a time (the 2 GiB case).
        let _ = fs::remove_file(&out);
        let _ = fs::remove_file(dir.join("averaged.safetensors.manifest.json"));
        let floor = read_floor(&ckpts, &mut buf) + fsync_time(dir, out_bytes);
        let (wall, kib) = run_sewa(&bin, &out, paths, args);
        ratios.push(wall.as_secs_f64() / floor.as_secs_f64());
        walls.push(wall.as_secs_f64());
        floors.push(floor.as_secs_f64());
        peak_kib = peak_kib.max(kib);
    }
    let _ = fs::remove_file(&out);
    let (r, w, f) = (spread(&mut ratios), spread(&mut walls), spread(&mut floors));
    println!("end-to-end: {:.3} s wall median ({:.3}-{:.3})", w.0, w.1, w.2);
    println!("floor (read once + write + fsync): {:.3} s median ({:.3}-{:.3})", f.0, f.1, f.2);
    println!(
        "wall / floor: {:.2}x median, {:.2}x best, {:.2}x worst (of {runs} interleaved pairs)",
        r.0, r.1, r.2
    );
    println!(
        "peak RSS: {:.1} MiB (largest of {runs} runs; wait4 of sewa average by its parent)",
        peak_kib as f64 / 1024.0
    );
}

/// One `sewa average` run under a python parent: its wall time (measured by the parent
/// around the child alone) and its peak RSS in KiB.
fn run_sewa(bin: &Path, out: &Path, paths: &[PathBuf], args: &Args) -> (Duration, u64) {
    let (wall, kib) = run_children(bin, &[], out, paths, args, 1);
    (Duration::from_secs_f64(wall), kib)
}

/// Time to write and fsync `bytes` into a new file in `dir` (16 MiB writes, as a file
/// output is written), removed after.
fn fsync_time(dir: &Path, bytes: u64) -> Duration {
    let path = dir.join("fsync-probe");
    let chunk = vec![1u8; 16 << 20];
    let start = Instant::now();
    let mut f = File::create(&path).unwrap();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
    f.sync_all().unwrap();
    let t = start.elapsed();
    fs::remove_file(&path).unwrap();
    t
}
