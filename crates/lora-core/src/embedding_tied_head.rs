//! An output head tied to the embedding table (`tie_word_embeddings`): `logits = h · Wᵀ`,
//! with a trainable-tokens adapter's rows in place of the table's (LoRA does not reach a
//! tied head, as in PEFT), and its backward, which hands the rows' share of the gradient
//! to [`LoraEmbedding::backward`]. The table is never copied.

use super::{EmbeddingAdapter, LoraEmbedding};
use crate::backend::{Tensor, Transpose};
use crate::error::{Error, Result};
use crate::ops::LoraOps;

impl<B: LoraOps> LoraEmbedding<B> {
    /// Whether trained token rows are active (not merged): a tied output head then reads
    /// them, and its backward needs its input.
    pub fn has_trainable_tokens(&self) -> bool {
        self.merged.is_none() && self.tokens().is_some()
    }

    /// The logits of an output head tied to this embedding, `h · Wᵀ` (`[rows of h,
    /// vocab]`), with the trained token rows in place of the table's (LoRA does not reach
    /// a tied head, as in PEFT). The table is never copied.
    pub fn head_logits(&self, backend: &B, h: &B::Tensor) -> Result<B::Tensor> {
        let (n, _) = h.shape().as_matrix();
        let (vocab, _) = self.vocab_dim();
        let mut logits = backend.matmul(
            1.0,
            (h, Transpose::No),
            (&self.weight, Transpose::Yes),
            &[n, vocab],
        )?;
        if let Some(t) = self.tokens().filter(|_| self.merged.is_none()) {
            t.head_logits(backend, &mut logits, h)?;
        }
        Ok(logits)
    }

    /// The backward of [`LoraEmbedding::head_logits`]: the gradient of `h`. With trained
    /// tokens, `h` (the head's input) is required and the rows' share of the gradient is
    /// kept for [`LoraEmbedding::backward`], which must follow.
    pub fn head_backward(
        &mut self,
        backend: &B,
        d_logits: &B::Tensor,
        h: Option<&B::Tensor>,
    ) -> Result<B::Tensor> {
        let (n, _) = d_logits.shape().as_matrix();
        let (_, dim) = self.vocab_dim();
        let mut d_h = backend.matmul(
            1.0,
            (d_logits, Transpose::No),
            (&self.weight, Transpose::No),
            &[n, dim],
        )?;
        if self.merged.is_some() {
            return Ok(d_h);
        }
        let (name, weight) = (&self.name, &self.weight);
        let tokens = self.adapters.iter_mut().find_map(|(_, a)| match a {
            EmbeddingAdapter::Tokens(t) => Some(t),
            _ => None,
        });
        if let Some(t) = tokens {
            let h = h.ok_or_else(|| {
                Error::state(
                    name,
                    "the tied head's backward needs its input with trained tokens",
                )
            })?;
            t.head_backward(backend, weight, d_logits, h, &mut d_h)?;
        }
        Ok(d_h)
    }
}
