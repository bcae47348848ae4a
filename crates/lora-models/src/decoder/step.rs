//! One forward step's tokens: the ids, positions and attention mask of `batch` rows of
//! new tokens after those already in the KV cache, their checks against the config, and
//! the additive attention mask they imply.

use super::config::{DecoderConfig, RopeScaling};
use crate::error::{ModelError, Result};
use crate::token_batch::TokenBatch;

/// Added to the attention scores of positions a query must not see. Finite, so that a
/// fully masked row (a left-padding query) gives a uniform distribution, not NaN.
const MASKED: f32 = -1e30;

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

/// The additive mask `[batch * heads * seq, past + seq]` (causal and padding; sequences
/// longer than a sliding window were refused by `check_step`) and, per query row, 1 where
/// it sees some key and 0 where it sees none.
pub(crate) fn attention_mask(step: &Step<'_>, heads: usize) -> (Vec<f32>, Vec<f32>) {
    let (t, past) = (step.seq, step.past);
    let kv = past + t;
    let mut mask = Vec::with_capacity(step.batch * heads * t * kv);
    let mut keep_rows = Vec::with_capacity(step.batch * heads * t);
    let mut block = vec![MASKED; t * kv];
    let mut block_keep = vec![1.0f32; t];
    for bi in 0..step.batch {
        let keep = &step.keep[bi * kv..(bi + 1) * kv];
        for q in 0..t {
            let qa = past + q;
            let row = &mut block[q * kv..(q + 1) * kv];
            for (k, slot) in row.iter_mut().enumerate() {
                let visible = k <= qa && keep[k] != 0;
                *slot = if visible { 0.0 } else { MASKED };
            }
            // A query that may see nothing (left padding) gets an attention output of
            // zero, as PyTorch's SDPA gives for a fully masked row: it reaches no real
            // token, but it enters the loss where the label after it is a real token.
            block_keep[q] = if row.iter().all(|&m| m == MASKED) {
                0.0
            } else {
                1.0
            };
        }
        for _ in 0..heads {
            mask.extend_from_slice(&block);
            keep_rows.extend_from_slice(&block_keep);
        }
    }
    (mask, keep_rows)
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
