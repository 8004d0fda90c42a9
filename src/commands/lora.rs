//! `sewa average --lora merge-delta --base DIR`: the weighted average of the adapters' merged
//! deltas ΔW_i = s·B_i·A_i (s = lora_alpha / r, or lora_alpha / √r with rsLoRA) added to the
//! base model's weights, published as a full model in the base's layout (its side files
//! copied). This is what merging each adapter and averaging the merged models gives, which
//! averaging A and B separately does not: avg(B)·avg(A) ≠ avg(B·A). Streams per target
//! module: one base weight, its accumulator and the adapters' small A and B at a time.
//! Only LoRA on linear layers (A [r, in], B [out, r]) is merged; anything else in the
//! adapters (DoRA magnitudes, embedding LoRA, modules_to_save, rank or alpha patterns) is
//! refused before anything is written.

use std::collections::BTreeMap;

use half::{bf16, f16};

use sewa_checkpoint::{Checkpoint, DType, TensorMeta};
use sewa_engine::average::AveragePlan;
use sewa_engine::average::TensorSource;
use sewa_engine::error::{Error, Result};
use sewa_engine::manifest::Manifest;

const PREFIX: &str = "base_model.model.";
const A: &str = ".lora_A.weight";
const B: &str = ".lora_B.weight";

/// One base weight that receives a delta: the adapters' A and B keys.
struct Target {
    a: String,
    b: String,
    /// PEFT's `fan_in_fan_out` (GPT-2 Conv1D): the base weight is [in, out], ΔW is transposed.
    transposed: bool,
}

/// The merged model as a tensor source for the publisher.
pub struct MergedDelta<'a> {
    base: &'a Checkpoint,
    plan: &'a AveragePlan<'a>,
    outputs: Vec<TensorMeta>,
    targets: BTreeMap<String, Target>,
    /// Per adapter: weight × scale.
    coef: Vec<f64>,
    out: Vec<u8>,
}

fn setting<'c>(c: &'c Checkpoint, key: &str) -> &'c str {
    c.metadata().get(key).map_or("none", String::as_str)
}

/// s = alpha / r (alpha / √r with rsLoRA), from the adapter's config.
fn scale(c: &Checkpoint) -> Result<f64> {
    let unsupported = |what: &str| {
        Err(Error::bad_input(c.path(), format!("--lora merge-delta: {what} is not supported")))
    };
    if setting(c, "peft_use_dora") == "true" {
        return unsupported("DoRA (use_dora)");
    }
    for key in ["peft_rank_pattern", "peft_alpha_pattern", "peft_modules_to_save"] {
        if setting(c, key) != "none" {
            return unsupported(key.trim_start_matches("peft_"));
        }
    }
    let num = |key: &str| setting(c, key).parse::<f64>().ok().filter(|x| *x > 0.0);
    let (Some(r), Some(alpha)) = (num("peft_r"), num("peft_lora_alpha")) else {
        return Err(Error::bad_input(
            c.path(),
            "adapter_config.json: no positive r and lora_alpha",
        ));
    };
    Ok(if setting(c, "peft_use_rslora") == "true" { alpha / r.sqrt() } else { alpha / r })
}

impl<'a> MergedDelta<'a> {
    /// Check that every adapter tensor is a LoRA A or B of a weight the base has, with
    /// matching shapes, and every adapter's LoRA settings, before anything is published.
    pub fn new(base: &'a Checkpoint, plan: &'a AveragePlan<'a>) -> Result<Self> {
        let coef = (plan.inputs().iter().zip(plan.weights()))
            .map(|(c, w)| Ok(w * scale(c)?))
            .collect::<Result<Vec<f64>>>()?;
        Self::with_coefficients(base, plan, coef)
    }

    fn with_coefficients(
        base: &'a Checkpoint,
        plan: &'a AveragePlan<'a>,
        coef: Vec<f64>,
    ) -> Result<Self> {
        let first = plan.inputs()[0];
        let transposed = setting(first, "peft_fan_in_fan_out") == "true";
        let mut targets = BTreeMap::new();
        for t in first.tensors() {
            let bad =
                |why: String| Error::bad_input(first.path(), format!("tensor {}: {why}", t.name));
            if t.name.ends_with(B) {
                continue;
            }
            let module = t.name.strip_prefix(PREFIX).and_then(|n| n.strip_suffix(A)).ok_or_else(|| {
                bad("not the lora_A or lora_B weight of a linear layer; --lora merge-delta merges only those".into())
            })?;
            let b = format!("{PREFIX}{module}{B}");
            let weight = format!("{module}.weight");
            let (Some(bm), Some(wm)) = (first.tensor(&b), base.tensor(&weight)) else {
                return Err(bad(format!("no {b} beside it, or no {weight} in the base model")));
            };
            let (r, inp, out) = match (&t.shape[..], &bm.shape[..]) {
                ([r, i], [o, r2]) if r == r2 => (*r, *i, *o),
                _ => {
                    return Err(bad(format!(
                        "A {:?} and B {:?} are not [r, in] and [out, r]",
                        t.shape, bm.shape
                    )));
                }
            };
            let want = if transposed { [inp, out] } else { [out, inp] };
            if wm.shape != want || !wm.dtype.is_float() || r == 0 {
                return Err(bad(format!(
                    "B·A is {out}×{inp} but the base's {weight} is {:?} {:?}",
                    wm.dtype, wm.shape
                )));
            }
            targets.insert(weight, Target { a: t.name.clone(), b, transposed });
        }
        let orphans = first.tensors().iter().filter(|t| t.name.ends_with(B));
        if let Some(t) = orphans.into_iter().find(|t| !targets.values().any(|x| x.b == t.name)) {
            return Err(Error::bad_input(
                first.path(),
                format!("tensor {}: no lora_A beside it", t.name),
            ));
        }
        let dtype = plan.options().dtype;
        let outputs = base
            .tensors()
            .iter()
            .map(|t| TensorMeta { dtype: dtype.resolve(t.dtype), ..t.clone() })
            .collect();
        Ok(MergedDelta { base, plan, outputs, targets, coef, out: Vec::new() })
    }

    /// Bytes of all the output tensors.
    pub fn output_bytes(&self) -> u64 {
        self.outputs.iter().map(|t| t.nbytes() as u64).sum()
    }

    /// Record the base and the method in a manifest made from the adapters' plan.
    pub fn describe(&self, manifest: &mut Manifest) {
        manifest.notes.push(format!(
            "--lora merge-delta: base {} plus the weighted average of each adapter's merged delta \
             (lora_alpha/r)·B·A on {} target weights (not avg(B)·avg(A))",
            self.base.path().display(),
            self.targets.len()
        ));
    }

    /// The base tensor `meta` as f64.
    fn base_values(&self, meta: &TensorMeta) -> Result<Vec<f64>> {
        let bytes = self.base.data(&meta.name)?;
        decode(meta.dtype, &bytes)
            .ok_or_else(|| Error::Internal(format!("{} is not a float tensor", meta.name)))
    }

    /// `acc += Σ_i coef_i · B_i·A_i` (or its transpose), in f64.
    fn add_deltas(&self, acc: &mut [f64], t: &Target) -> Result<()> {
        for (c, coef) in self.plan.inputs().iter().zip(&self.coef) {
            let read = |key: &str| {
                let meta = c
                    .tensor(key)
                    .ok_or_else(|| Error::bad_input(c.path(), format!("no tensor {key}")))?;
                let v = decode(meta.dtype, &c.data(key)?);
                v.ok_or_else(|| {
                    Error::bad_input(c.path(), format!("tensor {key} is not a float tensor"))
                })
                .map(|v| (v, meta.shape.clone()))
            };
            let ((a, ashape), (b, _)) = (read(&t.a)?, read(&t.b)?);
            let (r, inp) = (ashape[0], ashape[1]);
            let out = b.len() / r;
            for o in 0..out {
                for k in 0..r {
                    let bk = coef * b[o * r + k];
                    for i in 0..inp {
                        let at = if t.transposed { i * out + o } else { o * inp + i };
                        acc[at] += bk * a[k * inp + i];
                    }
                }
            }
        }
        Ok(())
    }
}

impl TensorSource for MergedDelta<'_> {
    fn tensors(&self) -> &[TensorMeta] {
        &self.outputs
    }

    fn tensor_bytes(&mut self, index: usize) -> Result<&[u8]> {
        let out = self.outputs[index].clone();
        let meta = self
            .base
            .tensor(&out.name)
            .cloned()
            .ok_or_else(|| Error::Internal(out.name.clone()))?;
        if !meta.dtype.is_float() {
            self.out = self.base.data(&meta.name)?.into_owned();
            return Ok(&self.out);
        }
        let mut acc = self.base_values(&meta)?;
        if let Some(t) = self.targets.get(&meta.name) {
            self.add_deltas(&mut acc, t)?;
        }
        if let Some(i) = acc.iter().position(|v| !v.is_finite()) {
            return Err(Error::bad_input(
                self.base.path(),
                format!("tensor {}: the merged value at element {i} is not finite", meta.name),
            ));
        }
        self.out = encode(&acc, out.dtype).ok_or_else(|| {
            Error::bad_input(
                self.base.path(),
                format!("tensor {}: merged values overflow {:?}", meta.name, out.dtype),
            )
        })?;
        Ok(&self.out)
    }
}

fn decode(dtype: DType, bytes: &[u8]) -> Option<Vec<f64>> {
    let es = dtype.size();
    if !dtype.is_float() {
        return None;
    }
    bytes.chunks_exact(es).map(|c| sewa_checkpoint::dtype::decode_f64(dtype, c)).collect()
}

/// `values` in `dtype`, little-endian; `None` if a finite value overflows it.
fn encode(values: &[f64], dtype: DType) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(values.len() * dtype.size());
    for &v in values {
        let ok = match dtype {
            DType::F64 => {
                out.extend_from_slice(&v.to_le_bytes());
                true
            }
            DType::F32 => push(&mut out, (v as f32).to_le_bytes(), (v as f32).is_finite()),
            DType::BF16 => {
                push(&mut out, bf16::from_f64(v).to_le_bytes(), bf16::from_f64(v).is_finite())
            }
            DType::F16 => {
                push(&mut out, f16::from_f64(v).to_le_bytes(), f16::from_f64(v).is_finite())
            }
            _ => false,
        };
        if !ok {
            return None;
        }
    }
    Some(out)
}

fn push<const N: usize>(out: &mut Vec<u8>, bytes: [u8; N], finite: bool) -> bool {
    out.extend_from_slice(&bytes);
    finite
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The slow, obvious twin: ΔW = s·B·A element by element, against a hand-computed case.
    #[test]
    fn delta_is_scale_times_b_times_a() {
        // A = [[1, 2, 3]] (r = 1, in = 3), B = [[1], [-1]] (out = 2): B·A = [[1,2,3],[-1,-2,-3]].
        let f = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let adapter = Checkpoint::from_memory(
            "a",
            Some(1),
            vec![
                (
                    "base_model.model.l.lora_A.weight".into(),
                    DType::F32,
                    vec![1, 3],
                    f(&[1.0, 2.0, 3.0]),
                ),
                (
                    "base_model.model.l.lora_B.weight".into(),
                    DType::F32,
                    vec![2, 1],
                    f(&[1.0, -1.0]),
                ),
            ],
        )
        .unwrap();
        let base = Checkpoint::from_memory(
            "b",
            None,
            vec![("l.weight".into(), DType::F32, vec![2, 3], f(&[10.0; 6]))],
        )
        .unwrap();
        let plan = AveragePlan::new(vec![&adapter], None, Default::default()).unwrap();
        // A memory checkpoint has no adapter_config: s = 2 is given directly.
        let mut m = MergedDelta::with_coefficients(&base, &plan, vec![2.0]).unwrap();
        let got = sewa_checkpoint::dtype::f32s(m.tensor_bytes(0).unwrap());
        assert_eq!(got, [12.0, 14.0, 16.0, 8.0, 6.0, 4.0]);
    }
}
