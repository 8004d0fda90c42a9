//! Per-request overhead of the external evaluator protocol for a ~100 MB model, against the
//! cost of the same forward/backward in-process (candle).
//!
//!     cargo run --release --example bench_evaluator [-- ROWS]
//!
//! The evaluator (`tests/evaluators/mlp_numpy.py --mode constant`) loads the candidate and
//! answers a constant loss with zero gradients, so its time is the protocol alone: write the
//! candidate, the evaluator reads it, writes a gradient file, sewa reads and checks it.

use std::path::PathBuf;
use std::time::Instant;

use sewa::objective::command::{CommandConfig, CommandObjective};
use sewa::objective::config::ObjectiveConfig;
use sewa::objective::data::{Targets, write_dataset};
use sewa::objective::{NamedTensor, Objective, Params};

const SIZES: [usize; 4] = [1024, 4096, 4096, 1024];

fn params() -> Params {
    let mut p = Vec::new();
    for (i, w) in SIZES.windows(2).enumerate() {
        let (fan_in, fan_out) = (w[0], w[1]);
        let scale = 1.0 / (fan_in as f32).sqrt();
        let data = (0..fan_in * fan_out).map(|j| ((j * 7919 % 1000) as f32 / 500.0 - 1.0) * scale);
        let name = format!("net.{}", 2 * i);
        p.push(NamedTensor {
            name: format!("{name}.bias"),
            shape: vec![fan_out],
            data: vec![0.01; fan_out],
        });
        p.push(NamedTensor {
            name: format!("{name}.weight"),
            shape: vec![fan_out, fan_in],
            data: data.collect(),
        });
    }
    p.sort_by(|a, b| a.name.cmp(&b.name));
    p
}

/// Median wall time in milliseconds of `reps` calls.
fn median_ms(reps: usize, mut f: impl FnMut()) -> f64 {
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[reps / 2]
}

fn main() {
    let rows: usize = std::env::args().nth(1).map_or(256, |a| a.parse().expect("ROWS"));
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("selection.safetensors");
    let x: Vec<f32> = (0..rows * SIZES[0]).map(|i| ((i % 97) as f32 / 48.0) - 1.0).collect();
    let y: Vec<i64> = (0..rows as i64).map(|i| i % SIZES[3] as i64).collect();
    write_dataset(&data, &x, SIZES[0], Targets::Classes(&y)).unwrap();
    let p = params();
    let mb = p.iter().map(|t| t.data.len() * 4).sum::<usize>() as f64 / 1e6;

    let cfg = ObjectiveConfig { data: data.clone(), ..Default::default() };
    let mut candle = cfg.build(dir.path()).unwrap();
    candle.evaluate(&p, true).unwrap(); // warm-up
    let fwd_bwd = median_ms(5, || drop(candle.evaluate(&p, true).unwrap()));
    let fwd = median_ms(5, || drop(candle.evaluate(&p, false).unwrap()));

    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/evaluators/mlp_numpy.py");
    let mut cmd = CommandObjective::start(CommandConfig {
        command: vec![
            "python3".into(),
            script.display().to_string(),
            data.display().to_string(),
            "--mode".into(),
            "constant".into(),
        ],
        timeout_s: 120.0,
        startup_timeout_s: 120.0,
        env: Default::default(),
        cwd: None,
        one_shot: false,
    })
    .unwrap();
    cmd.evaluate(&p, true).unwrap(); // warm-up
    let proto_grad = median_ms(5, || drop(cmd.evaluate(&p, true).unwrap()));
    let proto_fwd = median_ms(5, || drop(cmd.evaluate(&p, false).unwrap()));

    println!(
        "model: {mb:.1} MB f32 MLP {SIZES:?}, {rows} rows; scratch dir {:?}",
        cmd.scratch_dir()
    );
    println!("in-process candle   forward+backward {fwd_bwd:8.1} ms   forward {fwd:8.1} ms");
    println!(
        "protocol round trip with gradient    {proto_grad:8.1} ms   loss only {proto_fwd:8.1} ms"
    );
    println!(
        "protocol overhead / in-process cost: {:.2}x (with gradient), {:.2}x (loss only)",
        proto_grad / fwd_bwd,
        proto_fwd / fwd
    );
}
