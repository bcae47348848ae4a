//! Frozen weights below f32 on a decoder: loading with bf16/f16 storage (2 bytes per
//! parameter, the checkpoint's bits kept as they are), and QLoRA, the frozen weights of
//! every projection quantized at load to bitsandbytes' NF4/FP4 (with double quantization)
//! or LLM.int8, so that adapters train on the quantized base. Under QLoRA the embeddings
//! and `lm_head` stay in full precision, as transformers' `llm_int8_skip_modules` keeps them.

use std::path::Path;

use lora_core::{Linear, Model};
use lora_quant::{HalfType, QuantBackend, QuantConfig, QuantLinear, QuantizedWeight};

use super::config::DecoderConfig;
use super::model::DecoderModel;
use super::weights::{LinearWeight, Weights};
use crate::error::Result;

impl<B: QuantBackend> DecoderModel<B> {
    /// Loads a Hugging Face model directory as [`from_pretrained`](Self::from_pretrained)
    /// does, with every frozen linear weight (`lm_head` included) stored as `half`: a
    /// checkpoint saved in that type keeps its bits, read one tensor at a time, so no f32
    /// copy of them ever exists; products widen a block of rows at a time and accumulate
    /// in f32. Embeddings, norms and biases are rounded to `half` (as PyTorch's
    /// `model.to(dtype)`) and computed in f32. `None` loads in f32.
    pub fn from_pretrained_as(backend: &B, dir: &Path, half: Option<HalfType>) -> Result<Self> {
        let config = DecoderConfig::from_file(&dir.join("config.json"))?;
        let checkpoint = lora_io::Checkpoint::open(dir)?;
        let path = dir.display().to_string();
        let weights = Weights::from_checkpoint(&checkpoint, &path, half)?;
        Self::build(backend, config, weights, &stored_base::<B>)
    }

    /// Replaces the base of every projection but `lm_head` with its quantized version.
    /// Returns the resident bytes of the quantized weights and what they took in f32.
    /// Call before merging any adapter (merged weights cannot be re-based).
    pub fn quantize_base(&mut self, b: &B, config: &QuantConfig) -> Result<(usize, usize)> {
        config.validate()?;
        let head = self.output_head();
        let (mut quantized, mut dense) = (0usize, 0usize);
        for layer in self.linears_mut() {
            if Some(layer.name()) == head.as_deref() {
                continue;
            }
            let base = layer.base();
            let (out, inp) = (base.out_features(), base.in_features());
            let weight = base.weight(b)?;
            let bias = base.bias().cloned();
            let q = QuantLinear::quantize(b, &weight, bias, config)?;
            quantized += q.quantized().storage_bytes();
            dense += out * inp * 4;
            layer.replace_base(Box::new(q))?;
        }
        Ok((quantized, dense))
    }
}

/// A dense f32 base, or a half-precision one that widens per block inside the product.
fn stored_base<B: QuantBackend>(
    backend: &B,
    w: LinearWeight,
    bias: Option<B::Tensor>,
) -> Result<Box<dyn Linear<B>>> {
    Ok(match w {
        LinearWeight::F32(t) => {
            Box::new(lora_core::DenseLinear::new(t.into_backend(backend)?, bias)?)
        }
        LinearWeight::Half(h) => Box::new(QuantLinear::new(QuantizedWeight::Half(h), bias)?),
    })
}
