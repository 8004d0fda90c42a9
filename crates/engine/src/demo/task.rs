//! The demo's synthetic problem and trainer: a Gaussian-blob classification task with label
//! noise, and a small MLP trained with candle by plain SGD at a high learning rate (so the late
//! trajectory is noisy), saving safetensors checkpoints with `step` metadata the way trainers do.
//! It knows nothing about selection.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{D, Device, Tensor, Var};
use candle_nn::Optimizer;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};

/// Task and training knobs (fixed for the README's numbers; `seed` varies the whole run).
pub struct TaskSpec {
    pub features: usize,
    pub classes: usize,
    pub blobs_per_class: usize,
    pub hidden: usize,
    pub label_noise: f64,
    pub train_rows: usize,
    pub selection_rows: usize,
    pub test_rows: usize,
    pub lr: f64,
    pub batch: usize,
    pub steps: usize,
    pub save_every: usize,
    pub seed: u64,
}

impl Default for TaskSpec {
    fn default() -> Self {
        TaskSpec {
            features: 10,
            classes: 4,
            blobs_per_class: 3,
            hidden: 64,
            label_noise: 0.2,
            train_rows: 4000,
            selection_rows: 2000,
            test_rows: 5000,
            lr: 0.8,
            batch: 16,
            steps: 2400,
            save_every: 60,
            seed: 0,
        }
    }
}

/// A split: inputs [N, D] and class ids.
pub struct Split {
    pub x: Vec<f32>,
    pub y: Vec<i64>,
}

/// Train, selection (both with label noise) and clean test splits.
pub struct Task {
    pub train: Split,
    pub selection: Split,
    pub test: Split,
}

fn gauss(rng: &mut ChaCha8Rng) -> f64 {
    // Box–Muller; enough for a demo and free of extra crates.
    let (u, v): (f64, f64) = (rng.random_range(1e-12..1.0), rng.random());
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

impl TaskSpec {
    pub fn generate(&self) -> Task {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let centers: Vec<Vec<f64>> = (0..self.classes * self.blobs_per_class)
            .map(|_| (0..self.features).map(|_| 1.3 * gauss(&mut rng)).collect())
            .collect();
        let mut split = |rows: usize, noise: f64| {
            let (mut x, mut y) = (Vec::new(), Vec::new());
            for _ in 0..rows {
                let b = rng.random_range(0..centers.len());
                x.extend(centers[b].iter().map(|c| (c + gauss(&mut rng)) as f32));
                let class = (b % self.classes) as i64;
                let flip = rng.random::<f64>() < noise;
                y.push(if flip { rng.random_range(0..self.classes) as i64 } else { class });
            }
            Split { x, y }
        };
        let train = split(self.train_rows, self.label_noise);
        let selection = split(self.selection_rows, self.label_noise);
        let test = split(self.test_rows, 0.0);
        Task { train, selection, test }
    }

    /// Train on `task.train`, writing `step_NNNNNN.safetensors` into `dir` every `save_every`
    /// steps. `on_save` sees each written path and its step before training goes on (the demo
    /// waits there for its watcher); its error stops training.
    pub fn train(
        &self,
        task: &Task,
        dir: &Path,
        mut on_save: impl FnMut(&Path, u64) -> Result<()>,
    ) -> Result<Vec<PathBuf>> {
        let c = |e: candle_core::Error| Error::Internal(format!("demo training: {e}"));
        let dev = Device::Cpu;
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x5eed);
        let shapes = [
            ("net.0.weight", vec![self.hidden, self.features]),
            ("net.0.bias", vec![self.hidden]),
            ("net.2.weight", vec![self.classes, self.hidden]),
            ("net.2.bias", vec![self.classes]),
        ];
        let vars = shapes
            .iter()
            .map(|(_, s)| {
                let fan_in = if s.len() == 2 { s[1] } else { self.features } as f64;
                let bound = (1.0 / fan_in).sqrt();
                let n: usize = s.iter().product();
                let v: Vec<f32> = (0..n).map(|_| rng.random_range(-bound..bound) as f32).collect();
                Var::from_vec(v, s.as_slice(), &dev)
            })
            .collect::<candle_core::Result<Vec<Var>>>()
            .map_err(c)?;
        let names: Vec<&str> = shapes.iter().map(|s| s.0).collect();
        let n = task.train.y.len();
        let x = Tensor::from_slice(&task.train.x, (n, self.features), &dev).map_err(c)?;
        let y: Vec<u32> = task.train.y.iter().map(|v| *v as u32).collect();
        let y = Tensor::from_vec(y, n, &dev).map_err(c)?;
        let mut opt = candle_nn::SGD::new(vars.clone(), self.lr).map_err(c)?;
        let mut written = Vec::new();
        for step in 1..=self.steps {
            let idx: Vec<u32> = (0..self.batch).map(|_| rng.random_range(0..n as u32)).collect();
            let idx = Tensor::from_vec(idx, self.batch, &dev).map_err(c)?;
            let xb = x.index_select(&idx, 0).map_err(c)?;
            let yb = y.index_select(&idx, 0).map_err(c)?;
            let loss = batch_loss(&vars, &xb, &yb).map_err(c)?;
            opt.backward_step(&loss).map_err(c)?;
            if step % self.save_every == 0 {
                let path = dir.join(format!("step_{step:06}.safetensors"));
                save(&path, step, &names, &vars)?;
                on_save(&path, step as u64)?;
                written.push(path);
            }
        }
        Ok(written)
    }
}

fn batch_loss(vars: &[Var], x: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
    let h = x.matmul(&vars[0].t()?)?.broadcast_add(&vars[1])?.relu()?;
    let logits = h.matmul(&vars[2].t()?)?.broadcast_add(&vars[3])?;
    candle_nn::loss::nll(&candle_nn::ops::log_softmax(&logits, D::Minus1)?, y)
}

/// Save like a trainer: safetensors with `step` metadata (temp file + rename inside safetensors).
fn save(path: &Path, step: usize, names: &[&str], vars: &[Var]) -> Result<()> {
    let c = |e: candle_core::Error| Error::Internal(format!("demo save: {e}"));
    let mut blobs = Vec::new();
    for (name, v) in names.iter().zip(vars) {
        let data: Vec<f32> = v.as_tensor().flatten_all().and_then(|t| t.to_vec1()).map_err(c)?;
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        blobs.push((name.to_string(), v.as_tensor().dims().to_vec(), bytes));
    }
    let views = blobs
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Internal(format!("demo save: {e}")))?;
    let meta = HashMap::from([("step".to_string(), step.to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path)
        .map_err(|e| Error::bad_input(path, format!("cannot write checkpoint: {e}")))
}
