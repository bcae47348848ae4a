//! What the backward does with the input gradient, a child module of `lora_linear`: add it
//! into a running sum (`acc += dL/dx`: where several layers read one input, attention's
//! query, key and value projections or a residual branch), or skip it where nothing needs
//! it (the first layer over frozen embeddings).

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

    /// The backward where nothing needs the input gradient (the projections of a model's
    /// first layer over frozen embeddings): the running adapters' gradients alone, without
    /// the base's `dy W` product, which PyTorch's autograd skips the same way for an input
    /// that does not require grad. A layer whose adapter cannot (DoRA, several adapters
    /// running) runs the full backward and drops the input gradient.
    pub fn backward_params(&mut self, backend: &B, dy: &B::Tensor) -> Result<()> {
        self.trainable_required()?;
        let x = self.take_saved_input()?;
        self.check_output_grad(&x, dy)?;
        if !self.adapters_run() {
            return Ok(());
        }
        let active = &self.active;
        let mut running = self.adapters.iter_mut().filter(|(n, _)| active.contains(n));
        if let (Some((_, adapter)), None) = (running.next(), running.next())
            && adapter.backward_params(backend, &x, dy)?
        {
            return Ok(());
        }
        self.backward_with_input(backend, &x, dy).map(drop)
    }
}
