//! The builtin MLP objective: reference loss values, gradient against finite differences,
//! chunked evaluation, and errors that name the file and the mismatch.

use std::path::Path;

use sewa_checkpoint::{Checkpoint, DType};
use sewa_engine::objective::config::Kind;
use sewa_engine::objective::data::{Targets, write_dataset};
use sewa_engine::objective::{
    Activation, BuiltinConfig, LossKind, NamedTensor, ObjectiveConfig, Params,
};

fn cfg(
    data: &Path,
    activation: Activation,
    loss: LossKind,
    batch: Option<usize>,
) -> ObjectiveConfig {
    let b =
        BuiltinConfig { data: data.to_path_buf(), activation, loss, batch, ..Default::default() };
    ObjectiveConfig { kind: Kind::Builtin(b), ..Default::default() }
}

fn wave(n: usize, phase: f32) -> Vec<f32> {
    (0..n).map(|i| (i as f32 * 0.7 + phase).sin() * 0.8).collect()
}

/// A 3 → 4 → 3 MLP named as nn.Sequential saves it.
fn mlp_params(phase: f32) -> Params {
    let t = |name: &str, shape: Vec<usize>, ph: f32| {
        let n = shape.iter().product();
        NamedTensor { name: name.into(), shape, data: wave(n, phase + ph) }
    };
    vec![
        t("net.0.bias", vec![4], 0.1),
        t("net.0.weight", vec![4, 3], 0.2),
        t("net.2.bias", vec![3], 0.3),
        t("net.2.weight", vec![3, 4], 0.4),
    ]
}

fn classification_data(dir: &Path, rows: usize, classes: i64) -> std::path::PathBuf {
    let path = dir.join("sel.safetensors");
    let x = wave(rows * 3, 1.3);
    let y: Vec<i64> = (0..rows as i64).map(|i| i % classes).collect();
    write_dataset(&path, &x, 3, Targets::Classes(&y)).unwrap();
    path
}

#[test]
fn zero_weights_give_log_of_class_count() {
    let dir = tempfile::tempdir().unwrap();
    let data = classification_data(dir.path(), 10, 3);
    let mut obj =
        cfg(&data, Activation::Relu, LossKind::CrossEntropy, None).build(dir.path()).unwrap();
    let mut p = mlp_params(0.0);
    p.iter_mut().for_each(|t| t.data.iter_mut().for_each(|x| *x = 0.0));
    let ev = obj.evaluate(&p, false).unwrap();
    assert!((ev.loss - 3f64.ln()).abs() < 1e-6, "{}", ev.loss);
    assert!(ev.grad.is_none());
}

#[test]
fn mlp_gradient_matches_finite_differences() {
    let dir = tempfile::tempdir().unwrap();
    let data = classification_data(dir.path(), 16, 3);
    for (act, loss) in
        [(Activation::Tanh, LossKind::CrossEntropy), (Activation::Gelu, LossKind::CrossEntropy)]
    {
        let mut obj = cfg(&data, act, loss, None).build(dir.path()).unwrap();
        let p = mlp_params(0.5);
        let g = obj.evaluate(&p, true).unwrap().grad.unwrap();
        assert_eq!(
            g.iter().map(|t| &t.name).collect::<Vec<_>>(),
            p.iter().map(|t| &t.name).collect::<Vec<_>>()
        );
        let eps = 1e-2f32;
        for (ti, t) in p.iter().enumerate() {
            for j in 0..t.data.len() {
                let mut up = p.clone();
                up[ti].data[j] += eps;
                let mut dn = p.clone();
                dn[ti].data[j] -= eps;
                let fd = (obj.evaluate(&up, false).unwrap().loss
                    - obj.evaluate(&dn, false).unwrap().loss)
                    / (2.0 * eps as f64);
                let an = g[ti].data[j] as f64;
                assert!(
                    (fd - an).abs() < 2e-3 + 2e-2 * an.abs(),
                    "{act:?} {}[{j}]: {an} vs {fd}",
                    t.name
                );
            }
        }
    }
}

#[test]
fn chunked_batches_give_the_full_loss_and_gradient() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reg.safetensors");
    let x = wave(13 * 3, 0.3);
    let y = wave(13 * 3, 2.0);
    write_dataset(&path, &x, 3, Targets::Values(&y, 3)).unwrap();
    let p = mlp_params(0.2);
    let mut full = cfg(&path, Activation::Relu, LossKind::Mse, None).build(dir.path()).unwrap();
    let mut chunked =
        cfg(&path, Activation::Relu, LossKind::Mse, Some(5)).build(dir.path()).unwrap();
    let (a, b) = (full.evaluate(&p, true).unwrap(), chunked.evaluate(&p, true).unwrap());
    assert!((a.loss - b.loss).abs() < 1e-6, "{} vs {}", a.loss, b.loss);
    for (ga, gb) in a.grad.unwrap().iter().zip(b.grad.unwrap().iter()) {
        for (x, y) in ga.data.iter().zip(&gb.data) {
            assert!((x - y).abs() < 1e-5, "{}: {x} vs {y}", ga.name);
        }
    }
}

fn checkpoint(label: &str, params: &Params) -> Checkpoint {
    let tensors = params
        .iter()
        .map(|t| {
            let b = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
            (t.name.clone(), DType::F32, t.shape.clone(), b)
        })
        .collect();
    Checkpoint::from_memory(label, Some(1), tensors).unwrap()
}

#[test]
fn mismatches_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = classification_data(dir.path(), 10, 3);
    let obj = cfg(&data, Activation::Relu, LossKind::CrossEntropy, None).build(dir.path()).unwrap();
    let err = |p: &Params| obj.check(&checkpoint("ck-7.safetensors", p)).unwrap_err().to_string();

    let mut no_bias = mlp_params(0.0);
    no_bias.remove(2);
    let e = err(&no_bias);
    assert!(e.contains("ck-7.safetensors") && e.contains("net.2.bias"), "{e}");

    let mut wide = mlp_params(0.0);
    wide[1] = NamedTensor { name: "net.0.weight".into(), shape: vec![4, 5], data: vec![0.0; 20] };
    let e = err(&wide);
    assert!(e.contains("5 inputs") && e.contains("3 features"), "{e}");

    let data4 = classification_data(&dir.path().join("."), 10, 4);
    let obj4 =
        cfg(&data4, Activation::Relu, LossKind::CrossEntropy, None).build(dir.path()).unwrap();
    let e = obj4.check(&checkpoint("ck-8.safetensors", &mlp_params(0.0))).unwrap_err().to_string();
    assert!(e.contains("class id 3") && e.contains("3 outputs"), "{e}");
}

#[test]
fn bad_data_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reg.safetensors");
    let y = [0.5f32; 4];
    write_dataset(&path, &[0.0; 8], 2, Targets::Values(&y, 1)).unwrap();
    let c = cfg(&path, Activation::Relu, LossKind::CrossEntropy, None);
    let e = c.build(dir.path()).err().unwrap().to_string();
    assert!(e.contains("reg.safetensors") && e.contains("class ids"), "{e}");
    let missing = cfg(Path::new("nope.safetensors"), Activation::Relu, LossKind::Mse, None);
    let e = missing.build(dir.path()).err().unwrap().to_string();
    assert!(e.contains("nope.safetensors"), "{e}");
}
