//! Self-attention on ndarray, causal (decoders) or bidirectional (encoders), fused per
//! (sequence, head) item: one task per item across the cores (in the backward one per
//! key/value item, which owns the gradient of the keys and values its group of query heads
//! shares), queries in blocks of [`BLOCK`] rows. When causal, each block multiplies only
//! the keys it may see (`j <= past + last query of the block`), so the masked upper
//! triangle of the scores is never computed, in the forward or the backward. The forward
//! keeps one log-sum-exp per query instead of the `[t, kv]` probabilities (a block of them
//! lives in a scratch buffer), and the backward recomputes each block's probabilities from
//! it, as flash attention does: no `[items, t, kv]` tensor exists at any time. Same
//! results as the default (`lora_core::ops::attention_forward`) within rounding, which the
//! cross-backend suite checks.

use std::cell::RefCell;

use lora_core::ops::{AttentionMask, AttentionShape, check_attention};
use lora_core::{Error, Result, Tensor, Transpose};
use rayon::prelude::*;

use crate::gemm::{View, gemm_serial};
use crate::pool;
use crate::tensor::NdTensor;
use crate::vectorize;

/// Queries per block: large enough for efficient products, small enough that the
/// skipped triangle is most of the masked work.
const BLOCK: usize = 64;

/// The `rows x cols` matrix starting at element `at` of `data`, row stride `ld`.
fn view(data: &[f32], at: usize, rows: usize, cols: usize, ld: usize) -> View<'_> {
    View {
        data: &data[at.min(data.len())..],
        rows,
        cols,
        ld,
        trans: Transpose::No,
    }
}

/// What the threads need of the mask (its dense-form cell is not shared across threads).
#[derive(Clone, Copy)]
struct Visibility<'a> {
    heads: usize,
    causal: bool,
    past: usize,
    keep: &'a [u32],
}

impl<'a> Visibility<'a> {
    fn of<T>(mask: &AttentionMask<'a, T>) -> Self {
        Self {
            heads: mask.heads.max(1),
            causal: mask.causal,
            past: mask.past,
            keep: mask.keep,
        }
    }

    /// The key flags of query item `i`'s sequence.
    fn keep(&self, i: usize, kv: usize) -> &'a [u32] {
        let s = i / self.heads;
        &self.keep[s * kv..(s + 1) * kv]
    }

    /// Keys visible to the query block `q0..q1`: a prefix of the `kv` keys (all of them
    /// when not causal).
    fn keys(&self, q1: usize, kv: usize) -> usize {
        match self.causal {
            true => (self.past + q1).min(kv),
            false => kv,
        }
    }

    /// Keys the query `q` (its index among the new queries) may see by position: a prefix.
    fn seen(&self, q: usize, nk: usize) -> usize {
        match self.causal {
            true => (self.past + q + 1).min(nk),
            false => nk,
        }
    }
}

/// `s = scale·q_block·k[:nk]ᵀ` into `rows` (`[q1 - q0, kv]`, only the first `nk` columns).
#[allow(clippy::too_many_arguments)]
fn block_scores(
    (qs, ks): (&[f32], &[f32]),
    (qi, ki): (usize, usize),
    (q0, q1, nk, d, kv): (usize, usize, usize, usize, usize),
    scale: f32,
    rows: &mut [f32],
) -> Result<()> {
    gemm_serial(
        scale,
        view(qs, qi + q0 * d, q1 - q0, d, d),
        view(ks, ki, nk, d, d).t(),
        0.0,
        rows,
        kv,
    )
}

thread_local! {
    /// Each thread's scratch for its attention tasks (a block's scores and their
    /// gradients), reused across calls. Taken per task from the pool, their number at once
    /// depended on how rayon scheduled the tasks, and a steady-state step could find the
    /// pool one buffer short.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Runs `f` with this thread's two scratch buffers, each `len` zeros.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32], &mut [f32]) -> R) -> R {
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        let (a, b) = &mut *scratch;
        for v in [&mut *a, &mut *b] {
            v.clear();
            v.resize(len, 0.0);
        }
        f(a, b)
    })
}

/// Forward; returns `(out [items, t, d], lse [items * t])`, `lse` the log-sum-exp of
/// each query's visible scores (`+inf` for a query that sees no key).
pub(crate) fn forward(
    q: &NdTensor,
    k: &NdTensor,
    v: &NdTensor,
    mask: &AttentionMask<'_, NdTensor>,
    scale: f32,
) -> Result<(NdTensor, NdTensor)> {
    let AttentionShape {
        items,
        group,
        t,
        kv,
        d,
    } = check_attention(q, k, v, mask)?;
    let (qs, ks, vs) = (q.as_slice(), k.as_slice(), v.as_slice());
    let mut out = pool::zeros(items * t * d);
    let mut lse = pool::zeros(items * t);
    let vis = Visibility::of(mask);
    let item = |(i, (o, l)): (usize, (&mut [f32], &mut [f32]))| -> Result<()> {
        let keep = vis.keep(i, kv);
        let (qi, ki) = (i * t * d, (i / group) * kv * d);
        with_scratch(BLOCK.min(t) * kv, |p, _| {
            for q0 in (0..t).step_by(BLOCK) {
                let q1 = (q0 + BLOCK).min(t);
                let nk = vis.keys(q1, kv);
                let rows = &mut p[..(q1 - q0) * kv];
                block_scores((qs, ks), (qi, ki), (q0, q1, nk, d, kv), scale, rows)?;
                for (r, row) in rows.chunks_mut(kv).enumerate() {
                    l[q0 + r] = softmax_visible(row, keep, vis.seen(q0 + r, nk));
                }
                gemm_serial(
                    1.0,
                    view(rows, 0, q1 - q0, nk, kv),
                    view(vs, ki, nk, d, d),
                    0.0,
                    &mut o[q0 * d..q1 * d],
                    d,
                )?;
            }
            Ok(())
        })
    };
    out.par_chunks_mut(t * d)
        .zip(lse.par_chunks_mut(t.max(1)))
        .enumerate()
        .try_for_each(item)?;
    Ok((
        NdTensor::from_vec(out, &[items, t, d])?,
        NdTensor::from_vec(lse, &[items * t])?,
    ))
}

/// In place: the softmax of `row` over the keys `j < seen` with `keep[j] != 0`, every
/// other entry 0 (all of them when the query sees no key). Returns the log-sum-exp of the
/// visible scores (`+inf` when there are none, so that `e^(s - lse)` is 0).
fn softmax_visible(row: &mut [f32], keep: &[u32], seen: usize) -> f32 {
    // Masked keys to -inf (their exponential is 0), in the pass that finds the maximum.
    let max = vectorize::mask_and_max(&mut row[..seen], keep);
    row[seen..].iter_mut().for_each(|s| *s = 0.0);
    if max == f32::NEG_INFINITY {
        row[..seen].iter_mut().for_each(|s| *s = 0.0);
        return f32::INFINITY;
    }
    let sum = vectorize::exp_in_place_sum(&mut row[..seen], max);
    let inv = (1.0 / sum) as f32;
    row[..seen].iter_mut().for_each(|s| *s *= inv);
    max + sum.ln() as f32
}

/// One key/value item's group of `dq`, and its `dk` and `dv`.
type ItemGrads<'a> = (&'a mut [f32], (&'a mut [f32], &'a mut [f32]));

/// Backward; returns `(dq, dk, dv)`. Each block's probabilities are recomputed from the
/// forward's log-sum-exp over the same visible prefix of keys.
pub(crate) fn backward(
    (q, k, v): (&NdTensor, &NdTensor, &NdTensor),
    lse: &NdTensor,
    mask: &AttentionMask<'_, NdTensor>,
    d_out: &NdTensor,
    scale: f32,
) -> Result<(NdTensor, NdTensor, NdTensor)> {
    let shape = check_attention(q, k, v, mask)?;
    let AttentionShape {
        items,
        group,
        t,
        kv,
        d,
    } = shape;
    if lse.shape().dims() != [items * t] || d_out.shape().dims() != q.shape().dims() {
        return Err(Error::shape(
            "self_attention_backward saved log-sum-exp / d_out",
            format!("[{}] and [{items}, {t}, {d}]", items * t),
            lse.shape(),
        ));
    }
    let (qs, ks, vs, ls, gs) = (
        q.as_slice(),
        k.as_slice(),
        v.as_slice(),
        lse.as_slice(),
        d_out.as_slice(),
    );
    let vis = Visibility::of(mask);
    let kv_items = shape.kv_items();
    let mut dq = pool::zeros(items * t * d);
    let mut dk = pool::zeros(kv_items * kv * d);
    let mut dv = pool::zeros(kv_items * kv * d);
    let kv_item = |(j, (dq_group, (dk, dv))): (usize, ItemGrads<'_>)| {
        let ki = j * kv * d;
        with_scratch(BLOCK.min(t) * kv, |p, ds| {
            for (g, dq) in dq_group.chunks_mut(t * d).enumerate() {
                let i = j * group + g;
                query_item_backward(
                    (qs, ks, vs, ls, gs),
                    (i, ki, vis),
                    (t, kv, d, scale),
                    (p, ds),
                    (dq, dk, dv),
                )?;
            }
            Ok(())
        })
    };
    dq.par_chunks_mut(group * t * d)
        .zip(dk.par_chunks_mut(kv * d).zip(dv.par_chunks_mut(kv * d)))
        .enumerate()
        .try_for_each(kv_item)?;
    Ok((
        NdTensor::from_vec(dq, &[items, t, d])?,
        NdTensor::from_vec(dk, &[kv_items, kv, d])?,
        NdTensor::from_vec(dv, &[kv_items, kv, d])?,
    ))
}

/// The backward of query item `i` (reading keys and values at `ki`): writes its `dq` and
/// adds its share to the `dk`, `dv` of its key/value item. `p` and `ds` are scratch blocks.
#[allow(clippy::type_complexity)]
fn query_item_backward(
    (qs, ks, vs, ls, gs): (&[f32], &[f32], &[f32], &[f32], &[f32]),
    (i, ki, vis): (usize, usize, Visibility<'_>),
    (t, kv, d, scale): (usize, usize, usize, f32),
    (p, ds): (&mut [f32], &mut [f32]),
    (dq, dk, dv): (&mut [f32], &mut [f32], &mut [f32]),
) -> Result<()> {
    let (qi, keep) = (i * t * d, vis.keep(i, kv));
    for q0 in (0..t).step_by(BLOCK) {
        let q1 = (q0 + BLOCK).min(t);
        let (bq, nk) = (q1 - q0, vis.keys(q1, kv));
        let p = &mut p[..bq * kv];
        block_scores((qs, ks), (qi, ki), (q0, q1, nk, d, kv), scale, p)?;
        for (r, row) in p.chunks_mut(kv).enumerate() {
            let (seen, l) = (vis.seen(q0 + r, nk), ls[i * t + q0 + r]);
            for (j, s) in row[..nk].iter_mut().enumerate() {
                if j >= seen || keep[j] == 0 {
                    *s = f32::NEG_INFINITY;
                }
            }
            vectorize::exp_scale_in_place(&mut row[..nk], l, 1.0);
        }
        let p = view(p, 0, bq, nk, kv);
        let g = view(gs, qi + q0 * d, bq, d, d);
        // dv[:nk] += pᵀ·g
        gemm_serial(1.0, p.t(), g, 1.0, dv, d)?;
        // dp = g·v[:nk]ᵀ, then ds = p ⊙ (dp - rowsum(p ⊙ dp)).
        let ds = &mut ds[..bq * kv];
        gemm_serial(1.0, g, view(vs, ki, nk, d, d).t(), 0.0, ds, kv)?;
        for (r, row) in ds.chunks_mut(kv).enumerate() {
            let pr = &p.data[r * kv..r * kv + nk];
            let dot: f32 = pr.iter().zip(&row[..nk]).map(|(p, g)| p * g).sum();
            row[..nk]
                .iter_mut()
                .zip(pr)
                .for_each(|(g, p)| *g = p * (*g - dot));
        }
        let ds = view(ds, 0, bq, nk, kv);
        // dq = scale·ds·k[:nk]; dk[:nk] += scale·dsᵀ·q
        gemm_serial(
            scale,
            ds,
            view(ks, ki, nk, d, d),
            0.0,
            &mut dq[q0 * d..q1 * d],
            d,
        )?;
        gemm_serial(scale, ds.t(), view(qs, qi + q0 * d, bq, d, d), 1.0, dk, d)?;
    }
    Ok(())
}
