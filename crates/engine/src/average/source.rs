//! What the publisher consumes: output tensors by index ([`TensorSource`]), whole or in pieces,
//! and the streamed average of a plan as one ([`PlanSource`]); the daemon's running average is
//! the other.

use super::{AveragePlan, Workspace};
use crate::error::Result;
use sewa_checkpoint::TensorMeta;

/// Output tensors by index: the streaming average of an [`AveragePlan`], or any other producer
/// (the daemon's running average) that wants the same atomic publication.
pub trait TensorSource {
    /// Output tensors (name, dtype, shape), sorted by name.
    fn tensors(&self) -> &[TensorMeta];
    /// Little-endian bytes of tensor `index`, valid until the next call.
    fn tensor_bytes(&mut self, index: usize) -> Result<&[u8]>;
    /// The same bytes handed to `sink` in order, in pieces, so a producer that can need not
    /// hold the whole tensor (the publisher writes this way); by default, in one piece.
    fn write_tensor(
        &mut self,
        index: usize,
        sink: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let bytes = self.tensor_bytes(index)?;
        sink(bytes)
    }
}

/// An [`AveragePlan`] as a [`TensorSource`], with its reused workspace: written a window at a
/// time ([`AveragePlan::stream_tensor`]), so publishing holds no tensor-sized buffer.
pub struct PlanSource<'p, 'a> {
    plan: &'p AveragePlan<'a>,
    ws: Workspace,
}

impl<'p, 'a> PlanSource<'p, 'a> {
    pub fn new(plan: &'p AveragePlan<'a>) -> Self {
        PlanSource { plan, ws: Workspace::default() }
    }
}

impl TensorSource for PlanSource<'_, '_> {
    fn tensors(&self) -> &[TensorMeta] {
        self.plan.outputs()
    }
    fn tensor_bytes(&mut self, index: usize) -> Result<&[u8]> {
        self.plan.average_tensor(index, &mut self.ws)
    }
    fn write_tensor(
        &mut self,
        index: usize,
        sink: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        self.plan.stream_tensor(index, &mut self.ws, sink)
    }
}
