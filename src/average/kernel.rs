//! The averaging kernel's inner loops: one pass of a group of inputs over a tensor, block by
//! block, accumulating `w * x` into an f32 (or f64) buffer and converting finished blocks into
//! output bytes. Pure functions over byte slices: no checkpoints, no files, no allocation.

use std::borrow::Cow;
use std::ops::{Add, Mul, Range};

use super::Workspace;
use crate::checkpoint::DType;

/// Thread ranges are multiples of this many elements (so, page-aligned within a tensor).
pub(super) const BLOCK: usize = 8192;
/// Elements per slab: the accumulator slab (256 KiB of f32) stays in L2 while each input's
/// matching slab streams through it.
const SLAB: usize = 1 << 16;
/// Bytes around a consumed slab released with it when there are many inputs: a fault maps the
/// whole large folio (up to 2 MiB) around the page touched, before and after the slab, and
/// with 64 inputs those would add up. With few inputs they are left mapped: re-faulting them
/// costs bandwidth.
const LOOKAHEAD: usize = 2 << 20;
/// Up to this many inputs, pages mapped ahead (at most `LOOKAHEAD` each) are kept.
const FEW_INPUTS: usize = 16;
/// Below this many elements a tensor is not worth spawning threads for.
pub(super) const MIN_PARALLEL: usize = 1 << 16;

/// Position of the first NaN/Inf in little-endian float bytes.
pub(super) fn first_non_finite(bytes: &[u8], dtype: DType) -> Option<usize> {
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

/// Called with (view index, byte range within the tensor) once that range of the view has
/// been consumed, so its pages can be released.
pub(super) type Release<'r> = &'r (dyn Fn(usize, Range<usize>) + Sync);

/// One sweep of a group of inputs over a tensor's elements.
pub(super) struct Pass<'v, 'a, A> {
    pub(super) views: &'v [(Cow<'a, [u8]>, A)],
    pub(super) in_dtype: DType,
    /// First group: overwrite the accumulator instead of adding to it.
    pub(super) init: bool,
    /// Last group: convert the accumulator into the output bytes.
    pub(super) last: bool,
    pub(super) release: Release<'v>,
}

impl<A: Acc> Pass<'_, '_, A> {
    /// Run over all elements on up to `threads` threads (contiguous ranges, so every element
    /// sums its inputs in the same order whatever the thread count). Returns false if any
    /// output value is non-finite.
    pub(super) fn run(
        &self,
        acc: &mut [A],
        out: &mut [u8],
        out_dtype: DType,
        threads: usize,
    ) -> bool {
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

    /// Elements `start..start + acc.len()`, slab by slab: each input in turn streams one slab
    /// through the (cache-resident) accumulator slab and has its pages released at once, so
    /// only one input's pages are mapped at a time, whatever the number of inputs.
    fn range(&self, start: usize, acc: &mut [A], out: &mut [u8], out_dtype: DType) -> bool {
        let (in_size, out_size) = (self.in_dtype.size(), out_dtype.size());
        let ahead = if self.views.len() > FEW_INPUTS { LOOKAHEAD } else { 0 };
        let mut finite = true;
        for (k, (acc_s, out_s)) in
            acc.chunks_mut(SLAB).zip(out.chunks_mut(SLAB * out_size)).enumerate()
        {
            let lo = (start + k * SLAB) * in_size;
            let hi = lo + acc_s.len() * in_size;
            for (j, (view, w)) in self.views.iter().enumerate() {
                A::add_block(acc_s, &view[lo..hi], self.in_dtype, *w, self.init && j == 0);
                (self.release)(j, lo.saturating_sub(ahead)..hi + ahead);
            }
            if self.last {
                finite &= A::store_block(acc_s, out_s, out_dtype);
            }
        }
        finite
    }
}

/// An accumulator element type: f32 for 16/32-bit floats, f64 for f64.
pub(super) trait Acc:
    Copy + Default + Send + Sync + Add<Output = Self> + Mul<Output = Self>
{
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
            // Fast path: an aligned output buffer on a little-endian host is a plain copy.
            DType::F32 => match bytemuck::try_cast_slice_mut::<u8, f32>(out) {
                Ok(o) if cfg!(target_endian = "little") => {
                    o.copy_from_slice(acc);
                    finite = acc.iter().fold(true, |ok, a| ok & a.is_finite());
                }
                _ => out.chunks_exact_mut(4).zip(acc).for_each(|(o, a)| {
                    finite &= a.is_finite();
                    o.copy_from_slice(&a.to_le_bytes());
                }),
            },
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
