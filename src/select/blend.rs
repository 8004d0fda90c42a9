//! Forming candidate averages from window members for model-based selectors: w(m) = Σ m_i w_i /
//! Σ m_i streamed chunk by chunk from each member (positioned reads: a member truncated
//! meanwhile is an error, never a crash) into a reused f32 buffer, and the mask gradient's dot
//! products ⟨G, w_i − c⟩ streamed the same way. Only floating tensors take part (integer
//! buffers are not differentiable). This module does not call the objective or write files.

use crate::checkpoint::{Checkpoint, DType, TensorMeta};
use crate::error::{Error, Result};
use crate::objective::{NamedTensor, Params};

/// Bytes of a member read at a time.
const CHUNK: usize = 1 << 18;

/// The window's members, checked to share one float-tensor layout.
pub struct Blend<'a> {
    members: Vec<&'a Checkpoint>,
    layout: Vec<TensorMeta>,
}

impl<'a> Blend<'a> {
    /// Fails, naming the member, if float tensor names or shapes differ from the first member's.
    pub fn new(members: &[&'a Checkpoint]) -> Result<Self> {
        let first = members.first().ok_or_else(|| Error::Internal("empty window".into()))?;
        let layout: Vec<TensorMeta> =
            first.tensors().iter().filter(|t| t.dtype.is_float()).cloned().collect();
        for m in &members[1..] {
            let other: Vec<&TensorMeta> =
                m.tensors().iter().filter(|t| t.dtype.is_float()).collect();
            let same = other.len() == layout.len()
                && other.iter().zip(&layout).all(|(a, b)| a.name == b.name && a.shape == b.shape);
            if !same {
                let diff = first_difference(&layout, &other);
                return Err(Error::bad_input(
                    m.path(),
                    format!("floating tensors differ from {}: {diff}", first.path().display()),
                ));
            }
        }
        Ok(Blend { members: members.to_vec(), layout })
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
    pub fn member(&self, i: usize) -> &'a Checkpoint {
        self.members[i]
    }

    /// Zero-filled parameters with the members' float layout (names sorted).
    pub fn zeros(&self) -> Params {
        let t = |m: &TensorMeta| NamedTensor {
            name: m.name.clone(),
            shape: m.shape.clone(),
            data: vec![0.0; m.numel()],
        };
        self.layout.iter().map(t).collect()
    }

    /// `out = Σ c_i w_i / Σ c_i` over members with `c_i > 0`. `out` comes from `zeros()`.
    pub fn mix(&self, coeffs: &[f64], out: &mut Params) -> Result<()> {
        let total: f64 = coeffs.iter().filter(|c| **c > 0.0).sum();
        if total <= 0.0 {
            return Err(Error::Internal("mix: all coefficients are zero".into()));
        }
        let mut buf = Vec::new();
        for (meta, dst) in self.layout.iter().zip(out.iter_mut()) {
            dst.data.iter_mut().for_each(|x| *x = 0.0);
            let size = meta.dtype.size();
            for (m, &c) in self.members.iter().zip(coeffs) {
                if c > 0.0 {
                    m.for_each_chunk(&meta.name, CHUNK, &mut buf, |offset, bytes| {
                        let dst = dst.data.get_mut(offset / size..).unwrap_or_default();
                        axpy(dst, bytes, meta.dtype, (c / total) as f32);
                        Ok(())
                    })?;
                }
            }
        }
        Ok(())
    }

    /// `⟨g, w_i − center⟩` for every member, accumulated in f64.
    pub fn dots(&self, g: &Params, center: &Params) -> Result<Vec<f64>> {
        let mut out = vec![0f64; self.members.len()];
        let mut buf = Vec::new();
        for ((meta, gt), ct) in self.layout.iter().zip(g).zip(center) {
            let gc: f64 = gt.data.iter().zip(&ct.data).map(|(a, b)| *a as f64 * *b as f64).sum();
            let size = meta.dtype.size();
            for (o, m) in out.iter_mut().zip(&self.members) {
                let mut d = 0f64;
                m.for_each_chunk(&meta.name, CHUNK, &mut buf, |offset, bytes| {
                    dot(
                        &mut d,
                        gt.data.get(offset / size..).unwrap_or_default(),
                        bytes,
                        meta.dtype,
                    );
                    Ok(())
                })?;
                *o += d - gc;
            }
        }
        Ok(out)
    }
}

impl Blend<'_> {
    /// Squared distances ‖w_i − w_j‖² between members (K×K, f64) over at most `max_groups`
    /// contiguous groups of float tensors, for the surrogate's curvature terms. Member i's
    /// tensor is decoded once and every later member streamed against it: K(K+1)/2 passes over
    /// each tensor, one tensor in memory, no objective call.
    pub fn distances(&self, max_groups: usize) -> Result<Vec<Vec<Vec<f64>>>> {
        let (k, t) = (self.members.len(), self.layout.len());
        let groups = max_groups.clamp(1, t.max(1));
        let mut out = vec![vec![vec![0f64; k]; k]; groups];
        let (mut buf, mut own) = (Vec::new(), Vec::new());
        for (ti, meta) in self.layout.iter().enumerate() {
            let d = &mut out[ti * groups / t.max(1)];
            let size = meta.dtype.size();
            for (i, mi) in self.members.iter().enumerate() {
                own.clear();
                own.resize(meta.numel(), 0f32);
                mi.for_each_chunk(&meta.name, CHUNK, &mut buf, |offset, bytes| {
                    let dst = own.get_mut(offset / size..).unwrap_or_default();
                    axpy(dst, bytes, meta.dtype, 1.0);
                    Ok(())
                })?;
                for (j, mj) in self.members.iter().enumerate().skip(i + 1) {
                    let mut acc = 0f64;
                    mj.for_each_chunk(&meta.name, CHUNK, &mut buf, |offset, bytes| {
                        let mine = own.get(offset / size..).unwrap_or_default();
                        sq_dist(&mut acc, mine, bytes, meta.dtype);
                        Ok(())
                    })?;
                    d[i][j] += acc;
                    d[j][i] += acc;
                }
            }
        }
        Ok(out)
    }
}

/// `acc += ‖a − src‖²` in f64 with `src` as raw bytes of `dtype`.
fn sq_dist(acc: &mut f64, a: &[f32], src: &[u8], dtype: DType) {
    for (x, c) in a.iter().zip(src.chunks_exact(dtype.size())) {
        let y = crate::dtype::decode_f32(dtype, c).unwrap_or(0.0);
        *acc += (*x as f64 - y as f64).powi(2);
    }
}

fn first_difference(a: &[TensorMeta], b: &[&TensorMeta]) -> String {
    for (x, y) in a.iter().zip(b) {
        if x.name != y.name {
            return format!("tensor {} where {} was expected", y.name, x.name);
        }
        if x.shape != y.shape {
            return format!("{} has shape {:?}, expected {:?}", x.name, y.shape, x.shape);
        }
    }
    format!("{} floating tensors, expected {}", b.len(), a.len())
}

/// `dst += a * src` with `src` as raw bytes of `dtype`.
fn axpy(dst: &mut [f32], src: &[u8], dtype: DType, a: f32) {
    for (d, c) in dst.iter_mut().zip(src.chunks_exact(dtype.size())) {
        *d += a * crate::dtype::decode_f32(dtype, c).unwrap_or(0.0);
    }
}

/// `acc += ⟨g, src⟩` in f64 with `src` as raw bytes of `dtype`.
fn dot(acc: &mut f64, g: &[f32], src: &[u8], dtype: DType) {
    for (x, c) in g.iter().zip(src.chunks_exact(dtype.size())) {
        *acc += *x as f64 * crate::dtype::decode_f32(dtype, c).unwrap_or(0.0) as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ck(name: &str, vals: &[f32]) -> Checkpoint {
        let bytes = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let bf: Vec<u8> =
            vals.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect();
        let int = vec![7u8; 8];
        Checkpoint::from_memory(
            name,
            None,
            vec![
                ("a".into(), DType::F32, vec![vals.len()], bytes),
                ("b".into(), DType::BF16, vec![vals.len()], bf),
                ("n".into(), DType::I64, vec![1], int),
            ],
        )
        .unwrap()
    }

    #[test]
    fn mix_and_dots_match_by_hand() {
        let (a, b) = (ck("a", &[1.0, 2.0]), ck("b", &[3.0, 6.0]));
        let blend = Blend::new(&[&a, &b]).unwrap();
        let mut out = blend.zeros();
        assert_eq!(out.len(), 2, "integer tensors are left out");
        blend.mix(&[1.0, 3.0], &mut out).unwrap();
        assert_eq!(out[0].data, vec![2.5, 5.0]);
        assert_eq!(out[1].data, vec![2.5, 5.0]);
        let g = vec![
            NamedTensor { name: "a".into(), shape: vec![2], data: vec![1.0, 0.0] },
            NamedTensor { name: "b".into(), shape: vec![2], data: vec![0.0, 1.0] },
        ];
        let d = blend.dots(&g, &out).unwrap();
        assert_eq!(d, vec![(1.0 - 2.5) + (2.0 - 5.0), (3.0 - 2.5) + (6.0 - 5.0)]);
    }

    #[test]
    fn distances_per_group_match_by_hand() {
        let (a, b, c) = (ck("a", &[1.0, 2.0]), ck("b", &[3.0, 6.0]), ck("c", &[1.0, 0.0]));
        let blend = Blend::new(&[&a, &b, &c]).unwrap();
        let per_tensor = blend.distances(8).unwrap();
        assert_eq!(per_tensor.len(), 2, "one group per float tensor when there are few");
        let ab = (3.0f64 - 1.0).powi(2) + (6.0f64 - 2.0).powi(2);
        let ac = 4.0;
        for d in &per_tensor {
            assert_eq!((d[0][1], d[1][0], d[0][2], d[1][1]), (ab, ab, ac, 0.0));
        }
        let one = blend.distances(1).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0][0][1], 2.0 * ab, "groups sum to the whole distance");
    }

    #[test]
    fn layout_mismatch_names_member() {
        let a = ck("a.safetensors", &[1.0, 2.0]);
        let b = ck("b.safetensors", &[1.0, 2.0, 3.0]);
        let e = Blend::new(&[&a, &b]).err().unwrap().to_string();
        assert!(e.contains("b.safetensors") && e.contains("shape"), "{e}");
    }
}
