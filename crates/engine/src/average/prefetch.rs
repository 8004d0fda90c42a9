//! A reader thread that reads a tensor's file-backed inputs ahead of the arithmetic: it makes
//! the same positioned reads, in the same order (slab by slab, input by input), that a
//! one-thread [`Sweep`](super::kernel::Sweep) would make, into a small pool of slab buffers,
//! and hands each filled buffer over a channel; the sweep folds one buffer in while the next
//! ones are being read, so copying out of the page cache and the arithmetic overlap (measured
//! against the `pread` floor in docs/performance.md). The pool bounds both memory and how far
//! ahead it reads; inputs held in memory are not read here (the sweep reads them in place).
//! If the sweep stops (an error, a refused output), dropping its [`Feed`] ends the thread.

use std::ops::Range;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::Scope;

use super::kernel::{Fetch, Input, SLAB};
use crate::error::{Error, Result};
use sewa_checkpoint::TensorReader;

/// Slab buffers in flight: enough to absorb the jitter of a shared machine, small enough to
/// stay near the caches (8 × 256 KiB for f32 inputs).
const DEPTH: usize = 8;

/// The sweep's end: filled buffers in read order, and the way back for emptied ones.
pub(super) struct Feed {
    filled: Receiver<Result<Filled>>,
    emptied: SyncSender<Vec<u64>>,
    /// The buffer whose bytes the sweep is folding in; returned at the next fetch.
    held: Option<Vec<u64>>,
}

/// A filled buffer and what it holds: which reader (by address) and from which byte.
struct Filled {
    reader: usize,
    at: usize,
    buf: Vec<u64>,
}

/// Start the reader thread in `scope` for elements `0..n` of `inputs` (those not in memory),
/// slab by slab from element 0: the order a one-thread sweep of windows that are multiples of
/// [`SLAB`] fetches them in.
pub(super) fn start<'scope, 'env, A: Sync>(
    scope: &'scope Scope<'scope, 'env>,
    inputs: &'env [Input<'env, A>],
    n: usize,
    slab_bytes: usize,
) -> Feed {
    let (filled_tx, filled) = sync_channel(DEPTH);
    let (emptied, emptied_rx) = sync_channel::<Vec<u64>>(DEPTH);
    scope.spawn(move || {
        let mut pool: Vec<Vec<u64>> =
            (0..DEPTH).map(|_| vec![0u64; slab_bytes.div_ceil(8)]).collect();
        let files: Vec<&Input<'_, A>> =
            inputs.iter().filter(|i| i.reader.in_memory().is_none()).collect();
        for lo in (0..n).step_by(SLAB) {
            let hi = n.min(lo + SLAB);
            for input in &files {
                // Wait for an emptied buffer; a closed channel means the sweep stopped.
                let Some(mut buf) = pool.pop().or_else(|| emptied_rx.recv().ok()) else { return };
                let size = input.dtype.size();
                let bytes = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut buf)[..(hi - lo) * size];
                let read = input.reader.read_into(lo * size, bytes).map_err(Error::from);
                let failed = read.is_err();
                let reader = &input.reader as *const TensorReader<'_> as usize;
                let filled = read.map(|()| Filled { reader, at: lo * size, buf });
                if filled_tx.send(filled).is_err() || failed {
                    return;
                }
            }
        }
    });
    Feed { filled, emptied, held: None }
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
        if let Some(done) = self.held.take() {
            // The reader may have stopped (it read every slab); a lost buffer costs nothing.
            let _ = self.emptied.send(done);
        }
        let filled = self.filled.recv().map_err(|_| {
            Error::Internal("the kernel's reader thread stopped before the last slab".into())
        })??;
        // The sweep and the reader walk the same order; a mismatch is a bug, never data.
        let reader = input as *const TensorReader<'_> as usize;
        if (filled.reader, filled.at) != (reader, range.start) {
            return Err(Error::Internal(format!(
                "the kernel's reader thread read byte {} where the sweep wanted {}",
                filled.at, range.start
            )));
        }
        let bytes = bytemuck::cast_slice::<u64, u8>(self.held.insert(filled.buf));
        bytes.get(..range.len()).ok_or_else(|| out_of_range(&range, bytes.len()))
    }
}

/// A range the caller asked for that the bytes cannot hold: a bug, reported, not a panic.
fn out_of_range(range: &Range<usize>, len: usize) -> Error {
    Error::Internal(format!("kernel read {range:?} beyond the {len} bytes at hand"))
}
