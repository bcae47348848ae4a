//! Sentence embeddings as sentence-transformers computes them for all-MiniLM-L6-v2: the
//! mean of the token states over the attention mask, then (for retrieval) L2
//! normalization.

use lora_core::{Backend, Result, Tensor, Transpose};

use super::tokenizer::TokenBatch;

/// The `[batch, batch*seq]` averaging matrix: row `b` holds `mask / Σ mask` over sequence
/// `b`'s tokens. Mean pooling is then one GEMM forward and one backward.
fn pooling_matrix(batch: &TokenBatch) -> Vec<f32> {
    let (n, t) = (batch.batch, batch.seq_len);
    let mut m = vec![0.0f32; n * n * t];
    for s in 0..n {
        let mask = &batch.attention_mask[s * t..(s + 1) * t];
        // sentence-transformers clamps the count at 1e-9.
        let count = (mask.iter().filter(|&&v| v != 0).count() as f32).max(1e-9);
        for (j, &v) in mask.iter().enumerate() {
            if v != 0 {
                m[s * n * t + s * t + j] = 1.0 / count;
            }
        }
    }
    m
}

/// Mean pooling of `hidden` (`[batch, seq, h]`) over the attention mask: `[batch, h]`.
pub fn mean_pool<B: Backend>(b: &B, hidden: &B::Tensor, batch: &TokenBatch) -> Result<B::Tensor> {
    let (n, t) = (batch.batch, batch.seq_len);
    let h = hidden.shape().last();
    let m = b.from_host(&pooling_matrix(batch), &[n, n * t])?;
    let flat = b.reshape(hidden, &[n * t, h])?;
    let mut out = b.zeros(&[n, h])?;
    b.gemm(1.0, &m, Transpose::No, &flat, Transpose::No, 0.0, &mut out)?;
    Ok(out)
}

/// Backward of [`mean_pool`]: `d_hidden` (`[batch, seq, h]`) from `d_pooled` (`[batch, h]`).
pub fn mean_pool_backward<B: Backend>(
    b: &B,
    d_pooled: &B::Tensor,
    batch: &TokenBatch,
) -> Result<B::Tensor> {
    let (n, t) = (batch.batch, batch.seq_len);
    let h = d_pooled.shape().last();
    let m = b.from_host(&pooling_matrix(batch), &[n, n * t])?;
    let mut out = b.zeros(&[n * t, h])?;
    b.gemm(
        1.0,
        &m,
        Transpose::Yes,
        d_pooled,
        Transpose::No,
        0.0,
        &mut out,
    )?;
    b.reshape(&out, &[n, t, h])
}

/// L2-normalizes each row (host vectors), as `torch.nn.functional.normalize` (eps 1e-12).
pub fn l2_normalize(rows: &mut [f32], dim: usize) {
    for r in rows.chunks_mut(dim) {
        let norm = r.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        r.iter_mut().for_each(|v| *v /= norm);
    }
}
