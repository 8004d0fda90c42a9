//! Cost of one oracle call of the builtin `mlp` objective, phase by phase, beside PyTorch's
//! forward + backward of the same MLP on the same rows.
//!
//!     cargo run --release --example bench_loss [-- THREADS [ROWS [WINDOW]]]
//!
//! Defaults: 1 thread, 350 rows, a window of 20 checkpoints of a 64→256→256→10 ReLU MLP (f32
//! safetensors files on disk, as `sewa average` reads them). Phases: `mix` (the candidate
//! average of every member with a soft mask, what SeWA's relaxed steps evaluate), the
//! objective's forward + backward, the K dot products ⟨G, w_i − w⟩, and one whole call as
//! SeWA's optimiser makes it (mix + forward + backward + dots). Then one cold
//! `--select sewa --k 5` selection over the window: calls and wall time per call.
//!
//! The torch figure comes from `scripts/bench_loss_torch.py` on the same data and first
//! checkpoint, run with `$SEWA_TORCH_PYTHON` (default `python3`); without torch it says so.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sewa_checkpoint::{Checkpoint, OpenOptions};
use sewa_engine::objective::ObjectiveConfig;
use sewa_engine::objective::data::{Targets, write_dataset};
use sewa_engine::select::Method;
use sewa_engine::select::SewaConfig;
use sewa_engine::select::blend::Blend;
use sewa_engine::select::oracle::Oracle;

const SIZES: [usize; 4] = [64, 256, 256, 10];

/// One member: the shared base plus member-specific noise (a trajectory's spread).
fn write_member(path: &Path, base: &[Vec<f32>], rng: &mut ChaCha8Rng, step: usize) {
    let mut blobs = Vec::new();
    for (i, w) in SIZES.windows(2).enumerate() {
        let (fan_in, fan_out) = (w[0], w[1]);
        let name = format!("net.{}", 2 * i);
        let scale = 0.05 / (fan_in as f32).sqrt();
        let noisy = |b: &[f32], rng: &mut ChaCha8Rng| -> Vec<u8> {
            b.iter()
                .flat_map(|x| (x + scale * rng.random_range(-1.0..1.0f32)).to_le_bytes())
                .collect()
        };
        blobs.push((format!("{name}.weight"), vec![fan_out, fan_in], noisy(&base[2 * i], rng)));
        blobs.push((format!("{name}.bias"), vec![fan_out], noisy(&base[2 * i + 1], rng)));
    }
    let views = blobs.iter().map(|(n, s, b)| {
        (
            n.clone(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap(),
        )
    });
    let meta = std::collections::HashMap::from([("step".to_string(), step.to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path).unwrap();
}

fn base_model(rng: &mut ChaCha8Rng) -> Vec<Vec<f32>> {
    let mut base = Vec::new();
    for w in SIZES.windows(2) {
        let bound = 1.0 / (w[0] as f32).sqrt();
        base.push((0..w[0] * w[1]).map(|_| rng.random_range(-bound..bound)).collect());
        base.push((0..w[1]).map(|_| rng.random_range(-bound..bound)).collect());
    }
    base
}

/// CPU time of this process so far (all its threads), in ns, from /proc (0 where absent).
fn cpu_ns() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0 };
    let field = |e: std::fs::DirEntry| -> Option<u64> {
        let s = std::fs::read_to_string(e.path().join("schedstat")).ok()?;
        s.split_whitespace().next()?.parse().ok()
    };
    tasks.filter_map(|e| e.ok().and_then(field)).sum()
}

/// Per call: median wall time and mean CPU time (all threads), in ms, over `reps` calls after
/// two warm-up calls. On a busy machine the CPU time is the steadier figure for one thread.
#[derive(Clone, Copy)]
struct Cost {
    wall: f64,
    cpu: f64,
}

fn measure(reps: usize, mut f: impl FnMut()) -> Cost {
    f();
    f();
    let cpu0 = cpu_ns();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    let cpu = (cpu_ns() - cpu0) as f64 / 1e6 / reps as f64;
    t.sort_by(f64::total_cmp);
    Cost { wall: t[reps / 2], cpu }
}

impl std::fmt::Display for Cost {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "wall {:7.3} ms  cpu {:7.3} ms", self.wall, self.cpu)
    }
}

fn main() {
    let arg = |i: usize, default: usize| {
        std::env::args().nth(i).map_or(default, |a| a.parse().expect("a number"))
    };
    let (threads, rows, window) = (arg(1, 1), arg(2, 350), arg(3, 20));
    // candle's and rayon's pools read these once, before the first candle op (as `sewa` does).
    for var in ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"] {
        // SAFETY: first thing in main, no other thread exists yet.
        unsafe { std::env::set_var(var, threads.to_string()) };
    }
    let dir = tempfile::tempdir().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let data = dir.path().join("selection.safetensors");
    let x: Vec<f32> = (0..rows * SIZES[0]).map(|_| rng.random_range(-1.0..1.0)).collect();
    let y: Vec<i64> = (0..rows).map(|_| rng.random_range(0..SIZES[3] as i64)).collect();
    write_dataset(&data, &x, SIZES[0], Targets::Classes(&y)).unwrap();
    let base = base_model(&mut rng);
    let paths: Vec<_> = (0..window)
        .map(|i| {
            let p = dir.path().join(format!("step_{:05}.safetensors", 100 * (i + 1)));
            write_member(&p, &base, &mut rng, 100 * (i + 1));
            p
        })
        .collect();
    let members: Vec<Checkpoint> =
        paths.iter().map(|p| Checkpoint::open(p, &OpenOptions::default()).unwrap()).collect();
    let refs: Vec<&Checkpoint> = members.iter().collect();
    let cfg = ObjectiveConfig::builtin(data.clone());
    let mut objective = cfg.build(dir.path()).unwrap();

    let reps = 41;
    let mask: Vec<f64> = (0..window).map(|i| 0.2 + 0.6 * (i as f64 / window as f64)).collect();
    let mut oracle = Oracle::new(Blend::new(&refs).unwrap(), objective.as_mut());
    let mut point = oracle.blend.zeros();
    let mix = measure(reps, || oracle.blend.mix(&mask, &mut point).unwrap());
    // The whole call as a selector makes it: mix, forward + backward, the K dot products.
    let call = measure(reps, || drop(oracle.soft(&mask, true).unwrap()));
    drop(oracle);
    let grad = objective.evaluate(&point, true).unwrap().grad.unwrap();
    let blend = Blend::new(&refs).unwrap();
    let dots = measure(reps, || drop(blend.dots(&grad, &point).unwrap()));
    let fwd_bwd = measure(reps, || drop(objective.evaluate(&point, true).unwrap()));
    let fwd = measure(reps, || drop(objective.evaluate(&point, false).unwrap()));

    let sewa_cfg = SewaConfig { member_losses: false, ..Default::default() };
    let (t0, cpu0) = (Instant::now(), cpu_ns());
    let (sel, _) = sewa_engine::select::run_model_based(
        Method::Sewa,
        5,
        &refs,
        objective.as_mut(),
        &sewa_cfg,
        None,
    )
    .unwrap();
    let wall = t0.elapsed().as_secs_f64() * 1e3;
    let cpu = (cpu_ns() - cpu0) as f64 / 1e6;
    let calls = sel.details.json()["oracle_calls"].as_u64().unwrap_or(0).max(1);

    println!(
        "sewa builtin mlp {SIZES:?}, {rows} rows, window {window}, {threads} thread(s); median of \
         {reps} calls"
    );
    println!("  mix ({window} members, soft mask)     {mix}");
    println!("  forward + backward               {fwd_bwd}");
    println!("  forward only                     {fwd}");
    println!("  dots ({window} members)               {dots}");
    println!("  oracle call (mix+fwd+bwd+dots)   {call}");
    println!(
        "  cold sewa k=5 selection: {calls} calls, wall {wall:.1} ms ({:.3} ms/call), cpu \
         {cpu:.1} ms ({:.3} ms/call)",
        wall / calls as f64,
        cpu / calls as f64
    );
    torch(&data, &paths[0], &paths, threads, reps, call);
}

/// Run the torch script on the same data, first checkpoint and window; print its figures and
/// sewa's call over torch's forward + backward.
fn torch(
    data: &Path,
    ckpt: &Path,
    window: &[std::path::PathBuf],
    threads: usize,
    reps: usize,
    call: Cost,
) {
    let python = std::env::var("SEWA_TORCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench_loss_torch.py");
    let out = Command::new(&python)
        .arg(&script)
        .args(["--threads", &threads.to_string(), "--reps", &reps.to_string()])
        .arg(data)
        .arg(ckpt)
        .args(window)
        .output();
    let o = match out {
        Ok(o) if o.status.success() => o,
        Ok(o) => {
            let why = String::from_utf8_lossy(&o.stderr);
            return println!("torch: not measured ({})", why.lines().last().unwrap_or("failed"));
        }
        Err(e) => return println!("torch: not measured ({python}: {e})"),
    };
    let text = String::from_utf8_lossy(&o.stdout);
    print!("{text}");
    // "torch forward+backward  wall W ms  cpu C ms"
    let line = text.lines().find(|l| l.trim_start().starts_with("torch forward+backward"));
    let num = |key: &str| -> Option<f64> {
        let mut words = line?.split_whitespace();
        words.find(|w| *w == key)?;
        words.next()?.parse().ok()
    };
    if let (Some(wall), Some(cpu)) = (num("wall"), num("cpu")) {
        println!(
            "sewa oracle call / torch forward+backward: {:.2}x wall, {:.2}x cpu",
            call.wall / wall,
            call.cpu / cpu
        );
    }
}
