//! A reader thread that reads a tensor's file-backed inputs ahead of the arithmetic: it makes
//! the same positioned reads, in the same order (slab by slab, input by input), that a
//! one-thread [`Sweep`](super::kernel::Sweep) would make, into a small pool of 2 MiB buffers,
//! and hands each filled buffer (a batch of reads) over a channel; the sweep folds one batch
//! in while the next is being read, so copying out of the page cache and the arithmetic can
//! overlap. Opt-in (`AveragePlan::with_read_ahead`; `sewa average` asks for it when it may use
//! two CPUs): it needs an idle core. With one it took the f32 kernel from 62–77 % of the
//! `pread` floor to 92–108 %; on a machine busy with other builds it cost more than it saved
//! for few inputs (docs/performance.md).
//! The pool bounds both memory and how far ahead it reads; inputs held in memory are not read
//! here (the sweep reads them in place). If the sweep stops (an error, a refused output),
//! dropping its [`Feed`] ends the thread.

use std::ops::Range;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::Scope;

use super::kernel::{Fetch, Input, SLAB};
use crate::error::{Error, Result};
use sewa_checkpoint::TensorReader;

/// Bytes handed over at a time: consecutive slab reads (each still one `pread` of at most a
/// slab) batched, so that the two threads meet once per 2 MiB, not once per slab: on a busy
/// machine every meeting can cost a wake-up that waits for a core.
const BATCH: usize = 2 << 20;
/// Batches in flight: one being folded in, one ready, one being read.
const DEPTH: usize = 3;

/// The sweep's end: filled batches in read order, and the way back for emptied buffers.
pub(super) struct Feed {
    filled: Receiver<Result<Batch>>,
    emptied: SyncSender<Vec<u64>>,
    /// The batch being folded in, and its next piece; its buffer goes back when it is done.
    current: Option<Batch>,
    next: usize,
}

/// Consecutive reads in one buffer.
struct Batch {
    buf: Vec<u64>,
    pieces: Vec<Piece>,
}

/// One read of a batch: which reader (by address), from which byte of its tensor, how many
/// bytes, and where they start in the batch (8-byte aligned, for the kernel's fast paths).
struct Piece {
    reader: usize,
    at: usize,
    len: usize,
    start: usize,
}

/// Start the reader thread in `scope` for elements `0..n` of `inputs` (those not in memory),
/// slab by slab from element 0: the order a one-thread sweep of windows that are multiples of
/// [`SLAB`] fetches them in. `slab_bytes` is the largest read.
pub(super) fn start<'scope, 'env, A: Sync>(
    scope: &'scope Scope<'scope, 'env>,
    inputs: &'env [Input<'env, A>],
    n: usize,
    slab_bytes: usize,
) -> Feed {
    let (filled_tx, filled) = sync_channel(DEPTH);
    let (emptied, emptied_rx) = sync_channel::<Vec<u64>>(DEPTH);
    scope.spawn(move || {
        let words = BATCH.max(slab_bytes).div_ceil(8);
        let mut pool: Vec<Vec<u64>> = (0..DEPTH).map(|_| vec![0u64; words]).collect();
        let files: Vec<&Input<'_, A>> =
            inputs.iter().filter(|i| i.reader.in_memory().is_none()).collect();
        let mut batch: Option<(Batch, usize)> = None; // and its words used
        for lo in (0..n).step_by(SLAB) {
            let hi = n.min(lo + SLAB);
            for input in &files {
                let size = input.dtype.size();
                let len = (hi - lo) * size;
                if let Some((full, _)) = batch.take_if(|(_, used)| *used + len.div_ceil(8) > words)
                    && filled_tx.send(Ok(full)).is_err()
                {
                    return; // the sweep stopped
                }
                if batch.is_none() {
                    // Wait for an emptied buffer; a closed channel means the sweep stopped.
                    let Some(buf) = pool.pop().or_else(|| emptied_rx.recv().ok()) else { return };
                    batch = Some((Batch { buf, pieces: Vec::new() }, 0));
                }
                let Some((b, used)) = batch.as_mut() else { return };
                let start = *used * 8;
                let bytes =
                    &mut bytemuck::cast_slice_mut::<u64, u8>(&mut b.buf)[start..start + len];
                if let Err(e) = input.reader.read_into(lo * size, bytes) {
                    let _ = filled_tx.send(Err(e.into()));
                    return;
                }
                let reader = &input.reader as *const TensorReader<'_> as usize;
                b.pieces.push(Piece { reader, at: lo * size, len, start });
                *used += len.div_ceil(8);
            }
        }
        if let Some((last, _)) = batch {
            let _ = filled_tx.send(Ok(last));
        }
    });
    Feed { filled, emptied, current: None, next: 0 }
}

impl Fetch for Feed {
    fn fetch<'s>(
        &'s mut self,
        input: &'s TensorReader<'_>,
        range: Range<usize>,
    ) -> Result<&'s [u8]> {
        if let Some(b) = input.in_memory() {
            return b.get(range.clone()).ok_or_else(|| out_of_range(&range, b.len()));
        }
        while self.current.as_ref().is_none_or(|b| self.next >= b.pieces.len()) {
            if let Some(done) = self.current.take() {
                // The reader may have stopped (it read every slab); a lost buffer costs nothing.
                let _ = self.emptied.send(done.buf);
            }
            let batch = self.filled.recv().map_err(|_| {
                Error::Internal("the kernel's reader thread stopped before the last slab".into())
            })??;
            (self.current, self.next) = (Some(batch), 0);
        }
        let batch = self.current.as_ref();
        let Some((batch, piece)) = batch.and_then(|b| Some((b, b.pieces.get(self.next)?))) else {
            return Err(Error::Internal("the kernel's reader thread sent an empty batch".into()));
        };
        self.next += 1;
        // The sweep and the reader walk the same order; a mismatch is a bug, never data.
        let reader = input as *const TensorReader<'_> as usize;
        if (piece.reader, piece.at, piece.len) != (reader, range.start, range.len()) {
            return Err(Error::Internal(format!(
                "the kernel's reader thread read bytes {}..{} where the sweep wanted {range:?}",
                piece.at,
                piece.at + piece.len
            )));
        }
        let bytes = bytemuck::cast_slice::<u64, u8>(&batch.buf);
        Ok(&bytes[piece.start..piece.start + piece.len])
    }
}

/// A range the caller asked for that the bytes cannot hold: a bug, reported, not a panic.
fn out_of_range(range: &Range<usize>, len: usize) -> Error {
    Error::Internal(format!("kernel read {range:?} beyond the {len} bytes at hand"))
}
