//! The selection data a builtin objective is evaluated on: a safetensors file with `inputs`
//! (f32 [N, D]) and `targets` (i64/u32/i32 class ids for cross-entropy, f32 [N] or [N, C] for
//! mse). Loads it once into candle tensors; does not know about models.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use safetensors::{Dtype, SafeTensors};

use super::config::LossKind;
use crate::error::{Error, Result, WithPath};

/// Loaded selection data, on the CPU, ready for candle.
pub struct Dataset {
    pub path: PathBuf,
    /// f32 [N, D].
    pub inputs: Tensor,
    /// u32 [N] class ids (cross-entropy) or f32 [N, C] (mse).
    pub targets: Tensor,
    /// Largest class id, for cross-entropy (checked against the model's output width).
    pub max_class: Option<u32>,
}

impl Dataset {
    pub fn rows(&self) -> usize {
        self.inputs.dims()[0]
    }
    pub fn features(&self) -> usize {
        self.inputs.dims()[1]
    }

    /// Read `path`; errors name the file and the tensor at fault.
    pub fn load(path: &Path, loss: LossKind) -> Result<Self> {
        let bytes = std::fs::read(path).with_path(path)?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::bad_input(path, format!("not a safetensors file: {e}")))?;
        let bad = |msg: String| Error::bad_input(path, msg);
        let x =
            st.tensor("inputs").map_err(|_| bad("missing tensor `inputs` (f32 [N, D])".into()))?;
        if x.dtype() != Dtype::F32 || x.shape().len() != 2 {
            return Err(bad(format!(
                "`inputs` must be f32 [N, D], found {:?} {:?}",
                x.dtype(),
                x.shape()
            )));
        }
        let (n, d) = (x.shape()[0], x.shape()[1]);
        if n == 0 {
            return Err(bad("`inputs` has no rows".into()));
        }
        let inputs = Tensor::from_vec(sewa_checkpoint::dtype::f32s(x.data()), (n, d), &Device::Cpu)
            .map_err(internal)?;
        let t = st.tensor("targets").map_err(|_| bad("missing tensor `targets`".into()))?;
        if t.shape().first() != Some(&n) {
            return Err(bad(format!("`targets` has shape {:?}, expected {n} rows", t.shape())));
        }
        let (targets, max_class) = match loss {
            LossKind::CrossEntropy => {
                let ids = class_ids(t.dtype(), t.data()).ok_or_else(|| {
                    bad(format!(
                        "`targets` must be i64, i32 or u32 class ids for cross_entropy, found {:?}",
                        t.dtype()
                    ))
                })?;
                if t.shape().len() != 1 {
                    return Err(bad(format!("`targets` must be [N], found {:?}", t.shape())));
                }
                let ids = ids.map_err(bad)?;
                let max = ids.iter().copied().max();
                (Tensor::from_vec(ids, n, &Device::Cpu).map_err(internal)?, max)
            }
            LossKind::Mse => {
                if t.dtype() != Dtype::F32 || t.shape().len() > 2 {
                    return Err(bad(format!(
                        "`targets` must be f32 [N] or [N, C] for mse, found {:?} {:?}",
                        t.dtype(),
                        t.shape()
                    )));
                }
                let c = t.shape().get(1).copied().unwrap_or(1);
                (
                    Tensor::from_vec(sewa_checkpoint::dtype::f32s(t.data()), (n, c), &Device::Cpu)
                        .map_err(internal)?,
                    None,
                )
            }
        };
        Ok(Dataset { path: path.to_path_buf(), inputs, targets, max_class })
    }
}

fn internal(e: candle_core::Error) -> Error {
    Error::Internal(format!("candle: {e}"))
}

/// Class ids as u32; `None` for a non-integer dtype, `Some(Err)` for negative or huge ids.
fn class_ids(dtype: Dtype, bytes: &[u8]) -> Option<std::result::Result<Vec<u32>, String>> {
    let vals: Vec<i64> = match dtype {
        Dtype::I64 => {
            bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
        }
        Dtype::I32 => bytes
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
            .collect(),
        Dtype::U32 => bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as i64)
            .collect(),
        _ => return None,
    };
    Some(
        vals.iter()
            .enumerate()
            .map(|(i, &v)| {
                u32::try_from(v).map_err(|_| format!("`targets`[{i}] = {v} is not a class id"))
            })
            .collect(),
    )
}

/// Targets to write into a selection-data file.
pub enum Targets<'a> {
    /// Class ids, stored as i64 (what PyTorch uses).
    Classes(&'a [i64]),
    /// Regression targets, `cols` per row, stored as f32.
    Values(&'a [f32], usize),
}

/// Write `inputs` (row-major [rows, features]) and `targets` as a selection-data file.
pub fn write_dataset(path: &Path, inputs: &[f32], features: usize, targets: Targets) -> Result<()> {
    let rows = inputs.len() / features.max(1);
    let x: Vec<u8> = inputs.iter().flat_map(|v| v.to_le_bytes()).collect();
    let (t, dtype, shape): (Vec<u8>, Dtype, Vec<usize>) = match targets {
        Targets::Classes(c) => {
            (c.iter().flat_map(|v| v.to_le_bytes()).collect(), Dtype::I64, vec![rows])
        }
        Targets::Values(v, cols) => {
            (v.iter().flat_map(|v| v.to_le_bytes()).collect(), Dtype::F32, vec![rows, cols])
        }
    };
    let view = |d, s, b| {
        safetensors::tensor::TensorView::new(d, s, b)
            .map_err(|e| Error::Internal(format!("dataset view: {e}")))
    };
    let tensors = vec![
        ("inputs", view(Dtype::F32, vec![rows, features], &x)?),
        ("targets", view(dtype, shape, &t)?),
    ];
    safetensors::serialize_to_file(tensors, None, path)
        .map_err(|e| Error::bad_input(path, format!("cannot write selection data: {e}")))
}
