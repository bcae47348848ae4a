//! Merging an embedding's adapter into its table and undoing it, as PEFT's
//! `lora.Embedding.merge` / `unmerge` and `TrainableTokensLayer.merge` / `unmerge`:
//!
//! * LoRA: `W += s·(B A)ᵀ`; unmerge subtracts it again.
//! * DoRA: `W ← (m / ‖W + s·(BA)ᵀ‖) ⊙ (W + s·(BA)ᵀ)` per column, the norm taken on the
//!   unmerged table and kept for the unmerge (`W ← W / gain - s·(BA)ᵀ`).
//! * Trainable tokens: the listed rows replaced; the originals kept for the unmerge.
//!
//! While merged, the forward is a plain lookup and training is refused.

use super::{EmbeddingAdapter, LoraEmbedding};
use crate::backend::{Tensor, Transpose};
use crate::embedding_dora;
use crate::error::{Error, Result};
use crate::ops::LoraOps;

/// What a merge changed, to undo it.
#[derive(Debug)]
pub(super) enum Merged<T> {
    /// LoRA (and DoRA's per-column gain, `None` for plain LoRA).
    Lora(Option<T>),
    /// The table's rows the trained tokens replaced.
    Tokens(T),
}

impl<B: LoraOps> LoraEmbedding<B> {
    /// Whether an adapter is merged into the table.
    pub fn is_merged(&self) -> bool {
        self.merged.is_some()
    }

    /// `s·(B A)ᵀ` of a LoRA adapter, `[vocab, dim]`.
    fn lora_delta(backend: &B, a_t: &B::Tensor, b: &B::Tensor, scaling: f32) -> Result<B::Tensor> {
        let (vocab, _) = a_t.shape().as_matrix();
        let (dim, _) = b.shape().as_matrix();
        backend.matmul(
            scaling,
            (a_t, Transpose::No),
            (b, Transpose::Yes),
            &[vocab, dim],
        )
    }

    /// Merges the embedding's adapter (it carries at most one kind) into the table.
    pub fn merge(&mut self, backend: &B) -> Result<()> {
        if self.merged.is_some() {
            return Err(Error::state(&self.name, "already merged; unmerge first"));
        }
        let (_, adapter) = match self.adapters.as_slice() {
            [one] => one,
            [] => return Ok(()),
            _ => {
                return Err(Error::state(
                    &self.name,
                    "merging several adapters of an embedding is not implemented",
                ));
            }
        };
        self.merged = Some(match adapter {
            EmbeddingAdapter::Lora(l) => {
                let delta = Self::lora_delta(backend, &l.a_t, &l.b, l.scaling)?;
                let gain = match &l.dora {
                    None => None,
                    Some(d) => {
                        let mut col_sq = d.col_sq.clone();
                        let norm = embedding_dora::column_norms(
                            backend,
                            &self.weight,
                            &l.a_t,
                            &l.b,
                            l.scaling,
                            &mut col_sq,
                        )?;
                        Some(embedding_dora::gain(backend, &d.magnitude, &norm)?)
                    }
                };
                backend.axpby(1.0, &delta, 1.0, &mut self.weight)?;
                if let Some(g) = &gain {
                    self.weight = backend.scale_features(&self.weight, g)?;
                }
                Merged::Lora(gain)
            }
            EmbeddingAdapter::Tokens(t) => {
                let original = backend.gather_rows(&self.weight, &t.indices)?;
                self.weight = t.with_rows(backend, &self.weight)?;
                Merged::Tokens(original)
            }
        });
        Ok(())
    }

    /// Undoes [`LoraEmbedding::merge`].
    pub fn unmerge(&mut self, backend: &B) -> Result<()> {
        let Some(merged) = self.merged.take() else {
            return Ok(());
        };
        let Some((_, adapter)) = self.adapters.first() else {
            return Err(Error::state(&self.name, "the merged adapter was removed"));
        };
        match (adapter, merged) {
            (EmbeddingAdapter::Lora(l), Merged::Lora(gain)) => {
                if let Some(g) = gain {
                    let inv: Vec<f32> = backend.to_host(&g)?.iter().map(|v| 1.0 / v).collect();
                    let inv = backend.from_host_vec(inv, g.shape().dims())?;
                    self.weight = backend.scale_features(&self.weight, &inv)?;
                }
                let delta = Self::lora_delta(backend, &l.a_t, &l.b, l.scaling)?;
                backend.axpby(-1.0, &delta, 1.0, &mut self.weight)?;
            }
            (EmbeddingAdapter::Tokens(t), Merged::Tokens(original)) => {
                let mut w = self.weight.clone();
                let current = backend.gather_rows(&w, &t.indices)?;
                let mut back = original;
                backend.axpby(-1.0, &current, 1.0, &mut back)?;
                backend.scatter_add_rows(&mut w, &t.indices, &back)?;
                self.weight = w;
            }
            _ => return Err(Error::state(&self.name, "the merged adapter was replaced")),
        }
        Ok(())
    }

    /// Merges and removes the adapters: a plain table (PEFT's `merge_and_unload`).
    pub fn merge_and_unload(&mut self, backend: &B) -> Result<()> {
        if self.merged.is_none() {
            self.merge(backend)?;
        }
        self.adapters.clear();
        self.merged = None;
        Ok(())
    }
}
