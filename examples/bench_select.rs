//! Oracle calls and quality of the model-based selectors on real training trajectories: per
//! method and seed, the objective calls a cold selection spends (member losses included) and
//! the gap of its held-out loss to the exhaustive best k-subset; then the warm re-selection
//! after the window slides by one; then, with `--curve`, the surrogate's calls-vs-gap trade-off
//! under call budgets.
//!
//!     cargo run --release --example bench_select [-- --seeds 5 --other-seeds 2 --curve]
//!
//! Trajectories (window 20, k = 5, builtin MLP objective on a held-out split):
//! - `demo`: the demo's task and trainer (plain SGD at lr 0.8 on noisy Gaussian blobs);
//! - `spiral`: two interleaved spirals, a 2→48→48→2 MLP trained with SGD + momentum 0.9;
//! - `adamw`: 16-feature, 6-class blobs with 30 % label noise, a 16→96→6 MLP trained with AdamW.

use std::path::Path;
use std::time::Instant;

use candle_core::{D, Device, Tensor, Var};
use candle_nn::Optimizer;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use sewa_checkpoint::{Checkpoint, OpenOptions};
use sewa_engine::demo::task::TaskSpec;
use sewa_engine::objective::data::{Targets, write_dataset};
use sewa_engine::objective::{Objective, ObjectiveConfig};
use sewa_engine::select::{
    Memory, Method, Options, Selection, SewaConfig, SoupConfig, Strategy, TwaConfig, run_configured,
};

const WINDOW: usize = 20;
const K: usize = 5;

type Data = (Vec<f32>, Vec<i64>);

fn gauss(rng: &mut ChaCha8Rng) -> f32 {
    let (u, v): (f64, f64) = (rng.random_range(1e-12..1.0), rng.random());
    ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
}

fn spirals(rows: usize, rng: &mut ChaCha8Rng) -> Data {
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for _ in 0..rows {
        let class = rng.random_range(0..2);
        let t: f32 = rng.random_range(0.25..3.0f32) * std::f32::consts::PI;
        let sign = if class == 0 { 1.0 } else { -1.0 };
        x.push(sign * t * t.cos() / 9.0 + 0.08 * gauss(rng));
        x.push(sign * t * t.sin() / 9.0 + 0.08 * gauss(rng));
        y.push(class as i64);
    }
    (x, y)
}

fn blobs(rows: usize, centres: &[Vec<f32>], classes: usize, rng: &mut ChaCha8Rng) -> Data {
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for _ in 0..rows {
        let b = rng.random_range(0..centres.len());
        x.extend(centres[b].iter().map(|c| c + gauss(rng)));
        let noisy = rng.random::<f64>() < 0.3;
        y.push(if noisy { rng.random_range(0..classes) } else { b % classes } as i64);
    }
    (x, y)
}

/// How a bench trajectory trains.
enum Opt {
    Momentum(f64, f64),
    AdamW(f64),
}

/// Train an MLP with `dims` on `train`, saving `step_N.safetensors` every `every` steps.
fn train(
    dir: &Path,
    dims: &[usize],
    train: &Data,
    opt: Opt,
    steps: usize,
    every: usize,
    seed: u64,
) {
    let dev = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xbe7c);
    let mut vars = Vec::new();
    let mut names = Vec::new();
    for (l, w) in dims.windows(2).enumerate() {
        let bound = (1.0 / w[0] as f64).sqrt();
        let n = w[0] * w[1];
        let data: Vec<f32> = (0..n).map(|_| rng.random_range(-bound..bound) as f32).collect();
        vars.push(Var::from_vec(data, (w[1], w[0]), &dev).unwrap());
        vars.push(Var::from_vec(vec![0f32; w[1]], w[1], &dev).unwrap());
        names.push(format!("net.{}.weight", 2 * l));
        names.push(format!("net.{}.bias", 2 * l));
    }
    let rows = train.1.len();
    let x = Tensor::from_slice(&train.0, (rows, dims[0]), &dev).unwrap();
    let y: Vec<u32> = train.1.iter().map(|v| *v as u32).collect();
    let y = Tensor::from_vec(y, rows, &dev).unwrap();
    let mut velocity: Vec<Tensor> = vars.iter().map(|v| v.zeros_like().unwrap()).collect();
    let mut adam = match opt {
        Opt::AdamW(lr) => {
            let p = candle_nn::ParamsAdamW { lr, weight_decay: 1e-3, ..Default::default() };
            Some(candle_nn::AdamW::new(vars.clone(), p).unwrap())
        }
        Opt::Momentum(..) => None,
    };
    for step in 1..=steps {
        let idx: Vec<u32> = (0..32).map(|_| rng.random_range(0..rows as u32)).collect();
        let idx = Tensor::from_vec(idx, 32, &dev).unwrap();
        let (xb, yb) = (x.index_select(&idx, 0).unwrap(), y.index_select(&idx, 0).unwrap());
        let mut h = xb;
        for l in 0..dims.len() - 1 {
            h = h
                .matmul(&vars[2 * l].t().unwrap())
                .unwrap()
                .broadcast_add(&vars[2 * l + 1])
                .unwrap();
            if l + 2 < dims.len() {
                h = h.relu().unwrap();
            }
        }
        let logp = candle_nn::ops::log_softmax(&h, D::Minus1).unwrap();
        let loss = candle_nn::loss::nll(&logp, &yb).unwrap();
        match (&opt, adam.as_mut()) {
            (_, Some(a)) => a.backward_step(&loss).unwrap(),
            (Opt::Momentum(lr, mu), None) => {
                let grads = loss.backward().unwrap();
                for (v, vel) in vars.iter().zip(velocity.iter_mut()) {
                    let g = grads.get(v.as_tensor()).unwrap();
                    *vel = ((&*vel * *mu).unwrap() + g).unwrap();
                    v.set(&(v.as_tensor() - (&*vel * *lr).unwrap()).unwrap()).unwrap();
                }
            }
            _ => unreachable!(),
        }
        if step % every == 0 {
            save(&dir.join(format!("step_{step:06}.safetensors")), &names, &vars);
        }
    }
}

fn save(path: &Path, names: &[String], vars: &[Var]) {
    let map: std::collections::HashMap<String, Tensor> =
        names.iter().cloned().zip(vars.iter().map(|v| v.as_tensor().clone())).collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

/// Checkpoints of one trajectory (sorted) and the objective on its held-out split.
fn trajectory(name: &str, seed: u64, dir: &Path) -> (Vec<Checkpoint>, Box<dyn Objective>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let sel = dir.join("selection.safetensors");
    match name {
        "demo" => {
            let spec = TaskSpec { seed, ..TaskSpec::default() };
            let task = spec.generate();
            let s = &task.selection;
            write_dataset(&sel, &s.x, spec.features, Targets::Classes(&s.y)).unwrap();
            spec.train(&task, dir, |_, _| Ok(())).unwrap();
        }
        "spiral" => {
            let (tr, held) = (spirals(2000, &mut rng), spirals(800, &mut rng));
            write_dataset(&sel, &held.0, 2, Targets::Classes(&held.1)).unwrap();
            train(dir, &[2, 48, 48, 2], &tr, Opt::Momentum(0.05, 0.9), 2400, 60, seed);
        }
        _ => {
            let centres: Vec<Vec<f32>> =
                (0..12).map(|_| (0..16).map(|_| 1.2 * gauss(&mut rng)).collect()).collect();
            let (tr, held) =
                (blobs(3000, &centres, 6, &mut rng), blobs(1000, &centres, 6, &mut rng));
            write_dataset(&sel, &held.0, 16, Targets::Classes(&held.1)).unwrap();
            train(dir, &[16, 96, 6], &tr, Opt::AdamW(0.01), 2400, 60, seed);
        }
    }
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("step_"))
        .collect();
    paths.sort();
    let ckpts = paths.iter().map(|p| Checkpoint::open(p, &OpenOptions::default()).unwrap());
    let cfg = ObjectiveConfig::builtin(sel);
    (ckpts.collect(), cfg.build(dir).unwrap())
}

#[derive(Clone)]
struct Setup {
    sewa: SewaConfig,
    soup: SoupConfig,
    twa: TwaConfig,
}

fn select(
    method: Method,
    window: &[&Checkpoint],
    obj: &mut dyn Objective,
    s: &Setup,
    memory: &mut Memory,
) -> (Selection, f64) {
    let opts = Options { sewa: &s.sewa, soup: &s.soup, twa: &s.twa };
    let t = Instant::now();
    let sel = run_configured(method, K, window, obj, opts, memory).unwrap();
    (sel, t.elapsed().as_secs_f64())
}

fn row(traj: &str, seed: u64, label: &str, sel: &Selection, secs: f64, best: f64) {
    let loss = sel.loss.unwrap_or(f64::NAN);
    println!(
        "{traj:<7} {seed:>4} {label:<22} {:>6} {:>10.5} {:>+8.3}% {:>8.2}",
        sel.details.total_calls(),
        loss,
        100.0 * (loss - best) / best,
        secs
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let seeds: u64 = args
        .iter()
        .position(|a| a == "--seeds")
        .map_or(5, |i| args[i + 1].parse().expect("--seeds N"));
    let others: u64 = args
        .iter()
        .position(|a| a == "--other-seeds")
        .map_or(2, |i| args[i + 1].parse().expect("--other-seeds N"));
    let curve = args.iter().any(|a| a == "--curve");
    println!("window {WINDOW}, k = {K}; calls = all objective calls (member losses included)");
    println!(
        "{:<7} {:>4} {:<22} {:>6} {:>10} {:>9} {:>8}",
        "traj", "seed", "method", "calls", "loss", "gap", "secs"
    );
    let base = Setup {
        sewa: SewaConfig::default(),
        soup: SoupConfig::default(),
        twa: TwaConfig::default(),
    };
    for traj in ["demo", "spiral", "adamw"] {
        for seed in 0..if traj == "demo" { seeds } else { others } {
            let dir = tempfile::tempdir().unwrap();
            let (ckpts, mut obj) = trajectory(traj, seed, dir.path());
            let n = ckpts.len();
            let window: Vec<&Checkpoint> = ckpts[n - WINDOW - 1..n - 1].iter().collect();
            let slid: Vec<&Checkpoint> = ckpts[n - WINDOW..].iter().collect();
            let s = Setup { sewa: SewaConfig { seed, ..base.sewa.clone() }, ..base.clone() };
            let fresh = || Memory::default();
            let (ex, t) = select(Method::Exhaustive, &window, obj.as_mut(), &s, &mut fresh());
            let best = ex.loss.unwrap();
            row(traj, seed, "exhaustive", &ex, t, best);
            let mut memory = fresh();
            let (sur, t) = select(Method::Sewa, &window, obj.as_mut(), &s, &mut memory);
            row(traj, seed, "sewa (surrogate)", &sur, t, best);
            let direct = Setup {
                sewa: SewaConfig { strategy: Strategy::Direct, ..s.sewa.clone() },
                soup: s.soup.clone(),
                twa: s.twa.clone(),
            };
            let (dir_sel, t) = select(Method::Sewa, &window, obj.as_mut(), &direct, &mut fresh());
            row(traj, seed, "sewa (direct)", &dir_sel, t, best);
            for (m, label) in
                [(Method::Greedy, "greedy"), (Method::Soup, "soup"), (Method::Twa, "twa")]
            {
                let (sel, t) = select(m, &window, obj.as_mut(), &s, &mut fresh());
                row(traj, seed, label, &sel, t, best);
            }
            let (ex2, _) = select(Method::Exhaustive, &slid, obj.as_mut(), &s, &mut fresh());
            let (warm, t) = select(Method::Sewa, &slid, obj.as_mut(), &s, &mut memory);
            row(traj, seed, "sewa warm (slid by 1)", &warm, t, ex2.loss.unwrap());
            if curve {
                for budget in [10, 15, 20, 25, 30, 40, 60] {
                    let b = Setup {
                        sewa: SewaConfig { surrogate_max_calls: budget, ..s.sewa.clone() },
                        soup: s.soup.clone(),
                        twa: s.twa.clone(),
                    };
                    let (sel, t) = select(Method::Sewa, &window, obj.as_mut(), &b, &mut fresh());
                    row(traj, seed, &format!("surrogate budget {budget}"), &sel, t, best);
                }
            }
        }
    }
}
