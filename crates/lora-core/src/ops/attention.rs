//! Self-attention as one operation, forward and backward, causal (decoders) or
//! bidirectional (encoders), with padding: the reference semantics (the defaults of
//! [`DecoderOps::self_attention`](crate::DecoderOps::self_attention)),
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

/// Which keys each query of a self-attention call may see. Items are the `batch * heads`
/// (sequence, head) pairs, sequence-major; each has `t` queries and `kv` keys (`kv = past +
/// t`), query `i` at key position `past + i`, and sees key `j` when `keep[j] != 0` and, if
/// the attention is causal, `j <= past + i`.
#[derive(Debug)]
pub struct AttentionMask<'a, T> {
    /// Heads per sequence.
    pub heads: usize,
    /// Decoder attention: a query sees no key after its own position. Encoder attention
    /// (BERT) is not causal: every query sees every real key.
    pub causal: bool,
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
    /// Whether the mask's shape lets the query at key position `pos` see key `j` (padding
    /// aside).
    pub fn sees(&self, pos: usize, j: usize) -> bool {
        !self.causal || j <= pos
    }

    /// The dense mask for `t` queries per item, built on the host and uploaded once.
    pub fn dense<B: Backend<Tensor = T>>(&self, b: &B, t: usize) -> Result<&DenseMask<T>> {
        if self.dense.get().is_none() {
            let (bias, rows) = dense_mask_host(self, t);
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
            .ok_or_else(|| Error::state("self_attention mask", "dense mask not built"))
    }
}

/// The dense mask on the host for `t` queries per item: the additive bias `[batch * heads *
/// t, past + t]` and, per query row, 1 where it sees some key and 0 where it sees none.
pub fn dense_mask_host<T>(mask: &AttentionMask<'_, T>, t: usize) -> (Vec<f32>, Vec<f32>) {
    let (keep, heads, past) = (mask.keep, mask.heads, mask.past);
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
                let visible = mask.sees(past + q, k) && seq_keep[k] != 0;
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

/// The sizes of one attention call. Query item `i` reads key/value item `i / group`
/// (grouped-query attention: `group` consecutive query heads share one key/value head, as
/// transformers' `repeat_kv` lays them out, without the copies).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// `batch * heads` query items.
    pub items: usize,
    /// Query heads per key/value head (1: multi-head attention).
    pub group: usize,
    /// Queries per item.
    pub t: usize,
    /// Keys per item (`past + t`).
    pub kv: usize,
    /// Head size.
    pub d: usize,
}

impl AttentionShape {
    /// `batch * kv_heads` key/value items.
    pub fn kv_items(&self) -> usize {
        self.items / self.group
    }
}

/// Checks `q` `[items, t, d]` against `k`, `v` `[items / group, kv, d]` and the mask.
pub fn check_attention<T: Tensor>(
    q: &T,
    k: &T,
    v: &T,
    mask: &AttentionMask<'_, T>,
) -> Result<AttentionShape> {
    let (qd, kd) = (q.shape().dims(), k.shape().dims());
    let [items, t, d] = *qd else {
        return Err(Error::shape("self_attention q", "[items, t, d]", q.shape()));
    };
    let kv = mask.past + t;
    let heads = mask.heads.max(1);
    let kv_items = kd.first().copied().unwrap_or(0);
    // Key/value heads must divide the query heads, as `num_key_value_heads` does.
    let group = match kv_items {
        0 => 0,
        n if items.is_multiple_of(n) => items / n,
        _ => 0,
    };
    if group == 0
        || !heads.is_multiple_of(group)
        || kd != [kv_items, kv, d]
        || v.shape().dims() != kd
    {
        return Err(Error::shape(
            "self_attention k / v",
            format!(
                "[{items} / group, {kv}, {d}] each (past {} + {t} queries; the group of query \
                 heads per key/value head dividing {heads} heads)",
                mask.past
            ),
            k.shape(),
        ));
    }
    if !items.is_multiple_of(heads) || mask.keep.len() != items / heads * kv {
        return Err(Error::state(
            "self_attention mask",
            format!(
                "{} key flags for {items} items of {} heads x {kv} keys",
                mask.keep.len(),
                mask.heads
            ),
        ));
    }
    Ok(AttentionShape {
        items,
        group,
        t,
        kv,
        d,
    })
}

/// `k` or `v` (`[items / group, kv, d]`) with each item repeated for the `group` query
/// items that read it (`[items, kv, d]`), for the defaults over batched products.
fn repeat_groups<B: Backend>(b: &B, x: &B::Tensor, s: &AttentionShape) -> Result<B::Tensor> {
    if s.group == 1 {
        return Ok(x.clone());
    }
    let rows: Vec<usize> = (0..s.items).map(|i| i / s.group).collect();
    let flat = b.reshape(x, &[s.kv_items(), s.kv * s.d])?;
    b.reshape(&b.gather_rows(&flat, &rows)?, &[s.items, s.kv, s.d])
}

/// Backward of [`repeat_groups`]: each key/value item gets the sum of its group's
/// gradients, in item order (a scatter-add over repeated rows).
fn sum_groups<B: DecoderOps>(b: &B, dx: &B::Tensor, s: &AttentionShape) -> Result<B::Tensor> {
    if s.group == 1 {
        return Ok(dx.clone());
    }
    let rows: Vec<usize> = (0..s.items).map(|i| i / s.group).collect();
    let flat = b.reshape(dx, &[s.items, s.kv * s.d])?;
    let summed = b.embedding_backward(&flat, &rows, s.kv_items())?;
    b.reshape(&summed, &[s.kv_items(), s.kv, s.d])
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
    let shape = check_attention(q, k, v, mask)?;
    let AttentionShape {
        items, t, kv, d, ..
    } = shape;
    let (k, v) = (&repeat_groups(b, k, &shape)?, &repeat_groups(b, v, &shape)?);
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
/// `(dq, dk, dv)` shaped as `q`, `k`, `v` (a shared key/value item gets its group's summed
/// gradient). Rows of `probs` that are zero (queries that saw nothing) give zero gradients.
pub fn attention_backward<B: DecoderOps>(
    b: &B,
    q: &B::Tensor,
    k: &B::Tensor,
    v: &B::Tensor,
    probs: &B::Tensor,
    d_out: &B::Tensor,
    scale: f32,
) -> Result<(B::Tensor, B::Tensor, B::Tensor)> {
    let shape = check_attention_backward(q, k, v, probs, d_out)?;
    let AttentionShape {
        items, t, kv, d, ..
    } = shape;
    let (k, v) = (&repeat_groups(b, k, &shape)?, &repeat_groups(b, v, &shape)?);
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
    Ok((
        d_q,
        sum_groups(b, &d_k, &shape)?,
        sum_groups(b, &d_v, &shape)?,
    ))
}

/// Checks a backward call against the default's saved probabilities.
pub fn check_attention_backward<T: Tensor>(
    q: &T,
    k: &T,
    v: &T,
    probs: &T,
    d_out: &T,
) -> Result<AttentionShape> {
    let [items, t, d] = *q.shape().dims() else {
        return Err(Error::shape(
            "self_attention_backward q",
            "[items, t, d]",
            q.shape(),
        ));
    };
    let [kv_items, kv, _] = *k.shape().dims() else {
        return Err(Error::shape(
            "self_attention_backward k",
            "[items / group, kv, d]",
            k.shape(),
        ));
    };
    let group = match kv_items {
        n if n > 0 && items.is_multiple_of(n) => items / n,
        _ => 0,
    };
    if group == 0
        || k.shape().dims() != [kv_items, kv, d]
        || v.shape().dims() != [kv_items, kv, d]
        || probs.shape().dims() != [items * t, kv]
        || d_out.shape().dims() != q.shape().dims()
    {
        return Err(Error::shape(
            "self_attention_backward k / v / probs / d_out",
            format!(
                "[{kv_items}, {kv}, {d}] dividing {items} items, [{}, {kv}], [{items}, {t}, {d}]",
                items * t
            ),
            probs.shape(),
        ));
    }
    Ok(AttentionShape {
        items,
        group,
        t,
        kv,
        d,
    })
}
