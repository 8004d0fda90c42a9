//! Streaming weighted average over checkpoints' byte views, one tensor at a time.
//!
//! An [`AveragePlan`] is checked once (schema, weights, integer policy) and then yields each
//! output tensor's bytes into a reused [`Workspace`]: float tensors are accumulated in f32 (f64
//! for f64 inputs) slab by slab, each input in turn streaming its slab through the
//! cache-resident accumulator slab and releasing its pages right after (see `kernel`), so every
//! input is read once and RSS does not grow with the number of inputs; integer/bool tensors are
//! copied from one input chosen by [`IntPolicy`]. This module does not open files or write
//! outputs (see `publish`); a slow f64 twin lives in the tests.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use crate::checkpoint::{Checkpoint, DType, TensorMeta};
use crate::error::{Error, Result};
use crate::schema::check_schema;
use kernel::{Acc, Pass, first_non_finite};

/// Owned (copied, e.g. pickle) input bytes held at once before folding them into the
/// accumulator; borrowed (mapped) views cost no memory and are never split.
const OWNED_BUDGET: usize = 32 << 20;

/// Output dtype of floating tensors. Integer and bool tensors always keep their dtype.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutDType {
    /// The inputs' dtype (fp16 in, fp16 out).
    #[default]
    Keep,
    F32,
    BF16,
    F16,
}

impl OutDType {
    /// The dtype an input tensor of dtype `input` is written as.
    pub fn resolve(self, input: DType) -> DType {
        match (self, input.is_float()) {
            (_, false) | (OutDType::Keep, true) => input,
            (OutDType::F32, true) => DType::F32,
            (OutDType::BF16, true) => DType::BF16,
            (OutDType::F16, true) => DType::F16,
        }
    }
}

impl FromStr for OutDType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "keep" => Ok(OutDType::Keep),
            "f32" | "float32" => Ok(OutDType::F32),
            "bf16" | "bfloat16" => Ok(OutDType::BF16),
            "f16" | "fp16" | "float16" => Ok(OutDType::F16),
            _ => Err(format!("unknown dtype {s:?}; expected keep, f32, bf16 or f16")),
        }
    }
}

impl fmt::Display for OutDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OutDType::Keep => "keep",
            OutDType::F32 => "f32",
            OutDType::BF16 => "bf16",
            OutDType::F16 => "f16",
        })
    }
}

/// What to do with integer and bool tensors (step counters, BatchNorm `num_batches_tracked`),
/// which have no meaningful average.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IntPolicy {
    /// Copy from the latest input: highest step, or the last given when steps are unknown.
    #[default]
    Latest,
    /// Copy from the earliest input: lowest step, or the first given when steps are unknown.
    First,
    /// Refuse inputs that have integer or bool tensors.
    Error,
}

impl FromStr for IntPolicy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "latest" => Ok(IntPolicy::Latest),
            "first" => Ok(IntPolicy::First),
            "error" => Ok(IntPolicy::Error),
            _ => Err(format!("unknown int policy {s:?}; expected latest, first or error")),
        }
    }
}

impl fmt::Display for IntPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IntPolicy::Latest => "latest",
            IntPolicy::First => "first",
            IntPolicy::Error => "error",
        })
    }
}

/// How to average, independent of which inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AverageOptions {
    pub dtype: OutDType,
    pub int_policy: IntPolicy,
    /// Worker threads per tensor (at least 1).
    pub threads: usize,
}

impl Default for AverageOptions {
    fn default() -> Self {
        AverageOptions { dtype: OutDType::Keep, int_policy: IntPolicy::Latest, threads: 1 }
    }
}

/// A checked average: every input has the same tensors, the weights are valid and normalised.
/// Build it before creating any output file; running it can then only fail on tensor contents
/// (NaN/Inf, a reader error) or I/O.
pub struct AveragePlan<'a> {
    inputs: Vec<&'a Checkpoint>,
    weights: Vec<f64>,
    opts: AverageOptions,
    outputs: Vec<TensorMeta>,
    int_source: usize,
}

/// Reused buffers: one accumulator and one output buffer, grown to the largest tensor once.
#[derive(Default)]
pub struct Workspace {
    acc32: Vec<f32>,
    acc64: Vec<f64>,
    out: Vec<u8>,
}

impl<'a> AveragePlan<'a> {
    /// Check inputs and weights. `weights = None` means uniform. Zero-weight inputs are
    /// schema-checked but never read.
    pub fn new(
        inputs: Vec<&'a Checkpoint>,
        weights: Option<&[f64]>,
        opts: AverageOptions,
    ) -> Result<Self> {
        check_schema(&inputs)?;
        let weights = normalise_weights(weights, inputs.len())?;
        let int_source = pick_int_source(&inputs, &weights, opts.int_policy);
        let reference = inputs[0];
        if opts.int_policy == IntPolicy::Error
            && let Some(t) = reference.tensors().iter().find(|t| !t.dtype.is_float())
        {
            return Err(Error::bad_input(
                reference.path(),
                format!(
                    "tensor {} is {:?}, which cannot be averaged and --int-policy is error \
                     (use --int-policy latest or first to copy it from one input)",
                    t.name, t.dtype
                ),
            ));
        }
        let outputs = reference
            .tensors()
            .iter()
            .map(|t| TensorMeta { dtype: opts.dtype.resolve(t.dtype), ..t.clone() })
            .collect();
        let opts = AverageOptions { threads: opts.threads.max(1), ..opts };
        Ok(AveragePlan { inputs, weights, opts, outputs, int_source })
    }

    pub fn inputs(&self) -> &[&'a Checkpoint] {
        &self.inputs
    }
    /// Normalised weights, one per input, summing to 1.
    pub fn weights(&self) -> &[f64] {
        &self.weights
    }
    pub fn options(&self) -> &AverageOptions {
        &self.opts
    }
    /// Output tensors (with output dtypes), sorted by name.
    pub fn outputs(&self) -> &[TensorMeta] {
        &self.outputs
    }
    /// Total bytes of the output tensors.
    pub fn output_bytes(&self) -> u64 {
        self.outputs.iter().map(|t| t.nbytes() as u64).sum()
    }
    /// The input integer/bool tensors are copied from, if there are any such tensors.
    pub fn int_source(&self) -> Option<&'a Checkpoint> {
        self.outputs.iter().any(|t| !t.dtype.is_float()).then(|| self.inputs[self.int_source])
    }

    /// Average the tensors `order` (indices into [`outputs`](Self::outputs)) in that order and
    /// hand each to `sink`. Stops at the first error.
    pub fn run(
        &self,
        order: &[usize],
        sink: &mut dyn FnMut(&TensorMeta, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let mut ws = Workspace::default();
        for &i in order {
            let bytes = self.average_tensor(i, &mut ws)?;
            sink(&self.outputs[i], bytes)?;
        }
        Ok(())
    }

    /// Average output tensor `index` into `ws` and return its little-endian bytes.
    pub fn average_tensor<'w>(&self, index: usize, ws: &'w mut Workspace) -> Result<&'w [u8]> {
        let meta = &self.outputs[index];
        let result = match self.inputs[0].tensors()[index].dtype {
            DType::F64 => self.average_float::<f64>(index, ws),
            d if d.is_float() => self.average_float::<f32>(index, ws),
            _ => self.copy_int(index, ws),
        };
        // Done with this tensor in every input, even on error: give the pages back.
        for input in &self.inputs {
            input.release(&meta.name);
        }
        result.map(|()| &ws.out[..meta.nbytes()])
    }

    fn copy_int(&self, index: usize, ws: &mut Workspace) -> Result<()> {
        let source = self.inputs[self.int_source];
        let meta = &source.tensors()[index];
        let data = checked_data(source, meta)?;
        ws.out.clear();
        ws.out.extend_from_slice(&data);
        Ok(())
    }

    fn average_float<A: Acc>(&self, index: usize, ws: &mut Workspace) -> Result<()> {
        let in_meta = &self.inputs[0].tensors()[index];
        let out_dtype = self.outputs[index].dtype;
        let n = in_meta.numel();
        let (acc, out) = A::buffers(ws);
        if acc.len() < n {
            acc.resize(n, A::default());
        }
        if out.len() < n * out_dtype.size() {
            out.resize(n * out_dtype.size(), 0);
        }
        let acc = &mut acc[..n];
        let active: Vec<(usize, A)> = (self.weights.iter().enumerate())
            .filter(|(_, w)| **w > 0.0)
            .map(|(i, w)| (i, A::weight(*w)))
            .collect();
        let mut views: Vec<(Cow<'a, [u8]>, A)> = Vec::with_capacity(active.len());
        let (mut group_start, mut owned) = (0usize, 0usize);
        for (pos, &(i, w)) in active.iter().enumerate() {
            let data = checked_data(self.inputs[i], in_meta)?;
            owned += matches!(data, Cow::Owned(_)) as usize * data.len();
            views.push((data, w));
            let last = pos + 1 == active.len();
            if last || owned >= OWNED_BUDGET {
                let group = &active[group_start..=pos];
                let release = |j: usize, bytes: std::ops::Range<usize>| {
                    self.inputs[group[j].0].release_range(&in_meta.name, bytes)
                };
                let (init, in_dtype) = (group_start == 0, in_meta.dtype);
                let pass = Pass { views: &views, in_dtype, init, last, release: &release };
                let finite = pass.run(acc, out, out_dtype, self.opts.threads);
                if last && !finite {
                    return Err(self.blame_non_finite(in_meta, &active));
                }
                (views, owned, group_start) = (Vec::with_capacity(active.len()), 0, pos + 1);
            }
        }
        Ok(())
    }

    /// The average came out non-finite: find the input that holds a NaN or Inf.
    fn blame_non_finite<A>(&self, meta: &TensorMeta, active: &[(usize, A)]) -> Error {
        for &(i, _) in active {
            let input = self.inputs[i];
            if let Ok(data) = input.data(&meta.name)
                && let Some(at) = first_non_finite(&data, meta.dtype)
            {
                return Error::bad_input(
                    input.path(),
                    format!(
                        "tensor {} has a non-finite value (NaN or Inf) at element {at}; \
                         refusing to average it",
                        meta.name
                    ),
                );
            }
        }
        Error::bad_input(
            self.inputs[0].path(),
            format!("tensor {}: the weighted average overflows its dtype", meta.name),
        )
    }
}

/// The tensor's bytes, checked against its declared size (a reader bug or a lying header).
/// It first checks that the file was not rewritten in place since it was opened: touching pages
/// of a truncated mapping would kill the process with SIGBUS.
fn checked_data<'c>(input: &'c Checkpoint, meta: &TensorMeta) -> Result<Cow<'c, [u8]>> {
    if !input.still_valid() {
        return Err(Error::bad_input(
            input.path(),
            "changed on disk while being averaged (rewritten in place?); not reading it further",
        ));
    }
    let data = input.data(&meta.name)?;
    if data.len() != meta.nbytes() {
        return Err(Error::bad_input(
            input.path(),
            format!(
                "tensor {}: {} bytes of data for {:?} {:?} ({} expected)",
                meta.name,
                data.len(),
                meta.dtype,
                meta.shape,
                meta.nbytes()
            ),
        ));
    }
    Ok(data)
}

/// Validate and normalise weights: one per input, finite, non-negative, not all zero.
pub fn normalise_weights(weights: Option<&[f64]>, n: usize) -> Result<Vec<f64>> {
    if n == 0 {
        return Err(Error::Usage("no input checkpoints given".into()));
    }
    let Some(w) = weights else { return Ok(vec![1.0 / n as f64; n]) };
    if w.len() != n {
        return Err(Error::Usage(format!(
            "{} weights given for {n} input{} (give one weight per input)",
            w.len(),
            if n == 1 { "" } else { "s" }
        )));
    }
    if let Some(bad) = w.iter().find(|x| !x.is_finite() || **x < 0.0) {
        return Err(Error::Usage(format!("weight {bad} is not a finite non-negative number")));
    }
    let sum: f64 = w.iter().sum();
    if !sum.is_finite() {
        return Err(Error::Usage(format!(
            "weights {w:?} are too large: their sum overflows; scale them down (only their ratios matter)"
        )));
    }
    if sum <= 0.0 {
        return Err(Error::Usage("all weights are zero; at least one must be positive".into()));
    }
    Ok(w.iter().map(|x| x / sum).collect())
}

/// Index of the input whose integer tensors are copied, among inputs with a non-zero weight.
fn pick_int_source(inputs: &[&Checkpoint], weights: &[f64], policy: IntPolicy) -> usize {
    let candidates: Vec<usize> = (0..inputs.len()).filter(|&i| weights[i] > 0.0).collect();
    let steps: Option<Vec<u64>> = candidates.iter().map(|&i| inputs[i].step()).collect();
    let pick = match (policy, steps) {
        // max_by_key returns the last maximum, min_by_key the first minimum: ties go to the
        // last given (latest) or first given (first).
        (IntPolicy::First, Some(s)) => s.iter().enumerate().min_by_key(|(_, s)| **s).map(|p| p.0),
        (IntPolicy::First, None) => Some(0),
        (_, Some(s)) => s.iter().enumerate().max_by_key(|(_, s)| **s).map(|p| p.0),
        (_, None) => candidates.len().checked_sub(1),
    };
    candidates[pick.unwrap_or(0)]
}

mod kernel;

#[cfg(test)]
mod tests;
