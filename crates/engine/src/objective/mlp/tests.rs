//! The hand-written backward against its slow, obvious twin (candle's autograd over the same
//! forward) for every activation and loss, on a three-layer net, whole and in chunks.

use candle_core::{D, Device, Tensor, Var};

use super::*;

fn wave(n: usize, phase: f32) -> Vec<f32> {
    (0..n).map(|i| (i as f32 * 0.37 + phase).sin() * 0.9).collect()
}

/// A 5 → 7 → 6 → 4 MLP named as nn.Sequential saves it, sorted by name like `Params`.
fn params() -> Params {
    let mut p = Vec::new();
    for (i, (fan_in, fan_out)) in [(5, 7), (7, 6), (6, 4)].into_iter().enumerate() {
        let name = format!("net.{}", 2 * i);
        let w = wave(fan_in * fan_out, i as f32);
        p.push(NamedTensor {
            name: format!("{name}.weight"),
            shape: vec![fan_out, fan_in],
            data: w,
        });
        let b = wave(fan_out, 2.0 + i as f32);
        p.push(NamedTensor { name: format!("{name}.bias"), shape: vec![fan_out], data: b });
    }
    p.sort_by(|a, b| a.name.cmp(&b.name));
    p
}

fn dataset(loss: LossKind, rows: usize) -> Dataset {
    let inputs = Tensor::from_vec(wave(rows * 5, 0.3), (rows, 5), &Device::Cpu).unwrap();
    let (targets, max_class) = match loss {
        LossKind::CrossEntropy => {
            let ids: Vec<u32> = (0..rows as u32).map(|i| (i * 7) % 4).collect();
            (Tensor::from_vec(ids, rows, &Device::Cpu).unwrap(), Some(3))
        }
        LossKind::Mse => {
            (Tensor::from_vec(wave(rows * 4, 1.1), (rows, 4), &Device::Cpu).unwrap(), None)
        }
    };
    Dataset { path: "mem.safetensors".into(), inputs, targets, max_class }
}

/// Loss and gradient by candle's autograd.
fn twin(
    p: &Params,
    activation: Activation,
    loss: LossKind,
    data: &Dataset,
) -> (f64, Vec<Vec<f32>>) {
    let vars: Vec<Var> = p
        .iter()
        .map(|t| Var::from_slice(&t.data, t.shape.as_slice(), &Device::Cpu).unwrap())
        .collect();
    let ws: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let named: Vec<(&str, &[usize])> =
        p.iter().map(|t| (t.name.as_str(), t.shape.as_slice())).collect();
    let layers = infer_layers(&named).unwrap();
    let logits = forward(&ws, &layers, activation, &data.inputs).unwrap();
    let l = match loss {
        LossKind::CrossEntropy => {
            let logp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
            candle_nn::loss::nll(&logp, &data.targets).unwrap()
        }
        LossKind::Mse => candle_nn::loss::mse(&logits, &data.targets).unwrap(),
    };
    let store = l.backward().unwrap();
    let grads = vars
        .iter()
        .map(|v| store.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    (l.to_scalar::<f32>().unwrap() as f64, grads)
}

#[test]
fn hand_backward_matches_autograd_for_every_activation_loss_and_chunking() {
    let p = params();
    for activation in [Activation::Relu, Activation::Tanh, Activation::Gelu] {
        for loss in [LossKind::CrossEntropy, LossKind::Mse] {
            let (want_loss, want) = twin(&p, activation, loss, &dataset(loss, 23));
            for batch in [None, Some(5)] {
                let mut obj = MlpObjective::new(dataset(loss, 23), activation, loss, batch);
                let ev = obj.evaluate(&p, true).unwrap();
                let what = format!("{activation:?} {loss:?} batch {batch:?}");
                assert!((ev.loss - want_loss).abs() < 1e-5 * want_loss.max(1.0), "{what}");
                let forward_only = obj.evaluate(&p, false).unwrap();
                assert_eq!((forward_only.loss, forward_only.grad.is_none()), (ev.loss, true));
                for (g, w) in ev.grad.unwrap().iter().zip(&want) {
                    assert_eq!(g.data.len(), w.len(), "{what} {}", g.name);
                    for (a, b) in g.data.iter().zip(w) {
                        assert!(
                            (a - b).abs() < 1e-5 + 1e-4 * b.abs(),
                            "{what} {}: {a} vs {b}",
                            g.name
                        );
                    }
                }
            }
        }
    }
}
