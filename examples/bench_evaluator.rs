//! Per-request cost of the external evaluator protocol for a ~100 MB model, against the cost
//! of the same forward/backward in-process (candle), for protocol 1 (candidate and gradient
//! files) and protocol 2 (the evaluator holds K members and receives mixing weights).
//!
//!     cargo run --release --example bench_evaluator [-- ROWS [K]]
//!     SEWA_BENCH_PYTHON=/path/to/python-with-torch cargo run --release --example bench_evaluator
//!
//! Protocol 1: `tests/evaluators/mlp_numpy.py --mode constant` loads the candidate and answers
//! a constant loss with zero gradients, so its time is the protocol alone: write the candidate,
//! the evaluator reads it, writes a gradient file, sewa reads and checks it.
//! Protocol 2: K members on disk, loaded once by the evaluator. `--mode echo` answers at once
//! (the protocol alone: one request line out, one reply line in); the numpy client in `--mode
//! constant` adds its own mixing of the K members and K dot products; with SEWA_BENCH_PYTHON,
//! the torch client computes the real loss and gradient (tests/evaluators/mlp_torch.py).

use std::path::{Path, PathBuf};
use std::time::Instant;

use sewa_checkpoint::{Checkpoint, OpenOptions};
use sewa_engine::objective::command::{CommandConfig, CommandObjective, Traffic};
use sewa_engine::objective::config::ObjectiveConfig;
use sewa_engine::objective::data::{Targets, write_dataset};
use sewa_engine::objective::{NamedTensor, Objective, Params};

const SIZES: [usize; 4] = [1024, 4096, 4096, 1024];
const REPS: usize = 5;

fn params(seed: usize) -> Params {
    let mut p = Vec::new();
    for (i, w) in SIZES.windows(2).enumerate() {
        let (fan_in, fan_out) = (w[0], w[1]);
        let scale = 1.0 / (fan_in as f32).sqrt();
        let data = (0..fan_in * fan_out)
            .map(|j| (((j + seed) * 7919 % 1000) as f32 / 500.0 - 1.0) * scale);
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

fn write_member(path: &Path, p: &Params) {
    let views = p.iter().map(|t| {
        let v = safetensors::tensor::TensorView::new(
            safetensors::Dtype::F32,
            t.shape.clone(),
            bytemuck::cast_slice(&t.data),
        );
        (t.name.clone(), v.unwrap())
    });
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Median wall time in milliseconds of `REPS` calls.
fn median_ms(mut f: impl FnMut()) -> f64 {
    let mut t: Vec<f64> = (0..REPS)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[REPS / 2]
}

fn start(command: Vec<String>) -> CommandObjective {
    CommandObjective::start(CommandConfig {
        command,
        timeout_s: 600.0,
        startup_timeout_s: 600.0,
        env: Default::default(),
        cwd: None,
        staging_dir: None,
        one_shot: false,
    })
    .unwrap()
}

/// Bytes per request: protocol lines (both ways) and staging files (written + read).
fn per_request(a: Traffic, b: Traffic, calls: usize) -> (f64, f64) {
    let lines = (b.lines_out + b.lines_in - a.lines_out - a.lines_in) as f64;
    let files = (b.staged_written + b.staged_read - a.staged_written - a.staged_read) as f64;
    (lines / calls as f64, files / calls as f64)
}

/// (ms with gradient, ms loss only, line bytes, file bytes per request) of mixing requests.
fn bench_mix(obj: &mut CommandObjective, members: &[&Checkpoint]) -> (f64, f64, f64, f64) {
    let k = members.len();
    let alpha: Vec<f64> = (0..k).map(|i| (i + 1) as f64 / (k * (k + 1) / 2) as f64).collect();
    obj.evaluate_mix(members, &alpha, true).unwrap(); // loads the members once
    let t0 = obj.traffic();
    let grad = median_ms(|| drop(obj.evaluate_mix(members, &alpha, true).unwrap()));
    let fwd = median_ms(|| drop(obj.evaluate_mix(members, &alpha, false).unwrap()));
    let (lines, files) = per_request(t0, obj.traffic(), 2 * REPS);
    (grad, fwd, lines, files)
}

fn row(what: &str, grad: f64, fwd: f64, lines: f64, files: f64) {
    println!(
        "{what:<44} {grad:9.2} ms {fwd:9.2} ms   lines {:>9} B/req   files {:>11} B/req",
        lines.round(),
        files.round()
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let rows: usize = args.next().map_or(256, |a| a.parse().expect("ROWS"));
    let k: usize = args.next().map_or(4, |a| a.parse().expect("K"));
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("selection.safetensors");
    let x: Vec<f32> = (0..rows * SIZES[0]).map(|i| ((i % 97) as f32 / 48.0) - 1.0).collect();
    let y: Vec<i64> = (0..rows as i64).map(|i| i % SIZES[3] as i64).collect();
    write_dataset(&data, &x, SIZES[0], Targets::Classes(&y)).unwrap();
    let p = params(0);
    let mb = p.iter().map(|t| t.data.len() * 4).sum::<usize>() as f64 / 1e6;

    let cfg = ObjectiveConfig::builtin(data.clone());
    let mut candle = cfg.build(dir.path()).unwrap();
    candle.evaluate(&p, true).unwrap(); // warm-up
    let fwd_bwd = median_ms(|| drop(candle.evaluate(&p, true).unwrap()));
    let fwd = median_ms(|| drop(candle.evaluate(&p, false).unwrap()));

    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let numpy = |mode: &str, protocol: &str| {
        let script = repo.join("tests/evaluators/mlp_numpy.py").display().to_string();
        let args = [script, data.display().to_string(), "--mode".into(), mode.into()];
        let mut cmd = vec!["python3".to_string()];
        cmd.extend(args);
        cmd.extend(["--protocol".to_string(), protocol.to_string()]);
        start(cmd)
    };
    let mut p1 = numpy("constant", "1");
    p1.evaluate(&p, true).unwrap(); // warm-up
    let t0 = p1.traffic();
    let p1_grad = median_ms(|| drop(p1.evaluate(&p, true).unwrap()));
    let p1_fwd = median_ms(|| drop(p1.evaluate(&p, false).unwrap()));
    let (p1_lines, p1_files) = per_request(t0, p1.traffic(), 2 * REPS);

    let members: Vec<Checkpoint> = (0..k)
        .map(|i| {
            let path = dir.path().join(format!("step_{i}.safetensors"));
            write_member(&path, &params(i));
            Checkpoint::open(&path, &OpenOptions::default()).unwrap()
        })
        .collect();
    let refs: Vec<&Checkpoint> = members.iter().collect();
    let echo = bench_mix(&mut numpy("echo", "2"), &refs);
    let np2 = bench_mix(&mut numpy("constant", "2"), &refs);
    let torch = std::env::var("SEWA_BENCH_PYTHON").ok().map(|py| {
        let script = repo.join("tests/evaluators/mlp_torch.py").display().to_string();
        bench_mix(
            &mut start(vec![py, script, data.display().to_string(), "--float32".into()]),
            &refs,
        )
    });

    println!("model: {mb:.1} MB f32 MLP {SIZES:?}, {rows} rows, K = {k} members; {REPS} reps");
    println!("{:<44} {:>11} {:>11}", "", "with grad", "loss only");
    row("in-process candle forward(+backward)", fwd_bwd, fwd, 0.0, 0.0);
    row("protocol 1 round trip (constant evaluator)", p1_grad, p1_fwd, p1_lines, p1_files);
    row("protocol 2 round trip (echo evaluator)", echo.0, echo.1, echo.2, echo.3);
    row("protocol 2 numpy client: mix + K dots", np2.0, np2.1, np2.2, np2.3);
    if let Some(t) = torch {
        row("protocol 2 torch client: mix + loss + K dots", t.0, t.1, t.2, t.3);
    }
    println!(
        "protocol overhead / in-process forward+backward: protocol 1 {:.1} %, protocol 2 {:.3} %",
        100.0 * p1_grad / fwd_bwd,
        100.0 * echo.0 / fwd_bwd
    );
}
