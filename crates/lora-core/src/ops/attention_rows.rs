//! Self-attention over the projections' own layout: `q` as `[seqs * t, heads * d]` rows
//! (what `x·W_qᵀ` gives), `k` and `v` as `[seqs * kv, kv_heads * d]`, the output as
//! `[seqs * t, heads * d]` (what the output projection takes). The defaults split the heads
//! into `[seqs * heads, t, d]` items, run [`DecoderOps::self_attention`] and merge them
//! back; a backend that reads each head in place (ndarray) skips the four copies.

use crate::backend::{Backend, Tensor};
use crate::error::{Error, Result};
use crate::ops::attention::AttentionMask;
use crate::ops::decoder::DecoderOps;

/// The sizes of attention over rows (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowsShape {
    /// Sequences in the batch.
    pub seqs: usize,
    /// Query heads per sequence.
    pub heads: usize,
    /// Key/value heads per sequence (dividing `heads`).
    pub kv_heads: usize,
    /// Queries per sequence.
    pub t: usize,
    /// Keys per sequence (`past + t`).
    pub kv: usize,
    /// Head size.
    pub d: usize,
}

/// Checks `q`, `k`, `v` in the rows layout of `seqs` sequences against the mask
/// (`mask.keep` has `kv = past + t` flags per sequence) and returns their sizes.
pub fn check_attention_rows<T: Tensor>(
    q: &T,
    k: &T,
    v: &T,
    mask: &AttentionMask<'_, T>,
    seqs: usize,
) -> Result<RowsShape> {
    let heads = mask.heads.max(1);
    let (q_rows, q_cols) = q.shape().as_matrix();
    if q.shape().dims().len() != 2
        || seqs == 0
        || !q_rows.is_multiple_of(seqs)
        || q_cols == 0
        || !q_cols.is_multiple_of(heads)
    {
        return Err(Error::shape(
            "self_attention_rows q",
            format!("[{seqs} seqs * t, {heads} heads * d]"),
            q.shape(),
        ));
    }
    let (t, d) = (q_rows / seqs, q_cols / heads);
    let kv = mask.past + t;
    let (k_rows, k_cols) = k.shape().as_matrix();
    let kv_heads = k_cols / d;
    if k.shape().dims().len() != 2
        || k_rows != seqs * kv
        || !k_cols.is_multiple_of(d)
        || kv_heads == 0
        || !heads.is_multiple_of(kv_heads)
        || v.shape().dims() != k.shape().dims()
    {
        return Err(Error::shape(
            "self_attention_rows k / v",
            format!("[{seqs} seqs * {kv} keys, kv_heads * {d}] each, kv_heads dividing {heads}"),
            k.shape(),
        ));
    }
    if mask.keep.len() != seqs * kv {
        return Err(Error::state(
            "self_attention_rows mask",
            format!(
                "{} key flags for {seqs} sequences of {kv} keys",
                mask.keep.len()
            ),
        ));
    }
    Ok(RowsShape {
        seqs,
        heads,
        kv_heads,
        t,
        kv,
        d,
    })
}

/// `x` seen as `dims` (`[a, b, c, d]`), its two middle axes swapped (`[a, c, b, d]`),
/// reshaped to `out`: attention's head split and merge (here, and the decoder's
/// `[batch * heads, seq * d]` layout).
pub fn swap_middle_axes<B: Backend>(
    b: &B,
    x: &B::Tensor,
    dims: [usize; 4],
    out: &[usize],
) -> Result<B::Tensor> {
    let x = b.permute(&b.reshape(x, &dims)?, &[0, 2, 1, 3])?;
    b.reshape(&x, out)
}

/// `[seqs * n, h * d]` -> `[seqs * h, n, d]`.
fn split_heads<B: DecoderOps>(b: &B, x: &B::Tensor, seqs: usize, h: usize) -> Result<B::Tensor> {
    let (rows, cols) = x.shape().as_matrix();
    let (n, d) = (rows / seqs.max(1), cols / h.max(1));
    swap_middle_axes(b, x, [seqs, n, h, d], &[seqs * h, n, d])
}

/// `[seqs * h, n, d]` -> `[seqs * n, h * d]`.
fn merge_heads<B: DecoderOps>(b: &B, x: &B::Tensor, seqs: usize) -> Result<B::Tensor> {
    let [items, n, d] = *x.shape().dims() else {
        return Err(Error::shape(
            "merge_heads",
            "[seqs * heads, n, d]",
            x.shape(),
        ));
    };
    let h = items / seqs.max(1);
    swap_middle_axes(b, x, [seqs, h, n, d], &[seqs * n, h * d])
}

/// Default [`DecoderOps::self_attention_rows`]: split, attend, merge.
pub fn attention_rows_forward<B: DecoderOps>(
    b: &B,
    q: &B::Tensor,
    k: &B::Tensor,
    v: &B::Tensor,
    mask: &AttentionMask<'_, B::Tensor>,
    seqs: usize,
    scale: f32,
) -> Result<(B::Tensor, B::Tensor)> {
    let s = check_attention_rows(q, k, v, mask, seqs)?;
    let (out, saved) = b.self_attention(
        &split_heads(b, q, s.seqs, s.heads)?,
        &split_heads(b, k, s.seqs, s.kv_heads)?,
        &split_heads(b, v, s.seqs, s.kv_heads)?,
        mask,
        scale,
    )?;
    Ok((merge_heads(b, &out, s.seqs)?, saved))
}

/// Default [`DecoderOps::self_attention_rows_backward`]: split, the backward, merge.
pub fn attention_rows_backward<B: DecoderOps>(
    b: &B,
    (q, k, v): (&B::Tensor, &B::Tensor, &B::Tensor),
    saved: &B::Tensor,
    mask: &AttentionMask<'_, B::Tensor>,
    seqs: usize,
    d_out: &B::Tensor,
    scale: f32,
) -> Result<(B::Tensor, B::Tensor, B::Tensor)> {
    let s = check_attention_rows(q, k, v, mask, seqs)?;
    if d_out.shape().dims() != q.shape().dims() {
        return Err(Error::shape(
            "self_attention_rows_backward d_out",
            format!("{:?}", q.shape().dims()),
            d_out.shape(),
        ));
    }
    let (dq, dk, dv) = b.self_attention_backward(
        (
            &split_heads(b, q, s.seqs, s.heads)?,
            &split_heads(b, k, s.seqs, s.kv_heads)?,
            &split_heads(b, v, s.seqs, s.kv_heads)?,
        ),
        saved,
        mask,
        &split_heads(b, d_out, s.seqs, s.heads)?,
        scale,
    )?;
    Ok((
        merge_heads(b, &dq, s.seqs)?,
        merge_heads(b, &dk, s.seqs)?,
        merge_heads(b, &dv, s.seqs)?,
    ))
}
