//! Forming candidate averages from window members for model-based selectors: w(m) = Σ m_i w_i /
//! Σ m_i streamed chunk by chunk from each member (positioned reads: a member truncated
//! meanwhile is an error, never a crash) into a reused f32 buffer, and the mask gradient's dot
//! products ⟨G, w_i − c⟩ streamed the same way. Only floating tensors take part (integer
//! buffers are not differentiable). This module does not call the objective or write files.
//!
//! A small window (all members' floating tensors, as f32, within [`CACHE_BYTES`]) is read and
//! decoded once, at the first mix or dot product, and kept for the `Blend`'s life — one
//! selection — so the many oracle calls of a selection are memory-speed loops instead of
//! reads and per-element decodes (measured: 8.4 ms of an 11.4 ms call, CPU time, for 20
//! members of an 85 k parameter MLP). Each selection builds its own `Blend`, so it reads (and
//! checks) its members again: a member rewritten between selections is noticed, never served
//! stale.

use std::cell::OnceCell;

use crate::error::{Error, Result};
use crate::objective::{NamedTensor, Params};
use crate::schema::check_schema_with;
use sewa_checkpoint::dtype::decode_f32;
use sewa_checkpoint::{Checkpoint, DType, TensorMeta, TensorReader};

/// Bytes of a member read at a time.
const CHUNK: usize = 1 << 18;
/// Elements of each member decoded at a time by `distances` (K buffers of this many f32).
const DIST_CHUNK: usize = 1 << 16;

/// Largest window a `Blend` keeps decoded in memory (all members' floats as f32); larger
/// windows are streamed from their files on every call.
pub const CACHE_BYTES: usize = 64 << 20;

/// The window's members, checked to share one float-tensor layout.
pub struct Blend<'a> {
    members: Vec<&'a Checkpoint>,
    layout: Vec<TensorMeta>,
    /// Where each layout tensor starts in a member's flattened floats.
    offsets: Vec<usize>,
    /// Each member's floats in layout order, once read; `None` inside when over the limit.
    cache: OnceCell<Option<Vec<Vec<f32>>>>,
    cache_limit: usize,
}

impl<'a> Blend<'a> {
    /// Fails, naming the member, if the members' tensors differ (the averaging kernel's own
    /// schema check: names, shapes, integer dtypes). Float dtypes may differ (an f16 export
    /// beside f32 checkpoints): each member is decoded in its own.
    pub fn new(members: &[&'a Checkpoint]) -> Result<Self> {
        Self::with_cache_limit(members, CACHE_BYTES)
    }

    /// [`new`](Self::new) keeping the members decoded only if they fit `limit` bytes of f32.
    pub fn with_cache_limit(members: &[&'a Checkpoint], limit: usize) -> Result<Self> {
        let first = members.first().ok_or_else(|| Error::Selection("empty window".into()))?;
        check_schema_with(members, true)?;
        let layout: Vec<TensorMeta> =
            first.tensors().iter().filter(|t| t.dtype.is_float()).cloned().collect();
        let offsets = layout
            .iter()
            .scan(0, |at, m| {
                let start = *at;
                *at += m.numel();
                Some(start)
            })
            .collect();
        let cache = OnceCell::new();
        Ok(Blend { members: members.to_vec(), layout, offsets, cache, cache_limit: limit })
    }

    /// The one float dtype every member stores every float tensor in; `None` when they differ.
    pub fn float_dtype(&self) -> Option<DType> {
        let mut all = self.members.iter().flat_map(|m| m.tensors().iter().map(|t| t.dtype));
        let all = all.by_ref().filter(|d| d.is_float()).collect::<Vec<_>>();
        let first = *all.first()?;
        all.iter().all(|d| *d == first).then_some(first)
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
    pub fn members(&self) -> &[&'a Checkpoint] {
        &self.members
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
            return Err(Error::Selection("mix: all coefficients are zero".into()));
        }
        if let Some(cache) = self.cached()? {
            // Compiled for the CPU's widest vectors (AVX2/AVX-512), chosen at run time.
            pulp::Arch::new().dispatch(|| {
                for ((meta, dst), &at) in self.layout.iter().zip(out.iter_mut()).zip(&self.offsets)
                {
                    dst.data.iter_mut().for_each(|x| *x = 0.0);
                    for (w, &c) in cache.iter().zip(coeffs).filter(|(_, c)| **c > 0.0) {
                        let a = (c / total) as f32;
                        let src = &w[at..at + meta.numel()];
                        dst.data.iter_mut().zip(src).for_each(|(d, s)| *d += a * s);
                    }
                }
            });
            return Ok(());
        }
        let mut buf = Vec::new();
        for (meta, dst) in self.layout.iter().zip(out.iter_mut()) {
            dst.data.iter_mut().for_each(|x| *x = 0.0);
            for (m, &c) in self.members.iter().zip(coeffs) {
                if c > 0.0 {
                    let dtype = own_dtype(m, meta);
                    m.for_each_chunk(&meta.name, CHUNK, &mut buf, |offset, bytes| {
                        let dst = dst.data.get_mut(offset / dtype.size()..).unwrap_or_default();
                        axpy(dst, bytes, dtype, (c / total) as f32);
                        Ok(())
                    })?;
                }
            }
        }
        Ok(())
    }

    /// `⟨g, w_i − center⟩` for every member: accumulated in f64 when streamed; from the cache
    /// as `Σ g (w_i − center)` (no cancellation between two large sums) in f32 blocks added
    /// in f64.
    pub fn dots(&self, g: &Params, center: &Params) -> Result<Vec<f64>> {
        let mut out = vec![0f64; self.members.len()];
        if let Some(cache) = self.cached()? {
            pulp::Arch::new().dispatch(|| {
                for (o, w) in out.iter_mut().zip(cache) {
                    for ((gt, ct), &at) in g.iter().zip(center).zip(&self.offsets) {
                        let w = w.get(at..at + gt.data.len()).unwrap_or_default();
                        *o += dot_diff(&gt.data, w, &ct.data);
                    }
                }
            });
            return Ok(out);
        }
        let mut buf = Vec::new();
        for ((meta, gt), ct) in self.layout.iter().zip(g).zip(center) {
            let gc: f64 = gt.data.iter().zip(&ct.data).map(|(a, b)| *a as f64 * *b as f64).sum();
            for (o, m) in out.iter_mut().zip(&self.members) {
                let (mut d, dtype) = (0f64, own_dtype(m, meta));
                m.for_each_chunk(&meta.name, CHUNK, &mut buf, |offset, bytes| {
                    let g = gt.data.get(offset / dtype.size()..).unwrap_or_default();
                    dot(&mut d, g, bytes, dtype);
                    Ok(())
                })?;
                *o += d - gc;
            }
        }
        Ok(out)
    }

    /// The members decoded to f32 (read on first use), or `None` when the window is over the
    /// cache limit. A failed read leaves nothing cached: the error names the member.
    fn cached(&self) -> Result<Option<&[Vec<f32>]>> {
        if let Some(c) = self.cache.get() {
            return Ok(c.as_deref());
        }
        let floats: usize = self.layout.iter().map(|m| m.numel()).sum();
        let bytes = floats.checked_mul(4 * self.members.len());
        let decoded = match bytes {
            Some(b) if b <= self.cache_limit => {
                Some(self.members.iter().map(|m| self.decode(m, floats)).collect::<Result<_>>()?)
            }
            _ => None,
        };
        Ok(self.cache.get_or_init(|| decoded).as_deref())
    }

    /// One member's floating tensors as f32, in layout order (`floats` in all).
    fn decode(&self, m: &Checkpoint, floats: usize) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(floats);
        let mut buf = Vec::new();
        for (meta, &at) in self.layout.iter().zip(&self.offsets) {
            let dtype = own_dtype(m, meta);
            m.for_each_chunk(&meta.name, CHUNK, &mut buf, |_, bytes| {
                let vals = bytes.chunks_exact(dtype.size());
                out.extend(
                    vals.map(|c| sewa_checkpoint::dtype::decode_f32(dtype, c).unwrap_or(0.0)),
                );
                Ok(())
            })?;
            if out.len() != at + meta.numel() {
                return Err(Error::Internal(format!(
                    "{}: short read of {}",
                    m.path().display(),
                    meta.name
                )));
            }
        }
        Ok(out)
    }
}

/// `Σ g_j (w_j − c_j)`: f32 in 16 lanes (so the loop vectorises) over blocks of 1024
/// elements, the blocks added in f64. Inlined into its caller's vector dispatch.
#[inline(always)]
fn dot_diff(g: &[f32], w: &[f32], c: &[f32]) -> f64 {
    const LANES: usize = 16;
    let mut total = 0f64;
    for ((g, w), c) in g.chunks(1024).zip(w.chunks(1024)).zip(c.chunks(1024)) {
        let (gs, ws, cs) = (g.chunks_exact(LANES), w.chunks_exact(LANES), c.chunks_exact(LANES));
        let tail = gs.remainder().iter().zip(ws.remainder()).zip(cs.remainder());
        let tail: f32 = tail.map(|((g, w), c)| g * (w - c)).sum();
        let mut acc = [0f32; LANES];
        for ((g, w), c) in gs.zip(ws).zip(cs) {
            for j in 0..LANES {
                acc[j] += g[j] * (w[j] - c[j]);
            }
        }
        total += acc.iter().map(|a| *a as f64).sum::<f64>() + tail as f64;
    }
    total
}

impl Blend<'_> {
    /// Squared distances ‖w_i − w_j‖² between members (K×K, f64) over at most `max_groups`
    /// contiguous groups of float tensors, for the surrogate's curvature terms. No objective
    /// call, and each member is read once: from the decoded window when it fits the cache,
    /// else chunk by chunk, all K members side by side. Members whose tensor only exists as a
    /// decoded copy (torch pickles) fall back to one member in memory at a time, the others
    /// streamed against it (K(K+1)/2 passes over that tensor).
    pub fn distances(&self, max_groups: usize) -> Result<Vec<Vec<Vec<f64>>>> {
        let (k, t) = (self.members.len(), self.layout.len());
        let groups = max_groups.clamp(1, t.max(1));
        let mut out = vec![vec![vec![0f64; k]; k]; groups];
        let cache = self.cached()?;
        for (ti, meta) in self.layout.iter().enumerate() {
            let d = &mut out[ti * groups / t.max(1)];
            match cache {
                Some(c) => {
                    let at = self.offsets[ti];
                    let vals: Vec<&[f32]> = c.iter().map(|w| &w[at..at + meta.numel()]).collect();
                    add_pairs(d, &vals);
                }
                None => self.tensor_distances(meta, d)?,
            }
        }
        Ok(out)
    }

    /// One tensor's contribution to `d`, reading each member once, `DIST_CHUNK` elements at a
    /// time (K buffers of that size).
    fn tensor_distances(&self, meta: &TensorMeta, d: &mut [Vec<f64>]) -> Result<()> {
        let readers = (self.members.iter().map(|m| m.reader(&meta.name)))
            .collect::<sewa_checkpoint::Result<Vec<TensorReader<'_>>>>()?;
        if readers.iter().any(TensorReader::is_copy) {
            drop(readers);
            return self.pairwise_distances(meta, d);
        }
        let dtypes: Vec<DType> = self.members.iter().map(|m| own_dtype(m, meta)).collect();
        let (n, mut raw) = (meta.numel(), Vec::new());
        let mut vals: Vec<Vec<f32>> = vec![Vec::new(); readers.len()];
        let mut start = 0;
        while start < n {
            let len = DIST_CHUNK.min(n - start);
            for ((r, dt), v) in readers.iter().zip(&dtypes).zip(&mut vals) {
                let size = dt.size();
                raw.resize(len * size, 0);
                let bytes = r.bytes(start * size..(start + len) * size, &mut raw)?;
                v.clear();
                v.extend(bytes.chunks_exact(size).map(|c| decode_f32(*dt, c).unwrap_or(0.0)));
            }
            let views: Vec<&[f32]> = vals.iter().map(Vec::as_slice).collect();
            add_pairs(d, &views);
            start += len;
        }
        Ok(())
    }

    /// One tensor's contribution to `d` with member i decoded and every later member streamed
    /// against it (for members stored as decoded copies).
    fn pairwise_distances(&self, meta: &TensorMeta, d: &mut [Vec<f64>]) -> Result<()> {
        let (mut buf, mut own) = (Vec::new(), Vec::new());
        for (i, mi) in self.members.iter().enumerate() {
            own.clear();
            own.resize(meta.numel(), 0f32);
            let dtype = own_dtype(mi, meta);
            mi.for_each_chunk(&meta.name, CHUNK, &mut buf, |offset, bytes| {
                let dst = own.get_mut(offset / dtype.size()..).unwrap_or_default();
                axpy(dst, bytes, dtype, 1.0);
                Ok(())
            })?;
            for (j, mj) in self.members.iter().enumerate().skip(i + 1) {
                let (mut acc, dtype) = (0f64, own_dtype(mj, meta));
                mj.for_each_chunk(&meta.name, CHUNK, &mut buf, |offset, bytes| {
                    let mine = own.get(offset / dtype.size()..).unwrap_or_default();
                    sq_dist(&mut acc, mine, bytes, dtype);
                    Ok(())
                })?;
                d[i][j] += acc;
                d[j][i] += acc;
            }
        }
        Ok(())
    }
}

/// `d[i][j] += ‖v_i − v_j‖²` (f64) for every pair of equal-length slices.
fn add_pairs(d: &mut [Vec<f64>], vals: &[&[f32]]) {
    for i in 0..vals.len() {
        for j in i + 1..vals.len() {
            let acc: f64 =
                vals[i].iter().zip(vals[j]).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum();
            d[i][j] += acc;
            d[j][i] += acc;
        }
    }
}

/// `acc += ‖a − src‖²` in f64 with `src` as raw bytes of `dtype`.
fn sq_dist(acc: &mut f64, a: &[f32], src: &[u8], dtype: DType) {
    for (x, c) in a.iter().zip(src.chunks_exact(dtype.size())) {
        let y = sewa_checkpoint::dtype::decode_f32(dtype, c).unwrap_or(0.0);
        *acc += (*x as f64 - y as f64).powi(2);
    }
}

/// The dtype `member` stores tensor `meta` in (schema-checked: same name and shape).
fn own_dtype(member: &Checkpoint, meta: &TensorMeta) -> DType {
    member.tensor(&meta.name).map_or(meta.dtype, |t| t.dtype)
}

/// `dst += a * src` with `src` as raw bytes of `dtype`.
fn axpy(dst: &mut [f32], src: &[u8], dtype: DType, a: f32) {
    for (d, c) in dst.iter_mut().zip(src.chunks_exact(dtype.size())) {
        *d += a * sewa_checkpoint::dtype::decode_f32(dtype, c).unwrap_or(0.0);
    }
}

/// `acc += ⟨g, src⟩` in f64 with `src` as raw bytes of `dtype`.
fn dot(acc: &mut f64, g: &[f32], src: &[u8], dtype: DType) {
    for (x, c) in g.iter().zip(src.chunks_exact(dtype.size())) {
        *acc += *x as f64 * sewa_checkpoint::dtype::decode_f32(dtype, c).unwrap_or(0.0) as f64;
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
        for limit in [CACHE_BYTES, 0] {
            by_hand(&Blend::with_cache_limit(&[&a, &b], limit).unwrap());
        }
    }

    fn by_hand(blend: &Blend) {
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

    /// Whether `blend` holds its members decoded (after a first use).
    fn is_cached(blend: &Blend) -> bool {
        matches!(blend.cache.get(), Some(Some(_)))
    }

    #[test]
    fn cached_and_streamed_blends_agree_and_the_cache_is_bounded() {
        // Lengths past a block (1024) and not a multiple of the lanes (16).
        let wave = |n: usize, ph: f32| -> Vec<f32> {
            (0..n).map(|i| (i as f32 * 0.013 + ph).sin() * 3.0 + 0.5).collect()
        };
        let ms: Vec<Checkpoint> =
            (0..3).map(|i| ck(&format!("m{i}"), &wave(2500, i as f32))).collect();
        let refs: Vec<&Checkpoint> = ms.iter().collect();
        // 3 members × 2 float tensors × 2500 f32.
        let bytes = 3 * 2 * 2500 * 4;
        let cached = Blend::with_cache_limit(&refs, bytes).unwrap();
        let streamed = Blend::with_cache_limit(&refs, bytes - 1).unwrap();
        let (mut a, mut b) = (cached.zeros(), streamed.zeros());
        let mask = [0.7, 0.0, 0.2];
        cached.mix(&mask, &mut a).unwrap();
        streamed.mix(&mask, &mut b).unwrap();
        assert!(is_cached(&cached) && !is_cached(&streamed), "the limit counts every member");
        assert_eq!(a, b, "the same sums in the same order");
        let g: Params =
            a.iter().map(|t| NamedTensor { data: wave(t.data.len(), 9.0), ..t.clone() }).collect();
        let (da, db) = (cached.dots(&g, &a).unwrap(), streamed.dots(&g, &a).unwrap());
        for (x, y) in da.iter().zip(&db) {
            assert!((x - y).abs() < 1e-5 * y.abs().max(1.0), "{x} vs {y}");
        }
    }

    /// A one-tensor safetensors file, written in place (same inode) like `torch.save` does.
    fn write_member(path: &std::path::Path, vals: &[f32]) {
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![vals.len()], &bytes);
        std::fs::write(path, safetensors::serialize([("w", view.unwrap())], None).unwrap())
            .unwrap();
    }

    /// The cache is one selection's snapshot: a member rewritten in place after it was filled
    /// does not change that selection, and the next selection (a new `Blend` over the same
    /// opened checkpoints) reads it again and refuses the change instead of serving stale
    /// values, exactly as streaming does.
    #[test]
    fn a_member_rewritten_after_caching_is_noticed_by_the_next_blend() {
        let dir = tempfile::tempdir().unwrap();
        let (p, q) = (dir.path().join("step_1.safetensors"), dir.path().join("step_2.safetensors"));
        write_member(&p, &[1.0, 2.0]);
        write_member(&q, &[3.0, 4.0]);
        let open = |p: &std::path::Path| Checkpoint::open(p, &Default::default()).unwrap();
        let (a, b) = (open(&p), open(&q));
        let first = Blend::new(&[&a, &b]).unwrap();
        let mut out = first.zeros();
        first.mix(&[1.0, 1.0], &mut out).unwrap();
        assert!(is_cached(&first));
        assert_eq!(out[0].data, [2.0, 3.0]);
        let opened = std::fs::metadata(&p).unwrap().modified().unwrap();
        // A rewrite within the file system's timestamp tick would not move the mtime.
        while std::fs::metadata(&p).unwrap().modified().unwrap() == opened {
            write_member(&p, &[5.0, 6.0]);
        }
        first.mix(&[1.0, 1.0], &mut out).unwrap();
        assert_eq!(out[0].data, [2.0, 3.0], "one selection sees one snapshot");
        let next = Blend::new(&[&a, &b]).unwrap();
        let e = next.mix(&[1.0, 1.0], &mut out).unwrap_err().to_string();
        assert!(e.contains("step_1.safetensors") && e.contains("changed on disk"), "{e}");
        assert!(!is_cached(&next), "a failed read caches nothing");
    }

    #[test]
    fn distances_per_group_match_by_hand() {
        let (a, b, c) = (ck("a", &[1.0, 2.0]), ck("b", &[3.0, 6.0]), ck("c", &[1.0, 0.0]));
        // From the decoded window (cache) and streamed side by side (no cache): the same.
        for limit in [CACHE_BYTES, 0] {
            let blend = Blend::with_cache_limit(&[&a, &b, &c], limit).unwrap();
            check_distances(&blend);
        }
    }

    fn check_distances(blend: &Blend<'_>) {
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

    /// Tensors longer than one distance chunk, streamed, give the cached (whole-tensor) sums.
    #[test]
    fn streamed_distances_over_several_chunks_equal_the_cached_ones() {
        let n = 3 * DIST_CHUNK + 17;
        let vals = |s: f32| (0..n).map(|i| ((i % 97) as f32 - 48.0) * s).collect::<Vec<_>>();
        let (a, b, c) = (ck("a", &vals(0.01)), ck("b", &vals(0.03)), ck("c", &vals(-0.02)));
        let cached = Blend::new(&[&a, &b, &c]).unwrap().distances(8).unwrap();
        let streamed = Blend::with_cache_limit(&[&a, &b, &c], 0).unwrap().distances(8).unwrap();
        for (x, y) in cached.iter().flatten().flatten().zip(streamed.iter().flatten().flatten()) {
            assert!((x - y).abs() <= 1e-9 * x.abs().max(1.0), "{x} vs {y}");
        }
        assert!(cached[0][0][1] > 0.0);
    }

    #[test]
    fn layout_mismatch_names_member() {
        let a = ck("a.safetensors", &[1.0, 2.0]);
        let b = ck("b.safetensors", &[1.0, 2.0, 3.0]);
        let e = Blend::new(&[&a, &b]).err().unwrap().to_string();
        assert!(e.contains("b.safetensors") && e.contains("shape"), "{e}");
    }

    /// Issue 10: `Blend` decoded every member with the first member's dtypes, so an f16
    /// member beside f32 ones was read as garbage; each is now decoded in its own dtype.
    #[test]
    fn members_of_different_float_dtypes_are_each_decoded_in_their_own() {
        let a = ck("a.safetensors", &[1.0, 2.0]);
        let halves: Vec<u8> =
            [3.0f32, 6.0].iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
        let bf: Vec<u8> =
            [3.0f32, 6.0].iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect();
        let tensors = vec![
            ("a".into(), DType::F16, vec![2], halves),
            ("b".into(), DType::BF16, vec![2], bf),
            ("n".into(), DType::I64, vec![1], vec![7u8; 8]),
        ];
        let b = Checkpoint::from_memory("b.safetensors", None, tensors).unwrap();
        let blend = Blend::new(&[&a, &b]).unwrap();
        let mut out = blend.zeros();
        blend.mix(&[1.0, 1.0], &mut out).unwrap();
        assert_eq!(out[0].data, vec![2.0, 4.0], "f32 and f16 members");
        let g = vec![
            NamedTensor { name: "a".into(), shape: vec![2], data: vec![1.0, 1.0] },
            NamedTensor { name: "b".into(), shape: vec![2], data: vec![0.0, 0.0] },
        ];
        let d = blend.dots(&g, &out).unwrap();
        assert_eq!(d, vec![3.0 - 6.0, 9.0 - 6.0]);
    }
}
