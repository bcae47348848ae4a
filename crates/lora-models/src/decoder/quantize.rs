//! QLoRA on a decoder: the frozen weights of every projection quantized at load to
//! bitsandbytes' NF4/FP4 (with double quantization) or LLM.int8, so that adapters train on
//! the quantized base. The embeddings and `lm_head` stay in full precision, as
//! transformers' `llm_int8_skip_modules` keeps them.

use lora_core::Model;
use lora_quant::{QuantBackend, QuantConfig, QuantLinear};

use super::model::DecoderModel;
use crate::error::Result;

impl<B: QuantBackend> DecoderModel<B> {
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
