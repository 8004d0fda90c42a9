//! The daemon's running average: an f64 accumulator `S = Σ aᵢ·xᵢ`, `A = Σ aᵢ` over the members
//! of the current selection. When a new selection differs from the last by a few members
//! (LAWA sliding by one, EMA gaining one), only those are added or subtracted, so the cost of
//! an update does not grow with k; every `recompute_every` updates (and whenever a contributor
//! can no longer be trusted) it recomputes exactly from the selected members.
//! Members are read chunk by chunk (positioned reads: a member truncated meanwhile is an
//! error, never a crash). It holds its contributors open (so rotation cannot pull their files
//! away) and produces output tensors, refusing or saturating values beyond the output dtype's
//! range; it does not select, validate files or write anything.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::average::overflow_error;
use crate::average::{DtypeOverflow, IntPolicy, OutDType};
use crate::checkpoint::{Checkpoint, DType, TensorMeta};
use crate::dtype;
use crate::error::{Error, Result};
use crate::schema::check_against;

/// One output tensor: name, dtype, shape, little-endian bytes.
pub type OutTensor = (String, DType, Vec<usize>, Vec<u8>);

/// Relative tolerance under which two coefficients are "the same".
const TOL: f64 = 1e-9;
/// Bytes of a member read at a time (their f64 sums stay in L2 beside them).
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

pub struct Accumulator {
    schema: Vec<TensorMeta>,
    /// One buffer per float tensor of `schema` (empty for integer tensors).
    sums: Vec<Vec<f64>>,
    total: f64,
    contributors: Vec<Contributor>,
    since_exact: usize,
    recompute_every: usize,
}

impl Accumulator {
    pub fn new(recompute_every: usize) -> Self {
        Accumulator {
            schema: Vec::new(),
            sums: Vec::new(),
            total: 0.0,
            contributors: Vec::new(),
            since_exact: 0,
            recompute_every: recompute_every.max(1),
        }
    }

    /// Forget everything (config reload).
    pub fn reset(&mut self) {
        *self = Accumulator::new(self.recompute_every);
    }

    /// Make the accumulator hold `Σ wᵢ·xᵢ` for the given members (weights ≥ 0, zeros ignored).
    /// `trusted` says whether a checkpoint may still be read (not rewritten in place since it
    /// was opened, see `still_valid`); a contributor that is not forces an exact recompute.
    pub fn update(
        &mut self,
        members: &[(Arc<Checkpoint>, f64)],
        trusted: impl Fn(&Checkpoint) -> bool,
    ) -> Result<UpdateReport> {
        let target: Vec<(Arc<Checkpoint>, f64)> =
            members.iter().filter(|(_, w)| *w > 0.0).cloned().collect();
        let first = target.first().ok_or_else(|| Error::Internal("empty selection".into()))?;
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

    /// Contributors were given normalised weights, while `plan` worked in the accumulator's
    /// own scale: store the coefficients actually summed so the next plan matches them.
    fn rescale_to_contributors(&mut self) {
        let given: f64 = self.contributors.iter().map(|c| c.coef).sum();
        if given > 0.0 {
            let scale = self.total / given;
            self.contributors.iter_mut().for_each(|c| c.coef *= scale);
        }
    }

    /// The checkpoints currently summed (held open until the next update or reset).
    pub fn held(&self) -> Vec<Arc<Checkpoint>> {
        self.contributors.iter().map(|c| c.ckpt.clone()).collect()
    }

    /// Paths of the checkpoints currently summed (their files are held open).
    pub fn contributors(&self) -> Vec<PathBuf> {
        self.contributors.iter().map(|c| c.ckpt.path().to_path_buf()).collect()
    }

    /// The average `S / A` as output tensors. Integer tensors come from one contributor by
    /// `int_policy` (contributors are in window order: oldest first). Values beyond `dtype`'s
    /// range are refused, or clamped to its largest finite value when `overflow` saturates.
    pub fn output(
        &self,
        dtype: OutDType,
        int_policy: IntPolicy,
        overflow: DtypeOverflow,
    ) -> Result<Vec<OutTensor>> {
        let (first, last) = match (self.contributors.first(), self.contributors.last()) {
            (Some(f), Some(l)) => (&f.ckpt, &l.ckpt),
            _ => return Err(Error::Internal("nothing accumulated yet".into())),
        };
        let mut out = Vec::with_capacity(self.schema.len());
        for (meta, sum) in self.schema.iter().zip(&self.sums) {
            if !meta.dtype.is_float() {
                out.push(self.int_tensor(meta, first, last, int_policy)?);
                continue;
            }
            let target = dtype.resolve(meta.dtype);
            let (bytes, overflowed) =
                encode(sum, self.total, target, overflow == DtypeOverflow::Saturate);
            if overflowed && overflow == DtypeOverflow::Error {
                let at = (0..sum.len()).max_by(|&i, &j| sum[i].abs().total_cmp(&sum[j].abs()));
                let at = at.unwrap_or(0);
                return Err(overflow_error(&meta.name, target, sum[at] / self.total, at));
            }
            out.push((meta.name.clone(), target, meta.shape.clone(), bytes));
        }
        Ok(out)
    }

    fn int_tensor(
        &self,
        meta: &TensorMeta,
        first: &Checkpoint,
        last: &Checkpoint,
        policy: IntPolicy,
    ) -> Result<OutTensor> {
        if policy == IntPolicy::Error {
            return Err(Error::bad_input(
                last.path(),
                format!(
                    "tensor {} is {:?}, which cannot be averaged and int_policy = \"error\" \
                     (use \"latest\" or \"first\" to copy it from one member)",
                    meta.name, meta.dtype
                ),
            ));
        }
        let from = if policy == IntPolicy::First { first } else { last };
        let bytes = from.data(&meta.name)?.into_owned();
        Ok((meta.name.clone(), meta.dtype, meta.shape.clone(), bytes))
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
fn add(sums: &mut [Vec<f64>], schema: &[TensorMeta], ckpt: &Checkpoint, coef: f64) -> Result<()> {
    let mut buf = Vec::new();
    for (meta, sum) in schema.iter().zip(sums.iter_mut()) {
        if !meta.dtype.is_float() {
            continue;
        }
        let size = meta.dtype.size();
        ckpt.for_each_chunk(&meta.name, READ_CHUNK, &mut buf, |offset, bytes| {
            let first = offset / size;
            // Shapes were checked against the schema; `get` keeps a mismatch from panicking.
            let sum = sum.get_mut(first..).unwrap_or_default();
            match add_bytes(sum, bytes, meta.dtype, coef) {
                Some(i) => Err(non_finite(ckpt.path(), &meta.name, first + i)),
                None => Ok(()),
            }
        })?;
    }
    Ok(())
}

pub fn non_finite(path: &Path, tensor: &str, index: usize) -> Error {
    Error::bad_input(
        path,
        format!("tensor {tensor}: non-finite value (NaN or Inf) at element {index}"),
    )
}

/// Add `coef · decode(bytes)` into `sum`; returns the first non-finite element's index.
pub fn add_bytes(sum: &mut [f64], bytes: &[u8], dtype: DType, coef: f64) -> Option<usize> {
    fn go<const N: usize>(
        sum: &mut [f64],
        bytes: &[u8],
        coef: f64,
        dec: impl Fn([u8; N]) -> f64,
    ) -> Option<usize> {
        let mut bad = None;
        for (i, (s, b)) in sum.iter_mut().zip(bytes.chunks_exact(N)).enumerate() {
            let v = dec(b.try_into().expect("chunk of N"));
            if !v.is_finite() && bad.is_none() {
                bad = Some(i);
            }
            *s += coef * v;
        }
        bad
    }
    match dtype {
        DType::F32 => go::<4>(sum, bytes, coef, |b| f32::from_le_bytes(b) as f64),
        DType::F64 => go::<8>(sum, bytes, coef, f64::from_le_bytes),
        DType::F16 => go::<2>(sum, bytes, coef, |b| dtype::f16_to_f32(b) as f64),
        DType::BF16 => go::<2>(sum, bytes, coef, |b| dtype::bf16_to_f32(b) as f64),
        _ => None,
    }
}

/// `sum / total` in `dtype`, little-endian, and whether a finite value overflowed the dtype
/// (then written as ±inf, or ±max when `saturate`). One loop per dtype (no per-element
/// dispatch).
fn encode(sum: &[f64], total: f64, dtype: DType, saturate: bool) -> (Vec<u8>, bool) {
    fn go<const N: usize>(
        sum: &[f64],
        total: f64,
        enc: impl Fn(f64) -> ([u8; N], bool),
    ) -> (Vec<u8>, bool) {
        let mut out = vec![0u8; sum.len() * N];
        let mut over = false;
        for (o, s) in out.chunks_exact_mut(N).zip(sum) {
            let (bytes, o_) = enc(s / total);
            o.copy_from_slice(&bytes);
            over |= o_;
        }
        (out, over)
    }
    // `rounded` unless it overflowed from the finite `v`: then ±max when saturating.
    fn fit<T>(v: f64, rounded: T, infinite: bool, (max, min): (T, T), sat: bool) -> (T, bool) {
        let over = infinite && v.is_finite();
        match (over && sat, v > 0.0) {
            (true, true) => (max, true),
            (true, false) => (min, true),
            _ => (rounded, over),
        }
    }
    use half::{bf16, f16};
    match dtype {
        DType::F64 => go::<8>(sum, total, |v| (v.to_le_bytes(), false)),
        DType::F16 => go::<2>(sum, total, |v| {
            let h = f16::from_f64(v);
            let (h, o) = fit(v, h, h.is_infinite(), (f16::MAX, f16::MIN), saturate);
            (h.to_le_bytes(), o)
        }),
        DType::BF16 => go::<2>(sum, total, |v| {
            let h = bf16::from_f64(v);
            let (h, o) = fit(v, h, h.is_infinite(), (bf16::MAX, bf16::MIN), saturate);
            (h.to_le_bytes(), o)
        }),
        _ => go::<4>(sum, total, |v| {
            let x = v as f32;
            let (x, o) = fit(v, x, x.is_infinite(), (f32::MAX, f32::MIN), saturate);
            (x.to_le_bytes(), o)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::{MemberSummary, rules};

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
            let mut x = vec![0.0; meta.numel()];
            add_bytes(&mut x, &c.data(name).unwrap(), meta.dtype, 1.0);
            if acc.is_empty() {
                acc = vec![0.0; x.len()];
            }
            acc.iter_mut().zip(&x).for_each(|(a, v)| *a += w * v / total);
        }
        acc
    }

    fn f32s(bytes: &[u8]) -> Vec<f64> {
        bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64).collect()
    }

    fn summaries(ckpts: &[Arc<Checkpoint>]) -> Vec<MemberSummary> {
        let s = ckpts.iter().map(|c| MemberSummary {
            path: c.path().to_path_buf(),
            step: c.step(),
            metric: None,
        });
        s.collect()
    }

    /// Slide a window over 30 checkpoints with `select`; compare every output with the twin.
    fn slide(select: impl Fn(&[MemberSummary]) -> Vec<f64>, max_reads: usize) {
        let all: Vec<_> = (0..30).map(|s| ckpt(s, s as f32 * 0.3 - 2.0)).collect();
        let mut acc = Accumulator::new(8);
        for end in 1..=all.len() {
            let window = &all[end.saturating_sub(6)..end];
            let weights = select(&summaries(window));
            let members: Vec<_> = window.iter().cloned().zip(weights).collect();
            let rep = acc.update(&members, |_| true).unwrap();
            if end > 8 && !rep.exact {
                assert!(rep.reads <= max_reads, "update read {} checkpoints", rep.reads);
            }
            let out = acc.output(OutDType::Keep, IntPolicy::Latest, DtypeOverflow::Error).unwrap();
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
        slide(|w| rules::lawa(w, 4).unwrap().weights, 2);
    }

    #[test]
    fn ema_window_reads_two_checkpoints_and_matches_full_average() {
        slide(|w| rules::ema(w, 0.7).unwrap().weights, 2);
    }

    #[test]
    fn untrusted_contributor_forces_exact_recompute() {
        let all: Vec<_> = (0..5).map(|s| ckpt(s, s as f32)).collect();
        let mut acc = Accumulator::new(100);
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
        let err = Accumulator::new(4).update(&[(c, 1.0)], |_| true).unwrap_err().to_string();
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
        let mut acc = Accumulator::new(4);
        acc.update(&members, |_| true).unwrap();
        let err = acc.output(OutDType::F16, IntPolicy::Latest, DtypeOverflow::Error).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("tensor a") && msg.contains("-3e5 at element 2"), "{msg}");
        assert!(msg.contains("dtype_overflow = \"saturate\""), "{msg}");
        let out = acc.output(OutDType::F16, IntPolicy::Latest, DtypeOverflow::Saturate).unwrap();
        let got: Vec<f32> = out[0]
            .3
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        assert_eq!(got, vec![65504.0, 2.0, -65504.0]);
        let kept = acc.output(OutDType::F32, IntPolicy::Latest, DtypeOverflow::Error).unwrap();
        assert_eq!(f32s(&kept[0].3), vec![1.0e5, 2.0, -3.0e5], "f32 holds them");
    }
}
