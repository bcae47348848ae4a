//! BERT with its frozen weights at 2 bytes (`--dtype bf16|f16`): every tensor rounded to
//! the half type as PyTorch's `model.to(dtype)` rounds it (exact for a checkpoint saved in
//! that type), the linear layers then stored in it and widened per block inside each
//! product; embeddings and LayerNorms keep the rounded values in f32.

use std::path::Path;

use lora_core::Model;
use lora_quant::{HalfType, QuantBackend, store_frozen_as};

use super::config::BertConfig;
use super::model::BertModel;
use crate::error::Result;

impl<B: QuantBackend> BertModel<B> {
    /// Loads a model directory as [`from_pretrained`](Self::from_pretrained) does, with the
    /// weights stored as `half` (`None`: f32).
    pub fn from_pretrained_as(backend: &B, dir: &Path, half: Option<HalfType>) -> Result<Self> {
        let Some(h) = half else {
            return Self::from_pretrained(backend, dir);
        };
        let config = BertConfig::from_file(&dir.join("config.json"))?;
        let mut tensors = lora_io::read_checkpoint_f32(dir)?;
        for t in tensors.values_mut() {
            h.round_in_place(&mut t.data);
        }
        let mut model =
            Self::from_state_dict(backend, config, tensors, &dir.display().to_string())?;
        store_frozen_as(backend, model.linears_mut(), h)?;
        Ok(model)
    }
}
