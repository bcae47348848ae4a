//! Trainable tokens (PEFT's `TrainableTokensLayer`, `trainable_token_indices`): trained
//! rows that replace the listed rows of a frozen embedding table. The rows are the values
//! themselves (PEFT's `trainable_tokens_delta`, despite the name), starting as the table's.
//! The forward writes `trained - frozen` into the positions that hold a listed id, and a
//! tied output head overwrites the listed columns of its logits, so the table itself is
//! never copied; the head's share of the rows' gradient is kept until the embedding's
//! backward adds it.

use crate::backend::{Backend, Tensor, Transpose};
use crate::error::{Error, Result};
use crate::ops::DecoderOps;

/// Trained replacement rows for the listed token ids.
#[derive(Debug, Clone)]
pub(crate) struct TrainableTokens<T> {
    pub indices: Vec<usize>,
    pub rows: T,
    pub grad: Option<T>,
    /// A tied output head's share of the rows' gradient, from the head's backward (which
    /// runs before the embedding's).
    pub head_grad: Option<T>,
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
            head_grad: None,
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

    /// A copy of `weight` with the trained rows in place (merging).
    pub fn with_rows<B: Backend<Tensor = T>>(&self, backend: &B, weight: &T) -> Result<T> {
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
        let mut grad = match rows.is_empty() {
            true => backend.zeros(self.rows.shape().dims())?,
            false => {
                let d = backend.gather_rows(d_kept, &rows)?;
                backend.embedding_backward(&d, &which, self.indices.len())?
            }
        };
        if let Some(head) = self.head_grad.take() {
            backend.axpby(1.0, &head, 1.0, &mut grad)?;
        }
        self.grad = Some(grad);
        Ok(())
    }

    /// Columns `indices` of `m` (`[n, vocab]`), as `[n, indices.len()]`.
    fn columns<B: Backend<Tensor = T>>(&self, backend: &B, m: &T) -> Result<T> {
        let (n, _) = m.shape().as_matrix();
        let mut cols = backend.zeros(&[n, self.indices.len()])?;
        for (j, &idx) in self.indices.iter().enumerate() {
            backend.assign_cols(&mut cols, j, &backend.slice_cols(m, idx, 1)?)?;
        }
        Ok(cols)
    }

    /// A tied head's logits `h · weightᵀ` corrected for the trained rows: column `idx_j`
    /// becomes `h · rows_jᵀ`.
    pub fn head_logits<B: Backend<Tensor = T>>(
        &self,
        backend: &B,
        logits: &mut T,
        h: &T,
    ) -> Result<()> {
        let (n, _) = h.shape().as_matrix();
        let cols = backend.matmul(
            1.0,
            (h, Transpose::No),
            (&self.rows, Transpose::Yes),
            &[n, self.indices.len()],
        )?;
        for (j, &idx) in self.indices.iter().enumerate() {
            backend.assign_cols(logits, idx, &backend.slice_cols(&cols, j, 1)?)?;
        }
        Ok(())
    }

    /// The tied head's backward for the trained rows: `d_h` (already `d_logits · weight`)
    /// gains `d_logits[:, idx] (rows - weight[idx])`, and the rows' head share
    /// `d_logits[:, idx]ᵀ h` is kept for [`TrainableTokens::backward`].
    pub fn head_backward<B: Backend<Tensor = T>>(
        &mut self,
        backend: &B,
        weight: &T,
        d_logits: &T,
        h: &T,
        d_h: &mut T,
    ) -> Result<()> {
        let d_cols = self.columns(backend, d_logits)?;
        let mut diff = self.rows.clone();
        backend.axpby(
            -1.0,
            &backend.gather_rows(weight, &self.indices)?,
            1.0,
            &mut diff,
        )?;
        backend.gemm(1.0, &d_cols, Transpose::No, &diff, Transpose::No, 1.0, d_h)?;
        let (_, dim) = h.shape().as_matrix();
        self.head_grad = Some(backend.matmul(
            1.0,
            (&d_cols, Transpose::Yes),
            (h, Transpose::No),
            &[self.indices.len(), dim],
        )?);
        Ok(())
    }
}
