//! Builtin `mlp` objective: a multilayer perceptron inferred from the checkpoint's tensor names
//! (`<prefix>.weight` [out, in] with `<prefix>.bias` [out], ordered by the layer index in the
//! prefix as `nn.Sequential` saves them), evaluated with candle on the selection data. Gives the
//! mean loss and, on request, its gradient with respect to every weight. It does not read
//! checkpoints or choose members.

mod layers;
mod pass;
#[cfg(test)]
mod tests;

use candle_core::{D, Device, Tensor};

pub use self::layers::{Layer, infer_layers};
use self::pass::Target;
pub use self::pass::forward;
use super::config::{Activation, LossKind};
use super::data::Dataset;
use super::{Evaluation, NamedTensor, Objective, Params};
use crate::error::{Error, Result};
use sewa_checkpoint::Checkpoint;

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

    /// Forward (and backward) over rows `[start, start+len)`.
    fn chunk(
        &self,
        ws: &[Tensor],
        layers: &[Layer],
        start: usize,
        len: usize,
        want_grad: bool,
    ) -> candle_core::Result<pass::ChunkResult> {
        let x = self.data.inputs.narrow(0, start, len)?;
        let t = self.data.targets.narrow(0, start, len)?;
        let target = match self.loss {
            // [N, 1]: gathered and scattered along the class dimension.
            LossKind::CrossEntropy => t.unsqueeze(1)?,
            LossKind::Mse => t,
        };
        let target = match self.loss {
            LossKind::CrossEntropy => Target::Classes(&target),
            LossKind::Mse => Target::Values(&target),
        };
        pass::run(ws, layers, self.activation, &x, target, self.data.rows(), want_grad)
    }
}

impl Objective for MlpObjective {
    fn evaluate(&mut self, params: &Params, want_grad: bool) -> Result<Evaluation> {
        let c = |e: candle_core::Error| Error::Internal(format!("candle: {e}"));
        let named: Vec<(&str, &[usize])> =
            params.iter().map(|p| (p.name.as_str(), p.shape.as_slice())).collect();
        let layers = self.layers_for(&named).map_err(|m| self.mismatch(m))?;
        let ws = params
            .iter()
            .map(|p| Tensor::from_slice(&p.data, p.shape.as_slice(), &self.device))
            .collect::<candle_core::Result<Vec<Tensor>>>()
            .map_err(c)?;
        let n = self.data.rows();
        let mut total = 0f64;
        let mut grads: Option<Vec<Vec<f32>>> = want_grad.then(|| vec![Vec::new(); params.len()]);
        let mut start = 0;
        while start < n {
            let len = self.batch.min(n - start);
            let chunk = self.chunk(&ws, &layers, start, len, want_grad).map_err(c)?;
            total += chunk.loss;
            if let (Some(acc), Some(g)) = (grads.as_mut(), chunk.grads) {
                for (l, (dw, db)) in layers.iter().zip(g) {
                    add_into(&mut acc[l.weight], &dw).map_err(c)?;
                    add_into(&mut acc[l.bias], &db).map_err(c)?;
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

/// `acc += t` (flattened); an empty `acc` takes `t`'s values (the first chunk).
fn add_into(acc: &mut Vec<f32>, t: &Tensor) -> candle_core::Result<()> {
    let v = t.flatten_all()?.to_vec1::<f32>()?;
    if acc.is_empty() {
        *acc = v;
    } else {
        acc.iter_mut().zip(v).for_each(|(a, g)| *a += g);
    }
    Ok(())
}
