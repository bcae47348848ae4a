//! One forward step's tokens: the ids, positions and attention mask of `batch` rows of
//! new tokens after those already in the KV cache, and their checks against the config
//! (the causal + padding mask itself is `lora_core::ops::AttentionMask`).

use super::config::{DecoderConfig, RopeScaling};
use crate::error::{ModelError, Result};
use crate::token_batch::TokenBatch;

/// The tokens one forward computes: `batch` rows of `seq` new tokens after `past` cached
/// ones; `keep` is the attention mask of all `past + seq` tokens of each row.
#[derive(Debug)]
pub(crate) struct Step<'a> {
    pub batch: usize,
    pub seq: usize,
    pub ids: &'a [u32],
    pub keep: &'a [u32],
    pub positions: &'a [usize],
    pub past: usize,
}

/// Ids in the vocabulary, positions within the model's range, the window respected.
pub(crate) fn check_step(c: &DecoderConfig, step: &Step<'_>) -> Result<()> {
    let n = step.batch * step.seq;
    if step.ids.len() != n || step.positions.len() != n {
        return Err(ModelError::Input(format!(
            "{} ids and {} positions for {} rows of {} tokens",
            step.ids.len(),
            step.positions.len(),
            step.batch,
            step.seq
        )));
    }
    if let Some(&bad) = step.ids.iter().find(|&&id| id as usize >= c.vocab_size) {
        return Err(ModelError::Input(format!(
            "token id {bad} is outside the vocabulary (vocab_size {})",
            c.vocab_size
        )));
    }
    let max_pos = step.positions.iter().copied().max().unwrap_or(0);
    if max_pos >= c.max_position_embeddings
        && !matches!(c.rope_scaling, RopeScaling::Dynamic { .. })
    {
        return Err(ModelError::Input(format!(
            "a sequence of {} tokens exceeds max_position_embeddings {}",
            max_pos + 1,
            c.max_position_embeddings
        )));
    }
    let kv_len = step.past + step.seq;
    if let Some(w) = c.sliding_window.filter(|w| kv_len > *w) {
        return Err(ModelError::Input(format!(
            "a sequence of {kv_len} tokens is longer than sliding_window {w}; sliding-window attention is not implemented"
        )));
    }
    Ok(())
}

/// Each token's position: the number of real tokens before it in its row (so a
/// left-padded row starts at 0 at its first real token); padding gets 0.
pub fn positions(batch: &TokenBatch) -> Vec<usize> {
    let mut out = Vec::with_capacity(batch.ids.len());
    for row in batch.attention_mask.chunks(batch.seq_len.max(1)) {
        let mut seen = 0usize;
        for &m in row {
            out.push(if m != 0 { seen } else { 0 });
            seen += usize::from(m != 0);
        }
    }
    out
}
