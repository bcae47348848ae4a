//! Models as trees of named layers.

use crate::adapter::{Mode, ParamGrad};
use crate::backend::Backend;
use crate::error::Result;
use crate::lora_linear::LoraLinear;
use crate::ops::LoraOps;

/// A model made of named [`LoraLinear`] layers (plus whatever else it needs between them).
///
/// Exposing the linear layers by dotted name is what lets PEFT's `target_modules` rules
/// find injection points and what gives adapter files their keys.
pub trait Model<B: LoraOps> {
    /// Forward pass over a batch.
    fn forward(&mut self, backend: &B, x: &B::Tensor, mode: Mode) -> Result<B::Tensor>;

    /// Backward from the output gradient; leaves adapter gradients in the layers.
    fn backward(&mut self, backend: &B, dy: &B::Tensor) -> Result<()>;

    /// Every linear layer, in a fixed order.
    fn linears(&self) -> Vec<&LoraLinear<B>>;

    /// Every linear layer, mutably, in the same order.
    fn linears_mut(&mut self) -> Vec<&mut LoraLinear<B>>;

    /// Dotted names of all linear layers.
    fn linear_names(&self) -> Vec<String> {
        self.linears()
            .iter()
            .map(|l| l.name().to_string())
            .collect()
    }

    /// All parameters of the model, frozen and trainable.
    fn num_parameters(&self) -> usize {
        self.linears()
            .iter()
            .map(|l| l.base().num_parameters() + l.num_trainable())
            .sum()
    }

    /// Trainable (adapter) parameters.
    fn num_trainable(&self) -> usize {
        self.linears().iter().map(|l| l.num_trainable()).sum()
    }

    /// Every adapter parameter with its gradient, in a fixed order, for an optimizer.
    fn params_and_grads(&mut self) -> Vec<ParamGrad<'_, <B as Backend>::Tensor>> {
        self.linears_mut()
            .into_iter()
            .flat_map(|l| l.params_and_grads())
            .collect()
    }
}
