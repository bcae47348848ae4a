//! The input gradient added into a running sum (`acc += dL/dx`), a child module of
//! `lora_linear`: where several layers read one input (attention's query, key and value
//! projections, a residual branch), their input gradients are summed.

use super::LoraLinear;
use crate::backend::Tensor;
use crate::error::{Error, Result};
use crate::ops::LoraOps;

impl<B: LoraOps> LoraLinear<B> {
    /// [`backward`](Self::backward), adding the input gradient into `acc` (shaped like
    /// the forward's input) instead of returning it. With no adapter running, the base
    /// adds it ([`Linear::backward_add`](crate::Linear::backward_add): a dense base
    /// inside its product, `beta = 1`, which saves the separate add's pass over `acc`);
    /// otherwise this is the backward, then the add.
    pub fn backward_accumulate(
        &mut self,
        backend: &B,
        dy: &B::Tensor,
        acc: &mut B::Tensor,
    ) -> Result<()> {
        if self.adapters_run() {
            let dx = self.backward(backend, dy)?;
            return backend.axpby(1.0, &dx, 1.0, acc);
        }
        self.trainable_required()?;
        let x = self.take_saved_input()?;
        self.check_output_grad(&x, dy)?;
        if acc.shape() != x.shape() {
            return Err(Error::shape(
                format!("{} input gradient sum", self.name),
                format!("{}", x.shape()),
                acc.shape(),
            ));
        }
        self.base.backward_add(backend, dy, acc)
    }
}
