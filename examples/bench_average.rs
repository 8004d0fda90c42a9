//! Benchmark of `sewa average` (issue 2): kernel bandwidth against merely reading the same
//! bytes (positioned reads into an L2-sized buffer, as the kernel does), then the real binary
//! end to end (wall time, peak RSS) against the disk's fsync time for the same bytes.
//!
//! ```text
//! cargo build --release && cargo run --release --example bench_average -- \
//!     [--inputs 8] [--mib 256] [--tensors 16] [--threads 1] [--dir DIR] \
//!     [--format safetensors|dcp] [--ranks 4]
//! ```
//! Inputs are written to a fresh temp dir under `--dir` (default `$TMPDIR`) and removed after.
//! `--format dcp` writes each input as a torch.distributed.checkpoint directory instead
//! (`tests/writers/dcp.rs`): every tensor `[numel / 256, 256]` split along dim 0 over `--ranks`
//! ranks, one `__{rank}_0.distcp` per rank, so each tensor is read from `--ranks` chunks.
//! The binary is `target/release/sewa` (override with `SEWA_BIN`).

use std::fs::{self, File};
use std::io::Write;
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
    threads: usize,
    dir: PathBuf,
    dcp: bool,
    ranks: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        inputs: 8,
        mib: 256,
        tensors: 16,
        threads: 1,
        dir: std::env::temp_dir(),
        dcp: false,
        ranks: 4,
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
            "--dir" => a.dir = PathBuf::from(value),
            "--ranks" => a.ranks = num(),
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
    a
}

fn main() {
    let args = parse_args();
    let work = tempfile::Builder::new().prefix("sewa-bench-").tempdir_in(&args.dir).unwrap();
    let numel = args.mib * (1 << 20) / 4 / args.tensors / 256 * 256;
    let per_input = (numel * 4 * args.tensors) as u64;
    let layout = match args.dcp {
        true => format!("DCP dirs of {} ranks", args.ranks),
        false => "safetensors".to_string(),
    };
    println!(
        "inputs: {} x {:.0} MiB f32 ({} tensors of {:.0} MiB each, {layout}) in {}; threads {}",
        args.inputs,
        per_input as f64 / (1 << 20) as f64,
        args.tensors,
        (numel * 4) as f64 / (1 << 20) as f64,
        work.path().display(),
        args.threads
    );
    let paths: Vec<PathBuf> = (0..args.inputs)
        .map(|i| match args.dcp {
            true => write_dcp_input(work.path(), i, args.tensors, numel, args.ranks as u64),
            false => write_input(work.path(), i, args.tensors, numel),
        })
        .collect();
    kernel_vs_memcpy(&paths, args.threads);
    end_to_end(work.path(), &paths, per_input, args.threads);
}

/// `step_0000i.safetensors` with `tensors` f32 tensors of `numel` pseudo-random values.
fn write_input(dir: &Path, i: usize, tensors: usize, numel: usize) -> PathBuf {
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ (i as u64 + 1);
    let data: Vec<u8> = (0..numel)
        .flat_map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (((state >> 40) as f32) / (1u64 << 24) as f32 - 0.5).to_le_bytes()
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = (0..tensors)
        .map(|t| {
            let v =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![numel], &data);
            (format!("layers.{t:02}.weight"), v.unwrap())
        })
        .collect();
    let path = dir.join(format!("step_{:05}.safetensors", (i + 1) * 100));
    safetensors::serialize_to_file(views, None, &path).unwrap();
    path
}

/// `step-{i}/`, a DCP directory with the same tensors as `write_input`'s, `[numel / 256,
/// 256]` each, split along dim 0 over `ranks` ranks.
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

/// Kernel GB/s (input bytes read per second) vs reading the same bytes into a reused 256 KiB
/// buffer (the floor: every input byte copied out of the page cache once), best of 5, in one
/// process over page-cached inputs.
fn kernel_vs_memcpy(paths: &[PathBuf], threads: usize) {
    let ckpts: Vec<Checkpoint> =
        paths.iter().map(|p| Checkpoint::open(p, &OpenOptions::default()).unwrap()).collect();
    let opts = AverageOptions { threads, ..Default::default() };
    let plan = AveragePlan::new(ckpts.iter().collect(), None, opts).unwrap();
    let bytes: u64 = ckpts.iter().map(|c| c.total_bytes()).sum();
    let n = plan.outputs().len();
    let mut ws = Workspace::default();
    let mut buf = Vec::new();
    // Interleaved, best of 5 each: the machine is shared, so load changes between runs.
    let (mut kernel, mut copy) = (Duration::MAX, Duration::MAX);
    for _ in 0..5 {
        kernel = kernel.min(timed(|| {
            for i in 0..n {
                std::hint::black_box(plan.average_tensor(i, &mut ws).unwrap());
            }
        }));
        copy = copy.min(timed(|| {
            for t in plan.outputs() {
                for c in &ckpts {
                    let read = |_, b: &[u8]| {
                        std::hint::black_box(b);
                        Ok(())
                    };
                    c.for_each_chunk(&t.name, 256 << 10, &mut buf, read).unwrap();
                }
            }
        }));
    }
    let (k, m) = (gbps(bytes, kernel), gbps(bytes, copy));
    println!("kernel: {:.2} GB/s ({} bytes read in {:.3} s)", k, bytes, kernel.as_secs_f64());
    println!("read:   {:.2} GB/s (same bytes read in {:.3} s)", m, copy.as_secs_f64());
    println!("kernel / read: {:.0} %", 100.0 * k / m);
}

fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

/// Run the real binary, poll its VmHWM, and compare with writing+fsyncing the same bytes.
fn end_to_end(dir: &Path, paths: &[PathBuf], out_bytes: u64, threads: usize) {
    let bin = std::env::var_os("SEWA_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/sewa"));
    if !bin.exists() {
        println!("end-to-end: skipped, {} missing (run `cargo build --release`)", bin.display());
        return;
    }
    // Two runs each (the disk is shared and noisy): best wall time, worst peak RSS.
    let fsync = fsync_time(dir, out_bytes).min(fsync_time(dir, out_bytes));
    let out = dir.join("averaged.safetensors");
    let (mut wall, mut peak_kib) = (Duration::MAX, 0);
    for _ in 0..2 {
        let (w, p) = run_sewa(&bin, &out, paths, threads);
        (wall, peak_kib) = (wall.min(w), peak_kib.max(p));
    }
    let peak = peak_kib * 1024;
    let budget = out_bytes + (64 << 20);
    println!(
        "end-to-end: {:.3} s wall; fsync of the same bytes alone {:.3} s; beyond fsync {:.3} s",
        wall.as_secs_f64(),
        fsync.as_secs_f64(),
        wall.as_secs_f64() - fsync.as_secs_f64()
    );
    println!(
        "peak RSS: {:.1} MiB (budget: output {:.0} MiB + 64 MiB = {:.0} MiB) {}",
        peak as f64 / (1 << 20) as f64,
        out_bytes as f64 / (1 << 20) as f64,
        budget as f64 / (1 << 20) as f64,
        if peak <= budget { "ok" } else { "OVER BUDGET" }
    );
}

/// One `sewa average` run: wall time and peak RSS (KiB, VmHWM polled every 2 ms).
fn run_sewa(bin: &Path, out: &Path, paths: &[PathBuf], threads: usize) -> (Duration, u64) {
    let start = Instant::now();
    let mut child = Command::new(bin)
        .args(["average", "--threads", &threads.to_string(), "--out"])
        .arg(out)
        .args(paths)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0u64;
    let status = loop {
        if let Some(kib) = fs::read_to_string(&status_path).ok().and_then(|s| vm_hwm_kib(&s)) {
            peak_kib = peak_kib.max(kib);
        }
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    assert!(status.success(), "sewa average failed: {status}");
    (start.elapsed(), peak_kib)
}

/// VmHWM (peak resident set) in KiB from /proc/PID/status.
fn vm_hwm_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Time to write and fsync `bytes` into a new file in `dir`: the floor for a durable publish.
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
