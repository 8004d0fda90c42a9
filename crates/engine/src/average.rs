//! Streaming weighted average over checkpoints' byte views, one tensor at a time.
//!
//! An [`AveragePlan`] is checked once (schema, weights, integer policy) and then streams each
//! output tensor's bytes, a window at a time, to a sink ([`AveragePlan::stream_tensor`], what
//! the publisher uses): float tensors are accumulated in f32 (f64 for f64 inputs) slab by slab,
//! each input in turn streaming its slab through the cache-resident accumulator slab (read
//! with a positioned read, optionally by a reader thread ahead of the arithmetic (`prefetch`),
//! or in place when in memory; see `kernel`), so every input byte is read once
//! and RSS grows with neither the number nor the size of the inputs nor of their tensors;
//! integer/bool tensors are copied from one input chosen by [`IntPolicy`]. Values beyond a
//! narrower output dtype's range are refused or saturated ([`DtypeOverflow`]).
//! [`AveragePlan::average_tensor`] is the whole-tensor path (a tensor-sized accumulator and
//! output), kept for callers that want a tensor's bytes at once and as the reference the
//! streamed bytes are tested against, bit for bit. This module does not open files or write
//! outputs (see `publish`); a slow f64 twin lives in the tests.

use crate::error::{Error, Result};
use crate::schema::check_schema_with;
use kernel::{Acc, Input, Pass, Stored, Sweep};
use sewa_checkpoint::dtype::first_non_finite;
use sewa_checkpoint::{Checkpoint, DType, TensorMeta, TensorReader};

/// Decoded (pickle) input bytes held at once before folding them into the accumulator; file
/// and in-memory inputs cost only their slab and are never split into groups.
const COPY_BUDGET: usize = 32 << 20;
/// Bytes read at a time when scanning an input for the NaN/Inf that spoiled an average.
const SCAN_CHUNK: usize = 1 << 20;
/// Elements averaged before their bytes are handed on when streaming with several kernel
/// threads: the accumulator and output bytes held (4 MiB of f32 accumulator, at most 8 MiB of
/// output), a multiple of the kernel's slab and thread block.
pub const WINDOW: usize = 1 << 20;
/// The window with one kernel thread (see `stream_tensor`).
const SINGLE_THREAD_WINDOW: usize = 4 * kernel::SLAB;
/// File bytes of a tensor from which a reader thread reads ahead (below, starting a thread
/// costs more than the overlap saves).
const PREFETCH_MIN: usize = 4 << 20;

/// A checked average: every input has the same tensors, the weights are valid and normalised.
/// Build it before creating any output file; running it can then only fail on tensor contents
/// (NaN/Inf, a reader error) or I/O.
pub struct AveragePlan<'a> {
    inputs: Vec<&'a Checkpoint>,
    weights: Vec<f64>,
    opts: AverageOptions,
    outputs: Vec<TensorMeta>,
    int_source: usize,
    read_ahead: bool,
}

/// Reused buffers: one accumulator and one output buffer (a window's when streaming, grown
/// to the largest tensor by the whole-tensor path), and one slab-sized read buffer per kernel
/// thread.
#[derive(Default)]
pub struct Workspace {
    acc32: Vec<f32>,
    acc64: Vec<f64>,
    out: Vec<u8>,
    slabs: Vec<Vec<u64>>,
}

impl<'a> AveragePlan<'a> {
    /// Check inputs and weights. `weights = None` means uniform. Zero-weight inputs are
    /// schema-checked but never read.
    pub fn new(
        inputs: Vec<&'a Checkpoint>,
        weights: Option<&[f64]>,
        opts: AverageOptions,
    ) -> Result<Self> {
        // With an explicit output dtype, float tensors may differ in dtype across inputs
        // (an f16 export beside f32 checkpoints): each is decoded in its own dtype.
        check_schema_with(&inputs, opts.dtype != OutDType::Keep)?;
        let weights = normalise_weights(weights, inputs.len())?;
        let int_source = pick_int_source(&inputs, &weights, opts.int_policy);
        let reference = inputs[0];
        if opts.int_policy == IntPolicy::Error
            && let Some(t) = reference.tensors().iter().find(|t| !t.dtype.is_float())
        {
            return Err(Error::bad_input(
                reference.path(),
                format!(
                    "tensor {} is {:?}, which cannot be averaged and int_policy = \"error\" \
                     (int_policy = \"latest\" or int_policy = \"first\" copies it from one \
                     input)",
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
        Ok(AveragePlan { inputs, weights, opts, outputs, int_source, read_ahead: false })
    }

    /// With one kernel thread, let a reader thread read the inputs' slabs ahead of the
    /// arithmetic (`prefetch`) when streaming. Off unless asked: it needs an idle core. On a
    /// quiet 2-core machine it took f32 averages from 62–77 % of the `pread` floor to 92–108 %;
    /// on the same machine busy with other builds it lost (docs/performance.md). `sewa
    /// average` turns it on when it may use two CPUs; the daemon, beside a trainer, does not.
    pub fn with_read_ahead(mut self, on: bool) -> Self {
        self.read_ahead = on;
        self
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
        let dtype_of = |c: &&Checkpoint| c.tensors()[index].dtype;
        match self.inputs[0].tensors()[index].dtype {
            _ if self.inputs.iter().any(|c| dtype_of(c) == DType::F64) => {
                self.average_float::<f64>(index, ws)?
            }
            d if d.is_float() => self.average_float::<f32>(index, ws)?,
            _ => self.copy_int(index, ws)?,
        }
        Ok(&ws.out[..meta.nbytes()])
    }

    /// Average output tensor `index` and hand its little-endian bytes to `sink` in order, a
    /// window at a time ([`WINDOW`] elements, fewer with one thread): the bytes [`average_tensor`](Self::average_tensor)
    /// returns, bit for bit, while holding only a window's accumulator and output bytes (plus
    /// the slab buffers) whatever the tensor's size. With one thread, inputs on file and
    /// [`with_read_ahead`](Self::with_read_ahead), a reader thread reads ahead (`prefetch`). Nothing is handed to `sink`
    /// after a window that makes the tensor fail (NaN/Inf, a refused overflow); the error
    /// then is the one `average_tensor` gives. Inputs decoded whole in memory (some pickle
    /// tensors) already cost a copy of the tensor each: they take the whole-tensor path.
    pub fn stream_tensor(
        &self,
        index: usize,
        ws: &mut Workspace,
        sink: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        // One thread: windows of 4 slabs (1 MiB of f32 sums, at most as much output), so they
        // stay in L2 until the sink takes them; the 4 MiB window's output went out to memory
        // and back, with two inputs as many bytes as the inputs' own. One slab per window was
        // faster still in the kernel but slower end to end (more, smaller writes). Measured in
        // docs/performance.md. Several threads: the wide window, split between them (they are
        // started per window).
        let window = if self.opts.threads == 1 { SINGLE_THREAD_WINDOW } else { WINDOW };
        let how = Streaming { read_ahead: self.read_ahead, window, ..Streaming::DEFAULT };
        self.stream_with(how, index, ws, sink)
    }

    fn stream_with(
        &self,
        how: Streaming,
        index: usize,
        ws: &mut Workspace,
        sink: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let dtype_of = |c: &&Checkpoint| c.tensors()[index].dtype;
        match self.inputs[0].tensors()[index].dtype {
            _ if self.inputs.iter().any(|c| dtype_of(c) == DType::F64) => {
                self.stream_float::<f64>(how, index, ws, sink)
            }
            d if d.is_float() => self.stream_float::<f32>(how, index, ws, sink),
            _ => self.stream_int(how, index, ws, sink),
        }
    }

    fn stream_int(
        &self,
        how: Streaming,
        index: usize,
        ws: &mut Workspace,
        sink: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let source = self.inputs[self.int_source];
        let reader = source.reader(&source.tensors()[index].name)?;
        if let Some(bytes) = reader.in_memory() {
            return sink(bytes);
        }
        let chunk = how.window.min(reader.len());
        ws.out.resize(ws.out.len().max(chunk), 0);
        for at in (0..reader.len()).step_by(chunk.max(1)) {
            let bytes = &mut ws.out[..chunk.min(reader.len() - at)];
            reader.read_into(at, bytes)?;
            sink(bytes)?;
        }
        Ok(())
    }

    fn stream_float<A: Acc>(
        &self,
        how: Streaming,
        index: usize,
        ws: &mut Workspace,
        sink: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let in_meta = &self.inputs[0].tensors()[index];
        let out_dtype = self.outputs[index].dtype;
        let active: Vec<(usize, A)> = (self.weights.iter().enumerate())
            .filter(|(_, w)| **w > 0.0)
            .map(|(i, w)| (i, A::weight(*w)))
            .collect();
        let mut inputs = Vec::with_capacity(active.len());
        for &(i, weight) in &active {
            let reader = self.inputs[i].reader(&in_meta.name)?;
            if reader.is_copy() {
                drop((reader, inputs));
                let bytes = self.average_tensor(index, ws)?;
                return sink(bytes);
            }
            let dtype = self.inputs[i].tensors()[index].dtype;
            inputs.push(Input { reader, weight, dtype });
        }
        let n = in_meta.numel();
        // Windows start on slab boundaries: the reader thread reads ahead on that grid.
        debug_assert_eq!(how.window % kernel::SLAB, 0);
        let window = how.window.min(n);
        let Workspace { acc32, acc64, out, slabs } = ws;
        let acc = A::pick(acc32, acc64);
        acc.resize(acc.len().max(window), A::default());
        out.resize(out.len().max(window * out_dtype.size()), 0);
        let (acc, out) = (&mut acc[..window], &mut out[..window * out_dtype.size()]);
        let sweep = Sweep { inputs: &inputs, overflow: self.opts.overflow };
        let threads = self.opts.threads;
        let file_bytes = inputs.iter().filter(|i| i.reader.in_memory().is_none()).count()
            * n
            * in_meta.dtype.size();
        let mut windows = Windows { n, acc, out, out_dtype, overflow: self.opts.overflow };
        let found = if how.read_ahead && threads == 1 && file_bytes >= how.prefetch_min {
            std::thread::scope(|s| {
                let mut feed = prefetch::start(s, &inputs, n, sweep.slab_bytes(n));
                windows.drive(sink, |at, a, o| sweep.range(at, a, o, out_dtype, &mut feed))
            })?
        } else {
            windows.drive(sink, |at, a, o| sweep.window(at, a, o, out_dtype, slabs, threads))?
        };
        if found.non_finite {
            return Err(self.blame_non_finite(in_meta, &active));
        }
        match found.largest {
            Some((value, at)) => Err(overflow_error(&in_meta.name, out_dtype, value, at)),
            None => Ok(()),
        }
    }

    fn copy_int(&self, index: usize, ws: &mut Workspace) -> Result<()> {
        let source = self.inputs[self.int_source];
        let reader = source.reader(&source.tensors()[index].name)?;
        ws.out.resize(ws.out.len().max(reader.len()), 0);
        Ok(reader.read_into(0, &mut ws.out[..reader.len()])?)
    }

    fn average_float<A: Acc>(&self, index: usize, ws: &mut Workspace) -> Result<()> {
        let in_meta = &self.inputs[0].tensors()[index];
        let out_dtype = self.outputs[index].dtype;
        let n = in_meta.numel();
        let Workspace { acc32, acc64, out, slabs } = ws;
        let acc = A::pick(acc32, acc64);
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
        let mut group: Vec<(TensorReader<'a>, A)> = Vec::with_capacity(active.len());
        let (mut copied, mut first) = (0usize, true);
        let dtype_of = |i: usize| self.inputs[i].tensors()[index].dtype;
        for (pos, &(i, w)) in active.iter().enumerate() {
            let reader = self.inputs[i].reader(&in_meta.name)?;
            copied += reader.is_copy() as usize * reader.len();
            group.push((reader, w));
            let last = pos + 1 == active.len();
            // One pass reads one dtype: the group ends where the next input's dtype differs.
            let switch = !last && dtype_of(active[pos + 1].0) != dtype_of(i);
            if last || switch || copied >= COPY_BUDGET {
                let (in_dtype, overflow) = (dtype_of(i), self.opts.overflow);
                let pass = Pass { inputs: &group, in_dtype, init: first, last, overflow };
                let stored = pass.run(acc, out, out_dtype, slabs, self.opts.threads)?;
                if last {
                    self.check_stored(stored, in_meta, out_dtype, acc, &active)?;
                }
                (copied, first) = (0, false);
                group.clear();
            }
        }
        Ok(())
    }

    /// Refuse an average with a NaN/Inf (blaming the input that holds it) or, unless
    /// saturating, one beyond the output dtype's range.
    fn check_stored<A: Acc>(
        &self,
        stored: Stored,
        meta: &TensorMeta,
        out_dtype: DType,
        acc: &[A],
        active: &[(usize, A)],
    ) -> Result<()> {
        if stored.non_finite {
            return Err(self.blame_non_finite(meta, active));
        }
        if stored.overflow && self.opts.overflow == DtypeOverflow::Error {
            let at =
                (0..acc.len()).max_by(|&i, &j| acc[i].magnitude().total_cmp(&acc[j].magnitude()));
            let at = at.unwrap_or(0);
            return Err(overflow_error(&meta.name, out_dtype, acc[at], at));
        }
        Ok(())
    }

    /// The average came out non-finite: find the input that holds a NaN or Inf.
    fn blame_non_finite<A>(&self, meta: &TensorMeta, active: &[(usize, A)]) -> Error {
        let mut buf = Vec::new();
        for &(i, _) in active {
            let input = self.inputs[i];
            // Each input in its own dtype (mixed-dtype averages).
            let own = input.tensor(&meta.name).unwrap_or(meta);
            match find_non_finite(input, own, &mut buf) {
                Ok(None) => {}
                Ok(Some(at)) => {
                    return Error::bad_input(
                        input.path(),
                        format!(
                            "tensor {} has a non-finite value (NaN or Inf) at element {at}; \
                             refusing to average it",
                            meta.name
                        ),
                    );
                }
                Err(e) => return e, // the file changed under us: that is the error to report
            }
        }
        Error::bad_input(
            self.inputs[0].path(),
            format!("tensor {}: the weighted average overflows its dtype", meta.name),
        )
    }
}

/// How a tensor is streamed: elements per window (a multiple of the kernel's slab), whether a
/// reader thread reads ahead (one kernel thread only), and the file bytes from which it does.
/// Tests make the sizes small.
#[derive(Clone, Copy, Debug)]
struct Streaming {
    window: usize,
    read_ahead: bool,
    prefetch_min: usize,
}

impl Streaming {
    const DEFAULT: Streaming =
        Streaming { window: WINDOW, read_ahead: false, prefetch_min: PREFETCH_MIN };
}

/// A tensor's elements a window at a time through one reused accumulator and output buffer.
struct Windows<'w, A> {
    n: usize,
    acc: &'w mut [A],
    out: &'w mut [u8],
    out_dtype: DType,
    overflow: DtypeOverflow,
}

/// What the windows of a tensor found that refuses it.
struct Found<A> {
    non_finite: bool,
    /// With `dtype_overflow = "error"`: the largest magnitude among the overflowing windows
    /// (so of the tensor) and its element, the last of equals as `max_by` picks on the whole.
    largest: Option<(A, usize)>,
}

impl<A: Acc> Windows<'_, A> {
    /// Compute every window with `compute(first element, acc, out)` and hand its bytes to
    /// `sink` until one finds a reason to refuse the tensor; the rest are still computed (a
    /// read error later wins, as on the whole-tensor path) but not handed on.
    fn drive(
        &mut self,
        sink: &mut dyn FnMut(&[u8]) -> Result<()>,
        mut compute: impl FnMut(usize, &mut [A], &mut [u8]) -> Result<Stored>,
    ) -> Result<Found<A>> {
        let (window, osize) = (self.acc.len().max(1), self.out_dtype.size());
        let mut found = Found { non_finite: false, largest: None };
        for start in (0..self.n).step_by(window) {
            let len = window.min(self.n - start);
            let (acc, out) = (&mut self.acc[..len], &mut self.out[..len * osize]);
            let stored = compute(start, acc, out)?;
            found.non_finite |= stored.non_finite;
            if stored.overflow && self.overflow == DtypeOverflow::Error {
                let at =
                    (0..len).max_by(|&i, &j| acc[i].magnitude().total_cmp(&acc[j].magnitude()));
                let at = at.unwrap_or(0);
                let beats = |(v, _): &(A, usize)| acc[at].magnitude() >= v.magnitude();
                if found.largest.as_ref().is_none_or(beats) {
                    found.largest = Some((acc[at], start + at));
                }
            }
            if !found.non_finite && found.largest.is_none() {
                sink(out)?;
            }
        }
        Ok(found)
    }
}

/// Element index of the first NaN/Inf in `input`'s tensor `meta`, read chunk by chunk.
fn find_non_finite(
    input: &Checkpoint,
    meta: &TensorMeta,
    buf: &mut Vec<u8>,
) -> Result<Option<usize>> {
    let reader = input.reader(&meta.name)?;
    let size = meta.dtype.size();
    buf.resize(SCAN_CHUNK.min(reader.len()), 0);
    let mut offset = 0;
    while offset < reader.len() {
        let end = reader.len().min(offset + SCAN_CHUNK);
        if let Some(at) = first_non_finite(reader.bytes(offset..end, buf)?, meta.dtype) {
            return Ok(Some(offset / size + at));
        }
        offset = end;
    }
    Ok(None)
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
mod options;
mod prefetch;
pub mod running;
mod source;

pub use options::{AverageOptions, DtypeOverflow, IntPolicy, OutDType, overflow_error};
pub use source::{PlanSource, TensorSource};

#[cfg(test)]
mod tests;
