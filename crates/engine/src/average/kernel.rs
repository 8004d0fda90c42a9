//! The averaging kernel's inner loops: one pass of a group of inputs over a tensor, slab by
//! slab, accumulating `w * x` into an f32 (or f64) buffer and converting finished slabs into
//! output bytes. Inputs come as [`TensorReader`]s: bytes in memory are read in place, file
//! bytes are read (`pread`) slab by slab into a per-thread buffer that stays in L2 beside the
//! accumulator slab. No checkpoints, no allocation beyond those reused buffers.

use std::ops::{Add, BitOr, Mul, Range};

use super::DtypeOverflow;
use crate::error::Result;
use sewa_checkpoint::dtype::{bf16_to_f32, f16_to_f32};
use sewa_checkpoint::{DType, TensorReader};

/// Thread ranges are multiples of this many elements (so, page-aligned within a tensor).
pub(super) const BLOCK: usize = 8192;
/// Elements per slab: the accumulator slab (256 KiB of f32) and one input's slab (read into
/// the thread's buffer) stay in L2 while the inputs stream through in turn.
pub(super) const SLAB: usize = 1 << 16;
/// Below this many elements a tensor is not worth spawning threads for.
pub(super) const MIN_PARALLEL: usize = 1 << 16;

/// What storing a pass's results found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Stored {
    /// Some accumulated value is NaN or Inf (an input holds one).
    pub(super) non_finite: bool,
    /// Some finite value lies beyond the output dtype's range (written as ±inf, or as ±max
    /// when saturating).
    pub(super) overflow: bool,
}

impl BitOr for Stored {
    type Output = Stored;
    fn bitor(self, o: Stored) -> Stored {
        Stored { non_finite: self.non_finite | o.non_finite, overflow: self.overflow | o.overflow }
    }
}

/// One sweep of a group of inputs over a tensor's elements.
pub(super) struct Pass<'v, 'a, A> {
    pub(super) inputs: &'v [(TensorReader<'a>, A)],
    pub(super) in_dtype: DType,
    /// First group: overwrite the accumulator instead of adding to it.
    pub(super) init: bool,
    /// Last group: convert the accumulator into the output bytes.
    pub(super) last: bool,
    pub(super) overflow: DtypeOverflow,
}

impl<A: Acc> Pass<'_, '_, A> {
    /// Run over all elements on up to `threads` threads (contiguous ranges, so every element
    /// sums its inputs in the same order whatever the thread count), each thread reading file
    /// inputs into its own buffer of `slabs`. Fails on the first read error.
    pub(super) fn run(
        &self,
        acc: &mut [A],
        out: &mut [u8],
        out_dtype: DType,
        slabs: &mut Vec<Vec<u64>>,
        threads: usize,
    ) -> Result<Stored> {
        let n = acc.len();
        let out = &mut out[..n * out_dtype.size()];
        let all_in_memory = self.inputs.iter().all(|(r, _)| r.in_memory().is_some());
        let slab_bytes = if all_in_memory { 0 } else { SLAB.min(n) * self.in_dtype.size() };
        on_threads(acc, out, out_dtype, slabs, slab_bytes, threads, |at, a, o, buf| {
            self.range(at, a, o, out_dtype, buf)
        })
    }

    /// Elements `start..start + acc.len()`, slab by slab: each input in turn streams one slab
    /// (read into `buf` unless in memory) through the cache-resident accumulator slab.
    fn range(
        &self,
        start: usize,
        acc: &mut [A],
        out: &mut [u8],
        out_dtype: DType,
        buf: &mut [u8],
    ) -> Result<Stored> {
        let (in_size, out_size) = (self.in_dtype.size(), out_dtype.size());
        let saturate = self.overflow == DtypeOverflow::Saturate;
        let mut stored = Stored::default();
        for (k, (acc_s, out_s)) in
            acc.chunks_mut(SLAB).zip(out.chunks_mut(SLAB * out_size)).enumerate()
        {
            let lo = (start + k * SLAB) * in_size;
            let hi = lo + acc_s.len() * in_size;
            for (j, (input, w)) in self.inputs.iter().enumerate() {
                let bytes = input.bytes(lo..hi, buf)?;
                A::add_block(acc_s, bytes, self.in_dtype, *w, self.init && j == 0);
            }
            if self.last {
                stored = stored | A::store_block(acc_s, out_s, out_dtype, saturate);
            }
        }
        Ok(stored)
    }
}

/// One input of a [`Sweep`]: its reader, its weight, and the dtype its bytes are decoded from
/// (inputs may differ in float dtype when an output dtype is given).
pub(super) struct Input<'a, A> {
    pub(super) reader: TensorReader<'a>,
    pub(super) weight: A,
    pub(super) dtype: DType,
}

/// Where a sweep gets an input's bytes: read in place when in memory, else read (`Direct`)
/// or handed over by the reader thread that read them ahead (`prefetch::Feed`).
pub(super) trait Fetch {
    fn fetch<'s>(
        &'s mut self,
        input: &'s TensorReader<'_>,
        range: Range<usize>,
    ) -> Result<&'s [u8]>;
}

/// Positioned reads into one slab buffer, on the calling thread.
pub(super) struct Direct<'b>(pub(super) &'b mut [u8]);

impl Fetch for Direct<'_> {
    fn fetch<'s>(
        &'s mut self,
        input: &'s TensorReader<'_>,
        range: Range<usize>,
    ) -> Result<&'s [u8]> {
        Ok(input.bytes(range, self.0)?)
    }
}

/// All inputs of a tensor swept over a window of its elements at a time, slab by slab: every
/// element sums `w * x` over the inputs in their order (the first overwrites), exactly as the
/// passes of [`Pass`] do, so the output bytes are the same; the window's slabs are stored as
/// they finish. Only a window's accumulator and output bytes are held, whatever the tensor.
pub(super) struct Sweep<'v, 'a, A> {
    pub(super) inputs: &'v [Input<'a, A>],
    pub(super) overflow: DtypeOverflow,
}

impl<A: Acc> Sweep<'_, '_, A> {
    /// Elements `start..start + acc.len()` on up to `threads` threads (contiguous ranges, each
    /// with its own slab buffer from `slabs`, reading on its own thread).
    pub(super) fn window(
        &self,
        start: usize,
        acc: &mut [A],
        out: &mut [u8],
        out_dtype: DType,
        slabs: &mut Vec<Vec<u64>>,
        threads: usize,
    ) -> Result<Stored> {
        let slab_bytes = self.slab_bytes(acc.len());
        on_threads(acc, out, out_dtype, slabs, slab_bytes, threads, |at, a, o, buf| {
            self.range(start + at, a, o, out_dtype, &mut Direct(buf))
        })
    }

    /// Bytes of the largest slab any input not in memory reads for a window of `n` elements.
    pub(super) fn slab_bytes(&self, n: usize) -> usize {
        let file = self.inputs.iter().filter(|i| i.reader.in_memory().is_none());
        file.map(|i| SLAB.min(n) * i.dtype.size()).max().unwrap_or(0)
    }

    /// Elements `start..start + acc.len()`, slab by slab (slabs start at multiples of
    /// [`SLAB`] from `start`): each input in turn streams one slab through the cache-resident
    /// accumulator slab, which is then stored as output bytes.
    pub(super) fn range(
        &self,
        start: usize,
        acc: &mut [A],
        out: &mut [u8],
        out_dtype: DType,
        fetch: &mut impl Fetch,
    ) -> Result<Stored> {
        let saturate = self.overflow == DtypeOverflow::Saturate;
        let mut stored = Stored::default();
        for (k, (acc_s, out_s)) in
            acc.chunks_mut(SLAB).zip(out.chunks_mut(SLAB * out_dtype.size())).enumerate()
        {
            let (lo, hi) = (start + k * SLAB, start + k * SLAB + acc_s.len());
            for (j, input) in self.inputs.iter().enumerate() {
                let size = input.dtype.size();
                let bytes = fetch.fetch(&input.reader, lo * size..hi * size)?;
                A::add_block(acc_s, bytes, input.dtype, input.weight, j == 0);
            }
            stored = stored | A::store_block(acc_s, out_s, out_dtype, saturate);
        }
        Ok(stored)
    }
}

/// Run `range(offset, acc part, out part, slab buffer)` over `acc` and its output bytes on up
/// to `threads` threads: contiguous ranges (multiples of [`BLOCK`] elements), so every element
/// sums its inputs in the same order whatever the thread count, each range with its own slab
/// buffer of `slab_bytes` from `slabs`; one range on the calling thread when `threads` is 1 or
/// the tensor is small. The first error wins; what the ranges stored is or-ed together.
fn on_threads<A: Acc>(
    acc: &mut [A],
    out: &mut [u8],
    out_dtype: DType,
    slabs: &mut Vec<Vec<u64>>,
    slab_bytes: usize,
    threads: usize,
    range: impl Fn(usize, &mut [A], &mut [u8], &mut [u8]) -> Result<Stored> + Sync,
) -> Result<Stored> {
    let n = acc.len();
    let osize = out_dtype.size();
    let single = threads <= 1 || n < MIN_PARALLEL;
    let part = if single { n.max(1) } else { n.div_ceil(threads).next_multiple_of(BLOCK) };
    let mut bufs = slab_buffers(slabs, n.div_ceil(part).max(1), slab_bytes);
    if single {
        return range(0, acc, out, &mut bufs[0][..]);
    }
    let range = &range;
    std::thread::scope(|s| {
        let handles: Vec<_> = (acc.chunks_mut(part).zip(out.chunks_mut(part * osize)))
            .zip(bufs)
            .enumerate()
            .map(|(k, ((a, o), buf))| s.spawn(move || range(k * part, a, o, &mut buf[..])))
            .collect();
        let results = handles.into_iter().map(|h| h.join().expect("kernel thread panicked"));
        results
            .collect::<Result<Vec<Stored>>>()
            .map(|v| v.into_iter().fold(Stored::default(), BitOr::bitor))
    })
}

/// The first `parts` buffers of `slabs`, each at least `bytes` long (8-byte aligned, so the
/// aligned fast paths apply to what is read into them).
fn slab_buffers(slabs: &mut Vec<Vec<u64>>, parts: usize, bytes: usize) -> Vec<&mut [u8]> {
    if slabs.len() < parts {
        slabs.resize_with(parts, Vec::new);
    }
    let words = bytes.div_ceil(8);
    let bufs = slabs[..parts].iter_mut().map(|s| {
        if s.len() < words {
            s.resize(words, 0);
        }
        bytemuck::cast_slice_mut::<u64, u8>(s.as_mut_slice())
    });
    bufs.collect()
}

/// An accumulator element type: f32 for 16/32-bit floats, f64 for f64.
pub(super) trait Acc:
    Copy + Default + Send + Sync + Add<Output = Self> + Mul<Output = Self> + std::fmt::LowerExp
{
    /// The workspace's accumulator of this type.
    fn pick<'w>(acc32: &'w mut Vec<f32>, acc64: &'w mut Vec<f64>) -> &'w mut Vec<Self>;
    fn weight(w: f64) -> Self;
    fn magnitude(self) -> f64;
    /// `acc = w * x` (init) or `acc += w * x` for one block of input bytes.
    fn add_block(acc: &mut [Self], bytes: &[u8], dtype: DType, w: Self, init: bool);
    /// Write `acc` as `dtype` little-endian bytes. Finite values beyond the dtype's range
    /// become ±max when `saturate`, else ±inf (and the caller refuses the output).
    fn store_block(acc: &[Self], out: &mut [u8], dtype: DType, saturate: bool) -> Stored;
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

/// A 16-bit float type the accumulator can be narrowed to.
pub(super) trait Narrow: Copy {
    const MAX: Self;
    const MIN: Self;
    fn is_infinite(self) -> bool;
    fn bits(self) -> u16;
}

macro_rules! narrow {
    ($t:ty) => {
        impl Narrow for $t {
            const MAX: Self = <$t>::MAX;
            const MIN: Self = <$t>::MIN;
            fn is_infinite(self) -> bool {
                <$t>::is_infinite(self)
            }
            fn bits(self) -> u16 {
                self.to_bits()
            }
        }
    };
}
narrow!(half::f16);
narrow!(half::bf16);

/// `narrowed`, the rounding of the finite-or-not `wide` value, unless it overflowed to ±inf
/// from a finite value: then ±max when saturating; `s` records what was seen.
#[inline(always)]
fn fit<H: Narrow>(narrowed: H, finite: bool, positive: bool, saturate: bool, s: &mut Stored) -> H {
    s.non_finite |= !finite;
    if finite && narrowed.is_infinite() {
        s.overflow = true;
        if saturate {
            return if positive { H::MAX } else { H::MIN };
        }
    }
    narrowed
}

/// Store `acc` as a 16-bit float type.
#[inline(always)]
pub(super) fn store_narrow<A: Copy, H: Narrow>(
    acc: &[A],
    out: &mut [u8],
    saturate: bool,
    convert: impl Fn(A) -> (H, bool, bool),
) -> Stored {
    let mut s = Stored::default();
    out.chunks_exact_mut(2).zip(acc).for_each(|(o, a)| {
        let (h, finite, positive) = convert(*a);
        o.copy_from_slice(&fit(h, finite, positive, saturate, &mut s).bits().to_le_bytes());
    });
    s
}

/// `x`'s bits rounded to bf16 exactly as `half::bf16::from_f32` does (a NaN stays a quiet
/// NaN; otherwise round to nearest, ties to even), without branches, so the loop vectorises.
#[inline(always)]
fn bf16_bits(x: u32) -> u16 {
    let nan = x & 0x7FFF_FFFF > 0x7F80_0000;
    let up = (x & 0x8000 != 0 && x & 0x1_7FFF != 0) as u32;
    // No carry out of 16 bits: 0xFFFF above would be a NaN, taken by the select.
    if nan { ((x >> 16) | 0x0040) as u16 } else { ((x >> 16) + up) as u16 }
}

/// Store an f32 accumulator as bf16: what `store_narrow` with `half::bf16::from_f32` writes
/// (a test compares them on every kind of value), in a loop that vectorises: no branch and
/// no early exit per element, the flags gathered as integer ORs, and the rare saturation done
/// in a second pass only when something overflowed. The generic loop took most of a bf16
/// average's time, and a first branch-free version still ran scalar (its per-element select
/// of the saturated value kept it so: `perf annotate`).
#[inline(always)]
fn store_bf16(acc: &[f32], out: &mut [u8], saturate: bool) -> Stored {
    // (non-finite, overflowed) for one value, as 0/1 words, with its bf16 bits.
    #[inline(always)]
    fn one(a: f32) -> (u16, u32, u32) {
        let x = a.to_bits();
        let non_finite = u32::from(x & 0x7F80_0000 == 0x7F80_0000);
        let h = bf16_bits(x);
        let over = (non_finite ^ 1) & u32::from(h & 0x7FFF == 0x7F80);
        (h, non_finite, over)
    }
    let (mut non_finite, mut overflow) = (0u32, 0u32);
    match bytemuck::try_cast_slice_mut::<u8, u16>(out) {
        Ok(o) if cfg!(target_endian = "little") => {
            o.iter_mut().zip(acc).for_each(|(o, a)| {
                let (h, n, v) = one(*a);
                (non_finite, overflow) = (non_finite | n, overflow | v);
                *o = h;
            });
        }
        _ => (out.chunks_exact_mut(2).zip(acc)).for_each(|(o, a)| {
            let (h, n, v) = one(*a);
            (non_finite, overflow) = (non_finite | n, overflow | v);
            o.copy_from_slice(&h.to_le_bytes());
        }),
    }
    if overflow != 0 && saturate {
        for (o, a) in out.chunks_exact_mut(2).zip(acc) {
            if one(*a).2 != 0 {
                let h = if a.is_sign_negative() { half::bf16::MIN } else { half::bf16::MAX };
                o.copy_from_slice(&h.to_bits().to_le_bytes());
            }
        }
    }
    Stored { non_finite: non_finite != 0, overflow: overflow != 0 }
}

impl Acc for f32 {
    fn pick<'w>(acc32: &'w mut Vec<f32>, _: &'w mut Vec<f64>) -> &'w mut Vec<f32> {
        acc32
    }
    fn weight(w: f64) -> f32 {
        w as f32
    }
    fn magnitude(self) -> f64 {
        self.abs() as f64
    }
    fn add_block(acc: &mut [f32], bytes: &[u8], dtype: DType, w: f32, init: bool) {
        // Compiled for the CPU's widest vectors (AVX2, AVX-512), chosen at run time. Same
        // bytes as the baseline loop: Rust never fuses `a + w * x` into one rounding.
        pulp::Arch::new().dispatch(AddF32 { acc, bytes, dtype, w, init })
    }
    fn store_block(acc: &[f32], out: &mut [u8], dtype: DType, saturate: bool) -> Stored {
        pulp::Arch::new().dispatch(StoreF32 { acc, out, dtype, saturate })
    }
}

/// [`add_f32`]'s arguments, for `pulp` to run in each instruction set. A struct rather than a
/// closure: a closure's body is compiled once, outside the dispatched function, for the
/// baseline instruction set only (`perf annotate` showed SSE code under the AVX2 dispatch).
struct AddF32<'a> {
    acc: &'a mut [f32],
    bytes: &'a [u8],
    dtype: DType,
    w: f32,
    init: bool,
}

impl pulp::WithSimd for AddF32<'_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        add_f32(self.acc, self.bytes, self.dtype, self.w, self.init)
    }
}

/// [`store_f32`]'s arguments (see [`AddF32`]).
struct StoreF32<'a> {
    acc: &'a [f32],
    out: &'a mut [u8],
    dtype: DType,
    saturate: bool,
}

impl pulp::WithSimd for StoreF32<'_> {
    type Output = Stored;
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) -> Stored {
        store_f32(self.acc, self.out, self.dtype, self.saturate)
    }
}

/// [`Acc::add_block`] for f32, inlined into each instruction set's copy.
#[inline(always)]
fn add_f32(acc: &mut [f32], bytes: &[u8], dtype: DType, w: f32, init: bool) {
    match dtype {
        DType::F32 => match bytemuck::try_cast_slice::<u8, f32>(bytes) {
            // Fast path: aligned bytes are already f32 on a little-endian host.
            Ok(xs) if cfg!(target_endian = "little") => axpy(acc, xs.iter().copied(), w, init),
            _ => axpy(
                acc,
                bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                w,
                init,
            ),
        },
        DType::BF16 => match bytemuck::try_cast_slice::<u8, u16>(bytes) {
            // Fast path: aligned bf16 on a little-endian host widens by a shift, a loop
            // that vectorises (the byte-pair loop below did not).
            Ok(xs) if cfg!(target_endian = "little") => {
                axpy(acc, xs.iter().map(|&h| f32::from_bits(u32::from(h) << 16)), w, init)
            }
            _ => axpy(acc, bytes.chunks_exact(2).map(|c| bf16_to_f32([c[0], c[1]])), w, init),
        },
        DType::F16 => axpy(acc, bytes.chunks_exact(2).map(|c| f16_to_f32([c[0], c[1]])), w, init),
        other => unreachable!("f32 accumulator fed {other:?}"),
    }
}

/// [`Acc::store_block`] for f32, inlined into each instruction set's copy.
#[inline(always)]
fn store_f32(acc: &[f32], out: &mut [u8], dtype: DType, saturate: bool) -> Stored {
    let parts = |a: f32| (a.is_finite(), a > 0.0);
    match dtype {
        DType::F32 => {
            // Fast path: an aligned output buffer on a little-endian host is a plain copy.
            match bytemuck::try_cast_slice_mut::<u8, f32>(out) {
                Ok(o) if cfg!(target_endian = "little") => o.copy_from_slice(acc),
                _ => (out.chunks_exact_mut(4).zip(acc))
                    .for_each(|(o, a)| o.copy_from_slice(&a.to_le_bytes())),
            }
            let finite = acc.iter().fold(true, |ok, a| ok & a.is_finite());
            Stored { non_finite: !finite, overflow: false }
        }
        DType::BF16 => store_bf16(acc, out, saturate),
        DType::F16 => store_narrow(acc, out, saturate, |a| {
            let (finite, positive) = parts(a);
            (half::f16::from_f32(a), finite, positive)
        }),
        other => unreachable!("f32 accumulator written as {other:?}"),
    }
}

impl Acc for f64 {
    fn pick<'w>(_: &'w mut Vec<f32>, acc64: &'w mut Vec<f64>) -> &'w mut Vec<f64> {
        acc64
    }
    fn weight(w: f64) -> f64 {
        w
    }
    fn magnitude(self) -> f64 {
        self.abs()
    }
    fn add_block(acc: &mut [f64], bytes: &[u8], dtype: DType, w: f64, init: bool) {
        match dtype {
            DType::F64 => match bytemuck::try_cast_slice::<u8, f64>(bytes) {
                Ok(xs) if cfg!(target_endian = "little") => axpy(acc, xs.iter().copied(), w, init),
                _ => axpy(
                    acc,
                    bytes
                        .chunks_exact(8)
                        .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))),
                    w,
                    init,
                ),
            },
            // Mixed-dtype averages (an f64 input beside narrower ones) widen the others.
            DType::F32 => axpy(
                acc,
                bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64),
                w,
                init,
            ),
            DType::BF16 => {
                axpy(acc, bytes.chunks_exact(2).map(|c| bf16_to_f32([c[0], c[1]]) as f64), w, init)
            }
            DType::F16 => {
                axpy(acc, bytes.chunks_exact(2).map(|c| f16_to_f32([c[0], c[1]]) as f64), w, init)
            }
            other => unreachable!("f64 accumulator fed {other:?}"),
        }
    }
    fn store_block(acc: &[f64], out: &mut [u8], dtype: DType, saturate: bool) -> Stored {
        let parts = |a: f64| (a.is_finite(), a > 0.0);
        match dtype {
            DType::F64 => {
                (out.chunks_exact_mut(8).zip(acc))
                    .for_each(|(o, a)| o.copy_from_slice(&a.to_le_bytes()));
                Stored { non_finite: acc.iter().any(|a| !a.is_finite()), overflow: false }
            }
            DType::F32 => {
                let mut s = Stored::default();
                out.chunks_exact_mut(4).zip(acc).for_each(|(o, a)| {
                    let (finite, positive) = parts(*a);
                    let mut v = *a as f32;
                    s.non_finite |= !finite;
                    if finite && v.is_infinite() {
                        s.overflow = true;
                        if saturate {
                            v = if positive { f32::MAX } else { f32::MIN };
                        }
                    }
                    o.copy_from_slice(&v.to_le_bytes());
                });
                s
            }
            DType::BF16 => store_narrow(acc, out, saturate, |a| {
                let (finite, positive) = parts(a);
                (half::bf16::from_f64(a), finite, positive)
            }),
            DType::F16 => store_narrow(acc, out, saturate, |a| {
                let (finite, positive) = parts(a);
                (half::f16::from_f64(a), finite, positive)
            }),
            other => unreachable!("f64 accumulator written as {other:?}"),
        }
    }
}
