//! DoRA on an embedding table (PEFT's `DoraEmbeddingLayer`): the magnitude `m` has one
//! value per embedding dimension, and the output `W[x] + s·Aᵀ[x] Bᵀ` is scaled per
//! dimension by `m / ‖W + s·(B A)ᵀ‖`, the norm taken over the vocabulary for each column of
//! the `[vocab, dim]` table and treated as a constant in the backward, as PEFT detaches it.
//!
//! The norm never forms the `[vocab, dim]` delta: per column `j`,
//! `‖W_j‖² + 2s·Σ_k B_jk (Wᵀ Aᵀ)_jk + s²·B_j (A Aᵀ) B_jᵀ`, from one `[dim, vocab] x
//! [vocab, r]` product and an `r x r` one; `‖W_j‖²` is computed once (the table is frozen).

use crate::backend::{Backend, BinaryOp, Tensor, Transpose};
use crate::error::Result;
use crate::ops::LoraOps;

/// DoRA's state on one embedding adapter.
#[derive(Debug, Clone)]
pub(crate) struct EmbeddingDora<T> {
    /// `lora_magnitude_vector`, `[dim]`.
    pub magnitude: T,
    pub grad: Option<T>,
    /// `‖W_j‖²` per column of the frozen table, once computed.
    pub col_sq: Option<Vec<f32>>,
    /// From a training forward: the unscaled output (`[ids, dim]`), the norm and the gain
    /// `m / norm` it was scaled by.
    pub saved: Option<(T, Vec<f32>, T)>,
    /// The norm from the last inference forward, reused until the factors, the
    /// magnitude or the table may have changed (a training forward, an optimizer's access
    /// to the parameters, a loaded tensor).
    pub norm_cache: Option<Vec<f32>>,
}

impl<T> EmbeddingDora<T> {
    pub fn new(magnitude: T) -> Self {
        EmbeddingDora {
            magnitude,
            grad: None,
            col_sq: None,
            saved: None,
            norm_cache: None,
        }
    }
}

/// `‖W_j + s·(Aᵀ Bᵀ)_j‖` over the vocabulary for every column `j` of `weight`
/// (`[vocab, dim]`), with `a_t = Aᵀ` (`[vocab, r]`) and `b` (`[dim, r]`). `col_sq` caches
/// `‖W_j‖²`.
pub(crate) fn column_norms<B: LoraOps>(
    backend: &B,
    weight: &B::Tensor,
    a_t: &B::Tensor,
    b: &B::Tensor,
    scaling: f32,
    col_sq: &mut Option<Vec<f32>>,
) -> Result<Vec<f32>> {
    let (_, dim) = weight.shape().as_matrix();
    let r = b.shape().dims()[1];
    if col_sq.is_none() {
        let sq = backend.binary(BinaryOp::Mul, weight, weight)?;
        *col_sq = Some(backend.to_host(&backend.sum_rows(&sq)?)?);
    }
    let wa = backend.matmul(
        1.0,
        (weight, Transpose::Yes),
        (a_t, Transpose::No),
        &[dim, r],
    )?;
    let ata = backend.matmul(1.0, (a_t, Transpose::Yes), (a_t, Transpose::No), &[r, r])?;
    let (wa, ata, bh) = (
        backend.to_host(&wa)?,
        backend.to_host(&ata)?,
        backend.to_host(b)?,
    );
    let s = f64::from(scaling);
    let sq = col_sq.as_deref().unwrap_or_default();
    Ok((0..dim)
        .map(|j| {
            let bj = &bh[j * r..(j + 1) * r];
            let cross: f64 = (0..r)
                .map(|k| f64::from(bj[k]) * f64::from(wa[j * r + k]))
                .sum();
            let quad: f64 = (0..r)
                .map(|k| {
                    let row: f64 = (0..r)
                        .map(|l| f64::from(ata[k * r + l]) * f64::from(bj[l]))
                        .sum();
                    f64::from(bj[k]) * row
                })
                .sum();
            (f64::from(sq[j]) + 2.0 * s * cross + s * s * quad)
                .max(0.0)
                .sqrt() as f32
        })
        .collect())
}

/// `m / norm` as a `[dim]` tensor.
pub(crate) fn gain<B: Backend>(
    backend: &B,
    magnitude: &B::Tensor,
    norm: &[f32],
) -> Result<B::Tensor> {
    let m = backend.to_host(magnitude)?;
    let g: Vec<f32> = m.iter().zip(norm).map(|(m, n)| m / n).collect();
    backend.from_host_vec(g, &[norm.len()])
}

/// The magnitude's gradient: `dm_j = Σ_n dy[n, j] · pre[n, j] / norm_j`.
pub(crate) fn magnitude_grad<B: LoraOps>(
    backend: &B,
    dy: &B::Tensor,
    pre: &B::Tensor,
    norm: &[f32],
) -> Result<B::Tensor> {
    let summed =
        backend.to_host(&backend.sum_rows(&backend.binary(BinaryOp::Mul, dy, pre)?)?)?;
    let g: Vec<f32> = summed.iter().zip(norm).map(|(s, n)| s / n).collect();
    backend.from_host_vec(g, &[norm.len()])
}
