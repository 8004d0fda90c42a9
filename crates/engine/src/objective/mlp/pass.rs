//! One forward pass of the MLP over a chunk of rows and, on request, its backward pass written
//! out by hand: the loss's gradient with respect to every weight and bias, through candle's ops
//! (so it runs on any device; the matmuls are candle's gemm). candle's autograd spent ~4× the
//! forward's CPU time on the backward of the bench's 85 k-parameter MLP (examples/bench_loss.rs:
//! 3.3 ms against 0.7 ms; zeroed gradient stores, a gradient for the data, a row sum with a
//! divide per element); by hand it is two matmuls per layer and the row sum as a matmul.

use candle_core::{D, DType, Result, Tensor};

use super::layers::Layer;
use crate::objective::config::Activation;

/// What a chunk's rows are compared with.
pub enum Target<'a> {
    /// Class ids, u32 [N, 1] (for gather/scatter along the class dimension).
    Classes(&'a Tensor),
    /// Regression targets, f32 [N, C].
    Values(&'a Tensor),
}

/// Logits of the MLP `layers` (weights `ws`, indexed by the layers) on `x` [N, D].
pub fn forward(
    ws: &[Tensor],
    layers: &[Layer],
    activation: Activation,
    x: &Tensor,
) -> Result<Tensor> {
    let mut x = x.clone();
    for (i, l) in layers.iter().enumerate() {
        x = linear(ws, l, &x)?;
        if i + 1 < layers.len() {
            x = activate(activation, &x)?;
        }
    }
    Ok(x)
}

fn linear(ws: &[Tensor], l: &Layer, x: &Tensor) -> Result<Tensor> {
    x.matmul(&ws[l.weight].t()?)?.broadcast_add(&ws[l.bias])
}

fn activate(activation: Activation, z: &Tensor) -> Result<Tensor> {
    match activation {
        Activation::Relu => z.relu(),
        Activation::Gelu => z.gelu_erf(),
        Activation::Tanh => z.tanh(),
    }
}

/// A chunk's loss summed over its rows, divided by `rows` (the whole data's row count, so
/// chunk results add up to the mean), and with `want_grad` the gradient of that with respect
/// to each layer's (weight, bias), in layer order.
pub struct ChunkResult {
    pub loss: f64,
    pub grads: Option<Vec<(Tensor, Tensor)>>,
}

/// Forward (and backward) over the rows of `x` [N, D].
pub fn run(
    ws: &[Tensor],
    layers: &[Layer],
    activation: Activation,
    x: &Tensor,
    target: Target,
    rows: usize,
    want_grad: bool,
) -> Result<ChunkResult> {
    // Inputs of every layer and pre-activations of the hidden ones, kept for the backward.
    let mut inputs = vec![x.clone()];
    let mut pre = Vec::with_capacity(layers.len());
    let last = layers.len() - 1;
    for l in &layers[..last] {
        let z = linear(ws, l, inputs.last().expect("the data is the first input"))?;
        inputs.push(activate(activation, &z)?);
        pre.push(z);
    }
    let logits = linear(ws, &layers[last], &inputs[last])?;
    let (loss, dlogits) = loss_and_dlogits(&logits, target, rows, want_grad)?;
    let grads = match dlogits {
        Some(d) => Some(backward(ws, layers, activation, &inputs, &pre, d)?),
        None => None,
    };
    Ok(ChunkResult { loss, grads })
}

/// The chunk's loss (sum over rows / `rows`) and its gradient with respect to the logits.
fn loss_and_dlogits(
    logits: &Tensor,
    target: Target,
    rows: usize,
    want_grad: bool,
) -> Result<(f64, Option<Tensor>)> {
    let scale = 1.0 / rows as f64;
    match target {
        Target::Classes(ids) => {
            let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
            let picked = logp.gather(ids, 1)?.sum_all()?.to_scalar::<f32>()? as f64;
            if !want_grad {
                return Ok((-picked * scale, None));
            }
            // d/dlogits of −log softmax[y] = softmax − onehot(y).
            let minus_one = Tensor::full(-1f32, ids.dims(), ids.device())?;
            let d = logp.exp()?.scatter_add(ids, &minus_one, 1)?;
            Ok((-picked * scale, Some((d * scale)?)))
        }
        Target::Values(t) => {
            // Mean over rows and columns, as candle_nn::loss::mse.
            let scale = scale / logits.dim(1)? as f64;
            let diff = (logits - t)?;
            let sq = diff.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            let d = if want_grad { Some((diff * (2.0 * scale))?) } else { None };
            Ok((sq * scale, d))
        }
    }
}

/// Layer by layer from the last: dW = dZᵀ·X, db = Σ_rows dZ, dX = dZ·W (not for the data).
fn backward(
    ws: &[Tensor],
    layers: &[Layer],
    activation: Activation,
    inputs: &[Tensor],
    pre: &[Tensor],
    mut dz: Tensor,
) -> Result<Vec<(Tensor, Tensor)>> {
    let mut grads = Vec::with_capacity(layers.len());
    for (i, l) in layers.iter().enumerate().rev() {
        let dw = dz.t()?.matmul(&inputs[i])?;
        // A row of ones times dZ: candle's sum over dim 0 takes a divide per element; the
        // matmul is gemm's.
        let ones = Tensor::ones((1, dz.dim(0)?), DType::F32, dz.device())?;
        let db = ones.matmul(&dz)?.squeeze(0)?;
        if i > 0 {
            let dx = dz.matmul(&ws[l.weight])?;
            dz = activation_backward(activation, &pre[i - 1], &inputs[i], &dx)?;
        }
        grads.push((dw, db));
    }
    grads.reverse();
    Ok(grads)
}

/// dL/dz from dL/dh for h = act(z).
fn activation_backward(
    activation: Activation,
    z: &Tensor,
    h: &Tensor,
    dh: &Tensor,
) -> Result<Tensor> {
    match activation {
        // h = relu(z) ≥ 0, so sign(h) is relu'(z) (0 at the kink) in one op.
        Activation::Relu => dh * h.sign()?,
        // tanh' = 1 − h².
        Activation::Tanh => dh * h.sqr()?.affine(-1.0, 1.0)?,
        // gelu(z) = z Φ(z): gelu' = Φ(z) + z φ(z).
        Activation::Gelu => {
            let cdf = ((z / std::f64::consts::SQRT_2)?.erf()? + 1.0)? * 0.5;
            let pdf = (z.sqr()? * -0.5)?.exp()? * (1.0 / (2.0 * std::f64::consts::PI).sqrt());
            dh * (cdf? + (z * pdf?)?)?
        }
    }
}
