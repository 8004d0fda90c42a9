//! The external evaluator protocol end to end: sewa's `CommandObjective` against the real
//! Python client (the `sewa_evaluator` package in `clients/python/`) driving a numpy MLP.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sewa_checkpoint::{Checkpoint, DType};
use sewa_engine::objective::command::{CommandConfig, CommandObjective};
use sewa_engine::objective::config::ObjectiveConfig;
use sewa_engine::objective::{NamedTensor, Objective, Params};
use sewa_engine::select::{Method, SewaConfig, run_model_based};

const D: usize = 5;
const H: usize = 7;
const C: usize = 3;
const N: usize = 40;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Deterministic pseudo-random numbers in [-1, 1) without a dependency on rand's stream.
fn lcg(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Held-out data for the MLP: `inputs` f32 [N, D], `targets` i64 [N].
pub fn write_data(dir: &Path) -> PathBuf {
    let x = lcg(7, N * D);
    let y: Vec<i64> = (0..N).map(|i| (i % C) as i64).collect();
    let path = dir.join("selection.safetensors");
    let xb: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    let yb: Vec<u8> = y.iter().flat_map(|v| v.to_le_bytes()).collect();
    let tensors = vec![
        (
            "inputs",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![N, D], &xb).unwrap(),
        ),
        (
            "targets",
            safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![N], &yb).unwrap(),
        ),
    ];
    safetensors::serialize_to_file(tensors, None, &path).unwrap();
    path
}

/// MLP parameters in nn.Sequential layout, sorted by name.
pub fn mlp_params(seed: u64) -> Params {
    let t = |name: &str, shape: Vec<usize>, s: u64| {
        let n = shape.iter().product();
        NamedTensor { name: name.into(), shape, data: lcg(s, n) }
    };
    vec![
        t("net.0.bias", vec![H], seed),
        t("net.0.weight", vec![H, D], seed + 1),
        t("net.2.bias", vec![C], seed + 2),
        t("net.2.weight", vec![C, H], seed + 3),
    ]
}

fn evaluator(data: &Path, mode: &str, timeout_s: f64) -> CommandConfig {
    CommandConfig {
        command: vec![
            "python3".into(),
            repo().join("tests/evaluators/mlp_numpy.py").display().to_string(),
            data.display().to_string(),
            "--mode".into(),
            mode.into(),
        ],
        timeout_s,
        startup_timeout_s: 120.0,
        env: Default::default(),
        cwd: None,
        staging_dir: None,
        one_shot: false,
    }
}

fn start(mode: &str, timeout_s: f64) -> (tempfile::TempDir, CommandObjective) {
    let dir = tempfile::tempdir().unwrap();
    let data = write_data(dir.path());
    let obj = CommandObjective::start(evaluator(&data, mode, timeout_s)).unwrap();
    (dir, obj)
}

#[test]
fn gradient_matches_finite_differences() {
    let (_dir, mut obj) = start("ok", 60.0);
    assert!(obj.supports_grad());
    let p = mlp_params(1);
    let ev = obj.evaluate(&p, true).unwrap();
    let grad = ev.grad.expect("gradient asked for");
    assert_eq!(grad.len(), p.len());
    // Central differences on a few coordinates of each tensor (the evaluator works in f64,
    // candidates travel as f32: eps large enough to stay above f32 rounding).
    let eps = 1e-2f32;
    for (ti, t) in p.iter().enumerate() {
        for j in [0, t.data.len() / 2, t.data.len() - 1] {
            let mut plus = p.clone();
            plus[ti].data[j] += eps;
            let mut minus = p.clone();
            minus[ti].data[j] -= eps;
            let fd = (obj.evaluate(&plus, false).unwrap().loss
                - obj.evaluate(&minus, false).unwrap().loss)
                / (2.0 * eps as f64);
            let g = grad[ti].data[j] as f64;
            assert!((fd - g).abs() < 1e-3 + 1e-2 * g.abs(), "{}[{j}]: fd {fd} vs grad {g}", t.name);
        }
    }
}

#[test]
fn forward_only_evaluator_returns_no_gradient() {
    let (_dir, mut obj) = start("forward-only", 60.0);
    assert!(!obj.supports_grad());
    let ev = obj.evaluate(&mlp_params(2), true).unwrap();
    assert!(ev.loss.is_finite() && ev.loss > 0.0);
    assert!(ev.grad.is_none());
}

#[test]
fn crash_is_reported_with_stderr_and_the_evaluator_restarts() {
    let (_dir, mut obj) = start("crash-after-1", 60.0);
    let p = mlp_params(3);
    let first = obj.evaluate(&p, false).unwrap().loss;
    let err = obj.evaluate(&p, false).unwrap_err().to_string();
    assert!(err.contains("exited"), "{err}");
    assert!(err.contains("simulated crash"), "stderr tail missing: {err}");
    // Restart after the backoff: the new process answers its first request again.
    let deadline = Instant::now() + Duration::from_secs(30);
    let again = loop {
        match obj.evaluate(&p, false) {
            Ok(ev) => break ev.loss,
            Err(e) if Instant::now() < deadline && e.to_string().contains("restart") => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(e) => panic!("evaluator did not come back: {e}"),
        }
    };
    assert_eq!(first, again);
}

#[test]
fn hang_past_timeout_is_killed() {
    let (_dir, mut obj) = start("hang", 1.0);
    let t0 = Instant::now();
    let err = obj.evaluate(&mlp_params(4), false).unwrap_err().to_string();
    assert!(err.contains("did not answer within timeout_s"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(30));
}

#[test]
fn garbage_output_is_an_error() {
    let (_dir, mut obj) = start("garbage", 30.0);
    let err = obj.evaluate(&mlp_params(5), false).unwrap_err().to_string();
    assert!(err.contains("malformed") && err.contains("this is not json"), "{err}");
}

#[test]
fn nan_loss_is_an_error() {
    let (_dir, mut obj) = start("nan", 30.0);
    let err = obj.evaluate(&mlp_params(6), false).unwrap_err().to_string();
    assert!(err.contains("non-finite loss"), "{err}");
}

#[test]
fn protocol_version_mismatch_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_data(dir.path());
    let err = match CommandObjective::start(evaluator(&data, "version", 30.0)) {
        Ok(_) => panic!("a protocol 99 evaluator was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("protocol version 99") && err.contains("sewa speaks [1, 2]"), "{err}");
}

#[test]
fn missing_program_is_a_clear_error() {
    let cfg = CommandConfig {
        command: vec!["/nonexistent/evaluator".into()],
        timeout_s: 5.0,
        startup_timeout_s: 5.0,
        env: Default::default(),
        cwd: None,
        staging_dir: None,
        one_shot: false,
    };
    let err = match CommandObjective::start(cfg) {
        Ok(_) => panic!("started a missing program"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("cannot start evaluator /nonexistent/evaluator"), "{err}");
}

fn builtin(data: &Path) -> Box<dyn Objective> {
    let cfg = ObjectiveConfig::builtin(data.to_path_buf());
    cfg.build(Path::new(".")).unwrap()
}

#[test]
fn client_gradient_matches_the_builtin_candle_objective() {
    let (dir, mut cmd) = start("ok", 60.0);
    let mut candle = builtin(&dir.path().join("selection.safetensors"));
    let p = mlp_params(11);
    let a = cmd.evaluate(&p, true).unwrap();
    let b = candle.evaluate(&p, true).unwrap();
    assert!((a.loss - b.loss).abs() < 1e-5 * b.loss.abs().max(1.0), "{} vs {}", a.loss, b.loss);
    for (ga, gb) in a.grad.unwrap().iter().zip(b.grad.unwrap().iter()) {
        assert_eq!((&ga.name, &ga.shape), (&gb.name, &gb.shape));
        for (x, y) in ga.data.iter().zip(&gb.data) {
            assert!((x - y).abs() < 1e-5 + 1e-4 * y.abs(), "{}: {x} vs {y}", ga.name);
        }
    }
}

/// A window of MLP checkpoints around one point, each a noisy copy; a few are far off.
fn window(n: usize) -> Vec<Checkpoint> {
    let base = mlp_params(21);
    (0..n)
        .map(|i| {
            let noise = mlp_params(100 + i as u64);
            let scale = if i % 3 == 1 { 1.5 } else { 0.2 };
            let tensors = base
                .iter()
                .zip(&noise)
                .map(|(b, z)| {
                    let bytes = b
                        .data
                        .iter()
                        .zip(&z.data)
                        .flat_map(|(x, e)| (x + scale * e).to_le_bytes())
                        .collect();
                    (b.name.clone(), DType::F32, b.shape.clone(), bytes)
                })
                .collect();
            Checkpoint::from_memory(format!("member-{i}"), Some(i as u64), tensors).unwrap()
        })
        .collect()
}

#[test]
fn sewa_and_greedy_run_through_the_protocol_and_agree_with_builtin() {
    let (dir, mut cmd) = start("ok", 60.0);
    let mut candle = builtin(&dir.path().join("selection.safetensors"));
    let members = window(6);
    let refs: Vec<&Checkpoint> = members.iter().collect();
    let cfg = SewaConfig { iterations: 15, ..SewaConfig::default() };
    for method in [Method::Sewa, Method::Greedy] {
        let (via_cmd, _) = run_model_based(method, 2, &refs, &mut cmd, &cfg, None).unwrap();
        let (via_candle, _) =
            run_model_based(method, 2, &refs, candle.as_mut(), &cfg, None).unwrap();
        assert_eq!(via_cmd.members(), via_candle.members(), "{method}");
        let (a, b) = (via_cmd.loss.unwrap(), via_candle.loss.unwrap());
        assert!((a - b).abs() < 1e-4 * b.abs().max(1.0), "{method}: {a} vs {b}");
    }
}

#[test]
fn forward_only_evaluator_drives_sewa_with_the_score_function_estimator() {
    let (_dir, mut cmd) = start("forward-only", 60.0);
    let members = window(5);
    let refs: Vec<&Checkpoint> = members.iter().collect();
    let cfg = SewaConfig { iterations: 10, ..SewaConfig::default() };
    let (sel, _) = run_model_based(Method::Sewa, 2, &refs, &mut cmd, &cfg, None).unwrap();
    assert_eq!(sel.members().len(), 2);
    assert!(sel.loss.unwrap().is_finite());
    assert_eq!(sel.details.json()["estimator"], "reinforce", "{}", sel.details);
    // Exhaustive needs no gradient either, and certifies the best pair.
    let (best, _) = run_model_based(Method::Exhaustive, 2, &refs, &mut cmd, &cfg, None).unwrap();
    assert!(best.loss.unwrap() <= sel.loss.unwrap() + 1e-9);
}

#[test]
fn objective_table_with_kind_command_starts_the_evaluator() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_data(dir.path());
    let script = repo().join("tests/evaluators/mlp_numpy.py");
    let text = format!(
        "kind = \"command\"\ncommand = [\"python3\", {:?}, \"selection.safetensors\"]\ntimeout_s = 30\n",
        script.display().to_string()
    );
    let cfg = ObjectiveConfig::from_table_text(&text).unwrap();
    cfg.check(&dir.path().join("sewa.toml")).unwrap();
    // cwd defaults to the config file's directory, so the relative data path resolves there.
    let mut obj = cfg.build(dir.path()).unwrap();
    assert!(obj.supports_grad() && obj.describe().contains("mlp_numpy"), "{}", obj.describe());
    let direct = builtin(&data).evaluate(&mlp_params(9), false).unwrap().loss;
    assert!((obj.evaluate(&mlp_params(9), false).unwrap().loss - direct).abs() < 1e-5);

    let missing = ObjectiveConfig::from_table_text("kind = \"command\"").unwrap();
    let err = missing.check(Path::new("sewa.toml")).unwrap_err();
    assert!(err.to_string().contains("command must name a program"), "{err}");
}

#[test]
fn client_refuses_a_loss_with_no_gradient_for_any_weight() {
    let (_dir, mut obj) = start("no-grad", 60.0);
    let p = mlp_params(12);
    let err = obj.evaluate(&p, true).unwrap_err().to_string();
    assert!(err.contains("no weight received a gradient"), "{err}");
    assert!(err.contains("use torch.func.functional_call(model, weights, args)"), "{err}");
    // Forward-only calls are unaffected (after the restart the failure triggers).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match obj.evaluate(&p, false) {
            Ok(ev) => break assert!(ev.loss.is_finite()),
            Err(e) if Instant::now() < deadline && e.to_string().contains("restart") => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(e) => panic!("forward call failed: {e}"),
        }
    }
}

#[test]
fn zero_gradient_evaluator_is_refused_unless_reinforce_is_configured() {
    let (_dir, mut zero) = start("zero-grad", 60.0);
    let members = window(6);
    let refs: Vec<&Checkpoint> = members.iter().collect();
    let cfg = SewaConfig { iterations: 10, ..SewaConfig::default() };
    let err =
        run_model_based(Method::Sewa, 2, &refs, &mut zero, &cfg, None).unwrap_err().to_string();
    for part in ["mlp_numpy", "exactly zero", "torch.func.functional_call", "\"reinforce\""] {
        assert!(err.contains(part), "{part:?} missing: {err}");
    }
    // With the forward-only estimator configured, the same evaluator selects exactly what a
    // forward-only evaluator does: only losses are used.
    let reinforce =
        SewaConfig { estimator: sewa_engine::select::sewa::Estimator::Reinforce, ..cfg };
    let (sel, _) = run_model_based(Method::Sewa, 2, &refs, &mut zero, &reinforce, None).unwrap();
    let (_dir2, mut fwd) = start("forward-only", 60.0);
    let (want, _) = run_model_based(Method::Sewa, 2, &refs, &mut fwd, &reinforce, None).unwrap();
    assert_eq!(sel.details.json()["estimator"], "reinforce");
    assert_eq!(sel.weights, want.weights, "{} vs {}", sel.why, want.why);
}
