//! Benchmark of `sewa watch` (issue 3):
//!
//! 1. Latency from a checkpoint's completion (the end of its quiet period, when the settler
//!    hands it over) to the new average being published, LAWA k = 5 over 256 MiB f32
//!    checkpoints (16 tensors each): incremental running average vs a full re-average
//!    (`recompute_every = 1`) vs no running average at all (`memory_budget = 1`: every
//!    publication streams the k members through the kernel, as a model too large for the
//!    budget does). Includes validation (open + NaN scan) and the durable publish.
//! 2. Idle CPU of the `sewa watch` binary over a minute, from /proc/<pid>/stat.
//!
//! Run: `cargo run --release --example bench_watch -- [MiB per checkpoint] [idle seconds]`
//! (defaults 256 and 60). Needs ~5 GiB of free disk in the temp dir.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sewa_checkpoint::Identity;
use sewa_engine::config::Config;
use sewa_engine::daemon::Pipeline;
use sewa_engine::watch::Settled;

const TENSORS: usize = 16;
const K: usize = 5;
const WARM: usize = 6;
const MEASURED: usize = 4;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let mib: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(256);
    let idle_s: u64 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(60);
    let tmp = tempfile::tempdir()?;
    let runs = tmp.path().join("runs");
    std::fs::create_dir(&runs)?;
    println!("writing {} checkpoints of {mib} MiB...", WARM + 3 * MEASURED);
    let ckpts: Vec<PathBuf> = (0..WARM + 3 * MEASURED)
        .map(|i| write_checkpoint(&runs, (i as u64 + 1) * 100, mib))
        .collect();
    let modes = [
        ("incremental", 16, "\"auto\""),
        ("full re-average", 1, "\"auto\""),
        ("streamed, no running average", 16, "1"),
    ];
    for (m, (label, recompute_every, budget)) in modes.into_iter().enumerate() {
        let offset = m * MEASURED;
        let lat = latencies(tmp.path(), &runs, &ckpts, offset, (recompute_every, budget))?;
        let ms: Vec<String> =
            lat.iter().map(|(d, _)| format!("{:.0}", d.as_secs_f64() * 1e3)).collect();
        let n = lat.len() as f64;
        let mean = lat.iter().map(|(d, _)| d.as_secs_f64()).sum::<f64>() / n;
        let avg = lat.iter().map(|(_, a)| *a as f64).sum::<f64>() / n;
        println!(
            "LAWA k={K}, {mib} MiB, {label}: mean {:.0} ms from hand-over to published \
             ({} ms), of which updating the average {avg:.0} ms",
            mean * 1e3,
            ms.join(", ")
        );
    }
    idle_cpu(tmp.path(), &runs, idle_s)?;
    Ok(())
}

/// f32 tensors whose values depend on the step, written with the safetensors crate.
fn write_checkpoint(dir: &Path, step: u64, mib: usize) -> PathBuf {
    let per = mib * (1 << 20) / TENSORS / 4;
    let data: Vec<Vec<u8>> = (0..TENSORS)
        .map(|t| {
            (0..per)
                .flat_map(|i| {
                    ((step as f32) * 1e-3 + (i % 977) as f32 * 1e-4 + t as f32).to_le_bytes()
                })
                .collect()
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .enumerate()
        .map(|(t, d)| {
            let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![per], d)
                .unwrap();
            (format!("layer{t:02}.weight"), v)
        })
        .collect();
    let path = dir.join(format!("step_{step:07}.safetensors"));
    safetensors::serialize_to_file(views, None, &path).unwrap();
    path
}

/// Feed checkpoints to a pipeline one at a time; time the last `MEASURED` hand-overs.
fn latencies(
    base: &Path,
    runs: &Path,
    ckpts: &[PathBuf],
    offset: usize,
    (recompute_every, budget): (usize, &str),
) -> Result<Vec<(Duration, u64)>, Box<dyn std::error::Error>> {
    let out = base.join(format!("out-{offset}/model.safetensors"));
    let text = format!(
        "[watch]\ndir = {runs:?}\n[window]\nsize = 20\n[select]\nmethod = \"lawa\"\nk = {K}\n\
         [publish]\nout = {out:?}\n[runtime]\nrecompute_every = {recompute_every}\n\
         memory_budget = {budget}\n"
    );
    let cfg = Config::parse(&text, Path::new("bench.toml"))?;
    let mut p = Pipeline::new(cfg);
    let order = ckpts[..WARM].iter().chain(&ckpts[WARM + offset..WARM + offset + MEASURED]);
    let mut lat = Vec::new();
    for (i, path) in order.enumerate() {
        let sig = Identity::stat(path).ok_or("checkpoint vanished")?;
        let t0 = Instant::now();
        p.step(vec![Settled::Ready(path.clone(), sig)]);
        if i >= WARM {
            let average_ms = p.status.last_publish.as_ref().map_or(0, |l| l.average_ms);
            lat.push((t0.elapsed(), average_ms));
        }
    }
    // LAWA waits for k members ([select] min_members defaults to k) before its first publish.
    let publishes = p.status.counters.publishes as usize;
    let expected = WARM + MEASURED - (K - 1);
    assert_eq!(
        publishes, expected,
        "every checkpoint from the k-th must publish: {:?}",
        p.status.errors
    );
    Ok(lat)
}

/// Run the real binary on a quiet directory and read its CPU time from /proc.
fn idle_cpu(base: &Path, runs: &Path, secs: u64) -> Result<(), Box<dyn std::error::Error>> {
    let exe = std::env::current_exe()?;
    let bin = exe.parent().and_then(Path::parent).ok_or("no target dir")?.join("sewa");
    let config = base.join("idle.toml");
    let out = base.join("idle-out/model.safetensors");
    std::fs::write(&config, format!("[watch]\ndir = {runs:?}\n[publish]\nout = {out:?}\n"))?;
    let mut child = std::process::Command::new(&bin)
        .args(["watch", "--config"])
        .arg(&config)
        .stderr(std::process::Stdio::null())
        .spawn()?;
    // Let it settle and publish the existing directory first, then measure pure idling.
    let manifest = base.join("idle-out/model.safetensors.manifest.json");
    let t0 = Instant::now();
    while !manifest.exists() && t0.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = cpu_ticks(child.id())?;
    std::thread::sleep(Duration::from_secs(secs));
    let after = cpu_ticks(child.id())?;
    let rss = rss(child.id()).unwrap_or_default();
    child.kill()?;
    child.wait()?;
    let ticks_per_s = 100.0; // USER_HZ on Linux
    let cpu_s = (after - before) as f64 / ticks_per_s;
    println!(
        "idle over {secs} s: {cpu_s:.2} s CPU ({:.3} % of one core), RSS {}",
        100.0 * cpu_s / secs as f64,
        rss
    );
    Ok(())
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64, Box<dyn std::error::Error>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_comm = &stat[stat.rfind(')').ok_or("bad stat")? + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

fn rss(pid: u32) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>()[1..].join(" "))
}
