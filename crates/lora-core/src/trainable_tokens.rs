//! Trainable tokens (PEFT's `TrainableTokensLayer`, `trainable_token_indices`): trained
//! rows that replace the listed rows of a frozen embedding table. The rows are the values
//! themselves (PEFT's `trainable_tokens_delta`, despite the name), starting as the table's.
//! The forward writes `trained - frozen` into the positions that hold a listed id, so the
//! table itself is never copied; a tied output head multiplies by a copy with the rows in
//! place and adds its share of their gradient.

use crate::backend::{Backend, Tensor, Transpose};
use crate::error::{Error, Result};
use crate::ops::DecoderOps;

/// Trained replacement rows for the listed token ids.
#[derive(Debug, Clone)]
pub(crate) struct TrainableTokens<T> {
    pub indices: Vec<usize>,
    pub rows: T,
    pub grad: Option<T>,
}

impl<T: Tensor> TrainableTokens<T> {
    /// Rows `indices` of `weight` (`[vocab, dim]`), checked: ids past the vocabulary,
    /// repeated ids and an empty list are errors naming `trainable_token_indices`.
    pub fn new<B: Backend<Tensor = T>>(
        backend: &B,
        weight: &T,
        indices: &[usize],
        context: &str,
    ) -> Result<Self> {
        let (vocab, _) = weight.shape().as_matrix();
        let field = "trainable_token_indices";
        if indices.is_empty() {
            return Err(Error::config(
                context,
                field,
                "[]",
                "list at least one token id",
            ));
        }
        if let Some(&bad) = indices.iter().find(|&&i| i >= vocab) {
            return Err(Error::config(
                context,
                field,
                bad,
                format!("token id past the vocabulary of {vocab}"),
            ));
        }
        let mut sorted = indices.to_vec();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::config(context, field, w[0], "token id listed twice"));
        }
        Ok(TrainableTokens {
            indices: indices.to_vec(),
            rows: backend.gather_rows(weight, indices)?,
            grad: None,
        })
    }

    /// `(position in the batch, position in the list)` of every id the rows replace.
    fn replaced(&self, ids: &[usize]) -> (Vec<usize>, Vec<usize>) {
        ids.iter()
            .enumerate()
            .filter_map(|(p, id)| self.indices.iter().position(|i| i == id).map(|j| (p, j)))
            .unzip()
    }

    /// Puts the trained rows into `out` (the table's rows of `ids`): `out[p] += trained -
    /// frozen` at the positions holding a listed id (positions are distinct).
    pub fn apply<B: Backend<Tensor = T>>(
        &self,
        backend: &B,
        out: &mut T,
        ids: &[usize],
    ) -> Result<()> {
        let (at, which) = self.replaced(ids);
        if !at.is_empty() {
            let mut delta = backend.gather_rows(&self.rows, &which)?;
            let frozen = backend.gather_rows(out, &at)?;
            backend.axpby(-1.0, &frozen, 1.0, &mut delta)?;
            backend.scatter_add_rows(out, &at, &delta)?;
        }
        Ok(())
    }

    /// A copy of `weight` with the trained rows in place (for a tied output head).
    pub fn head_weight<B: Backend<Tensor = T>>(&self, backend: &B, weight: &T) -> Result<T> {
        let mut w = weight.clone();
        let mut delta = self.rows.clone();
        let frozen = backend.gather_rows(weight, &self.indices)?;
        backend.axpby(-1.0, &frozen, 1.0, &mut delta)?;
        backend.scatter_add_rows(&mut w, &self.indices, &delta)?;
        Ok(w)
    }

    /// The rows' gradient from `d_kept`, the output gradient at the non-padding positions
    /// whose ids are `kept`.
    pub fn backward<B: Backend<Tensor = T> + DecoderOps>(
        &mut self,
        backend: &B,
        d_kept: &T,
        kept: &[usize],
    ) -> Result<()> {
        let (rows, which) = self.replaced(kept);
        self.grad = Some(match rows.is_empty() {
            true => backend.zeros(self.rows.shape().dims())?,
            false => {
                let d = backend.gather_rows(d_kept, &rows)?;
                backend.embedding_backward(&d, &which, self.indices.len())?
            }
        });
        Ok(())
    }

    /// Adds a tied head's share: it computed `logits = h · head_weightᵀ`, so row `j`
    /// gains `d_logits[:, idx_j]ᵀ h`. After [`TrainableTokens::backward`].
    pub fn tied_head_backward<B: Backend<Tensor = T>>(
        &mut self,
        backend: &B,
        d_logits: &T,
        h: &T,
        context: &str,
    ) -> Result<()> {
        let (n, _) = d_logits.shape().as_matrix();
        let mut cols = backend.zeros(&[n, self.indices.len()])?;
        for (j, &idx) in self.indices.iter().enumerate() {
            backend.assign_cols(&mut cols, j, &backend.slice_cols(d_logits, idx, 1)?)?;
        }
        let grad = self
            .grad
            .as_mut()
            .ok_or_else(|| Error::state(context, "tied head backward before the embedding's"))?;
        backend.gemm(1.0, &cols, Transpose::Yes, h, Transpose::No, 1.0, grad)
    }
}
