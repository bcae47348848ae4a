//! Models as trees of named layers.

use std::collections::BTreeMap;

use crate::adapter::{Mode, ParamGrad};
use crate::backend::Backend;
use crate::backend::Tensor;
use crate::error::{Error, Result};
use crate::host_tensor::HostTensor;
use crate::lora_embedding::LoraEmbedding;
use crate::lora_linear::{LoraLinear, RowAdapter};
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

    /// Inference where row `i` of the batch uses adapter `rows[i]` (or the base alone) in
    /// every layer. Models whose rows are not independent through the network (attention
    /// mixes tokens of one sequence, so rows there are sequences) say how in their impl.
    fn forward_mixed(
        &mut self,
        backend: &B,
        x: &B::Tensor,
        rows: &[RowAdapter],
    ) -> Result<B::Tensor> {
        let _ = (backend, x, rows);
        Err(Error::state(
            "model",
            "mixed-adapter batches are not implemented for this model",
        ))
    }

    /// Every linear layer, in a fixed order.
    fn linears(&self) -> Vec<&LoraLinear<B>>;

    /// Every linear layer, mutably, in the same order.
    fn linears_mut(&mut self) -> Vec<&mut LoraLinear<B>>;

    /// Every embedding table that can carry LoRA or trainable tokens (PEFT's
    /// `lora.Embedding` / `trainable_token_indices`), in a fixed order. None by default.
    fn embeddings(&self) -> Vec<&LoraEmbedding<B>> {
        Vec::new()
    }

    /// The same embeddings, mutably.
    fn embeddings_mut(&mut self) -> Vec<&mut LoraEmbedding<B>> {
        Vec::new()
    }

    /// The dotted name of the input embedding (transformers' `get_input_embeddings`),
    /// which a list of `trainable_token_indices` applies to.
    fn input_embedding(&self) -> Option<String> {
        None
    }

    /// The dotted name of the model's output head (e.g. `lm_head`), which PEFT's
    /// `"all-linear"` leaves out. `None` when the model has none.
    fn output_head(&self) -> Option<String> {
        None
    }

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
        self.linears()
            .iter()
            .map(|l| l.num_trainable())
            .sum::<usize>()
            + self
                .embeddings()
                .iter()
                .map(|e| e.num_trainable())
                .sum::<usize>()
    }

    /// Every adapter parameter with its gradient, in a fixed order, for an optimizer.
    fn params_and_grads(&mut self) -> Vec<ParamGrad<'_, <B as Backend>::Tensor>> {
        // Both lists borrow `self` mutably, so they come from one call.
        let mut out: Vec<ParamGrad<'_, <B as Backend>::Tensor>> = Vec::new();
        let (linears, embeddings) = self.trainable_parts_mut();
        for l in linears {
            out.extend(l.params_and_grads());
        }
        for e in embeddings {
            out.extend(e.params_and_grads());
        }
        out
    }

    /// The linear layers and embeddings together, mutably (for [`Model::params_and_grads`]).
    /// Models with embeddings override it; the default has none.
    fn trainable_parts_mut(&mut self) -> (Vec<&mut LoraLinear<B>>, Vec<&mut LoraEmbedding<B>>) {
        (self.linears_mut(), Vec::new())
    }

    /// The base weights as a Hugging Face-style state dict: `<layer>.weight` and
    /// `<layer>.bias` for every linear layer (merged adapters included, unmerged not).
    fn state_dict(&self, backend: &B) -> Result<Vec<(String, HostTensor)>> {
        let mut out = Vec::new();
        for l in self.linears() {
            let w = l.base().weight(backend)?;
            out.push((
                format!("{}.weight", l.name()),
                HostTensor::from_backend(backend, &w)?,
            ));
            if let Some(b) = l.base().bias() {
                out.push((
                    format!("{}.bias", l.name()),
                    HostTensor::from_backend(backend, b)?,
                ));
            }
        }
        Ok(out)
    }

    /// Loads base weights from a state dict (see [`Model::state_dict`]). Every layer's
    /// weight and bias must be present with its shape; errors name the key.
    fn load_state_dict(
        &mut self,
        backend: &B,
        tensors: &BTreeMap<String, HostTensor>,
    ) -> Result<()> {
        for l in self.linears_mut() {
            let name = l.name().to_string();
            let dense = l
                .base_mut()
                .as_dense_mut()
                .ok_or_else(|| Error::state(&name, "loading weights needs a dense base"))?;
            let (w, b) = dense.params_mut();
            let key = format!("{name}.weight");
            let t = tensors
                .get(&key)
                .ok_or_else(|| Error::state("load_state_dict", format!("missing tensor {key}")))?;
            t.expect_shape(&format!("load_state_dict tensor {key}"), w.shape().dims())?;
            *w = t.to_backend(backend)?;
            if let Some(b) = b {
                let key = format!("{name}.bias");
                let t = tensors.get(&key).ok_or_else(|| {
                    Error::state("load_state_dict", format!("missing tensor {key}"))
                })?;
                t.expect_shape(&format!("load_state_dict tensor {key}"), b.shape().dims())?;
                *b = t.to_backend(backend)?;
            }
        }
        Ok(())
    }
}
