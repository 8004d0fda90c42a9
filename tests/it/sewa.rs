//! Model-based selection: the mask gradient against finite differences (f64 slow twin), SeWA
//! against exhaustive search on planted problems, determinism, warm starts, baselines.

use sewa_checkpoint::{Checkpoint, DType};
use sewa_engine::error::Result;
use sewa_engine::objective::{Evaluation, NamedTensor, Objective, Params};
use sewa_engine::select::blend::Blend;
use sewa_engine::select::{Method, SewaConfig, Strategy, run_model_based};

/// The paper-style estimator (`strategy = "direct"`), which these tests guard.
fn direct() -> SewaConfig {
    SewaConfig { strategy: Strategy::Direct, ..SewaConfig::default() }
}

/// F(w) = Σ_j a_j (w_j − t_j)², computed in f64; exact gradient when `grad` is on.
#[derive(Clone)]
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
    method: Method,
    k: usize,
    members: &[Checkpoint],
    quad: &mut Quad,
    cfg: &SewaConfig,
) -> sewa_engine::select::Selection {
    let refs: Vec<&Checkpoint> = members.iter().collect();
    run_model_based(method, k, &refs, quad, cfg, None).unwrap().0
}

#[test]
fn sewa_finds_the_exhaustive_best_on_planted_windows() {
    for (seed, good) in [(1u64, vec![2, 5, 7]), (2, vec![0, 9, 11]), (3, vec![4, 6, 10])] {
        let (members, mut quad) = planted(12, 64, &good, seed);
        let cfg = SewaConfig::default();
        let ex = run(Method::Exhaustive, 3, &members, &mut quad, &cfg);
        let sw = run(Method::Sewa, 3, &members, &mut quad, &cfg);
        assert_eq!(ex.members(), good, "planted subset is the optimum (seed {seed})");
        assert_eq!(sw.members(), ex.members(), "seed {seed}: {}", sw.why);
        assert_eq!(sw.details.json()["chosen"], serde_json::json!(good));
        // The optimiser alone (no polishing) must already rank the planted members on top:
        // polishing would otherwise hide a broken gradient.
        let direct = SewaConfig { polish: false, strategy: Strategy::Direct, ..cfg };
        let raw = run(Method::Sewa, 3, &members, &mut quad, &direct);
        assert_eq!(
            raw.details.json()["top_k"],
            serde_json::json!(good),
            "seed {seed}: {}",
            raw.why
        );
        assert_eq!(raw.details.json()["polish_changed"], false);
    }
}

#[test]
fn reinforce_estimator_works_without_gradients() {
    let (members, mut quad) = planted(10, 32, &[1, 3, 8], 5);
    quad.grad = false;
    let cfg = SewaConfig::default();
    let sw = run(Method::Sewa, 3, &members, &mut quad, &cfg);
    assert_eq!(sw.details.json()["estimator"], "reinforce");
    assert_eq!(sw.members(), vec![1, 3, 8], "{}", sw.why);
    let concrete = SewaConfig { estimator: sewa_engine::select::sewa::Estimator::Concrete, ..cfg };
    let refs: Vec<&Checkpoint> = members.iter().collect();
    let e = run_model_based(Method::Sewa, 3, &refs, &mut quad, &concrete, None).unwrap_err();
    assert!(e.to_string().contains("reinforce"), "{e}");
}

#[test]
fn sewa_is_deterministic_for_a_seed() {
    let (members, mut quad) = planted(10, 32, &[0, 2, 3], 11);
    let cfg = SewaConfig { polish: false, ..direct() };
    let a = run(Method::Sewa, 3, &members, &mut quad, &cfg);
    let b = run(Method::Sewa, 3, &members, &mut quad, &cfg);
    assert_eq!(a.details.json()["probabilities"], b.details.json()["probabilities"]);
    let c = run(Method::Sewa, 3, &members, &mut quad, &SewaConfig { seed: 9, ..cfg });
    assert_ne!(
        a.details.json()["probabilities"],
        c.details.json()["probabilities"],
        "seed changes the samples"
    );
}

#[test]
fn warm_start_uses_under_30_percent_of_cold_oracle_calls() {
    let (all, mut quad) = planted(14, 48, &[3, 6, 9, 12], 21);
    let cfg = direct();
    let first: Vec<&Checkpoint> = all[..12].iter().collect();
    let (_, state) = run_model_based(Method::Sewa, 4, &first, &mut quad, &cfg, None).unwrap();
    // The window slides by two: two members leave, two arrive.
    let second: Vec<&Checkpoint> = all[2..].iter().collect();
    let (cold, _) = run_model_based(Method::Sewa, 4, &second, &mut quad, &cfg, None).unwrap();
    let (warm, _) =
        run_model_based(Method::Sewa, 4, &second, &mut quad, &cfg, state.as_ref()).unwrap();
    let calls =
        |s: &sewa_engine::select::Selection| s.details.json()["oracle_calls"].as_u64().unwrap();
    assert_eq!(warm.details.json()["warm"], true);
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
    let e = run_model_based(Method::Exhaustive, 3, &refs, &mut quad, &cfg, None).unwrap_err();
    assert!(e.to_string().contains("C(8,3) = 56"), "{e}");
    let r1 = run(Method::Random, 3, &members, &mut quad, &cfg);
    let r2 = run(Method::Random, 3, &members, &mut quad, &cfg);
    assert_eq!(r1.members(), r2.members());
    assert_eq!(r1.members().len(), 3);
    let g = run(Method::Greedy, 3, &members, &mut quad, &cfg);
    let first = g.details.json()["order"][0].as_u64().unwrap() as usize;
    assert!(g.members().contains(&first), "the soup starts from the best single member");
    let single = g.details.json()["member_losses"][first].as_f64().unwrap();
    assert!(g.loss.unwrap() <= single);
    let all = run(Method::Sewa, 20, &members, &mut quad, &cfg);
    assert_eq!(all.members(), (0..8).collect::<Vec<_>>(), "k above the window takes it all");
    assert!(
        all.details.json()["probabilities"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p.as_f64().unwrap().is_finite())
    );
    let w: f64 = g.weights.iter().sum();
    assert!((w - 1.0).abs() < 1e-12);
}

/// A short candle training run in `dir` (a checkpoint every 30 steps) plus its selection split
/// written as `data`: `(hidden, train rows, selection rows, steps, seed)`.
fn trained(
    dir: &std::path::Path,
    (hidden, train_rows, selection_rows, steps, seed): (usize, usize, usize, usize, u64),
    data: &str,
) -> Vec<std::path::PathBuf> {
    use sewa_engine::demo::task::TaskSpec;
    use sewa_engine::objective::data::{Targets, write_dataset};
    let spec = TaskSpec {
        hidden,
        train_rows,
        selection_rows,
        test_rows: 10,
        steps,
        save_every: 30,
        seed,
        ..TaskSpec::default()
    };
    let task = spec.generate();
    let inputs = spec.train(&task, dir, |_, _| Ok(())).unwrap();
    let x = &task.selection.x;
    write_dataset(&dir.join(data), x, spec.features, Targets::Classes(&task.selection.y)).unwrap();
    inputs
}

/// Real files end to end: a short candle training run writes checkpoints; `sewa average
/// --select sewa` (builtin MLP objective from a config file) publishes the same subset and loss
/// as `--select exhaustive`; `sewa report` draws the manifest.
#[test]
fn average_select_sewa_matches_exhaustive_on_real_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = trained(dir.path(), (12, 400, 300, 240, 3), "sel.safetensors");
    assert_eq!(inputs.len(), 8);
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
    assert_eq!(sw["inputs"], ex["inputs"], "sewa: {}", sw["selection"]["why"]);
    // The k members averaged, as the daemon's manifest lists them; the window is in a note.
    assert_eq!(sw["inputs"].as_array().unwrap().len(), 3, "{sw}");
    assert!(sw["notes"].to_string().contains("window of 8 members"), "{sw}");
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
    let dir = tempfile::tempdir().unwrap();
    let inputs = trained(dir.path(), (6, 200, 100, 90, 5), "selection.safetensors");
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

/// Members around one target with their own bias scale: `bias[i]` times a shared direction,
/// plus noise. Larger bias is worse; no mix of biased members cancels the bias.
fn graded(bias: &[f64], dim: usize, seed: u64) -> (Vec<Checkpoint>, Quad) {
    let target = noise(seed, dim);
    let dir = noise(seed + 1, dim);
    let members = bias
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let z = noise(seed + 10 + i as u64, dim);
            let w: Vec<f64> =
                target.iter().zip(&z).zip(&dir).map(|((t, z), d)| t + 0.1 * z + b * d).collect();
            member(i, &w)
        })
        .collect();
    let scale = noise(seed + 2, dim).iter().map(|a| 1.0 + 0.5 * a).collect();
    (members, Quad { target, scale, grad: true })
}

/// Window 20, k = 5. In the first window members 10..14 are the best (bias 0.4, the rest 0.9);
/// the window then slides by 5 and the five newcomers 20..24 are better still (bias 0). A warm
/// start carries 10..14 at high logits and 5..9, 15..19 far below.
fn slide() -> (Vec<Checkpoint>, Quad) {
    let mut bias = vec![0.9; 25];
    bias[10..15].iter_mut().for_each(|b| *b = 0.4);
    bias[20..25].iter_mut().for_each(|b| *b = 0.0);
    graded(&bias, 48, 31)
}

#[test]
fn warm_start_finds_the_best_subset_among_the_newest_members_after_a_slide() {
    let (all, mut quad) = slide();
    let newest: Vec<usize> = (15..20).collect();
    for polish in [true, false] {
        let cfg = SewaConfig { polish, cold_every: 0, ..direct() };
        let first: Vec<&Checkpoint> = all[..20].iter().collect();
        let (one, state) = run_model_based(Method::Sewa, 5, &first, &mut quad, &cfg, None).unwrap();
        assert_eq!(one.members(), (10..15).collect::<Vec<_>>(), "first window: {}", one.why);
        let second: Vec<&Checkpoint> = all[5..].iter().collect();
        let (ex, _) =
            run_model_based(Method::Exhaustive, 5, &second, &mut quad, &cfg, None).unwrap();
        assert_eq!(ex.members(), newest, "the planted optimum is the newcomers");
        let (warm, _) =
            run_model_based(Method::Sewa, 5, &second, &mut quad, &cfg, state.as_ref()).unwrap();
        assert_eq!(warm.members(), newest, "polish {polish}: {}", warm.why);
        assert_eq!(
            warm.details.json()["warm"],
            true,
            "found warm, not by a restart: {}",
            warm.details
        );
    }
}

#[test]
fn a_stuck_warm_start_restarts_cold_and_cold_every_forces_one() {
    let (all, mut quad) = slide();
    let (first, second): (Vec<&Checkpoint>, Vec<&Checkpoint>) =
        (all[..20].iter().collect(), all[5..].iter().collect());
    let cfg = SewaConfig { cold_every: 0, ..direct() };
    let (_, state) = run_model_based(Method::Sewa, 5, &first, &mut quad, &cfg, None).unwrap();
    // No warm iterations and no polishing: the warm start can only return its starting top 5
    // (the old survivors), which lose to the five newest members.
    let stuck = SewaConfig { warm_iterations: 0, polish: false, ..cfg.clone() };
    let (sel, next) =
        run_model_based(Method::Sewa, 5, &second, &mut quad, &stuck, state.as_ref()).unwrap();
    let d = &sel.details.json();
    assert_eq!(d["warm"], false, "{d}");
    assert!(d["cold_reason"].as_str().unwrap().contains("stuck"), "{d}");
    assert_eq!(d["abandoned_warm_start"]["set"], serde_json::json!([5, 6, 7, 8, 9]), "{d}");
    assert!(d["abandoned_warm_start"]["loss"].as_f64().unwrap() > sel.loss.unwrap());
    assert_eq!(sel.members(), (15..20).collect::<Vec<_>>(), "{}", sel.why);
    assert_eq!(next.unwrap().warm_runs, 0, "a restart counts as a cold start");
    // cold_every = 2: the selection after one warm one starts cold, whatever the warm start.
    let every2 = SewaConfig { cold_every: 2, ..cfg };
    let (w1, s1) =
        run_model_based(Method::Sewa, 5, &second, &mut quad, &every2, state.as_ref()).unwrap();
    assert_eq!(
        (w1.details.json()["warm"].clone(), s1.as_ref().unwrap().warm_runs),
        (true.into(), 1)
    );
    let (c2, s2) =
        run_model_based(Method::Sewa, 5, &second, &mut quad, &every2, s1.as_ref()).unwrap();
    assert_eq!(c2.details.json()["cold_reason"], "cold_every = 2", "{}", c2.details);
    assert_eq!(s2.unwrap().warm_runs, 0);
}

/// A `Quad` gone wrong in one way.
#[derive(Clone, Copy, Debug)]
enum Fault {
    NanLoss,
    NanGrad,
    ZeroGrad,
}

struct Faulty(Quad, Fault);

impl Objective for Faulty {
    fn evaluate(&mut self, p: &Params, want_grad: bool) -> Result<Evaluation> {
        let mut ev = self.0.evaluate(p, want_grad)?;
        match self.1 {
            Fault::NanLoss => ev.loss = f64::NAN,
            Fault::NanGrad => ev.grad.iter_mut().for_each(|g| g[0].data[3] = f32::INFINITY),
            Fault::ZeroGrad => ev.grad.iter_mut().for_each(|g| g[0].data.fill(0.0)),
        }
        Ok(ev)
    }
    fn supports_grad(&self) -> bool {
        true
    }
    fn describe(&self) -> String {
        format!("faulty quadratic ({:?})", self.1)
    }
}

#[test]
fn non_finite_loss_or_gradient_fails_the_selection() {
    let (members, quad) = planted(8, 16, &[1, 2], 3);
    let refs: Vec<&Checkpoint> = members.iter().collect();
    let cfg = SewaConfig::default();
    for method in [Method::Sewa, Method::Greedy, Method::Exhaustive, Method::Random] {
        let mut nan = Faulty(quad.clone(), Fault::NanLoss);
        let e = run_model_based(method, 3, &refs, &mut nan, &cfg, None).unwrap_err().to_string();
        assert!(e.contains("non-finite loss (NaN)") && e.contains("faulty quadratic"), "{e}");
    }
    let mut inf = Faulty(quad, Fault::NanGrad);
    let e = run_model_based(Method::Sewa, 3, &refs, &mut inf, &cfg, None).unwrap_err().to_string();
    assert!(e.contains("non-finite gradient for w"), "{e}");
}

#[test]
fn zero_gradient_is_refused_unless_the_forward_only_estimator_is_configured() {
    let (members, quad) = planted(10, 32, &[1, 3, 8], 5);
    let refs: Vec<&Checkpoint> = members.iter().collect();
    let mut zero = Faulty(quad.clone(), Fault::ZeroGrad);
    let cfg = SewaConfig::default();
    let e = run_model_based(Method::Sewa, 3, &refs, &mut zero, &cfg, None).unwrap_err().to_string();
    for part in ["faulty quadratic", "exactly zero", "functional_call(model, weights, args)"] {
        assert!(e.contains(part), "{part:?} missing: {e}");
    }
    assert!(e.contains("estimator = \"reinforce\""), "the fallback is named: {e}");
    // Configured: the forward-only estimator never asks for the (broken) gradient.
    let reinforce =
        SewaConfig { estimator: sewa_engine::select::sewa::Estimator::Reinforce, ..cfg };
    let (sel, _) = run_model_based(Method::Sewa, 3, &refs, &mut zero, &reinforce, None).unwrap();
    assert_eq!(sel.details.json()["estimator"], "reinforce");
    assert_eq!(sel.members(), vec![1, 3, 8], "{}", sel.why);
}

/// Counts every objective call.
struct Counting(Quad, usize);

impl Objective for Counting {
    fn evaluate(&mut self, p: &Params, want_grad: bool) -> Result<Evaluation> {
        self.1 += 1;
        self.0.evaluate(p, want_grad)
    }
    fn supports_grad(&self) -> bool {
        true
    }
    fn describe(&self) -> String {
        "counted quadratic".into()
    }
}

#[test]
fn member_losses_are_remembered_across_selections() {
    use sewa_engine::select::{Memory, run_remembering};
    let (all, quad) = planted(12, 24, &[2, 5, 7], 9);
    let mut obj = Counting(quad, 0);
    let cfg = direct();
    let mut memory = Memory::default();
    let calls = |s: &sewa_engine::select::Selection, key: &str| {
        s.details.json()[key].as_u64().unwrap() as usize
    };
    let window: Vec<&Checkpoint> = all[..10].iter().collect();
    let a = run_remembering(Method::Sewa, 3, &window, &mut obj, &cfg, &mut memory).unwrap();
    assert_eq!(calls(&a, "oracle_calls_report"), 10, "first selection: every member is new");
    assert_eq!(obj.1, calls(&a, "oracle_calls") + 10, "counted apart from the selection");
    let before = obj.1;
    let b = run_remembering(Method::Sewa, 3, &window, &mut obj, &cfg, &mut memory).unwrap();
    assert_eq!(calls(&b, "oracle_calls_report"), 0, "the same members again cost nothing");
    assert_eq!(calls(&b, "member_losses_remembered"), 10);
    assert_eq!(obj.1 - before, calls(&b, "oracle_calls"), "no call beyond the selection's own");
    assert_eq!(b.details.json()["member_losses"], a.details.json()["member_losses"]);
    // The window slides by two: only the two newcomers are evaluated, and the remembered
    // losses are the ones a fresh run computes.
    let slid: Vec<&Checkpoint> = all[2..].iter().collect();
    let c = run_remembering(Method::Sewa, 3, &slid, &mut obj, &cfg, &mut memory).unwrap();
    assert_eq!(calls(&c, "oracle_calls_report"), 2);
    let (fresh, _) = run_model_based(Method::Sewa, 3, &slid, &mut obj, &cfg, None).unwrap();
    assert_eq!(c.details.json()["member_losses"], fresh.details.json()["member_losses"]);
}

/// A short `sewa demo` (15 checkpoints, window 8, k = 3) in a fresh directory.
fn short_demo() -> (tempfile::TempDir, sewa_engine::demo::Outcome) {
    use sewa_engine::demo::{DemoOptions, run_with, task::TaskSpec};
    let spec = TaskSpec {
        hidden: 16,
        train_rows: 400,
        selection_rows: 300,
        test_rows: 100,
        steps: 600,
        save_every: 40,
        seed: 1,
        ..TaskSpec::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let args = DemoOptions { dir: Some(dir.path().into()), k: 3, window: 8, seed: 1 };
    let outcome = run_with(&args, &spec).unwrap();
    (dir, outcome)
}

#[test]
fn demo_is_deterministic_and_says_what_was_published_and_when() {
    let (dir, a) = short_demo();
    let (_dir2, b) = short_demo();
    // Everything but wall times is the same in both runs.
    let table = |o: &sewa_engine::demo::Outcome| {
        let rows = o.rows.iter();
        rows.map(|r| (r.method.clone(), r.steps.clone(), r.heldout_loss, r.oracle_calls))
            .collect::<Vec<_>>()
    };
    assert_eq!(table(&a), table(&b));
    let published = |o: &sewa_engine::demo::Outcome| {
        let p = o.history.publications.iter();
        p.map(|p| (p.after_step, p.selection, p.steps.clone(), p.loss)).collect::<Vec<_>>()
    };
    assert_eq!(published(&a), published(&b));
    let status = a.history.last.as_ref().unwrap();
    assert_eq!(status.counters.loaded, 15, "every checkpoint was taken in, each on its own");
    // k = 3: the watcher selects once the window holds 3 members ([select] min_members).
    assert_eq!(status.counters.selections, 15 - 2);
    assert_eq!(status.counters.publishes as usize, a.history.publications.len());
    // The last publication recorded is what is on disk, and the final lines say so.
    let last = a.history.publications.last().expect("the watcher published");
    let manifest = dir.path().join("published/model.safetensors.manifest.json");
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    let steps: Vec<u64> =
        m["inputs"].as_array().unwrap().iter().map(|i| i["step"].as_u64().unwrap()).collect();
    assert_eq!((steps, m["selection"]["loss"].as_f64()), (last.steps.clone(), last.loss));
    let said = format!(
        "published model: selection {} of {}, made when step {} arrived",
        last.selection, status.counters.selections, last.after_step
    );
    assert!(a.summary.contains(&said), "{}", a.summary);
    let same = sewa_engine::demo::same_loss(
        status.last_selection.as_ref().unwrap().summary.loss,
        a.table_sewa.loss,
    );
    let claim = if same { "chose the same subset" } else { "chose another subset" };
    assert!(a.summary.contains(claim), "{}", a.summary);
}

#[test]
fn a_warm_start_worse_than_the_previous_selection_restarts_cold() {
    // Members 10..14 are the best; the window slides past member 10. The newest five are
    // poor, so only the previous selection's loss shows that the warm start fell behind.
    let mut bias = vec![0.9; 31];
    bias[10..15].iter_mut().for_each(|b| *b = 0.4);
    let (all, mut quad) = graded(&bias, 48, 31);
    let cfg = SewaConfig { cold_every: 0, ..direct() };
    let first: Vec<&Checkpoint> = all[..20].iter().collect();
    let (one, state) = run_model_based(Method::Sewa, 5, &first, &mut quad, &cfg, None).unwrap();
    assert_eq!(one.members(), (10..15).collect::<Vec<_>>());
    let stuck = SewaConfig { warm_iterations: 0, polish: false, ..cfg };
    let second: Vec<&Checkpoint> = all[11..].iter().collect();
    let (sel, _) =
        run_model_based(Method::Sewa, 5, &second, &mut quad, &stuck, state.as_ref()).unwrap();
    let d = sel.details.json();
    let why = d["cold_reason"].as_str().unwrap_or_default();
    assert!(why.contains("previous selection's"), "{}", sel.details);
}

/// A model-based selection over members whose paths are not UTF-8 used to panic building its
/// details (`json!` of such a `Path`), outside any per-checkpoint guard: the daemon died.
#[test]
fn model_based_selection_records_non_utf8_member_paths_losslessly() {
    use std::os::unix::ffi::OsStringExt;
    let (members, mut quad) = graded(&[0.5, 0.1, 0.3], 8, 3);
    let renamed: Vec<Checkpoint> = members
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let mut raw = format!("m{i}_").into_bytes();
            raw.push(0xfe); // invalid UTF-8
            let path = std::path::PathBuf::from(std::ffi::OsString::from_vec(raw));
            let tensors = m
                .tensors()
                .iter()
                .map(|t| {
                    (t.name.clone(), t.dtype, t.shape.clone(), m.data(&t.name).unwrap().to_vec())
                })
                .collect();
            Checkpoint::from_memory(path, m.step(), tensors).unwrap()
        })
        .collect();
    let refs: Vec<&Checkpoint> = renamed.iter().collect();
    let (sel, _) =
        run_model_based(Method::Greedy, 2, &refs, &mut quad, &SewaConfig::default(), None).unwrap();
    let first = &sel.details.json()["members"][0]["path"];
    assert!(first["bytes_hex"].as_str().is_some_and(|h| h.ends_with("fe")), "{first}");
}

// ---- The surrogate strategy (the default), learned soups and TWA ----

fn calls_of(s: &sewa_engine::select::Selection) -> usize {
    s.details.total_calls()
}

/// On the planted windows (and the slide's first window, K = 20), the surrogate finds the
/// exhaustive optimum with at most 2K objective calls, member losses included (counted at the
/// objective, not only as reported).
#[test]
fn surrogate_finds_the_planted_best_subset_within_2k_calls() {
    let mut cases: Vec<(Vec<Checkpoint>, Quad, usize)> = Vec::new();
    for (seed, good) in [(1u64, vec![2, 5, 7]), (2, vec![0, 9, 11]), (3, vec![4, 6, 10])] {
        let (members, quad) = planted(12, 64, &good, seed);
        cases.push((members, quad, 3));
    }
    let (mut all, quad) = slide();
    all.truncate(20);
    cases.push((all, quad, 5));
    for (members, quad, k) in cases {
        let n = members.len();
        let mut obj = Counting(quad.clone(), 0);
        let cfg = SewaConfig::default();
        let sw = run_counted(Method::Sewa, k, &members, &mut obj, &cfg);
        let ex = run(Method::Exhaustive, k, &members, &mut quad.clone(), &cfg);
        assert_eq!(sw.members(), ex.members(), "K = {n}: {}", sw.why);
        assert!(obj.1 <= 2 * n, "K = {n}: {} calls: {}", obj.1, sw.details);
        assert_eq!(obj.1, calls_of(&sw), "the reported calls are the real ones");
        let d = sw.details.json();
        assert_eq!(d["strategy"], "surrogate");
        let predicted = d["surrogate_predicted_loss"].as_f64().unwrap();
        assert!(predicted.is_finite() && d["oracle_calls_verify"].as_u64().unwrap() >= 1);
    }
}

fn run_counted(
    method: Method,
    k: usize,
    members: &[Checkpoint],
    obj: &mut Counting,
    cfg: &SewaConfig,
) -> sewa_engine::select::Selection {
    let refs: Vec<&Checkpoint> = members.iter().collect();
    run_model_based(method, k, &refs, obj, cfg, None).unwrap().0
}

/// Small windows of every size and k: the surrogate's published loss is the exhaustive best.
#[test]
fn surrogate_equals_exhaustive_on_small_windows() {
    for seed in 0..6u64 {
        for (n, k) in [(4, 2), (5, 2), (6, 3), (7, 3), (8, 4)] {
            let bias: Vec<f64> = noise(seed + 100, n).iter().map(|b| 0.5 + 0.4 * b).collect();
            let (members, mut quad) = graded(&bias, 24, seed);
            let cfg = SewaConfig { seed, ..SewaConfig::default() };
            let sw = run(Method::Sewa, k, &members, &mut quad, &cfg);
            let ex = run(Method::Exhaustive, k, &members, &mut quad, &cfg);
            let (a, b) = (sw.loss.unwrap(), ex.loss.unwrap());
            assert!(a <= b * (1.0 + 1e-9), "seed {seed}, C({n},{k}): {a} vs {b}: {}", sw.details);
        }
    }
}

#[test]
fn surrogate_is_deterministic_for_a_seed() {
    let (members, mut quad) = planted(10, 32, &[0, 2, 3], 11);
    let cfg = SewaConfig::default();
    let strip = |s: &sewa_engine::select::Selection| {
        let mut d = s.details.json();
        d.as_object_mut().unwrap().remove("wall_seconds");
        d
    };
    let a = run(Method::Sewa, 3, &members, &mut quad, &cfg);
    let b = run(Method::Sewa, 3, &members, &mut quad, &cfg);
    assert_eq!(strip(&a), strip(&b));
    let c = run(Method::Sewa, 3, &members, &mut quad, &SewaConfig { seed: 9, ..cfg });
    assert_ne!(a.details.probabilities, c.details.probabilities, "seed changes the relaxation");
}

/// The daemon's case: the window slides by one; survivors' data points and member losses
/// are kept, so the re-selection costs at most K/2 calls and still finds the optimum.
#[test]
fn surrogate_warm_reselection_after_a_slide_by_one_costs_at_most_half_k_calls() {
    use sewa_engine::select::{Memory, run_remembering};
    let (all, quad) = slide();
    let mut obj = Counting(quad.clone(), 0);
    let cfg = SewaConfig { cold_every: 0, ..SewaConfig::default() };
    let mut memory = Memory::default();
    for start in 0..5 {
        let window: Vec<&Checkpoint> = all[start..start + 20].iter().collect();
        let before = obj.1;
        let sel = run_remembering(Method::Sewa, 5, &window, &mut obj, &cfg, &mut memory).unwrap();
        let spent = obj.1 - before;
        let (ex, _) =
            run_model_based(Method::Exhaustive, 5, &window, &mut quad.clone(), &cfg, None).unwrap();
        assert_eq!(sel.members(), ex.members(), "window {start}: {}", sel.details);
        if start == 0 {
            assert!(spent <= 40, "cold: {spent} calls");
        } else {
            assert!(spent <= 10, "window {start}: {spent} calls: {}", sel.details);
            assert_eq!(sel.details.json()["warm"], true);
            assert_eq!(sel.details.member_losses_computed, Some(1), "only the newcomer's");
        }
    }
}

/// A member's own loss is computed once per member and objective: a second greedy soup over
/// the same window ranks members without evaluating them again (counted at the objective).
#[test]
fn member_losses_are_not_recomputed_by_a_second_selection() {
    use sewa_engine::select::{Memory, run_remembering};
    let (members, quad) = planted(10, 32, &[1, 3, 8], 5);
    let window: Vec<&Checkpoint> = members.iter().collect();
    for method in [Method::Greedy, Method::Sewa] {
        let mut obj = Counting(quad.clone(), 0);
        let mut memory = Memory::default();
        let cfg = SewaConfig::default();
        let a = run_remembering(method, 3, &window, &mut obj, &cfg, &mut memory).unwrap();
        let first = obj.1;
        assert_eq!(a.details.member_losses_computed, Some(10));
        let b = run_remembering(method, 3, &window, &mut obj, &cfg, &mut memory).unwrap();
        assert_eq!(b.details.member_losses_computed, Some(0), "{method}");
        assert_eq!(b.details.member_losses_remembered, Some(10));
        assert_eq!(b.details.member_losses, a.details.member_losses);
        assert!(obj.1 - first <= first - 10, "{method}: second {} vs first {first}", obj.1 - first);
        assert_eq!(obj.1 - first, calls_of(&b), "{method}: reported calls are the real ones");
        assert_eq!(b.members(), a.members());
    }
}

/// Members around nothing in particular and a target inside their span at non-uniform
/// weights β: the best mixture is β, far from uniform.
fn mixture_problem() -> (Vec<Checkpoint>, Quad, Vec<f64>) {
    let beta = [0.55, 0.3, 0.15, 0.0, 0.0, 0.0];
    let dim = 32;
    let ws: Vec<Vec<f64>> = (0..beta.len()).map(|i| noise(70 + i as u64, dim)).collect();
    let target: Vec<f64> =
        (0..dim).map(|j| ws.iter().zip(beta).map(|(w, b)| b * w[j]).sum()).collect();
    let members = ws.iter().enumerate().map(|(i, w)| member(i, w)).collect();
    let scale = noise(72, dim).iter().map(|a| 1.0 + 0.5 * a).collect();
    (members, Quad { target, scale, grad: true }, beta.to_vec())
}

fn uniform_loss(members: &[Checkpoint], quad: &mut Quad) -> f64 {
    let refs: Vec<&Checkpoint> = members.iter().collect();
    let blend = Blend::new(&refs).unwrap();
    let mut p = blend.zeros();
    blend.mix(&vec![1.0; members.len()], &mut p).unwrap();
    quad.evaluate(&p, false).unwrap().loss
}

#[test]
fn soup_and_twa_learn_a_non_uniform_mixture_that_beats_the_uniform_average() {
    use sewa_engine::select::{Options, SoupConfig, TwaConfig, run_model_based_with};
    let (members, mut quad, beta) = mixture_problem();
    let uniform = uniform_loss(&members, &mut quad);
    let refs: Vec<&Checkpoint> = members.iter().collect();
    let sewa_cfg = SewaConfig::default();
    let (soup, twa) = (SoupConfig::default(), TwaConfig::default());
    let opts = Options { sewa: &sewa_cfg, soup: &soup, twa: &twa };
    for method in [Method::Soup, Method::Twa] {
        let (sel, _) = run_model_based_with(method, 3, &refs, &mut quad, opts, None).unwrap();
        let loss = sel.loss.unwrap();
        assert!(loss < 0.3 * uniform, "{method}: {loss} vs uniform {uniform}: {}", sel.details);
        let total: f64 = sel.weights.iter().sum();
        assert!((total - 1.0).abs() < 1e-9 && sel.weights.iter().all(|w| *w >= 0.0));
        assert!(sel.weights[0] > sel.weights[3] + 0.2, "{method}: {:?} vs β {beta:?}", sel.weights);
        assert_eq!(sel.details.json()["learned_weights"], serde_json::json!(sel.weights));
        assert_eq!(sel.details.oracle_calls_report, Some(6), "member losses for the report");
    }
    // Sparse soup: exactly k members.
    let sparse = SoupConfig { k: Some(2), ..SoupConfig::default() };
    let opts = Options { soup: &sparse, ..opts };
    let (sel, _) = run_model_based_with(Method::Soup, 2, &refs, &mut quad, opts, None).unwrap();
    assert_eq!(sel.members(), vec![0, 1], "{:?}", sel.weights);
    // Forward-only objectives are refused with the alternative named.
    quad.grad = false;
    let e = run_model_based_with(Method::Twa, 2, &refs, &mut quad, opts, None).unwrap_err();
    assert!(e.to_string().contains("method = \"sewa\""), "{e}");
}

/// The soup's logit gradient α ⊙ (d − α·d) and TWA's coefficient gradient d_i = ⟨G, w_i − w(α)⟩
/// against central differences of F(softmax(z)) and F(α + εv) on the f64 slow twin.
#[test]
fn soup_and_twa_gradients_match_finite_differences() {
    use sewa_engine::select::{soup, twa};
    let (members, quad, _) = mixture_problem();
    let refs: Vec<&Checkpoint> = members.iter().collect();
    let blend = Blend::new(&refs).unwrap();
    let ws: Vec<Vec<f64>> = members
        .iter()
        .map(|c| {
            let raw = c.data("w").unwrap();
            raw.chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64).collect()
        })
        .collect();
    let f = |alpha: &[f64]| {
        let w: Vec<f64> =
            (0..32).map(|j| alpha.iter().zip(&ws).map(|(a, w)| a * w[j]).sum()).collect();
        quad.f64(&w)
    };
    let z = [0.3, -0.2, 0.8, 0.0, -0.5, 0.1];
    let all = [true; 6];
    let alpha = soup::softmax(&z, &all);
    let mut point = blend.zeros();
    blend.mix(&alpha, &mut point).unwrap();
    let g = quad.clone().evaluate(&point, true).unwrap().grad.unwrap();
    let d = blend.dots(&g, &point).unwrap();
    let analytic = soup::logit_gradient(&alpha, &d);
    for i in 0..6 {
        let (mut up, mut dn) = (z.to_vec(), z.to_vec());
        up[i] += 1e-5;
        dn[i] -= 1e-5;
        let fd = (f(&soup::softmax(&up, &all)) - f(&soup::softmax(&dn, &all))) / 2e-5;
        let err = (fd - analytic[i]).abs() / fd.abs().max(1e-3);
        assert!(err < 1e-3, "soup logit {i}: {} vs {fd}", analytic[i]);
    }
    // TWA moves α along v with Σv = 0: the directional derivative is Σ v_i d_i.
    for (a, b) in [(0, 1), (2, 5), (3, 4)] {
        let mut v = vec![0.0; 6];
        (v[a], v[b]) = (1.0, -1.0);
        let step = |s: f64| alpha.iter().zip(&v).map(|(x, v)| x + s * v).collect::<Vec<_>>();
        let fd = (f(&step(1e-5)) - f(&step(-1e-5))) / 2e-5;
        let analytic = d[a] - d[b];
        assert!((fd - analytic).abs() / fd.abs().max(1e-3) < 1e-3, "{a}-{b}: {analytic} vs {fd}");
    }
    // The preconditioned step is a descent direction on the plane.
    let dist = blend.distances(1).unwrap();
    let dir = twa::direction(&twa::centred_gram(&dist[0]), &d);
    assert!(dir.iter().sum::<f64>().abs() < 1e-9, "stays on Σα = 1");
    assert!(dir.iter().zip(&d).map(|(x, d)| x * d).sum::<f64>() < 0.0, "descends");
}

/// Issue 18: a model-based answer worse than a fixed rule the user could have had for one call
/// is never published. `random` stands for any method that misses: on a graded window whose
/// newest members are best, its raw answer loses to LAWA-k; the guard publishes LAWA-k.
#[test]
fn the_guard_publishes_lawa_when_the_method_does_worse() {
    let mut bias = vec![0.9; 20];
    bias[15..].iter_mut().for_each(|b| *b = 0.0);
    let (all, mut quad) = graded(&bias, 48, 41);
    let refs: Vec<&Checkpoint> = all.iter().collect();
    let raw = SewaConfig { guard: false, ..SewaConfig::default() };
    let (unguarded, _) = run_model_based(Method::Random, 5, &refs, &mut quad, &raw, None).unwrap();
    let lawa: Vec<usize> = (15..20).collect();
    let (lawa_loss, _) = {
        let mut w = vec![0.0; 48];
        for m in &all[15..] {
            let bytes = m.data("w").unwrap();
            let p = bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()));
            w.iter_mut().zip(p).for_each(|(a, x)| *a += x as f64 / 5.0);
        }
        (quad.f64(&w), ())
    };
    assert!(unguarded.loss.unwrap() > lawa_loss, "the raw answer misses: {}", unguarded.why);
    let (guarded, _) =
        run_model_based(Method::Random, 5, &refs, &mut quad, &SewaConfig::default(), None).unwrap();
    assert_eq!(guarded.members(), lawa, "{}", guarded.why);
    assert!((guarded.loss.unwrap() - lawa_loss).abs() < 1e-6 * lawa_loss.max(1.0));
    let d = guarded.details.json();
    assert_eq!(d["guard"]["winner"], "lawa-5", "{d}");
    assert!(d["guard"]["gain"].as_f64().unwrap() < 0.0, "{d}");
    assert_eq!(d["method_set"], serde_json::json!(unguarded.members()), "{d}");
    assert!(guarded.why.contains("guard: lawa-5"), "{}", guarded.why);
}

/// Issue 18: the best average can be a weighting no k-subset gives. Members scattered around
/// the target so that their EMA (decay 0.8 = 1 − 1/k) lands on it exactly: SeWA's best
/// subset loses to that EMA, and the EMA's weights are published, for every strategy.
#[test]
fn an_ema_that_beats_every_subset_is_published_with_its_weights() {
    let (n, dim) = (20, 32);
    let target = noise(51, dim);
    let ema = sewa_engine::select::guard::ema_weights(n, 0.8);
    let mut z: Vec<Vec<f64>> = (0..n).map(|i| noise(60 + i as u64, dim)).collect();
    let last: Vec<f64> =
        (0..dim).map(|d| -(0..n - 1).map(|i| ema[i] * z[i][d]).sum::<f64>() / ema[n - 1]).collect();
    z[n - 1] = last;
    let members: Vec<Checkpoint> = (0..n)
        .map(|i| member(i, &target.iter().zip(&z[i]).map(|(t, z)| t + z).collect::<Vec<_>>()))
        .collect();
    let mut quad = Quad { target, scale: vec![1.0; dim], grad: true };
    let refs: Vec<&Checkpoint> = members.iter().collect();
    for strategy in [Strategy::Surrogate, Strategy::Direct] {
        let cfg = SewaConfig { strategy, ..SewaConfig::default() };
        let (sel, _) = run_model_based(Method::Sewa, 5, &refs, &mut quad, &cfg, None).unwrap();
        let d = sel.details.json();
        assert_eq!(d["guard"]["winner"], "ema-0.8", "{strategy:?}: {d}");
        for (w, e) in sel.weights.iter().zip(&ema) {
            assert!((w - e).abs() < 1e-12, "{strategy:?}: {:?}", sel.weights);
        }
        assert!(sel.loss.unwrap() < 1e-6, "{strategy:?}: {}", sel.why);
    }
}

/// Issue 18: a window that slides by one keeps its verified rules: the warm selection pays for
/// the newest run, the uniform window and the EMAs, and ends within 0.1 % of a cold one.
#[test]
fn a_warm_selection_after_a_slide_by_one_matches_cold_in_few_calls() {
    let mut bias = vec![0.9; 21];
    bias[18..].iter_mut().for_each(|b| *b = 0.0);
    let (all, mut quad) = graded(&bias, 48, 71);
    let cfg = SewaConfig::default();
    let mut memory = sewa_engine::select::Memory::default();
    let first: Vec<&Checkpoint> = all[..20].iter().collect();
    sewa_engine::select::run_remembering(Method::Sewa, 5, &first, &mut quad, &cfg, &mut memory)
        .unwrap();
    let second: Vec<&Checkpoint> = all[1..].iter().collect();
    let warm = sewa_engine::select::run_remembering(
        Method::Sewa,
        5,
        &second,
        &mut quad,
        &cfg,
        &mut memory,
    )
    .unwrap();
    let (cold, _) = run_model_based(Method::Sewa, 5, &second, &mut quad, &cfg, None).unwrap();
    let (w, c) = (warm.loss.unwrap(), cold.loss.unwrap());
    assert!(w <= c * 1.001, "warm {w} ({}) vs cold {c} ({})", warm.why, cold.why);
    let d = warm.details.json();
    assert_eq!(d["warm"], true, "{d}");
    assert!(d["guard"]["reused"].as_u64().unwrap() >= 3, "runs carried over: {d}");
    let calls = d["oracle_calls"].as_u64().unwrap();
    assert!(calls <= 8, "warm calls {calls}: {d}");
}

/// Issue 18: a forward-only objective (losses, no gradient) gets the same guarantee: the rules
/// are verified from losses alone and the published loss is no worse than any of them.
#[test]
fn forward_only_selections_pass_the_same_guard() {
    let mut bias = vec![0.9; 20];
    bias[15..].iter_mut().for_each(|b| *b = 0.0);
    let (all, quad) = graded(&bias, 48, 43);
    let mut quad = Quad { grad: false, ..quad };
    let refs: Vec<&Checkpoint> = all.iter().collect();
    for strategy in [Strategy::Surrogate, Strategy::Direct] {
        let cfg = SewaConfig { strategy, ..SewaConfig::default() };
        let (sel, _) = run_model_based(Method::Sewa, 5, &refs, &mut quad, &cfg, None).unwrap();
        let d = sel.details.json();
        assert_eq!(d["estimator"], "reinforce", "{d}");
        let rules = d["guard"]["rules"].as_array().expect("the guard ran");
        assert!(rules.len() >= 6, "runs, uniform and EMAs: {d}");
        let loss = sel.loss.unwrap();
        for r in rules {
            assert!(loss <= r[1].as_f64().unwrap(), "{strategy:?}: {loss} vs {r}");
        }
        assert!(
            d["oracle_calls"].as_u64().unwrap() <= 2 * 20 || strategy == Strategy::Direct,
            "{d}"
        );
    }
}
