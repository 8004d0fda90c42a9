//! Model-based selection: the mask gradient against finite differences (f64 slow twin), SeWA
//! against exhaustive search on planted problems, determinism, warm starts, baselines.

use sewa::checkpoint::{Checkpoint, DType};
use sewa::error::Result;
use sewa::objective::{Evaluation, NamedTensor, Objective, Params};
use sewa::select::blend::Blend;
use sewa::select::{SewaConfig, run_model_based};

/// F(w) = Σ_j a_j (w_j − t_j)², computed in f64; exact gradient when `grad` is on.
struct Quad {
    target: Vec<f64>,
    scale: Vec<f64>,
    grad: bool,
}

impl Quad {
    fn f64(&self, w: &[f64]) -> f64 {
        w.iter().zip(&self.target).zip(&self.scale).map(|((w, t), a)| a * (w - t).powi(2)).sum()
    }
}

impl Objective for Quad {
    fn evaluate(&mut self, p: &Params, want_grad: bool) -> Result<Evaluation> {
        let w: Vec<f64> = p[0].data.iter().map(|x| *x as f64).collect();
        let grad = (want_grad && self.grad).then(|| {
            let g = w
                .iter()
                .zip(&self.target)
                .zip(&self.scale)
                .map(|((w, t), a)| (2.0 * a * (w - t)) as f32)
                .collect();
            vec![NamedTensor { name: "w".into(), shape: p[0].shape.clone(), data: g }]
        });
        Ok(Evaluation { loss: self.f64(&w), grad })
    }
    fn supports_grad(&self) -> bool {
        self.grad
    }
    fn describe(&self) -> String {
        "quadratic".into()
    }
}

fn member(i: usize, w: &[f64]) -> Checkpoint {
    let bytes = w.iter().flat_map(|x| (*x as f32).to_le_bytes()).collect();
    let steps = vec![0u8; 8];
    Checkpoint::from_memory(
        format!("m{i:02}.safetensors"),
        Some(100 * i as u64),
        vec![
            ("w".into(), DType::F32, vec![w.len()], bytes),
            ("count".into(), DType::I64, vec![1], steps),
        ],
    )
    .unwrap()
}

/// Deterministic pseudo-random numbers in [-1, 1) (no rand dependency in the test's logic).
fn noise(seed: u64, n: usize) -> Vec<f64> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect()
}

/// A window of `n` members around `target`: members in `good` are close, with noise that
/// partly cancels; the rest share a bias direction, so no mix of bad ones looks good.
fn planted(n: usize, dim: usize, good: &[usize], seed: u64) -> (Vec<Checkpoint>, Quad) {
    let target = noise(seed, dim);
    let bias = noise(seed + 1, dim);
    let members = (0..n)
        .map(|i| {
            let z = noise(seed + 10 + i as u64, dim);
            let w: Vec<f64> = if good.contains(&i) {
                target.iter().zip(&z).map(|(t, z)| t + 0.3 * z).collect()
            } else {
                target.iter().zip(&z).zip(&bias).map(|((t, z), b)| t + 0.3 * z + 0.5 * b).collect()
            };
            member(i, &w)
        })
        .collect();
    let scale = noise(seed + 2, dim).iter().map(|a| 1.0 + 0.5 * a).collect();
    (members, Quad { target, scale, grad: true })
}

#[test]
fn mask_gradient_matches_finite_differences_in_f64() {
    let (members, mut quad) = planted(6, 40, &[1, 4], 7);
    let refs: Vec<&Checkpoint> = members.iter().collect();
    let blend = Blend::new(&refs).unwrap();
    let m = [0.9, 0.2, 0.6, 0.05, 0.7, 0.4];
    let mut point = blend.zeros();
    blend.mix(&m, &mut point).unwrap();
    let g = quad.evaluate(&point, true).unwrap().grad.unwrap();
    let total: f64 = m.iter().sum();
    let analytic: Vec<f64> =
        blend.dots(&g, &point).unwrap().into_iter().map(|d| d / total).collect();
    // Slow twin: form w(m) in f64 straight from the members' values, difference centrally.
    let ws: Vec<Vec<f64>> = members
        .iter()
        .map(|c| {
            c.data("w")
                .unwrap()
                .chunks(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
                .collect()
        })
        .collect();
    let f = |m: &[f64]| {
        let s: f64 = m.iter().sum();
        let w: Vec<f64> = (0..40)
            .map(|j| m.iter().zip(&ws).map(|(mi, wi)| mi * wi[j]).sum::<f64>() / s)
            .collect();
        quad.f64(&w)
    };
    for i in 0..m.len() {
        let (mut up, mut dn) = (m.to_vec(), m.to_vec());
        up[i] += 1e-5;
        dn[i] -= 1e-5;
        let fd = (f(&up) - f(&dn)) / 2e-5;
        let err = (fd - analytic[i]).abs() / fd.abs().max(1e-3);
        assert!(err < 1e-3, "member {i}: analytic {} vs finite difference {fd}", analytic[i]);
    }
}

fn run(
    method: &str,
    k: usize,
    members: &[Checkpoint],
    quad: &mut Quad,
    cfg: &SewaConfig,
) -> sewa::select::Selection {
    let refs: Vec<&Checkpoint> = members.iter().collect();
    run_model_based(method, k, &refs, quad, cfg, None).unwrap().0
}

#[test]
fn sewa_finds_the_exhaustive_best_on_planted_windows() {
    for (seed, good) in [(1u64, vec![2, 5, 7]), (2, vec![0, 9, 11]), (3, vec![4, 6, 10])] {
        let (members, mut quad) = planted(12, 64, &good, seed);
        let cfg = SewaConfig::default();
        let ex = run("exhaustive", 3, &members, &mut quad, &cfg);
        let sw = run("sewa", 3, &members, &mut quad, &cfg);
        assert_eq!(ex.members(), good, "planted subset is the optimum (seed {seed})");
        assert_eq!(sw.members(), ex.members(), "seed {seed}: {}", sw.why);
        assert_eq!(sw.details["chosen"], serde_json::json!(good));
        // The optimiser alone (no polishing) must already rank the planted members on top:
        // polishing would otherwise hide a broken gradient.
        let raw = run("sewa", 3, &members, &mut quad, &SewaConfig { polish: false, ..cfg });
        assert_eq!(raw.details["top_k"], serde_json::json!(good), "seed {seed}: {}", raw.why);
        assert_eq!(raw.details["polish_changed"], false);
    }
}

#[test]
fn reinforce_estimator_works_without_gradients() {
    let (members, mut quad) = planted(10, 32, &[1, 3, 8], 5);
    quad.grad = false;
    let cfg = SewaConfig::default();
    let sw = run("sewa", 3, &members, &mut quad, &cfg);
    assert_eq!(sw.details["estimator"], "reinforce");
    assert_eq!(sw.members(), vec![1, 3, 8], "{}", sw.why);
    let concrete = SewaConfig { estimator: sewa::select::sewa::Estimator::Concrete, ..cfg };
    let refs: Vec<&Checkpoint> = members.iter().collect();
    let e = run_model_based("sewa", 3, &refs, &mut quad, &concrete, None).unwrap_err();
    assert!(e.to_string().contains("reinforce"), "{e}");
}

#[test]
fn sewa_is_deterministic_for_a_seed() {
    let (members, mut quad) = planted(10, 32, &[0, 2, 3], 11);
    let cfg = SewaConfig { polish: false, ..SewaConfig::default() };
    let a = run("sewa", 3, &members, &mut quad, &cfg);
    let b = run("sewa", 3, &members, &mut quad, &cfg);
    assert_eq!(a.details["probabilities"], b.details["probabilities"]);
    let c = run("sewa", 3, &members, &mut quad, &SewaConfig { seed: 9, ..cfg });
    assert_ne!(a.details["probabilities"], c.details["probabilities"], "seed changes the samples");
}

#[test]
fn warm_start_uses_under_30_percent_of_cold_oracle_calls() {
    let (all, mut quad) = planted(14, 48, &[3, 6, 9, 12], 21);
    let cfg = SewaConfig::default();
    let first: Vec<&Checkpoint> = all[..12].iter().collect();
    let (_, state) = run_model_based("sewa", 4, &first, &mut quad, &cfg, None).unwrap();
    // The window slides by two: two members leave, two arrive.
    let second: Vec<&Checkpoint> = all[2..].iter().collect();
    let (cold, _) = run_model_based("sewa", 4, &second, &mut quad, &cfg, None).unwrap();
    let (warm, _) = run_model_based("sewa", 4, &second, &mut quad, &cfg, state.as_ref()).unwrap();
    let calls = |s: &sewa::select::Selection| s.details["oracle_calls"].as_u64().unwrap();
    assert_eq!(warm.details["warm"], true);
    assert!(
        calls(&warm) * 10 <= calls(&cold) * 3,
        "warm {} vs cold {}",
        calls(&warm),
        calls(&cold)
    );
    assert_eq!(warm.members(), cold.members(), "warm {} / cold {}", warm.why, cold.why);
}

#[test]
fn baselines_behave() {
    let (members, mut quad) = planted(8, 16, &[1, 2], 3);
    let cfg = SewaConfig { exhaustive_limit: 10, ..SewaConfig::default() };
    let refs: Vec<&Checkpoint> = members.iter().collect();
    let e = run_model_based("exhaustive", 3, &refs, &mut quad, &cfg, None).unwrap_err();
    assert!(e.to_string().contains("C(8,3) = 56"), "{e}");
    let r1 = run("random", 3, &members, &mut quad, &cfg);
    let r2 = run("random", 3, &members, &mut quad, &cfg);
    assert_eq!(r1.members(), r2.members());
    assert_eq!(r1.members().len(), 3);
    let g = run("greedy", 3, &members, &mut quad, &cfg);
    let first = g.details["order"][0].as_u64().unwrap() as usize;
    assert!(g.members().contains(&first), "the soup starts from the best single member");
    let single = g.details["member_losses"][first].as_f64().unwrap();
    assert!(g.loss.unwrap() <= single);
    let all = run("sewa", 20, &members, &mut quad, &cfg);
    assert_eq!(all.members(), (0..8).collect::<Vec<_>>(), "k above the window takes it all");
    assert!(
        all.details["probabilities"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p.as_f64().unwrap().is_finite())
    );
    let w: f64 = g.weights.iter().sum();
    assert!((w - 1.0).abs() < 1e-12);
}

/// Real files end to end: a short candle training run writes checkpoints; `sewa average
/// --select sewa` (builtin MLP objective from a config file) publishes the same subset and loss
/// as `--select exhaustive`; `sewa report` draws the manifest.
#[test]
fn average_select_sewa_matches_exhaustive_on_real_checkpoints() {
    use sewa::demo::task::TaskSpec;
    use sewa::objective::data::{Targets, write_dataset};
    let dir = tempfile::tempdir().unwrap();
    let spec = TaskSpec {
        hidden: 12,
        train_rows: 400,
        selection_rows: 300,
        test_rows: 10,
        steps: 240,
        save_every: 30,
        seed: 3,
        ..TaskSpec::default()
    };
    let task = spec.generate();
    let inputs = spec.train(&task, dir.path(), |_| {}).unwrap();
    assert_eq!(inputs.len(), 8);
    let data = dir.path().join("sel.safetensors");
    write_dataset(&data, &task.selection.x, spec.features, Targets::Classes(&task.selection.y))
        .unwrap();
    let config = dir.path().join("sewa.toml");
    std::fs::write(&config, "[objective]\ndata = \"sel.safetensors\"\n\n[select.sewa]\nseed = 4\n")
        .unwrap();
    let manifest = |method: &str| {
        let out = dir.path().join(format!("{method}.safetensors"));
        let st = std::process::Command::new(env!("CARGO_BIN_EXE_sewa"))
            .args(["average", "--config"])
            .arg(&config)
            .args(["--select", method, "--k", "3", "--out"])
            .arg(&out)
            .args(&inputs)
            .output()
            .unwrap();
        assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
        let m = dir.path().join(format!("{method}.safetensors.manifest.json"));
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&m).unwrap()).unwrap();
        (m, v)
    };
    let (path, sw) = manifest("sewa");
    let (_, ex) = manifest("exhaustive");
    assert_eq!(sw["selection"]["method"], "sewa");
    assert_eq!(sw["weights"], ex["weights"], "sewa: {}", sw["selection"]["why"]);
    assert_eq!(sw["selection"]["loss"], ex["selection"]["loss"]);
    let d = &sw["selection"]["details"];
    assert!(d["oracle_calls"].as_u64().unwrap() > 0);
    assert_eq!(d["member_losses"].as_array().unwrap().len(), 8);
    assert_eq!(d["probabilities"].as_array().unwrap().len(), 8);
    let svg = dir.path().join("w.svg");
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_sewa"))
        .arg("report")
        .arg(&path)
        .arg("--out")
        .arg(&svg)
        .status()
        .unwrap();
    assert!(st.success());
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg") && text.contains("sewa: k = 3 of K = 8"), "{}", &text[..200]);
    assert!(text.contains("own held-out loss"), "the member-loss panel is drawn");
    // The same picture straight from checkpoints and the config.
    let svg2 = dir.path().join("w2.svg");
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_sewa"))
        .args(["report", "--k", "3", "--config"])
        .arg(&config)
        .arg("--out")
        .arg(&svg2)
        .args(&inputs)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(std::fs::read_to_string(&svg2).unwrap(), text);
}

/// A bare `--config sewa.toml` (parent "") used to start the evaluator in directory "" ("No such
/// file or directory"); relative paths now resolve against the config file's directory from any
/// cwd. A one-shot command whose evaluator fails does not announce a restart it will not make.
#[test]
fn bare_config_name_starts_a_command_evaluator_and_one_shot_failures_announce_no_restart() {
    use sewa::demo::task::TaskSpec;
    use sewa::objective::data::{Targets, write_dataset};
    let dir = tempfile::tempdir().unwrap();
    let spec = TaskSpec {
        hidden: 6,
        train_rows: 200,
        selection_rows: 100,
        test_rows: 10,
        steps: 90,
        save_every: 30,
        seed: 5,
        ..TaskSpec::default()
    };
    let task = spec.generate();
    let inputs = spec.train(&task, dir.path(), |_| {}).unwrap();
    let data = dir.path().join("selection.safetensors");
    write_dataset(&data, &task.selection.x, spec.features, Targets::Classes(&task.selection.y))
        .unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/evaluators/mlp_numpy.py");
    let config = |mode: &str| {
        format!(
            "[objective]\nkind = \"command\"\ncommand = [\"python3\", {script:?}, \"selection.safetensors\", \"--mode\", \"{mode}\"]\ntimeout_s = 60\n"
        )
    };
    std::fs::write(dir.path().join("sewa.toml"), config("ok")).unwrap();
    std::fs::write(dir.path().join("crash.toml"), config("crash-after-1")).unwrap();
    let run = |cfg: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sewa"))
            .current_dir(dir.path())
            .args([
                "average",
                "--config",
                cfg,
                "--select",
                "greedy",
                "--k",
                "2",
                "--out",
                "avg.safetensors",
            ])
            .args(&inputs)
            .output()
            .unwrap()
    };
    let ok = run("sewa.toml");
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(dir.path().join("avg.safetensors.manifest.json").exists());
    let failed = run("crash.toml");
    let err = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success(), "{err}");
    assert!(err.contains("evaluator") && !err.contains("will be restarted"), "{err}");
}
