//! Causal self-attention as one operation, forward and backward: the reference semantics
//! (the defaults of [`DecoderOps::causal_attention`](crate::DecoderOps::causal_attention)),
//! written over the primitives: a batched product for the scores, the masked softmax, a
//! batched product with the values, and the reverse for the backward. A backend overrides
//! the pair with a fused kernel that skips what the mask hides.

use std::cell::OnceCell;

use crate::backend::{Backend, BinaryOp, Tensor, Transpose};
use crate::error::{Error, Result};
use crate::ops::decoder::{DecoderOps, RowOrCol};

/// Added to the scores of keys a query must not see in the dense mask. Finite, so that a
/// fully masked row gives a uniform distribution (zeroed afterwards), not NaN.
pub const MASKED: f32 = -1e30;

/// Which keys each query of a causal self-attention call may see. Items are the
/// `batch * heads` (sequence, head) pairs, sequence-major; each has `t` queries and `kv`
/// keys (`kv = past + t`), query `i` at key position `past + i`, and sees key `j` when
/// `j <= past + i` and `keep[j] != 0`.
#[derive(Debug)]
pub struct AttentionMask<'a, T> {
    /// Heads per sequence.
    pub heads: usize,
    /// Keys already in the KV cache before the first query.
    pub past: usize,
    /// `[batch * kv]`: nonzero where a key is a real token (0: padding).
    pub keep: &'a [u32],
    /// The dense form, built by [`AttentionMask::dense`] on first use and shared by every
    /// call that gets this cell (the layers of one step). Fused backends never build it.
    pub dense: &'a OnceCell<DenseMask<T>>,
}

/// The mask as tensors: what the default implementation adds to the scores.
#[derive(Debug)]
pub struct DenseMask<T> {
    /// `[batch * heads * t, kv]`: 0 where the query may see the key, [`MASKED`] elsewhere.
    pub bias: T,
    /// `[batch * heads * t]`: 0 for queries that see no key at all (left padding), whose
    /// output is zero as PyTorch's SDPA gives; `None` when every query sees some key.
    pub nonempty_rows: Option<T>,
}

impl<T> AttentionMask<'_, T> {
    /// The dense mask for `t` queries per item, built on the host and uploaded once.
    pub fn dense<B: Backend<Tensor = T>>(&self, b: &B, t: usize) -> Result<&DenseMask<T>> {
        if self.dense.get().is_none() {
            let (bias, rows) = dense_mask_host(self.keep, self.heads, t, self.past);
            let n = bias.len() / (self.past + t).max(1);
            let built = DenseMask {
                bias: b.from_host(&bias, &[n, self.past + t])?,
                nonempty_rows: match rows.contains(&0.0) {
                    true => Some(b.from_host(&rows, &[n])?),
                    false => None,
                },
            };
            // Set just above when empty; a racing set cannot happen (the cell is not Sync).
            let _ = self.dense.set(built);
        }
        self.dense
            .get()
            .ok_or_else(|| Error::state("causal_attention mask", "dense mask not built"))
    }
}

/// The dense mask on the host: the additive bias `[batch * heads * t, past + t]` and, per
/// query row, 1 where it sees some key and 0 where it sees none. `keep` is `[batch * kv]`.
pub fn dense_mask_host(keep: &[u32], heads: usize, t: usize, past: usize) -> (Vec<f32>, Vec<f32>) {
    let kv = past + t;
    let batch = keep.len() / kv.max(1);
    let mut bias = Vec::with_capacity(batch * heads * t * kv);
    let mut rows = Vec::with_capacity(batch * heads * t);
    let mut block = vec![MASKED; t * kv];
    let mut block_rows = vec![1.0f32; t];
    for seq_keep in keep.chunks(kv.max(1)) {
        for q in 0..t {
            let row = &mut block[q * kv..(q + 1) * kv];
            for (k, slot) in row.iter_mut().enumerate() {
                let visible = k <= past + q && seq_keep[k] != 0;
                *slot = if visible { 0.0 } else { MASKED };
            }
            // A query that may see nothing (left padding) gets an output of zero: it
            // reaches no real token, but it enters the loss where the label after it is
            // a real token.
            block_rows[q] = if row.iter().all(|&m| m == MASKED) {
                0.0
            } else {
                1.0
            };
        }
        for _ in 0..heads {
            bias.extend_from_slice(&block);
            rows.extend_from_slice(&block_rows);
        }
    }
    (bias, rows)
}

/// Checks `q` `[items, t, d]` against `k`, `v` `[items, kv, d]` and the mask; returns
/// `(items, t, kv, d)`.
pub fn check_attention<T: Tensor>(
    q: &T,
    k: &T,
    v: &T,
    mask: &AttentionMask<'_, T>,
) -> Result<(usize, usize, usize, usize)> {
    let (qd, kd) = (q.shape().dims(), k.shape().dims());
    let [items, t, d] = *qd else {
        return Err(Error::shape(
            "causal_attention q",
            "[items, t, d]",
            q.shape(),
        ));
    };
    let kv = mask.past + t;
    if kd != [items, kv, d] || v.shape().dims() != [items, kv, d] {
        return Err(Error::shape(
            "causal_attention k / v",
            format!(
                "[{items}, {kv}, {d}] each (past {} + {t} queries)",
                mask.past
            ),
            k.shape(),
        ));
    }
    let heads = mask.heads.max(1);
    if !items.is_multiple_of(heads) || mask.keep.len() != items / heads * kv {
        return Err(Error::state(
            "causal_attention mask",
            format!(
                "{} key flags for {items} items of {} heads x {kv} keys",
                mask.keep.len(),
                mask.heads
            ),
        ));
    }
    Ok((items, t, kv, d))
}

/// Default forward: `probs = softmax(scale·q·kᵀ + bias)` (rows of queries that see no key
/// zeroed), `out = probs·v`. Returns `(out [items, t, d], probs [items * t, kv])`.
pub fn attention_forward<B: DecoderOps>(
    b: &B,
    q: &B::Tensor,
    k: &B::Tensor,
    v: &B::Tensor,
    mask: &AttentionMask<'_, B::Tensor>,
    scale: f32,
) -> Result<(B::Tensor, B::Tensor)> {
    let (items, t, kv, d) = check_attention(q, k, v, mask)?;
    let dense = mask.dense(b, t)?;
    let mut scores = b.zeros(&[items, t, kv])?;
    b.bmm(scale, q, Transpose::No, k, Transpose::Yes, 0.0, &mut scores)?;
    let scores = b.reshape(&scores, &[items * t, kv])?;
    let mut probs = b.softmax(&scores, Some(&dense.bias))?;
    if let Some(rows) = &dense.nonempty_rows {
        let keep = b.outer(rows, items * t, kv, RowOrCol::PerRow)?;
        probs = b.binary(BinaryOp::Mul, &probs, &keep)?;
    }
    let mut out = b.zeros(&[items, t, d])?;
    let p3 = b.reshape(&probs, &[items, t, kv])?;
    b.bmm(1.0, &p3, Transpose::No, v, Transpose::No, 0.0, &mut out)?;
    Ok((out, probs))
}

/// Default backward from `d_out` (`[items, t, d]`) and the forward's `probs`: returns
/// `(dq, dk, dv)` shaped as `q`, `k`, `v`. Rows of `probs` that are zero (queries that
/// saw nothing) give zero gradients.
pub fn attention_backward<B: Backend>(
    b: &B,
    q: &B::Tensor,
    k: &B::Tensor,
    v: &B::Tensor,
    probs: &B::Tensor,
    d_out: &B::Tensor,
    scale: f32,
) -> Result<(B::Tensor, B::Tensor, B::Tensor)> {
    let (items, t, d, kv) = check_attention_backward(q, k, v, probs, d_out)?;
    let p3 = b.reshape(probs, &[items, t, kv])?;
    let mut d_probs = b.zeros(&[items, t, kv])?;
    b.bmm(
        1.0,
        d_out,
        Transpose::No,
        v,
        Transpose::Yes,
        0.0,
        &mut d_probs,
    )?;
    let mut d_v = b.zeros(&[items, kv, d])?;
    b.bmm(
        1.0,
        &p3,
        Transpose::Yes,
        d_out,
        Transpose::No,
        0.0,
        &mut d_v,
    )?;
    let d_probs = b.reshape(&d_probs, &[items * t, kv])?;
    let d_scores = b.softmax_backward(probs, &d_probs)?;
    let d_scores = b.reshape(&d_scores, &[items, t, kv])?;
    let mut d_q = b.zeros(&[items, t, d])?;
    b.bmm(
        scale,
        &d_scores,
        Transpose::No,
        k,
        Transpose::No,
        0.0,
        &mut d_q,
    )?;
    let mut d_k = b.zeros(&[items, kv, d])?;
    b.bmm(
        scale,
        &d_scores,
        Transpose::Yes,
        q,
        Transpose::No,
        0.0,
        &mut d_k,
    )?;
    Ok((d_q, d_k, d_v))
}

/// Checks a backward call; returns `(items, t, d, kv)`.
pub fn check_attention_backward<T: Tensor>(
    q: &T,
    k: &T,
    v: &T,
    probs: &T,
    d_out: &T,
) -> Result<(usize, usize, usize, usize)> {
    let [items, t, d] = *q.shape().dims() else {
        return Err(Error::shape(
            "causal_attention_backward q",
            "[items, t, d]",
            q.shape(),
        ));
    };
    let kv = k.shape().dims().get(1).copied().unwrap_or(0);
    if k.shape().dims() != [items, kv, d]
        || v.shape().dims() != [items, kv, d]
        || probs.shape().dims() != [items * t, kv]
        || d_out.shape().dims() != q.shape().dims()
    {
        return Err(Error::shape(
            "causal_attention_backward k / v / probs / d_out",
            format!(
                "[{items}, {kv}, {d}], [{items}, {kv}, {d}], [{}, {kv}], [{items}, {t}, {d}]",
                items * t
            ),
            probs.shape(),
        ));
    }
    Ok((items, t, d, kv))
}
