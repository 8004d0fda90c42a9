//! Builtin `mlp` objective: a multilayer perceptron inferred from the checkpoint's tensor names
//! (`<prefix>.weight` [out, in] with `<prefix>.bias` [out], ordered by the layer index in the
//! prefix as `nn.Sequential` saves them), evaluated with candle on the selection data. Gives the
//! mean loss and, on request, its gradient with respect to every weight. It does not read
//! checkpoints or choose members.

use candle_core::{D, Device, Tensor, Var};

use super::config::{Activation, LossKind};
use super::data::Dataset;
use super::{Evaluation, NamedTensor, Objective, Params};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};

/// One linear layer: indices into the `Params` list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layer {
    pub weight: usize,
    pub bias: usize,
    pub inputs: usize,
    pub outputs: usize,
}

/// Infer the layer chain from tensor names and shapes (names, shapes as `(name, shape)`).
/// The error says what does not fit an MLP.
pub fn infer_layers(tensors: &[(&str, &[usize])]) -> std::result::Result<Vec<Layer>, String> {
    let find = |n: &str| tensors.iter().position(|(t, _)| *t == n);
    let mut layers: Vec<(Vec<Seg>, Layer)> = Vec::new();
    let mut used = vec![false; tensors.len()];
    for (wi, (name, shape)) in tensors.iter().enumerate() {
        let Some(prefix) = name.strip_suffix(".weight") else { continue };
        if shape.len() != 2 {
            continue;
        }
        let bias_name = format!("{prefix}.bias");
        let bi = find(&bias_name).ok_or_else(|| format!("{name} has no {bias_name}"))?;
        if tensors[bi].1 != [shape[0]] {
            return Err(format!(
                "{bias_name} has shape {:?}, expected [{}] to match {name} {:?}",
                tensors[bi].1, shape[0], shape
            ));
        }
        used[wi] = true;
        used[bi] = true;
        let layer = Layer { weight: wi, bias: bi, inputs: shape[1], outputs: shape[0] };
        layers.push((natural_key(prefix), layer));
    }
    if let Some(i) = used.iter().position(|u| !u) {
        return Err(format!("tensor {} is not part of an MLP (linear weight/bias)", tensors[i].0));
    }
    if layers.is_empty() {
        return Err("no 2-D `*.weight` tensors: not an MLP".into());
    }
    layers.sort_by(|a, b| a.0.cmp(&b.0));
    let layers: Vec<Layer> = layers.into_iter().map(|(_, l)| l).collect();
    for pair in layers.windows(2) {
        if pair[1].inputs != pair[0].outputs {
            return Err(format!(
                "{} takes {} inputs but the layer before ({}) gives {}",
                tensors[pair[1].weight].0,
                pair[1].inputs,
                tensors[pair[0].weight].0,
                pair[0].outputs
            ));
        }
    }
    Ok(layers)
}

/// Name segments, numbers compared as numbers (`net.10` after `net.2`).
#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum Seg {
    Num(u64),
    Text(String),
}

fn natural_key(prefix: &str) -> Vec<Seg> {
    prefix
        .split('.')
        .map(|s| s.parse().map(Seg::Num).unwrap_or_else(|_| Seg::Text(s.to_string())))
        .collect()
}

/// Logits of the MLP `layers` (weights `ws`, indexed by the layers) on `x` [N, D].
pub fn forward(
    ws: &[Tensor],
    layers: &[Layer],
    activation: Activation,
    x: &Tensor,
) -> candle_core::Result<Tensor> {
    let mut x = x.clone();
    for (i, l) in layers.iter().enumerate() {
        x = x.matmul(&ws[l.weight].t()?)?.broadcast_add(&ws[l.bias])?;
        if i + 1 < layers.len() {
            x = match activation {
                Activation::Relu => x.relu(),
                Activation::Gelu => x.gelu_erf(),
                Activation::Tanh => x.tanh(),
            }?;
        }
    }
    Ok(x)
}

/// Class predictions (argmax of the logits) of the MLP given by `params` on `x` [N, D].
pub fn predict(params: &Params, activation: Activation, x: &Tensor) -> Result<Vec<u32>> {
    let c = |e: candle_core::Error| Error::Internal(format!("candle: {e}"));
    let named: Vec<(&str, &[usize])> =
        params.iter().map(|p| (p.name.as_str(), p.shape.as_slice())).collect();
    let layers = infer_layers(&named).map_err(Error::Internal)?;
    let ws = params
        .iter()
        .map(|p| Tensor::from_slice(&p.data, p.shape.as_slice(), x.device()))
        .collect::<candle_core::Result<Vec<_>>>()
        .map_err(c)?;
    let logits = forward(&ws, &layers, activation, x).map_err(c)?;
    logits.argmax(D::Minus1).and_then(|t| t.to_vec1::<u32>()).map_err(c)
}

/// The builtin MLP oracle.
pub struct MlpObjective {
    data: Dataset,
    activation: Activation,
    loss: LossKind,
    batch: usize,
    device: Device,
}

impl MlpObjective {
    pub fn new(
        data: Dataset,
        activation: Activation,
        loss: LossKind,
        batch: Option<usize>,
    ) -> Self {
        let batch = batch.unwrap_or(usize::MAX).min(data.rows()).max(1);
        MlpObjective { data, activation, loss, batch, device: Device::Cpu }
    }

    /// The same objective computing on `device` (its held-out data moved there once).
    pub fn on(mut self, device: &Device) -> Result<Self> {
        if device.same_device(&self.device) {
            return Ok(self);
        }
        let c = |e: candle_core::Error| Error::Internal(format!("moving data to {device:?}: {e}"));
        self.data.inputs = self.data.inputs.to_device(device).map_err(c)?;
        self.data.targets = self.data.targets.to_device(device).map_err(c)?;
        self.device = device.clone();
        Ok(self)
    }

    /// The layer chain for these parameters, checked against the data's shapes.
    fn layers_for(&self, tensors: &[(&str, &[usize])]) -> std::result::Result<Vec<Layer>, String> {
        let layers = infer_layers(tensors)?;
        let (first, last) = (layers[0], layers[layers.len() - 1]);
        if first.inputs != self.data.features() {
            return Err(format!(
                "the first layer {} takes {} inputs but the data has {} features",
                tensors[first.weight].0,
                first.inputs,
                self.data.features()
            ));
        }
        match self.loss {
            LossKind::CrossEntropy => {
                let max = self.data.max_class.unwrap_or(0);
                if max as usize >= last.outputs {
                    return Err(format!(
                        "class id {max} in the data is out of range for the last layer {} \
                         with {} outputs",
                        tensors[last.weight].0, last.outputs
                    ));
                }
            }
            LossKind::Mse => {
                let c = self.data.targets.dims()[1];
                if c != last.outputs {
                    return Err(format!(
                        "targets have {c} columns but the last layer {} has {} outputs",
                        tensors[last.weight].0, last.outputs
                    ));
                }
            }
        }
        Ok(layers)
    }

    /// Forward pass over rows `[start, start+len)`; returns the chunk's mean loss.
    fn chunk_loss(
        &self,
        ws: &[Tensor],
        layers: &[Layer],
        start: usize,
        len: usize,
    ) -> Result<Tensor> {
        let c = |e: candle_core::Error| Error::Internal(format!("candle: {e}"));
        let x = self.data.inputs.narrow(0, start, len).map_err(c)?;
        let x = forward(ws, layers, self.activation, &x).map_err(c)?;
        let t = self.data.targets.narrow(0, start, len).map_err(c)?;
        match self.loss {
            LossKind::CrossEntropy => {
                let logp = candle_nn::ops::log_softmax(&x, D::Minus1).map_err(c)?;
                candle_nn::loss::nll(&logp, &t).map_err(c)
            }
            LossKind::Mse => candle_nn::loss::mse(&x, &t).map_err(c),
        }
    }
}

impl Objective for MlpObjective {
    fn evaluate(&mut self, params: &Params, want_grad: bool) -> Result<Evaluation> {
        let c = |e: candle_core::Error| Error::Internal(format!("candle: {e}"));
        let named: Vec<(&str, &[usize])> =
            params.iter().map(|p| (p.name.as_str(), p.shape.as_slice())).collect();
        let layers = self.layers_for(&named).map_err(|m| self.mismatch(m))?;
        let vars = params
            .iter()
            .map(|p| Var::from_vec(p.data.clone(), p.shape.as_slice(), &self.device))
            .collect::<candle_core::Result<Vec<Var>>>()
            .map_err(c)?;
        let ws: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let n = self.data.rows();
        let mut total = 0f64;
        let mut grads: Option<Vec<Vec<f32>>> =
            want_grad.then(|| params.iter().map(|p| vec![0f32; p.data.len()]).collect());
        let mut start = 0;
        while start < n {
            let len = self.batch.min(n - start);
            // Chunk means weighted by their share of rows give the mean over all rows.
            let share = len as f64 / n as f64;
            let loss = (self.chunk_loss(&ws, &layers, start, len)? * share).map_err(c)?;
            total += loss.to_scalar::<f32>().map_err(c)? as f64;
            if let Some(acc) = grads.as_mut() {
                let store = loss.backward().map_err(c)?;
                for (a, v) in acc.iter_mut().zip(&vars) {
                    if let Some(g) = store.get(v.as_tensor()) {
                        let g = g.flatten_all().and_then(|g| g.to_vec1::<f32>()).map_err(c)?;
                        a.iter_mut().zip(g).for_each(|(a, g)| *a += g);
                    }
                }
            }
            start += len;
        }
        let grad = grads.map(|gs| {
            params
                .iter()
                .zip(gs)
                .map(|(p, data)| NamedTensor { name: p.name.clone(), shape: p.shape.clone(), data })
                .collect()
        });
        Ok(Evaluation { loss: total, grad })
    }

    fn supports_grad(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        format!(
            "builtin mlp ({:?}), {:?} over {} rows of {}",
            self.activation,
            self.loss,
            self.data.rows(),
            self.data.path.display()
        )
    }

    fn check(&self, ckpt: &Checkpoint) -> Result<()> {
        let named: Vec<(&str, &[usize])> = ckpt
            .tensors()
            .iter()
            .filter(|t| t.dtype.is_float())
            .map(|t| (t.name.as_str(), t.shape.as_slice()))
            .collect();
        self.layers_for(&named).map(|_| ()).map_err(|m| {
            Error::bad_input(
                ckpt.path(),
                format!("does not fit the builtin mlp with data {}: {m}", self.data.path.display()),
            )
        })
    }
}

impl MlpObjective {
    fn mismatch(&self, msg: String) -> Error {
        Error::bad_input(&self.data.path, format!("weights do not fit the builtin mlp: {msg}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_are_ordered_by_index_not_text() {
        let t: Vec<(&str, &[usize])> = vec![
            ("net.0.bias", &[4]),
            ("net.0.weight", &[4, 3]),
            ("net.10.bias", &[2]),
            ("net.10.weight", &[2, 5]),
            ("net.2.bias", &[5]),
            ("net.2.weight", &[5, 4]),
        ];
        let l = infer_layers(&t).unwrap();
        let order: Vec<&str> = l.iter().map(|l| t[l.weight].0).collect();
        assert_eq!(order, ["net.0.weight", "net.2.weight", "net.10.weight"]);
    }

    #[test]
    fn missing_bias_and_broken_chain_are_named() {
        let t: Vec<(&str, &[usize])> = vec![("net.0.weight", &[4, 3])];
        assert!(infer_layers(&t).unwrap_err().contains("net.0.bias"));
        let t: Vec<(&str, &[usize])> = vec![
            ("a.0.bias", &[4]),
            ("a.0.weight", &[4, 3]),
            ("a.1.bias", &[2]),
            ("a.1.weight", &[2, 5]),
        ];
        assert!(infer_layers(&t).unwrap_err().contains("a.1.weight takes 5 inputs"));
    }
}
