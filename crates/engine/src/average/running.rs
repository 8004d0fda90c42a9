//! The daemon's running average: f32 sums `S = Σ aᵢ·xᵢ`, `A = Σ aᵢ` over the members of the
//! current selection, kept between publications. When a new selection differs from the last by
//! a few members (LAWA sliding by one, EMA gaining one), only those are added or subtracted, so
//! the cost of an update does not grow with k; every `recompute_every` updates (and whenever a
//! contributor can no longer be trusted) it recomputes exactly from the selected members.
//!
//! It costs 4 bytes per float parameter, which is why the daemon keeps it only when that fits
//! `[runtime] memory_budget` (`fits`); otherwise it streams the members through the kernel at
//! every publication. Precision: every incremental update rounds each sum at most twice (an add
//! and a subtract) by 2⁻²⁴ of its magnitude, so between exact recomputes the error stays below
//! `recompute_every · 2⁻²³ · Σ|aᵢ·xᵢ|/A` per element (1.9·10⁻⁶ relative for the default 16) —
//! under the rounding of a bf16 or f16 output, and the exact recompute resets it. f64 models
//! are never kept here (`fits` says no): they would lose their precision.
//! Members are read chunk by chunk (positioned reads: a member truncated meanwhile is an
//! error, never a crash). It holds its contributors open (so rotation cannot pull their files
//! away) and hands out its average tensor by tensor through [`RunningSource`], encoded by the
//! kernel's own store (refusing or saturating values beyond the output dtype's range); it does
//! not select, validate files or write anything.

use std::path::Path;
use std::sync::Arc;

use super::kernel::{Acc, Stored};
use super::{DtypeOverflow, IntPolicy, OutDType, TensorSource, WINDOW, overflow_error};
use crate::error::{Error, Result};
use crate::schema::check_against;
use sewa_checkpoint::dtype::first_non_finite;
use sewa_checkpoint::{Checkpoint, DType, TensorMeta};

/// Relative tolerance under which two coefficients are "the same".
const TOL: f64 = 1e-9;
/// Bytes of a member read at a time (their f32 sums stay in L2 beside them).
const READ_CHUNK: usize = 1 << 18;

/// How the last update was done (for logs, status and the benchmark).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct UpdateReport {
    /// Checkpoints read in full by this update.
    pub reads: usize,
    pub exact: bool,
}

struct Contributor {
    ckpt: Arc<Checkpoint>,
    coef: f64,
}

pub struct RunningAverage {
    schema: Vec<TensorMeta>,
    /// One buffer per float tensor of `schema` (empty for integer tensors).
    sums: Vec<Vec<f32>>,
    total: f64,
    contributors: Vec<Contributor>,
    since_exact: usize,
    recompute_every: usize,
}

impl RunningAverage {
    pub fn new(recompute_every: usize) -> Self {
        RunningAverage {
            schema: Vec::new(),
            sums: Vec::new(),
            total: 0.0,
            contributors: Vec::new(),
            since_exact: 0,
            recompute_every: recompute_every.max(1),
        }
    }

    /// Bytes the sums of a model with tensors `schema` take (f32 per float element).
    pub fn bytes_for(schema: &[TensorMeta]) -> u64 {
        schema.iter().filter(|t| t.dtype.is_float()).map(|t| t.numel() as u64 * 4).sum()
    }

    /// Whether a model with tensors `schema` may be kept here within `budget` bytes: its sums
    /// fit, and it has no f64 tensor (whose precision f32 sums would lose).
    pub fn fits(schema: &[TensorMeta], budget: u64) -> bool {
        !schema.iter().any(|t| t.dtype == DType::F64) && Self::bytes_for(schema) <= budget
    }

    /// Forget everything (config reload, a member failed mid-update, the budget says no).
    pub fn reset(&mut self) {
        *self = RunningAverage::new(self.recompute_every);
    }

    /// Make the average hold `Σ wᵢ·xᵢ` for the given members (weights ≥ 0, zeros ignored).
    /// `trusted` says whether a checkpoint may still be read (not rewritten in place since it
    /// was opened, see `still_valid`); a contributor that is not forces an exact recompute.
    pub fn update(
        &mut self,
        members: &[(Arc<Checkpoint>, f64)],
        trusted: impl Fn(&Checkpoint) -> bool,
    ) -> Result<UpdateReport> {
        let target: Vec<(Arc<Checkpoint>, f64)> =
            members.iter().filter(|(_, w)| *w > 0.0).cloned().collect();
        let Some(first) = target.first() else {
            return Err(Error::Usage("the selection gave every member weight 0".into()));
        };
        let same_schema = self.schema.as_slice() == first.0.tensors();
        let plan = plan(&self.contributors, &target);
        let stale = self.contributors.iter().any(|c| !trusted(&c.ckpt));
        let due = self.since_exact + 1 >= self.recompute_every;
        if !same_schema || stale || due || plan.len() >= target.len() {
            return self.recompute(&target);
        }
        for (ckpt, delta) in &plan {
            if let Err(e) = add(&mut self.sums, &self.schema, ckpt, *delta) {
                self.contributors.clear(); // the sums are half-updated: next time, recompute
                return Err(e);
            }
            self.total += delta;
        }
        self.contributors =
            target.into_iter().map(|(ckpt, coef)| Contributor { ckpt, coef }).collect();
        self.rescale_to_contributors();
        self.since_exact += 1;
        Ok(UpdateReport { reads: plan.len(), exact: false })
    }

    fn recompute(&mut self, target: &[(Arc<Checkpoint>, f64)]) -> Result<UpdateReport> {
        self.contributors.clear();
        self.schema = target[0].0.tensors().to_vec();
        self.sums = self
            .schema
            .iter()
            .map(|t| if t.dtype.is_float() { vec![0.0; t.numel()] } else { Vec::new() })
            .collect();
        self.total = 0.0;
        let mut sums = std::mem::take(&mut self.sums);
        for (ckpt, w) in target {
            check_against("the running average", &self.schema, ckpt)?;
            add(&mut sums, &self.schema, ckpt, *w)?;
            self.total += w;
        }
        self.sums = sums;
        self.contributors =
            target.iter().map(|(c, w)| Contributor { ckpt: c.clone(), coef: *w }).collect();
        self.since_exact = 0;
        Ok(UpdateReport { reads: target.len(), exact: true })
    }

    /// Contributors were given normalised weights, while `plan` worked in the average's own
    /// scale: store the coefficients actually summed so the next plan matches them.
    fn rescale_to_contributors(&mut self) {
        let given: f64 = self.contributors.iter().map(|c| c.coef).sum();
        if given > 0.0 {
            let scale = self.total / given;
            self.contributors.iter_mut().for_each(|c| c.coef *= scale);
        }
    }

    /// The checkpoints currently summed (their files are held open), oldest first, with their
    /// normalised weights.
    pub fn contributors(&self) -> Vec<(&Checkpoint, f64)> {
        let total = self.total.max(f64::MIN_POSITIVE);
        self.contributors.iter().map(|c| (c.ckpt.as_ref(), c.coef / total)).collect()
    }

    /// The checkpoints currently summed (held open until the next update or reset).
    pub fn held(&self) -> Vec<Arc<Checkpoint>> {
        self.contributors.iter().map(|c| c.ckpt.clone()).collect()
    }

    /// The average `S / A`, tensor by tensor, for the publisher. Integer tensors come from one
    /// contributor by `int_policy` (contributors are in window order: oldest first).
    pub fn source(&self, out: OutputOptions) -> Result<RunningSource<'_>> {
        if self.contributors.is_empty() {
            return Err(Error::Usage("nothing averaged yet".into()));
        }
        let outputs = (self.schema.iter())
            .map(|t| TensorMeta { dtype: out.dtype.resolve(t.dtype), ..t.clone() })
            .collect();
        Ok(RunningSource { avg: self, out, outputs, scaled: Vec::new(), bytes: Vec::new() })
    }

    /// The contributor integer tensors are copied from under `policy`.
    pub fn int_source(&self, policy: IntPolicy) -> Option<&Checkpoint> {
        let from = match policy {
            IntPolicy::First => self.contributors.first(),
            _ => self.contributors.last(),
        };
        let has_ints = self.schema.iter().any(|t| !t.dtype.is_float());
        from.filter(|_| has_ints).map(|c| c.ckpt.as_ref())
    }
}

/// How the average is written: the output dtype, the integer policy, what overflow does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutputOptions {
    pub dtype: OutDType,
    pub int_policy: IntPolicy,
    pub overflow: DtypeOverflow,
}

/// A [`RunningAverage`] as output tensors: one tensor at a time is divided by the total and
/// encoded into reused buffers, so publishing costs one tensor beyond the sums, not a copy
/// of the model.
pub struct RunningSource<'r> {
    avg: &'r RunningAverage,
    out: OutputOptions,
    outputs: Vec<TensorMeta>,
    scaled: Vec<f32>,
    bytes: Vec<u8>,
}

impl TensorSource for RunningSource<'_> {
    fn tensors(&self) -> &[TensorMeta] {
        &self.outputs
    }

    fn tensor_bytes(&mut self, index: usize) -> Result<&[u8]> {
        let meta = &self.avg.schema[index];
        let target = self.outputs[index].dtype;
        self.bytes.resize(self.outputs[index].nbytes(), 0);
        if !meta.dtype.is_float() {
            return self.int_tensor(index);
        }
        let total = self.avg.total;
        let sum = &self.avg.sums[index];
        self.scaled.clear();
        self.scaled.extend(sum.iter().map(|s| (*s as f64 / total) as f32));
        let saturate = self.out.overflow == DtypeOverflow::Saturate;
        let stored: Stored = f32::store_block(&self.scaled, &mut self.bytes, target, saturate);
        if stored.overflow && !saturate {
            let at = (0..self.scaled.len())
                .max_by(|&i, &j| self.scaled[i].abs().total_cmp(&self.scaled[j].abs()));
            let at = at.unwrap_or(0);
            return Err(overflow_error(&meta.name, target, self.scaled[at], at));
        }
        Ok(&self.bytes)
    }

    fn write_tensor(
        &mut self,
        index: usize,
        sink: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        match self.avg.schema[index].dtype.is_float() {
            true => self.write_float(index, sink),
            false => sink(self.tensor_bytes(index)?),
        }
    }
}

impl RunningSource<'_> {
    /// Tensor `index` handed to `sink` a window at a time (the sums are kept anyway; this
    /// avoids two more tensor-sized buffers): the bytes of `tensor_bytes`, bit for bit.
    fn write_float(
        &mut self,
        index: usize,
        sink: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let meta = &self.avg.schema[index];
        let target = self.outputs[index].dtype;
        let (total, sum) = (self.avg.total, &self.avg.sums[index]);
        let scale = |s: f32| (s as f64 / total) as f32;
        let saturate = self.out.overflow == DtypeOverflow::Saturate;
        let mut overflow = false;
        for part in sum.chunks(WINDOW) {
            self.scaled.clear();
            self.scaled.extend(part.iter().map(|s| scale(*s)));
            self.bytes.resize(part.len() * target.size(), 0);
            let stored: Stored = f32::store_block(&self.scaled, &mut self.bytes, target, saturate);
            overflow |= stored.overflow && !saturate;
            if !overflow {
                sink(&self.bytes)?;
            }
        }
        if overflow {
            let at =
                (0..sum.len()).max_by(|&i, &j| scale(sum[i]).abs().total_cmp(&scale(sum[j]).abs()));
            let at = at.unwrap_or(0);
            return Err(overflow_error(&meta.name, target, scale(sum[at]), at));
        }
        Ok(())
    }

    fn int_tensor(&mut self, index: usize) -> Result<&[u8]> {
        let meta = &self.avg.schema[index];
        let policy = self.out.int_policy;
        let Some(from) = self.avg.int_source(policy) else {
            return Err(Error::Usage("nothing averaged yet".into()));
        };
        if policy == IntPolicy::Error {
            return Err(Error::bad_input(
                from.path(),
                format!(
                    "tensor {} is {:?}, which cannot be averaged and int_policy = \"error\" \
                     (use \"latest\" or \"first\" to copy it from one member)",
                    meta.name, meta.dtype
                ),
            ));
        }
        let reader = from.reader(&meta.name)?;
        reader.read_into(0, &mut self.bytes[..reader.len()])?;
        Ok(&self.bytes)
    }
}

/// Changes turning the current sum into the target one: `(checkpoint, coefficient delta)`.
/// The target weights are rescaled by the factor that keeps most current coefficients
/// unchanged, so a sliding LAWA or a growing EMA window costs one or two reads.
fn plan(current: &[Contributor], target: &[(Arc<Checkpoint>, f64)]) -> Vec<(Arc<Checkpoint>, f64)> {
    let coef_of =
        |c: &Arc<Checkpoint>| current.iter().find(|x| Arc::ptr_eq(&x.ckpt, c)).map(|x| x.coef);
    let ratios: Vec<f64> = target.iter().filter_map(|(c, w)| coef_of(c).map(|a| a / w)).collect();
    let agree = |r: f64| ratios.iter().filter(|x| close(**x, r)).count();
    let scale = ratios.iter().copied().max_by_key(|r| agree(*r)).unwrap_or(1.0);
    let mut deltas = Vec::new();
    for (c, w) in target {
        let want = w * scale;
        let have = coef_of(c).unwrap_or(0.0);
        if !close(want, have) {
            deltas.push((c.clone(), want - have));
        }
    }
    for x in current {
        if !target.iter().any(|(c, _)| Arc::ptr_eq(c, &x.ckpt)) {
            deltas.push((x.ckpt.clone(), -x.coef));
        }
    }
    deltas
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= TOL * a.abs().max(b.abs()).max(1e-300)
}

/// `sums += coef · x` for every float tensor of `ckpt`, read chunk by chunk; non-finite
/// inputs are bad input.
fn add(sums: &mut [Vec<f32>], schema: &[TensorMeta], ckpt: &Checkpoint, coef: f64) -> Result<()> {
    let mut buf = Vec::new();
    for (meta, sum) in schema.iter().zip(sums.iter_mut()) {
        if !meta.dtype.is_float() {
            continue;
        }
        let size = meta.dtype.size();
        ckpt.for_each_chunk(&meta.name, READ_CHUNK, &mut buf, |offset, bytes| {
            let first = offset / size;
            if let Some(i) = first_non_finite(bytes, meta.dtype) {
                return Err(non_finite(ckpt.path(), &meta.name, first + i));
            }
            // Shapes were checked against the schema; `get` keeps a mismatch from panicking.
            let n = bytes.len() / size;
            let sum = sum.get_mut(first..first + n).unwrap_or_default();
            f32::add_block(sum, &bytes[..sum.len() * size], meta.dtype, coef as f32, false);
            Ok(())
        })?;
    }
    Ok(())
}

pub fn non_finite(path: &Path, tensor: &str, index: usize) -> sewa_checkpoint::Error {
    sewa_checkpoint::Error::bad_input(
        path,
        format!("tensor {tensor}: non-finite value (NaN or Inf) at element {index}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ckpt(step: u64, seed: f32) -> Arc<Checkpoint> {
        let a: Vec<u8> =
            (0..64).flat_map(|i| (seed * 1.37 + i as f32 * 0.01).to_le_bytes()).collect();
        let b: Vec<u8> =
            (0..8).flat_map(|i| half::bf16::from_f32(seed - i as f32).to_le_bytes()).collect();
        let n: Vec<u8> = (step as i64).to_le_bytes().to_vec();
        let t = vec![
            ("a".to_string(), DType::F32, vec![8, 8], a),
            ("b".to_string(), DType::BF16, vec![8], b),
            ("n".to_string(), DType::I64, vec![], n),
        ];
        Arc::new(Checkpoint::from_memory(format!("step_{step}"), Some(step), t).unwrap())
    }

    /// The slow, obvious twin: decode every selected member and average in f64.
    fn reference(members: &[(Arc<Checkpoint>, f64)], name: &str) -> Vec<f64> {
        let total: f64 = members.iter().map(|m| m.1).sum();
        let mut acc: Vec<f64> = Vec::new();
        for (c, w) in members.iter().filter(|m| m.1 > 0.0) {
            let meta = c.tensor(name).unwrap();
            let data = c.data(name).unwrap();
            let x: Vec<f64> = (data.chunks_exact(meta.dtype.size()))
                .map(|b| sewa_checkpoint::dtype::decode_f64(meta.dtype, b).unwrap())
                .collect();
            if acc.is_empty() {
                acc = vec![0.0; x.len()];
            }
            acc.iter_mut().zip(&x).for_each(|(a, v)| *a += w * v / total);
        }
        acc
    }

    type OutTensor = (String, DType, Vec<usize>, Vec<u8>);

    /// Every output tensor, as the publisher would take them from the source.
    fn output(
        acc: &RunningAverage,
        dtype: OutDType,
        int_policy: IntPolicy,
        overflow: DtypeOverflow,
    ) -> Result<Vec<OutTensor>> {
        let mut src = acc.source(OutputOptions { dtype, int_policy, overflow })?;
        let metas = src.tensors().to_vec();
        let each = metas.into_iter().enumerate().map(|(i, m)| {
            Ok((m.name.clone(), m.dtype, m.shape.clone(), src.tensor_bytes(i)?.to_vec()))
        });
        each.collect()
    }

    fn f32s(bytes: &[u8]) -> Vec<f64> {
        bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64).collect()
    }

    /// LAWA's weights over a window of `n`: the last `k` equally (as `select::rules::lawa`).
    fn lawa(n: usize, k: usize) -> Vec<f64> {
        (0..n).map(|i| if i + k >= n { 1.0 / k.min(n) as f64 } else { 0.0 }).collect()
    }

    /// EMA weights over a window of `n`: newest 1, then `decay`, `decay²`... normalised.
    fn ema(n: usize, decay: f64) -> Vec<f64> {
        let w: Vec<f64> = (0..n).map(|i| decay.powi((n - 1 - i) as i32)).collect();
        let total: f64 = w.iter().sum();
        w.iter().map(|x| x / total).collect()
    }

    /// Slide a window over 30 checkpoints with `select`; compare every output with the twin.
    fn slide(select: impl Fn(usize) -> Vec<f64>, max_reads: usize) {
        let all: Vec<_> = (0..30).map(|s| ckpt(s, s as f32 * 0.3 - 2.0)).collect();
        let mut acc = RunningAverage::new(8);
        for end in 1..=all.len() {
            let window = &all[end.saturating_sub(6)..end];
            let weights = select(window.len());
            let members: Vec<_> = window.iter().cloned().zip(weights).collect();
            let rep = acc.update(&members, |_| true).unwrap();
            if end > 8 && !rep.exact {
                assert!(rep.reads <= max_reads, "update read {} checkpoints", rep.reads);
            }
            let out =
                output(&acc, OutDType::Keep, IntPolicy::Latest, DtypeOverflow::Error).unwrap();
            for (got, want) in f32s(&out[0].3).iter().zip(reference(&members, "a")) {
                assert!((got - want).abs() < 1e-5, "end {end}: {got} vs {want}");
            }
            let latest = members.iter().rev().find(|m| m.1 > 0.0).unwrap();
            assert_eq!(out[2].3, latest.0.data("n").unwrap().to_vec(), "int policy latest");
            assert_eq!(out[1].1, DType::BF16, "dtype kept");
        }
    }

    #[test]
    fn lawa_sliding_reads_two_checkpoints_and_matches_full_average() {
        slide(|n| lawa(n, 4), 2);
    }

    #[test]
    fn ema_window_reads_two_checkpoints_and_matches_full_average() {
        slide(|n| ema(n, 0.7), 2);
    }

    #[test]
    fn untrusted_contributor_forces_exact_recompute() {
        let all: Vec<_> = (0..5).map(|s| ckpt(s, s as f32)).collect();
        let mut acc = RunningAverage::new(100);
        let m = |ws: [f64; 5]| all.iter().cloned().zip(ws).collect::<Vec<_>>();
        let t = 1.0 / 3.0;
        acc.update(&m([t, t, t, 0.0, 0.0]), |_| true).unwrap();
        let rep = acc.update(&m([0.0, t, t, t, 0.0]), |_| true).unwrap();
        assert_eq!(rep, UpdateReport { reads: 2, exact: false });
        let gone = all[1].path().to_path_buf();
        let rep = acc.update(&m([0.0, 0.0, t, t, t]), |c| c.path() != gone).unwrap();
        assert!(rep.exact, "a rewritten contributor must never be read again");
    }

    #[test]
    fn non_finite_input_names_file_and_tensor() {
        let bad = vec![(
            "a".to_string(),
            DType::F32,
            vec![2],
            [1.0f32, f32::NAN].iter().flat_map(|v| v.to_le_bytes()).collect(),
        )];
        let c = Arc::new(Checkpoint::from_memory("bad.safetensors", Some(1), bad).unwrap());
        let err = RunningAverage::new(4).update(&[(c, 1.0)], |_| true).unwrap_err().to_string();
        assert!(err.contains("bad.safetensors") && err.contains("tensor a"), "{err}");
    }

    #[test]
    fn output_overflowing_f16_is_refused_or_saturated() {
        let t = |v: [f32; 3]| {
            let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            let t = vec![("a".to_string(), DType::F32, vec![3], bytes)];
            Arc::new(Checkpoint::from_memory("big.safetensors", Some(1), t).unwrap())
        };
        let members = [(t([1.0e5, 2.0, -3.0e5]), 0.5), (t([1.0e5, 2.0, -3.0e5]), 0.5)];
        let mut acc = RunningAverage::new(4);
        acc.update(&members, |_| true).unwrap();
        let err = output(&acc, OutDType::F16, IntPolicy::Latest, DtypeOverflow::Error).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("tensor a") && msg.contains("-3e5 at element 2"), "{msg}");
        assert!(msg.contains("dtype_overflow = \"saturate\""), "{msg}");
        let out = output(&acc, OutDType::F16, IntPolicy::Latest, DtypeOverflow::Saturate).unwrap();
        let got: Vec<f32> = out[0]
            .3
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        assert_eq!(got, vec![65504.0, 2.0, -65504.0]);
        let kept = output(&acc, OutDType::F32, IntPolicy::Latest, DtypeOverflow::Error).unwrap();
        assert_eq!(f32s(&kept[0].3), vec![1.0e5, 2.0, -3.0e5], "f32 holds them");
    }

    #[test]
    fn written_in_windows_equals_whole_tensor_bytes() {
        // A tensor one window and a bit long: the pieces the publisher writes are the whole
        // tensor's bytes, in every output dtype; an overflow is refused with the same message.
        let n = WINDOW + 5;
        let t = |seed: f32, big: f32| {
            let mut v: Vec<f32> = (0..n).map(|i| seed + (i % 977) as f32 * 0.013).collect();
            (v[3], v[WINDOW + 2]) = (big * 0.5, big);
            let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            let t = vec![("a".to_string(), DType::F32, vec![n], bytes)];
            Arc::new(Checkpoint::from_memory(format!("s{seed}.safetensors"), Some(1), t).unwrap())
        };
        for big in [7.0, 3.0e5] {
            let mut acc = RunningAverage::new(4);
            acc.update(&[(t(1.0, big), 0.25), (t(-2.0, big), 0.75)], |_| true).unwrap();
            for dtype in [OutDType::Keep, OutDType::BF16, OutDType::F16] {
                let opts = OutputOptions {
                    dtype,
                    int_policy: IntPolicy::Latest,
                    overflow: DtypeOverflow::Error,
                };
                let mut src = acc.source(opts).unwrap();
                let whole = src.tensor_bytes(0).map(<[u8]>::to_vec).map_err(|e| e.to_string());
                let (mut got, mut pieces) = (Vec::new(), 0);
                let streamed = src.write_tensor(0, &mut |b| {
                    got.extend_from_slice(b);
                    pieces += 1;
                    Ok(())
                });
                match whole {
                    Ok(whole) => {
                        streamed.unwrap();
                        assert_eq!(pieces, 2, "{dtype:?}");
                        assert!(got == whole, "{dtype:?}: bytes differ");
                    }
                    Err(msg) => {
                        assert_eq!(dtype, OutDType::F16, "only f16 overflows: {msg}");
                        assert_eq!(streamed.unwrap_err().to_string(), msg);
                    }
                }
            }
        }
    }
}
