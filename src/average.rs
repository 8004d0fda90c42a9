//! Streaming weighted average over checkpoints' byte views, one tensor at a time.
//!
//! An [`AveragePlan`] is checked once (schema, weights, integer policy) and then yields each
//! output tensor's bytes into a reused [`Workspace`]: float tensors are accumulated in f32 (f64
//! for f64 inputs) block by block across all inputs, so the accumulator block stays in cache and
//! the inputs are each read once; integer/bool tensors are copied from one input chosen by
//! [`IntPolicy`]. Pages of a finished tensor are released so RSS stays flat over many inputs.
//! This module does not open files or write outputs (see `publish`); a slow f64 twin lives in
//! the tests below.

use std::borrow::Cow;
use std::fmt;
use std::ops::{Add, Mul};
use std::str::FromStr;

use crate::checkpoint::{Checkpoint, DType, TensorMeta};
use crate::error::{Error, Result};
use crate::schema::check_schema;

/// Elements per cache block: the accumulator block (32 KiB of f32) stays in L1/L2 while every
/// input's matching block streams through it.
const BLOCK: usize = 8192;
/// Below this many elements a tensor is not worth spawning threads for.
const MIN_PARALLEL: usize = 1 << 16;
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
        let (mut owned, mut first) = (0usize, true);
        for (pos, &(i, w)) in active.iter().enumerate() {
            let data = checked_data(self.inputs[i], in_meta)?;
            owned += matches!(data, Cow::Owned(_)) as usize * data.len();
            views.push((data, w));
            let last = pos + 1 == active.len();
            if last || owned >= OWNED_BUDGET {
                let pass = Pass { views: &views, in_dtype: in_meta.dtype, init: first, last };
                let finite = pass.run(acc, out, out_dtype, self.opts.threads);
                if last && !finite {
                    return Err(self.blame_non_finite(in_meta, &active));
                }
                (views, owned, first) = (Vec::with_capacity(active.len()), 0, false);
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
fn checked_data<'c>(input: &'c Checkpoint, meta: &TensorMeta) -> Result<Cow<'c, [u8]>> {
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
            "{} weights given for {n} inputs (give one weight per input)",
            w.len()
        )));
    }
    if let Some(bad) = w.iter().find(|x| !x.is_finite() || **x < 0.0) {
        return Err(Error::Usage(format!("weight {bad} is not a finite non-negative number")));
    }
    let sum: f64 = w.iter().sum();
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

/// Position of the first NaN/Inf in little-endian float bytes.
fn first_non_finite(bytes: &[u8], dtype: DType) -> Option<usize> {
    let size = dtype.size();
    bytes.chunks_exact(size).position(|c| match dtype {
        DType::F64 => !f64::from_le_bytes(c.try_into().expect("8 bytes")).is_finite(),
        DType::F32 => !f32::from_le_bytes(c.try_into().expect("4 bytes")).is_finite(),
        DType::BF16 => !bf16_to_f32([c[0], c[1]]).is_finite(),
        DType::F16 => !f16_to_f32([c[0], c[1]]).is_finite(),
        _ => false,
    })
}

#[inline(always)]
fn bf16_to_f32(b: [u8; 2]) -> f32 {
    f32::from_bits((u16::from_le_bytes(b) as u32) << 16)
}

#[inline(always)]
fn f16_to_f32(b: [u8; 2]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes(b)).to_f32()
}

/// One sweep of a group of inputs over a tensor's elements.
struct Pass<'v, 'a, A> {
    views: &'v [(Cow<'a, [u8]>, A)],
    in_dtype: DType,
    /// First group: overwrite the accumulator instead of adding to it.
    init: bool,
    /// Last group: convert the accumulator into the output bytes.
    last: bool,
}

impl<A: Acc> Pass<'_, '_, A> {
    /// Run over all elements on up to `threads` threads (contiguous ranges, so every element
    /// sums its inputs in the same order whatever the thread count). Returns false if any
    /// output value is non-finite.
    fn run(&self, acc: &mut [A], out: &mut [u8], out_dtype: DType, threads: usize) -> bool {
        let n = acc.len();
        let osize = out_dtype.size();
        let out = &mut out[..n * osize];
        if threads <= 1 || n < MIN_PARALLEL {
            return self.range(0, acc, out, out_dtype);
        }
        let part = n.div_ceil(threads).next_multiple_of(BLOCK);
        std::thread::scope(|s| {
            let handles: Vec<_> = (acc.chunks_mut(part).zip(out.chunks_mut(part * osize)))
                .enumerate()
                .map(|(k, (a, o))| s.spawn(move || self.range(k * part, a, o, out_dtype)))
                .collect();
            handles.into_iter().fold(true, |ok, h| h.join().expect("kernel thread panicked") & ok)
        })
    }

    /// Elements `start..start + acc.len()`, block by block.
    fn range(&self, start: usize, acc: &mut [A], out: &mut [u8], out_dtype: DType) -> bool {
        let (in_size, out_size) = (self.in_dtype.size(), out_dtype.size());
        let mut finite = true;
        for (b, (acc_b, out_b)) in
            acc.chunks_mut(BLOCK).zip(out.chunks_mut(BLOCK * out_size)).enumerate()
        {
            let lo = (start + b * BLOCK) * in_size;
            let hi = lo + acc_b.len() * in_size;
            for (j, (view, w)) in self.views.iter().enumerate() {
                A::add_block(acc_b, &view[lo..hi], self.in_dtype, *w, self.init && j == 0);
            }
            if self.last {
                finite &= A::store_block(acc_b, out_b, out_dtype);
            }
        }
        finite
    }
}

/// An accumulator element type: f32 for 16/32-bit floats, f64 for f64.
trait Acc: Copy + Default + Send + Sync + Add<Output = Self> + Mul<Output = Self> {
    /// The workspace's accumulator of this type and its output buffer.
    fn buffers(ws: &mut Workspace) -> (&mut Vec<Self>, &mut Vec<u8>);
    fn weight(w: f64) -> Self;
    /// `acc = w * x` (init) or `acc += w * x` for one block of input bytes.
    fn add_block(acc: &mut [Self], bytes: &[u8], dtype: DType, w: Self, init: bool);
    /// Write `acc` as `dtype` little-endian bytes; false if any value is non-finite.
    fn store_block(acc: &[Self], out: &mut [u8], dtype: DType) -> bool;
}

#[inline(always)]
fn axpy<A: Acc>(acc: &mut [A], xs: impl Iterator<Item = A>, w: A, init: bool) {
    // Two loops rather than a branch per element, so both vectorise.
    if init {
        acc.iter_mut().zip(xs).for_each(|(a, x)| *a = w * x);
    } else {
        acc.iter_mut().zip(xs).for_each(|(a, x)| *a = *a + w * x);
    }
}

impl Acc for f32 {
    fn buffers(ws: &mut Workspace) -> (&mut Vec<f32>, &mut Vec<u8>) {
        (&mut ws.acc32, &mut ws.out)
    }
    fn weight(w: f64) -> f32 {
        w as f32
    }
    fn add_block(acc: &mut [f32], bytes: &[u8], dtype: DType, w: f32, init: bool) {
        match dtype {
            DType::F32 => match bytemuck::try_cast_slice::<u8, f32>(bytes) {
                // Fast path: aligned mapped bytes are already f32 on a little-endian host.
                Ok(xs) if cfg!(target_endian = "little") => axpy(acc, xs.iter().copied(), w, init),
                _ => axpy(
                    acc,
                    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                    w,
                    init,
                ),
            },
            DType::BF16 => {
                axpy(acc, bytes.chunks_exact(2).map(|c| bf16_to_f32([c[0], c[1]])), w, init)
            }
            DType::F16 => {
                axpy(acc, bytes.chunks_exact(2).map(|c| f16_to_f32([c[0], c[1]])), w, init)
            }
            other => unreachable!("f32 accumulator fed {other:?}"),
        }
    }
    fn store_block(acc: &[f32], out: &mut [u8], dtype: DType) -> bool {
        let mut finite = true;
        match dtype {
            DType::F32 => out.chunks_exact_mut(4).zip(acc).for_each(|(o, a)| {
                finite &= a.is_finite();
                o.copy_from_slice(&a.to_le_bytes());
            }),
            DType::BF16 => out.chunks_exact_mut(2).zip(acc).for_each(|(o, a)| {
                finite &= a.is_finite();
                o.copy_from_slice(&half::bf16::from_f32(*a).to_bits().to_le_bytes());
            }),
            DType::F16 => out.chunks_exact_mut(2).zip(acc).for_each(|(o, a)| {
                finite &= a.is_finite();
                o.copy_from_slice(&half::f16::from_f32(*a).to_bits().to_le_bytes());
            }),
            other => unreachable!("f32 accumulator written as {other:?}"),
        }
        finite
    }
}

impl Acc for f64 {
    fn buffers(ws: &mut Workspace) -> (&mut Vec<f64>, &mut Vec<u8>) {
        (&mut ws.acc64, &mut ws.out)
    }
    fn weight(w: f64) -> f64 {
        w
    }
    fn add_block(acc: &mut [f64], bytes: &[u8], dtype: DType, w: f64, init: bool) {
        assert_eq!(dtype, DType::F64, "f64 accumulator fed {dtype:?}");
        match bytemuck::try_cast_slice::<u8, f64>(bytes) {
            Ok(xs) if cfg!(target_endian = "little") => axpy(acc, xs.iter().copied(), w, init),
            _ => axpy(
                acc,
                bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))),
                w,
                init,
            ),
        }
    }
    fn store_block(acc: &[f64], out: &mut [u8], dtype: DType) -> bool {
        let finite = acc.iter().fold(true, |ok, a| ok & a.is_finite());
        match dtype {
            DType::F64 => out
                .chunks_exact_mut(8)
                .zip(acc)
                .for_each(|(o, a)| o.copy_from_slice(&a.to_le_bytes())),
            DType::F32 => out
                .chunks_exact_mut(4)
                .zip(acc)
                .for_each(|(o, a)| o.copy_from_slice(&(*a as f32).to_le_bytes())),
            DType::BF16 => out.chunks_exact_mut(2).zip(acc).for_each(|(o, a)| {
                o.copy_from_slice(&half::bf16::from_f64(*a).to_bits().to_le_bytes())
            }),
            DType::F16 => out.chunks_exact_mut(2).zip(acc).for_each(|(o, a)| {
                o.copy_from_slice(&half::f16::from_f64(*a).to_bits().to_le_bytes())
            }),
            other => unreachable!("f64 accumulator written as {other:?}"),
        }
        finite
    }
}

#[cfg(test)]
mod tests;
