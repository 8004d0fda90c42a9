//! Protocol 2 (the evaluator holds the window's members, requests carry mixing weights) end to
//! end through the real Python client: the same numbers and the same selections as protocol 1,
//! O(K) bytes per request, members added and removed as the window slides, load failures that
//! name the member, and the torch client (and torchrun) where torch is importable.
//!
//! The torch tests run with the Python named by `SEWA_TEST_PYTHON` (default `python3`) and are
//! skipped, saying why, when it cannot import torch.

use std::path::{Path, PathBuf};
use std::process::Command;

use sewa_checkpoint::{Checkpoint, DType, OpenOptions};
use sewa_engine::objective::command::{CommandConfig, CommandObjective};
use sewa_engine::objective::{NamedTensor, Objective, Params};
use sewa_engine::select::{Method, SewaConfig, run_model_based};

use crate::evaluator::{mlp_params, write_data};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> String {
    std::env::var("SEWA_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn config(command: Vec<String>) -> CommandConfig {
    CommandConfig {
        command,
        timeout_s: 120.0,
        startup_timeout_s: 120.0,
        env: Default::default(),
        cwd: None,
        staging_dir: None,
        one_shot: false,
    }
}

/// The numpy MLP evaluator speaking at most `protocol`.
fn numpy_eval(data: &Path, protocol: u32) -> CommandObjective {
    numpy_mode(data, protocol, "ok", 120.0)
}

fn numpy_mode(data: &Path, protocol: u32, mode: &str, timeout_s: f64) -> CommandObjective {
    let script = repo().join("tests/evaluators/mlp_numpy.py");
    let args = [&script.display().to_string(), &data.display().to_string(), "--mode", mode];
    let cmd = std::iter::once("python3".to_string())
        .chain(args.iter().map(|s| s.to_string()))
        .chain(["--protocol".into(), protocol.to_string()])
        .collect();
    let mut cfg = config(cmd);
    cfg.timeout_s = timeout_s;
    CommandObjective::start(cfg).unwrap()
}

fn write_params(path: &Path, p: &Params, dtype: safetensors::Dtype) {
    let bytes: Vec<Vec<u8>> = p
        .iter()
        .map(|t| match dtype {
            safetensors::Dtype::BF16 => {
                t.data.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect()
            }
            _ => t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        })
        .collect();
    let views = p.iter().zip(&bytes).map(|(t, b)| {
        (t.name.clone(), safetensors::tensor::TensorView::new(dtype, t.shape.clone(), b).unwrap())
    });
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// K members `step_{i}.safetensors` with the MLP layout, opened.
fn members(dir: &Path, k: usize) -> Vec<Checkpoint> {
    (0..k)
        .map(|i| {
            let path = dir.join(format!("step_{}.safetensors", 100 * (i + 1)));
            write_params(&path, &mlp_params(10 * i as u64 + 3), safetensors::Dtype::F32);
            Checkpoint::open(&path, &OpenOptions::default()).unwrap()
        })
        .collect()
}

fn mix(ps: &[Params], alpha: &[f64]) -> Params {
    let mut out = ps[0].clone();
    for (j, t) in out.iter_mut().enumerate() {
        for (e, x) in t.data.iter_mut().enumerate() {
            *x = ps.iter().zip(alpha).map(|(p, a)| *a as f32 * p[j].data[e]).sum();
        }
    }
    out
}

fn dot(g: &Params, w: &Params) -> f64 {
    g.iter()
        .zip(w)
        .map(|(a, b)| a.data.iter().zip(&b.data).map(|(x, y)| *x as f64 * *y as f64).sum::<f64>())
        .sum()
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + a.abs().max(b.abs()))
}

/// Protocol 2's loss and ∂F/∂α_i = ⟨∇F, w_i⟩ against protocol 1's loss and gradient file
/// (dot products taken here) at the same mixtures: the two paths agree to float tolerance.
pub(crate) fn assert_protocols_agree(p1: &mut dyn Objective, p2: &mut dyn Objective, dir: &Path) {
    let ms = members(dir, 4);
    let refs: Vec<&Checkpoint> = ms.iter().collect();
    let ps: Vec<Params> = (0..4).map(|i| mlp_params(10 * i as u64 + 3)).collect();
    for alpha in [[0.25, 0.25, 0.25, 0.25], [0.7, 0.0, 0.1, 0.2], [0.0, 0.0, 1.0, 0.0]] {
        let two = p2.evaluate_mix(&refs, &alpha, true).unwrap();
        let one = p1.evaluate(&mix(&ps, &alpha), true).unwrap();
        assert!(close(one.loss, two.loss, 1e-5), "loss {} vs {}", one.loss, two.loss);
        let g = one.grad.unwrap();
        let dots = two.member_dots.unwrap();
        for (i, p) in ps.iter().enumerate() {
            let want = dot(&g, p);
            assert!(close(want, dots[i], 1e-4), "α {alpha:?}: ∂F/∂α_{i} {} vs {want}", dots[i]);
        }
        let fwd = p2.evaluate_mix(&refs, &alpha, false).unwrap();
        assert!(fwd.member_dots.is_none() && close(fwd.loss, two.loss, 1e-12));
    }
}

#[test]
fn protocol_2_gives_protocol_1_losses_and_member_gradients() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_data(dir.path());
    let (mut p1, mut p2) = (numpy_eval(&data, 1), numpy_eval(&data, 2));
    assert_eq!((p1.protocol(), p1.mixes()), (1, false), "capped at 1: no mixing");
    assert_eq!((p2.protocol(), p2.mixes()), (2, true));
    assert_protocols_agree(&mut p1, &mut p2, dir.path());
}

/// A protocol-1-only evaluator (it never mentions mixing) still serves selections, and SeWA and
/// greedy choose the same subsets, with the same losses, through both protocols.
#[test]
fn sewa_and_greedy_choose_the_same_subsets_through_both_protocols() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_data(dir.path());
    let ms = members(dir.path(), 5);
    let refs: Vec<&Checkpoint> = ms.iter().collect();
    let (mut p1, mut p2) = (numpy_eval(&data, 1), numpy_eval(&data, 2));
    let cfg = SewaConfig { iterations: 6, samples: 2, member_losses: false, ..Default::default() };
    for method in [Method::Sewa, Method::Greedy] {
        let (a, _) = run_model_based(method, 2, &refs, &mut p1, &cfg, None).unwrap();
        let (b, _) = run_model_based(method, 2, &refs, &mut p2, &cfg, None).unwrap();
        assert_eq!(a.members(), b.members(), "{method:?}: {} / {}", a.why, b.why);
        assert!(close(a.loss.unwrap(), b.loss.unwrap(), 1e-5), "{} / {}", a.why, b.why);
        assert_eq!(a.details.json()["oracle_calls"], b.details.json()["oracle_calls"]);
    }
    assert!(p1.traffic().staged_written > 0, "protocol 1 moved candidates as files");
}

/// MLP parameters with a wide hidden layer (so the model is far larger than a request).
fn wide(seed: u64, h: usize) -> Params {
    let mut p = mlp_params(seed);
    let (d, c) = (p[1].shape[1], p[2].shape[0]);
    let vals =
        |n: usize, s: u64| (0..n).map(move |i| ((i as u64 * 7919 + s) % 200) as f32 / 1e3 - 0.1);
    p[0] = NamedTensor { name: p[0].name.clone(), shape: vec![h], data: vals(h, seed).collect() };
    p[1] = NamedTensor {
        name: p[1].name.clone(),
        shape: vec![h, d],
        data: vals(h * d, seed + 1).collect(),
    };
    p[3] = NamedTensor {
        name: p[3].name.clone(),
        shape: vec![c, h],
        data: vals(c * h, seed + 3).collect(),
    };
    p
}

/// Once the members are loaded, a protocol 2 request writes no file (nothing staged, nothing
/// read back) and moves O(K) bytes of protocol lines, far below the model's size.
#[test]
fn protocol_2_requests_move_o_k_bytes_and_write_no_model_sized_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_data(dir.path());
    let k = 6;
    let ms: Vec<Checkpoint> = (0..k)
        .map(|i| {
            let path = dir.path().join(format!("step_{i}.safetensors"));
            write_params(&path, &wide(i as u64, 2048), safetensors::Dtype::F32);
            Checkpoint::open(&path, &OpenOptions::default()).unwrap()
        })
        .collect();
    let model_bytes = ms[0].total_bytes();
    let refs: Vec<&Checkpoint> = ms.iter().collect();
    let mut p2 = numpy_eval(&data, 2);
    let alpha = vec![1.0 / k as f64; k];
    p2.evaluate_mix(&refs, &alpha, true).unwrap(); // loads the members
    let before = p2.traffic();
    let calls = 10;
    for c in 0..calls {
        let mut a = vec![0.0; k];
        a[c % k] = 0.5;
        a[(c + 1) % k] = 0.5;
        p2.evaluate_mix(&refs, &a, true).unwrap();
        let files = staged_files(&p2);
        assert!(files.is_empty(), "nothing is staged for safetensors members: {files:?}");
    }
    let after = p2.traffic();
    assert_eq!(after.staged_written, before.staged_written, "no file written per request");
    assert_eq!(after.staged_read, before.staged_read, "no file read per request");
    let per_call =
        (after.lines_out + after.lines_in - before.lines_out - before.lines_in) / calls as u64;
    assert!(per_call < 120 + 60 * k as u64, "{per_call} bytes per request for K = {k}");
    assert!(per_call * 100 < model_bytes, "{per_call} bytes per request, model {model_bytes}");
}

/// The files in `o`'s staging directory, but for the marker naming its owner.
fn staged_files(o: &CommandObjective) -> Vec<PathBuf> {
    let entries = std::fs::read_dir(o.scratch_dir()).unwrap().flatten().map(|e| e.path());
    entries.filter(|p| !p.ends_with(".sewa-staging")).collect()
}

/// Members sewa holds in memory (no file the evaluator could open) reach it as one safetensors
/// copy each, written once when added and deleted when removed; a sliding window adds the new
/// member and removes the old one.
#[test]
fn members_without_a_loadable_file_are_staged_once_and_the_window_slides() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_data(dir.path());
    let files = members(dir.path(), 4);
    let mem: Vec<Checkpoint> = (0..4)
        .map(|i| {
            let p = mlp_params(10 * i as u64 + 3);
            let tensors = p
                .iter()
                .map(|t| {
                    let b = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
                    (t.name.clone(), DType::F32, t.shape.clone(), b)
                })
                .collect();
            Checkpoint::from_memory(format!("memory-{i}"), Some(i as u64), tensors).unwrap()
        })
        .collect();
    let mut p2 = numpy_eval(&data, 2);
    let alpha = [0.2, 0.3, 0.5];
    let from_mem = p2.evaluate_mix(&[&mem[0], &mem[1], &mem[2]], &alpha, true).unwrap();
    let from_files = p2.evaluate_mix(&[&files[0], &files[1], &files[2]], &alpha, true).unwrap();
    assert!(close(from_mem.loss, from_files.loss, 1e-9), "the copies hold the same tensors");
    let staged = |o: &CommandObjective| staged_files(o).len();
    assert_eq!(staged(&p2), 0, "copies of members that left the window are deleted");
    let w0 = p2.traffic().staged_written;
    p2.evaluate_mix(&[&mem[0], &mem[1]], &[0.5, 0.5], false).unwrap();
    p2.evaluate_mix(&[&mem[1], &mem[2], &mem[3]], &alpha, false).unwrap();
    assert_eq!(staged(&p2), 3, "one copy per member in the window");
    let w1 = p2.traffic().staged_written;
    p2.evaluate_mix(&[&mem[1], &mem[2], &mem[3]], &[0.1, 0.1, 0.8], true).unwrap();
    assert_eq!(p2.traffic().staged_written, w1, "a member already held is not copied again");
    let one = mem[0].total_bytes();
    let (lo, hi) = (4 * one, 4 * (one + 1024));
    assert!(
        (lo..hi).contains(&(w1 - w0)),
        "four copies written (two re-added, two new): {}",
        w1 - w0
    );
}

/// A member the evaluator cannot load (numpy has no bfloat16) is an error naming its path.
#[test]
fn a_member_the_evaluator_cannot_load_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_data(dir.path());
    let good = members(dir.path(), 1);
    let path = dir.path().join("step_900.safetensors");
    write_params(&path, &mlp_params(5), safetensors::Dtype::BF16);
    let bad = Checkpoint::open(&path, &OpenOptions::default()).unwrap();
    let mut p2 = numpy_eval(&data, 2);
    let err = p2.evaluate_mix(&[&good[0], &bad], &[0.5, 0.5], true).unwrap_err().to_string();
    assert!(err.contains("cannot load member") && err.contains("step_900.safetensors"), "{err}");
}

/// Crash, NaN and hang stay contained under protocol 2 as under protocol 1: an error with the
/// evaluator's stderr, then a restart (after the backoff) that is sent the whole window again.
#[test]
fn protocol_2_failures_are_contained_and_a_restarted_evaluator_gets_the_window_again() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_data(dir.path());
    let ms = members(dir.path(), 3);
    let refs: Vec<&Checkpoint> = ms.iter().collect();
    let alpha = [0.2, 0.3, 0.5];
    let mut crashy = numpy_mode(&data, 2, "crash-after-1", 60.0);
    let first = crashy.evaluate_mix(&refs, &alpha, true).unwrap().loss;
    let err = crashy.evaluate_mix(&refs, &alpha, true).unwrap_err().to_string();
    assert!(err.contains("exited") && err.contains("simulated crash"), "{err}");
    let start = std::time::Instant::now();
    let again = loop {
        match crashy.evaluate_mix(&refs, &alpha, true) {
            Ok(ev) => break ev.loss,
            Err(e) if e.to_string().contains("next restart allowed") => {}
            Err(e) => panic!("{e}"),
        }
        assert!(start.elapsed() < crate::watch::DEADLINE, "never restarted");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(first, again, "the restarted evaluator holds the same members");
    let mut nan = numpy_mode(&data, 2, "nan", 60.0);
    let err = nan.evaluate_mix(&refs, &alpha, false).unwrap_err().to_string();
    assert!(err.contains("non-finite loss"), "{err}");
    let mut hang = numpy_mode(&data, 2, "hang", 1.0);
    let err = hang.evaluate_mix(&refs, &alpha, false).unwrap_err().to_string();
    assert!(err.contains("did not answer within timeout_s"), "{err}");
}

/// Integer buffers are not mixed: the evaluator is told which member supplies them, the newest
/// one with a positive weight under `int_policy = "latest"`, the oldest under `"first"`.
#[test]
fn a_mixture_carries_the_integer_buffers_of_the_member_the_int_policy_picks() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_data(dir.path());
    let ms: Vec<Checkpoint> = (0..3u64)
        .map(|i| {
            let p = mlp_params(10 * i + 3);
            let mut tensors: Vec<(String, DType, Vec<usize>, Vec<u8>)> = p
                .iter()
                .map(|t| {
                    let b = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
                    (t.name.clone(), DType::F32, t.shape.clone(), b)
                })
                .collect();
            let steps = (100 * (i + 1) as i64).to_le_bytes().to_vec();
            tensors.push(("steps".into(), DType::I64, vec![1], steps));
            Checkpoint::from_memory(format!("member-{i}"), Some(i), tensors).unwrap()
        })
        .collect();
    let refs: Vec<&Checkpoint> = ms.iter().collect();
    let alpha = [0.5, 0.0, 0.5];
    let plain = numpy_eval(&data, 2).evaluate_mix(&refs, &alpha, false).unwrap().loss;
    let mut counting = numpy_mode(&data, 2, "count-ints", 60.0);
    let latest = counting.evaluate_mix(&refs, &alpha, false).unwrap().loss;
    assert!(close(latest - plain, 300.0, 1e-9), "newest used member: {}", latest - plain);
    counting.set_int_policy(sewa_engine::average::IntPolicy::First);
    let first = counting.evaluate_mix(&refs, &alpha, false).unwrap().loss;
    assert!(close(first - plain, 100.0, 1e-9), "oldest used member: {}", first - plain);
}

// ---- torch (where importable) ----------------------------------------------------------------

/// Why the torch tests cannot run with this Python, if they cannot.
fn torch_missing() -> Option<String> {
    let py = python();
    let out = Command::new(&py).args(["-c", "import torch, safetensors"]).output();
    match out {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!("{py} cannot import torch: {}", String::from_utf8_lossy(&o.stderr))),
        Err(e) => Some(format!("cannot run {py}: {e}")),
    }
}

macro_rules! need_torch {
    () => {
        if let Some(why) = torch_missing() {
            eprintln!("skipped (set SEWA_TEST_PYTHON to a Python with torch): {why}");
            return;
        }
    };
}

fn torch_eval(data: &Path, protocol: u32, ranks: usize) -> CommandObjective {
    let script = repo().join("tests/evaluators/mlp_torch.py").display().to_string();
    let mut cmd = vec![python()];
    if ranks > 1 {
        let n = format!("--nproc_per_node={ranks}");
        cmd.extend(["-m", "torch.distributed.run", "--standalone", &n].map(String::from));
    }
    cmd.extend([script, data.display().to_string(), "--protocol".into(), protocol.to_string()]);
    let mut cfg = config(cmd);
    cfg.env.insert("OMP_NUM_THREADS".into(), "1".into());
    CommandObjective::start(cfg).unwrap()
}

#[test]
fn torch_client_protocol_2_gives_protocol_1_losses_and_member_gradients() {
    need_torch!();
    let dir = tempfile::tempdir().unwrap();
    let data = write_data(dir.path());
    let (mut p1, mut p2) = (torch_eval(&data, 1, 1), torch_eval(&data, 2, 1));
    assert!(p2.mixes() && !p1.mixes());
    assert_protocols_agree(&mut p1, &mut p2, dir.path());
}

#[test]
fn torchrun_with_two_ranks_gives_the_one_rank_loss_and_member_gradients() {
    need_torch!();
    let dir = tempfile::tempdir().unwrap();
    let data = write_data(dir.path());
    let ms = members(dir.path(), 3);
    let refs: Vec<&Checkpoint> = ms.iter().collect();
    let (mut one, mut two) = (torch_eval(&data, 2, 1), torch_eval(&data, 2, 2));
    for alpha in [[0.2, 0.3, 0.5], [0.0, 1.0, 0.0]] {
        let a = one.evaluate_mix(&refs, &alpha, true).unwrap();
        let b = two.evaluate_mix(&refs, &alpha, true).unwrap();
        assert!(close(a.loss, b.loss, 1e-5), "loss {} vs {}", a.loss, b.loss);
        for (x, y) in a.member_dots.unwrap().iter().zip(&b.member_dots.unwrap()) {
            assert!(close(*x, *y, 1e-4), "∂F/∂α {x} vs {y}");
        }
    }
}

/// `sewa watch` with a protocol 2 evaluator: as checkpoints arrive and the window (size 3)
/// slides, the evaluator is sent each newcomer and told to drop each leaver, and every
/// selection is published.
#[test]
fn the_daemon_sends_members_as_the_window_slides() {
    let script = repo().join("tests/evaluators/mlp_numpy.py");
    let cfg = format!(
        "[window]\nsize = 3\n[select]\nmethod = \"greedy\"\nk = 2\n\
         [objective]\nkind = \"command\"\ncommand = [\"python3\", {:?}, \"sel.safetensors\"]\n",
        script.display().to_string()
    );
    let mut d = crate::watch::Daemon::start(&cfg);
    crate::watch::write_selection_data(&d.tmp.path().join("sel.safetensors"));
    // One `members` message per newcomer (selections that change nothing publish nothing,
    // so the evaluator's own report of each change is what is waited for).
    let changes = |d: &crate::watch::Daemon| {
        d.log().lines().filter(|l| l.contains("sewa_evaluator: members")).count()
    };
    for (step, a) in [(1, 1.0), (2, 3.0), (3, -2.0), (4, 0.5), (5, 2.0)] {
        crate::watch::write_mlp(&d.runs, step, a);
        let start = std::time::Instant::now();
        while changes(&d) < step as usize {
            assert!(d.alive(), "sewa exited:\n{}", d.log());
            assert!(start.elapsed() < crate::watch::DEADLINE, "step {step}:\n{}", d.log());
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    let log = d.log();
    let changes: Vec<&str> =
        log.lines().filter(|l| l.contains("sewa_evaluator: members")).collect();
    assert_eq!(changes.len(), 5, "{changes:#?}");
    assert!(
        changes[3].contains("removed ['1']") && changes[3].contains("holding 3"),
        "{changes:#?}"
    );
    assert!(
        changes[4].contains("removed ['2']") && changes[4].contains("holding 3"),
        "{changes:#?}"
    );
    assert!(!log.contains("evaluator failed"), "{log}");
}

/// F(w) = ½ Σ s_j (w_j − t_j)² over one f32 tensor, answering either averages (`mixes` false)
/// or mixing weights with ⟨∇F, w_i⟩ per member (`mixes` true).
struct Bowl {
    target: Vec<f64>,
    members: Vec<Vec<f64>>,
    mixes: bool,
}

impl Bowl {
    fn at(&self, w: &[f64]) -> (f64, Vec<f64>) {
        let s = |j: usize| 1.0 + (j % 3) as f64;
        let g: Vec<f64> = w.iter().enumerate().map(|(j, x)| s(j) * (x - self.target[j])).collect();
        let f = w.iter().enumerate().map(|(j, x)| 0.5 * s(j) * (x - self.target[j]).powi(2)).sum();
        (f, g)
    }
}

impl Objective for Bowl {
    fn evaluate(
        &mut self,
        p: &Params,
        want_grad: bool,
    ) -> sewa_engine::error::Result<sewa_engine::objective::Evaluation> {
        let w: Vec<f64> = p[0].data.iter().map(|x| *x as f64).collect();
        let (loss, g) = self.at(&w);
        let grad = want_grad.then(|| {
            vec![NamedTensor {
                name: "w".into(),
                shape: p[0].shape.clone(),
                data: g.iter().map(|x| *x as f32).collect(),
            }]
        });
        Ok(sewa_engine::objective::Evaluation { loss, grad })
    }
    fn supports_grad(&self) -> bool {
        true
    }
    fn describe(&self) -> String {
        "bowl".into()
    }
    fn mixes(&self) -> bool {
        self.mixes
    }
    fn evaluate_mix(
        &mut self,
        members: &[&Checkpoint],
        alpha: &[f64],
        want_grad: bool,
    ) -> sewa_engine::error::Result<sewa_engine::objective::MixEvaluation> {
        assert_eq!(members.len(), self.members.len());
        let n = self.target.len();
        // The mixture in f32, as sewa forms averages.
        let w: Vec<f64> = (0..n)
            .map(|j| {
                self.members.iter().zip(alpha).map(|(m, a)| (*a as f32) * m[j] as f32).sum::<f32>()
                    as f64
            })
            .collect();
        let (loss, g) = self.at(&w);
        let dots = want_grad.then(|| {
            self.members
                .iter()
                .map(|m| {
                    m.iter().zip(&g).map(|(x, y)| (*x as f32) as f64 * (*y as f32) as f64).sum()
                })
                .collect()
        });
        Ok(sewa_engine::objective::MixEvaluation { loss, member_dots: dots })
    }
}

/// The Oracle's mask gradient from per-member dot products equals the one it streams from a
/// gradient: SeWA learns the same probabilities and both searches choose the same sets.
#[test]
fn mask_gradient_from_member_dots_equals_the_streamed_one() {
    let n = 24;
    let target: Vec<f64> = (0..n).map(|j| (j as f64 * 0.37).sin()).collect();
    let members: Vec<Vec<f64>> = (0..6)
        .map(|i| {
            (0..n)
                .map(|j| target[j] + ((i * 7 + j * 3) % 11) as f64 / 10.0 - 0.5 + 0.1 * i as f64)
                .collect()
        })
        .collect();
    let ckpts: Vec<Checkpoint> = members
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let b = m.iter().flat_map(|x| (*x as f32).to_le_bytes()).collect();
            Checkpoint::from_memory(
                format!("m{i}"),
                Some(i as u64),
                vec![("w".into(), DType::F32, vec![n], b)],
            )
            .unwrap()
        })
        .collect();
    let refs: Vec<&Checkpoint> = ckpts.iter().collect();
    let cfg = SewaConfig { member_losses: false, ..Default::default() };
    let mut streamed = Bowl { target: target.clone(), members: members.clone(), mixes: false };
    let mut mixed = Bowl { target, members, mixes: true };
    for method in [Method::Sewa, Method::Greedy] {
        let (a, _) = run_model_based(method, 3, &refs, &mut streamed, &cfg, None).unwrap();
        let (b, _) = run_model_based(method, 3, &refs, &mut mixed, &cfg, None).unwrap();
        assert_eq!(a.members(), b.members(), "{method:?}: {} / {}", a.why, b.why);
        if method == Method::Sewa {
            let (ja, jb) = (a.details.json(), b.details.json());
            let (pa, pb) =
                (ja["probabilities"].as_array().unwrap(), jb["probabilities"].as_array().unwrap());
            for (x, y) in pa.iter().zip(pb) {
                assert!(close(x.as_f64().unwrap(), y.as_f64().unwrap(), 1e-4), "{pa:?} vs {pb:?}");
            }
        }
    }
}

/// Issue 12 item 3: protocol 1 candidates of f16 members go out in f16 to an evaluator whose
/// hello lists `dtypes: ["f16"]` (the numpy client widens them on load): half the staged bytes,
/// the same loss to f16 rounding. Members of mixed or f32 dtypes still travel as f32.
#[test]
fn protocol_1_candidates_travel_in_the_members_dtype_when_the_evaluator_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_data(dir.path());
    let mut p1 = numpy_eval(&data, 1);
    let params = mlp_params(7);
    let f32_loss = p1.evaluate(&params, false).unwrap().loss;
    let f32_bytes = p1.traffic().staged_written;
    p1.members_dtype(Some(DType::F16));
    let f16_loss = p1.evaluate(&params, false).unwrap().loss;
    let f16_bytes = p1.traffic().staged_written - f32_bytes;
    let numel: usize = params.iter().map(|t| t.data.len()).sum();
    assert!(f32_bytes >= 4 * numel as u64, "f32 candidate: {f32_bytes} bytes");
    assert!(f16_bytes < 2 * numel as u64 + 1024, "f16 candidate: {f16_bytes} bytes");
    assert!(close(f32_loss, f16_loss, 1e-2), "loss {f32_loss} (f32) vs {f16_loss} (f16)");
    p1.members_dtype(None);
    p1.evaluate(&params, false).unwrap();
    let back = p1.traffic().staged_written - f32_bytes - f16_bytes;
    assert_eq!(back, f32_bytes, "mixed or f32 members: f32 again");
}

// ---- `sewa average --select` with a protocol 2 evaluator from the config file -------------

/// Three members `step_{100,200,300}.safetensors` on disk: the MLP layout plus an integer
/// buffer `steps` of 1e6 · (i + 1), so a loss counting integers (mode `count-ints`) says whose
/// buffers a mixture carried.
pub(crate) fn members_with_int_buffers(dir: &Path) -> Vec<PathBuf> {
    (0..3u64)
        .map(|i| {
            let path = dir.join(format!("step_{}.safetensors", 100 * (i + 1)));
            let p = mlp_params(10 * i + 3);
            let mut bytes: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = p
                .iter()
                .map(|t| {
                    let b = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
                    (t.name.clone(), safetensors::Dtype::F32, t.shape.clone(), b)
                })
                .collect();
            let steps = (1_000_000 * (i as i64 + 1)).to_le_bytes().to_vec();
            bytes.push(("steps".into(), safetensors::Dtype::I64, vec![1], steps));
            let views = bytes.iter().map(|(n, d, s, b)| {
                (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap())
            });
            safetensors::serialize_to_file(views, None, &path).unwrap();
            path
        })
        .collect()
}

/// Issue 20: `average --select` read the config its own way and never handed `[publish]
/// int_policy` to the objective, so a protocol 2 evaluator mixed integer buffers by `latest`
/// while the published average took them from the first member. Now the evaluator is told the
/// policy the average uses: the selection's loss counts the integers of the oldest chosen
/// member, and the published model carries the same member's.
#[test]
fn average_select_tells_a_protocol_2_evaluator_the_configs_int_policy() {
    let dir = tempfile::tempdir().unwrap();
    write_data(dir.path());
    let inputs = members_with_int_buffers(dir.path());
    let script = repo().join("tests/evaluators/mlp_numpy.py");
    let config = dir.path().join("sewa.toml");
    let text = format!(
        "[watch]\ndir = \"runs\"\n[publish]\nout = \"published/model.safetensors\"\n\
         int_policy = \"first\"\n[objective]\nkind = \"command\"\n\
         command = [\"python3\", {:?}, \"selection.safetensors\", \"--mode\", \"count-ints\"]\n\
         timeout_s = 60\n",
        script.display().to_string()
    );
    std::fs::write(&config, text).unwrap();
    let out = dir.path().join("avg.safetensors");
    let run = Command::new(env!("CARGO_BIN_EXE_sewa"))
        .args(["average", "--config"])
        .arg(&config)
        .args(["--select", "exhaustive", "--k", "2", "--out"])
        .arg(&out)
        .args(&inputs)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let m = dir.path().join("avg.safetensors.manifest.json");
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&m).unwrap()).unwrap();
    assert_eq!(m["int_policy"], "first", "{m}");
    // The manifest lists the k members averaged (as the daemon's does), oldest first.
    let steps: Vec<u64> =
        m["inputs"].as_array().unwrap().iter().map(|i| i["step"].as_u64().unwrap()).collect();
    assert!(steps.len() >= 2, "first and latest differ only with two members: {m}");
    assert_eq!(m["weights"].as_array().unwrap().len(), steps.len(), "{m}");
    let oldest = 1e6 * (steps[0] / 100) as f64;
    let loss = m["selection"]["loss"].as_f64().unwrap();
    // The true loss is a few units; the integers are millions apart.
    assert!((loss - oldest).abs() < 1e3, "loss {loss}: not the oldest member's integers: {m}");
    let published = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&published).unwrap();
    let steps = st.tensor("steps").unwrap();
    let steps = i64::from_le_bytes(steps.data().try_into().unwrap());
    assert_eq!(steps as f64, oldest, "the average took the same member's integers");
}

/// Issue 20: `average --select` used to skip the daemon's cross-checks and unknown keys
/// outside `[objective]`; it now reads the file through the same parse.
#[test]
fn average_select_reports_what_the_config_parse_refuses() {
    let dir = tempfile::tempdir().unwrap();
    write_data(dir.path());
    let inputs = members_with_int_buffers(dir.path());
    let cases = [
        // A cross-check: the acceptance split is for `policy = "best"` only.
        (
            "[objective]\ndata = \"selection.safetensors\"\nacceptance_data = \"a.safetensors\"\n",
            "policy = \"best\"",
        ),
        // A typo outside `[objective]`, ignored before.
        ("[objective]\ndata = \"selection.safetensors\"\n[select]\nmethdo = \"sewa\"\n", "methdo"),
        // A key of the other kind, at its line.
        ("[objective]\nkind = \"command\"\ncommand = [\"python3\"]\ndevice = \"cpu\"\n", "line 4"),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let config = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&config, text).unwrap();
        let run = Command::new(env!("CARGO_BIN_EXE_sewa"))
            .args(["average", "--config"])
            .arg(&config)
            .args(["--select", "greedy", "--k", "2", "--out"])
            .arg(dir.path().join("avg.safetensors"))
            .args(&inputs)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(78), "case {i}: {err}");
        assert!(err.contains(want) && err.contains(&format!("bad{i}.toml")), "case {i}: {err}");
    }
    assert!(!dir.path().join("avg.safetensors").exists());
}
