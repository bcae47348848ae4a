//! The input gradient added into a running sum (`acc += dL/dx`), a child module of
//! `lora_linear`: where several layers read one input (attention's query, key and value
//! projections, a residual branch), their input gradients are summed.

use super::LoraLinear;
use crate::backend::{Tensor, Transpose};
use crate::error::{Error, Result};
use crate::ops::LoraOps;

impl<B: LoraOps> LoraLinear<B> {
    /// [`backward`](Self::backward), adding the input gradient into `acc` (shaped like
    /// the forward's input) instead of returning it. A frozen dense layer with no adapter
    /// running accumulates inside its product (`acc = dy W + acc`, one GEMM with
    /// `beta = 1`), which saves the separate add's pass over `acc`; otherwise this is the
    /// backward followed by that add.
    pub fn backward_accumulate(
        &mut self,
        backend: &B,
        dy: &B::Tensor,
        acc: &mut B::Tensor,
    ) -> Result<()> {
        if self.adapters_run() || self.base.as_dense().is_none() {
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
        let Some(dense) = self.base.as_dense() else {
            return Err(Error::state(&self.name, "the base is no longer dense"));
        };
        let w = dense.weight_for_input_grad(dy)?;
        backend.gemm(1.0, dy, Transpose::No, w, Transpose::No, 1.0, acc)
    }
}
