//! BERT's embeddings: `LayerNorm(word[x] + position[p] + token_type[t])`. The word table is
//! a [`LoraEmbedding`] (`embeddings.word_embeddings`), so PEFT's `target_modules` can put
//! LoRA on it and `trainable_token_indices` can train rows of it (it is the input
//! embedding); the other tables and the norm stay frozen. With adapters attached, a
//! training forward keeps the sum and the norm's statistics for the backward.

use lora_core::{BinaryOp, DecoderOps, LoraEmbedding, LoraOps, Mode, Tensor};

use super::config::BertConfig;
use crate::error::{ModelError, Result};
use crate::token_batch::TokenBatch;

/// A LayerNorm's frozen parameters.
#[derive(Debug)]
pub(crate) struct Norm<T> {
    pub gamma: T,
    pub beta: T,
}

/// The embedding tables.
#[derive(Debug)]
pub(crate) struct Embeddings<B: LoraOps> {
    pub word: LoraEmbedding<B>,
    pub position: B::Tensor,
    pub token_type: B::Tensor,
    pub norm: Norm<B::Tensor>,
    /// From a training forward with adapters on `word`: the sum and the norm's statistics.
    pub saved: Option<(B::Tensor, B::Tensor)>,
}

impl<B: LoraOps + DecoderOps> Embeddings<B> {
    /// The embedding sum and its LayerNorm, `[B*T, H]`; token ids and types are checked
    /// against the config.
    pub fn forward(
        &mut self,
        b: &B,
        c: &BertConfig,
        batch: &TokenBatch,
        mode: Mode,
    ) -> Result<B::Tensor> {
        if batch.seq_len > c.max_position_embeddings {
            return Err(ModelError::Input(format!(
                "sequences of {} tokens exceed max_position_embeddings {}",
                batch.seq_len, c.max_position_embeddings
            )));
        }
        let ids: Vec<usize> = batch.ids.iter().map(|&i| i as usize).collect();
        if let Some(bad) = ids.iter().find(|&&i| i >= c.vocab_size) {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary ({} tokens)",
                c.vocab_size
            )));
        }
        let types: Vec<usize> = batch.token_type_ids.iter().map(|&i| i as usize).collect();
        if let Some(bad) = types.iter().find(|&&i| i >= c.type_vocab_size) {
            return Err(ModelError::Input(format!(
                "token type {bad} is outside type_vocab_size {}",
                c.type_vocab_size
            )));
        }
        let positions: Vec<usize> = (0..batch.batch).flat_map(|_| 0..batch.seq_len).collect();
        let sum = b.binary(
            BinaryOp::Add,
            &self.word.forward(b, &ids, mode)?,
            &b.gather_rows(&self.position, &positions)?,
        )?;
        let sum = b.binary(
            BinaryOp::Add,
            &sum,
            &b.gather_rows(&self.token_type, &types)?,
        )?;
        let (y, stats) = b.layer_norm(
            &sum,
            &self.norm.gamma,
            &self.norm.beta,
            c.layer_norm_eps as f32,
        )?;
        self.saved = (mode == Mode::Train && self.word.has_adapters()).then_some((sum, stats));
        Ok(y)
    }

    /// Whether the backward needs the gradient of the embeddings' output: only when the
    /// word table has adapters (the last training forward then kept what their backward
    /// reads). Without, the first layer skips its input gradient.
    pub fn needs_output_grad(&self) -> bool {
        self.saved.is_some()
    }

    /// Backward from the gradient of the embeddings' output (the first layer's input):
    /// through the norm into the word table's adapters. Nothing to do without adapters.
    pub fn backward(&mut self, b: &B, d_out: &B::Tensor) -> Result<()> {
        let Some((sum, stats)) = self.saved.take() else {
            return Ok(());
        };
        let d_sum = b.layer_norm_backward(&sum, &stats, &self.norm.gamma, d_out)?;
        Ok(self.word.backward(b, &d_sum)?)
    }

    /// Frozen parameters of the tables and the norm.
    pub fn num_parameters(&self) -> usize {
        self.word.weight().numel()
            + self.word.num_trainable()
            + self.position.numel()
            + self.token_type.numel()
            + self.norm.gamma.numel()
            + self.norm.beta.numel()
    }
}
