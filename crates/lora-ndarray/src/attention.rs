//! Self-attention on ndarray, causal (decoders) or bidirectional (encoders), fused per
//! (sequence, head) item: one task per item across the cores (in the backward one per
//! key/value item, which owns the gradient of the keys and values its group of query heads
//! shares), queries in blocks of rows ([`Visibility::block`]). When causal, each block multiplies only
//! the keys it may see (`j <= past + last query of the block`), so the masked upper
//! triangle of the scores is never computed, in the forward or the backward. The forward
//! keeps one log-sum-exp per query instead of the `[t, kv]` probabilities (a block of them
//! lives in a scratch buffer), and the backward recomputes each block's probabilities from
//! it, as flash attention does: no `[items, t, kv]` tensor exists at any time. Same
//! results as the default (`lora_core::ops::attention_forward`) within rounding, which the
//! cross-backend suite checks.
//!
//! Both layouts run the same code ([`Layout`]): `[items, t, d]` items, or the projections'
//! own rows (`[seqs * t, heads * d]`, `DecoderOps::self_attention_rows`), where each head
//! is read in place with a row stride of `heads * d` and a task takes a whole sequence, so
//! that no head split or merge is copied (four copies of `[tokens, hidden]` per layer).

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};

use lora_core::ops::{
    AttentionMask, AttentionShape, RowsShape, check_attention, check_attention_rows,
};
use lora_core::{Error, Result, Tensor, Transpose};
use rayon::prelude::*;

use crate::gemm::{View, gemm_serial};
use crate::pool;
use crate::tensor::NdTensor;
use crate::vectorize;

/// Queries per block when causal: large enough for efficient products, small enough that
/// the skipped triangle is most of the masked work.
const CAUSAL_BLOCK: usize = 64;
/// Queries per block otherwise (encoders): a whole MiniLM sequence, so that each item's
/// keys are packed once (64: 9.3-9.6 ms for a MiniLM layer's forward at 32 x 128, 128:
/// 8.6 ms, alternating; the backward within noise).
const FULL_BLOCK: usize = 128;

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

    /// Queries per block.
    fn block(&self) -> usize {
        if self.causal {
            CAUSAL_BLOCK
        } else {
            FULL_BLOCK
        }
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

/// `s = scale·q_block·k[:nk]ᵀ` into `rows` (`[q1 - q0, kv]`, only the first `nk` columns),
/// the query item at `q` and its key item at `k` (offset, row stride).
fn block_scores(
    (qs, ks): (&[f32], &[f32]),
    (q, k): (At, At),
    (q0, q1, nk, d, kv): (usize, usize, usize, usize, usize),
    scale: f32,
    rows: &mut [f32],
) -> Result<()> {
    gemm_serial(
        scale,
        view(qs, q.0 + q0 * q.1, q1 - q0, d, q.1),
        view(ks, k.0, nk, d, k.1).t(),
        0.0,
        rows,
        kv,
    )
}

/// An item's matrix in a tensor: `(offset, row stride)`.
type At = (usize, usize);

/// Where the items' matrices lie (see the module docs).
#[derive(Clone, Copy)]
struct Layout {
    /// The projections' rows (`[seqs * t, heads * d]`); else `[items, t, d]`.
    rows: bool,
    /// Query heads per sequence.
    heads: usize,
    /// Query heads per key/value head.
    group: usize,
    t: usize,
    kv: usize,
    d: usize,
}

impl Layout {
    fn of_items(s: AttentionShape, heads: usize) -> Self {
        let AttentionShape {
            group, t, kv, d, ..
        } = s;
        Self {
            rows: false,
            heads,
            group,
            t,
            kv,
            d,
        }
    }

    fn of_rows(s: RowsShape) -> Self {
        Self {
            rows: true,
            heads: s.heads,
            group: s.heads / s.kv_heads,
            t: s.t,
            kv: s.kv,
            d: s.d,
        }
    }

    /// Query item `i`'s `[t, d]` matrix in `q` (and in the output, `d_out`, `dq`).
    fn query(&self, i: usize) -> At {
        let Self { t, d, heads, .. } = *self;
        match self.rows {
            true => ((i / heads) * t * heads * d + (i % heads) * d, heads * d),
            false => (i * t * d, d),
        }
    }

    /// The `[kv, d]` matrix of the key/value item query item `i` reads (in `k`, `v`, `dk`,
    /// `dv`).
    fn key(&self, i: usize) -> At {
        let Self {
            kv,
            d,
            heads,
            group,
            ..
        } = *self;
        let kv_heads = heads / group;
        match self.rows {
            true => (
                (i / heads) * kv * kv_heads * d + (i % heads) / group * d,
                kv_heads * d,
            ),
            false => ((i / group) * kv * d, d),
        }
    }

    /// Query items per forward task, whose outputs are one contiguous chunk: one item, or
    /// a sequence's heads.
    fn forward_items(&self) -> usize {
        if self.rows { self.heads } else { 1 }
    }

    /// Query items per backward task: those sharing a key/value item, or a sequence's; their
    /// `dq` is one chunk, and so are their `dk` and `dv` (of [`Layout::backward_kv_len`]).
    fn backward_items(&self) -> usize {
        if self.rows { self.heads } else { self.group }
    }

    fn backward_kv_len(&self) -> usize {
        match self.rows {
            true => self.kv * (self.heads / self.group) * self.d,
            false => self.kv * self.d,
        }
    }
}

thread_local! {
    /// Each thread's scratch for its attention tasks (a block's scores and their
    /// gradients), reused across calls. Taken per task from the pool, their number at once
    /// depended on how rayon scheduled the tasks, and a steady-state step could find the
    /// pool one buffer short.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Grows every pool thread's scratch to `len` floats before a call's tasks start: which
/// threads run how many tasks depends on rayon's scheduling (a batch of four sequences is
/// four tasks), so a thread that ran none in the warm-up steps would otherwise grow its
/// scratch in a steady-state step.
fn reserve_scratch(len: usize) {
    // Every pool thread already holds this much: skip the broadcast, which wakes every
    // thread (a decoder generates with one small attention call per layer and token).
    static RESERVED: AtomicUsize = AtomicUsize::new(0);
    if RESERVED.load(Relaxed) >= len {
        return;
    }
    rayon::broadcast(|_| {
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let (a, b) = &mut *scratch;
            for v in [a, b] {
                v.reserve(len.saturating_sub(v.len()));
            }
        })
    });
    RESERVED.fetch_max(len, Relaxed);
}

/// Runs `f` with this thread's two scratch buffers of `len` values each, holding whatever
/// an earlier task left: every block's scores and gradients are written (products with
/// `beta = 0`, masked tails filled) before they are read, and zeroing 128 KiB per task was
/// 4% of the attention's time.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32], &mut [f32]) -> R) -> R {
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        let (a, b) = &mut *scratch;
        for v in [&mut *a, &mut *b] {
            if v.len() < len {
                v.resize(len, 0.0);
            }
        }
        f(&mut a[..len], &mut b[..len])
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
    let shape = check_attention(q, k, v, mask)?;
    let lay = Layout::of_items(shape, mask.heads.max(1));
    let (out, lse, finite) = forward_in(lay, shape.items, (q, k, v), mask, scale)?;
    let out = NdTensor::from_vec(out, q.shape().dims())?;
    out.set_finite(finite);
    Ok((out, NdTensor::from_vec(lse, &[shape.items * shape.t])?))
}

/// Forward over the rows layout (`DecoderOps::self_attention_rows`); `lse` as [`forward`]'s.
pub(crate) fn forward_rows(
    q: &NdTensor,
    k: &NdTensor,
    v: &NdTensor,
    mask: &AttentionMask<'_, NdTensor>,
    seqs: usize,
    scale: f32,
) -> Result<(NdTensor, NdTensor)> {
    let shape = check_attention_rows(q, k, v, mask, seqs)?;
    let items = shape.seqs * shape.heads;
    let (out, lse, finite) = forward_in(Layout::of_rows(shape), items, (q, k, v), mask, scale)?;
    let out = NdTensor::from_vec(out, q.shape().dims())?;
    out.set_finite(finite);
    Ok((out, NdTensor::from_vec(lse, &[items * shape.t])?))
}

/// The forward of `items` query items laid out as `lay` says: `(out, lse, whether out is
/// all finite)`.
fn forward_in(
    lay: Layout,
    items: usize,
    (q, k, v): (&NdTensor, &NdTensor, &NdTensor),
    mask: &AttentionMask<'_, NdTensor>,
    scale: f32,
) -> Result<(Vec<f32>, Vec<f32>, bool)> {
    let Layout { t, kv, d, .. } = lay;
    let (qs, ks, vs) = (q.as_slice(), k.as_slice(), v.as_slice());
    // Every element is written by its task: each query block's output rows by a product
    // with `beta = 0` (zeros where no key is visible), its log-sum-exps one per row, so
    // nothing is zero-filled first. (At head size 0 there is no output to split into
    // tasks; the log-sum-exps are then left unwritten, and nothing reads them: the
    // backward's gradients are empty too.)
    let mut out = pool::take_for_overwrite(items * t * d);
    let mut lse = pool::take_for_overwrite(items * t);
    let vis = Visibility::of(mask);
    let per = lay.forward_items();
    reserve_scratch(vis.block().min(t) * kv);
    let bad = AtomicBool::new(false);
    let task = |(n, (o, l)): (usize, (&mut [f32], &mut [f32]))| -> Result<()> {
        let base = lay.query(n * per).0;
        with_scratch(vis.block().min(t) * kv, |p, _| {
            for u in 0..per {
                let i = n * per + u;
                let (keep, l) = (vis.keep(i, kv), &mut l[u * t..(u + 1) * t]);
                let (qa, ka) = (lay.query(i), lay.key(i));
                for q0 in (0..t).step_by(vis.block()) {
                    let q1 = (q0 + vis.block()).min(t);
                    let nk = vis.keys(q1, kv);
                    let rows = &mut p[..(q1 - q0) * kv];
                    block_scores((qs, ks), (qa, ka), (q0, q1, nk, d, kv), scale, rows)?;
                    let mut inv_sums = [0.0f32; FULL_BLOCK];
                    for (r, row) in rows.chunks_mut(kv).enumerate() {
                        let seen = vis.seen(q0 + r, nk);
                        (l[q0 + r], inv_sums[r]) = softmax_visible(row, keep, seen);
                    }
                    let out = &mut o[qa.0 - base + q0 * qa.1..];
                    gemm_serial(
                        1.0,
                        view(rows, 0, q1 - q0, nk, kv),
                        view(vs, ka.0, nk, d, ka.1),
                        0.0,
                        out,
                        qa.1,
                    )?;
                    // Each query's output row over its sum of exponentials: d values a
                    // row, where normalising the probabilities took kv.
                    for (r, inv) in inv_sums[..q1 - q0].iter().enumerate() {
                        out[r * qa.1..r * qa.1 + d]
                            .iter_mut()
                            .for_each(|v| *v *= inv);
                    }
                }
            }
            // The task's output is in L2: its finiteness costs no pass over memory (the
            // output projection checks its input; see `NdTensor`).
            if !vectorize::all_finite(o) {
                bad.store(true, Relaxed);
            }
            Ok(())
        })
    };
    out.par_chunks_mut((per * t * d).max(1))
        .zip(lse.par_chunks_mut((per * t).max(1)))
        .enumerate()
        .try_for_each(task)?;
    Ok((out, lse, !bad.into_inner()))
}

/// In place: the softmax of `row` over the keys `j < seen` with `keep[j] != 0` before its
/// normalisation (`e^(s - max)`), every other entry 0 (all of them when the query sees no
/// key). Returns the log-sum-exp of the visible scores (`+inf` when there are none, so
/// that `e^(s - lse)` is 0) and the reciprocal of the exponentials' sum (0 for none),
/// which the caller applies to the output row: `d` multiplies, not `kv` (scaling the
/// probabilities here, unvectorized, held 11% of a MiniLM layer's attention forward).
fn softmax_visible(row: &mut [f32], keep: &[u32], seen: usize) -> (f32, f32) {
    // Masked keys to -inf (their exponential is 0), in the pass that finds the maximum.
    let max = vectorize::mask_and_max(&mut row[..seen], keep);
    row[seen..].iter_mut().for_each(|s| *s = 0.0);
    if max == f32::NEG_INFINITY {
        row[..seen].iter_mut().for_each(|s| *s = 0.0);
        return (f32::INFINITY, 0.0);
    }
    let sum = vectorize::exp_in_place_sum(&mut row[..seen], max);
    (max + sum.ln() as f32, (1.0 / sum) as f32)
}

/// One backward task's `dq`, and its `dk` and `dv`.
type TaskGrads<'a> = (&'a mut [f32], (&'a mut [f32], &'a mut [f32]));

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
    let lay = Layout::of_items(shape, mask.heads.max(1));
    backward_in(lay, shape.items, (q, k, v), (lse, d_out), mask, scale)
}

/// Backward over the rows layout (`DecoderOps::self_attention_rows_backward`).
pub(crate) fn backward_rows(
    (q, k, v): (&NdTensor, &NdTensor, &NdTensor),
    lse: &NdTensor,
    mask: &AttentionMask<'_, NdTensor>,
    seqs: usize,
    d_out: &NdTensor,
    scale: f32,
) -> Result<(NdTensor, NdTensor, NdTensor)> {
    let shape = check_attention_rows(q, k, v, mask, seqs)?;
    let items = shape.seqs * shape.heads;
    backward_in(
        Layout::of_rows(shape),
        items,
        (q, k, v),
        (lse, d_out),
        mask,
        scale,
    )
}

/// The backward of `items` query items laid out as `lay` says: `(dq, dk, dv)` shaped as
/// `q`, `k`, `v`.
fn backward_in(
    lay: Layout,
    items: usize,
    (q, k, v): (&NdTensor, &NdTensor, &NdTensor),
    (lse, d_out): (&NdTensor, &NdTensor),
    mask: &AttentionMask<'_, NdTensor>,
    scale: f32,
) -> Result<(NdTensor, NdTensor, NdTensor)> {
    let Layout { t, kv, .. } = lay;
    if lse.shape().dims() != [items * t] || d_out.shape().dims() != q.shape().dims() {
        return Err(Error::shape(
            "self_attention_backward saved log-sum-exp / d_out",
            format!("[{}] and {:?}", items * t, q.shape().dims()),
            lse.shape(),
        ));
    }
    let slices = (
        q.as_slice(),
        k.as_slice(),
        v.as_slice(),
        lse.as_slice(),
        d_out.as_slice(),
    );
    let vis = Visibility::of(mask);
    // `dq` is written whole by its task's products (`beta = 0`, see `forward_in`); `dk` and
    // `dv` sum over query blocks and items, so each task zeroes its slices first.
    let mut dq = pool::take_for_overwrite(q.numel());
    let mut dk = pool::take_for_overwrite(k.numel());
    let mut dv = pool::take_for_overwrite(v.numel());
    let per = lay.backward_items();
    reserve_scratch(vis.block().min(t) * kv);
    let task = |(n, (dq, (dk, dv))): (usize, TaskGrads<'_>)| {
        dk.fill(0.0);
        dv.fill(0.0);
        let (q_base, k_base) = (lay.query(n * per).0, lay.key(n * per).0);
        with_scratch(vis.block().min(t) * kv, |p, ds| {
            for u in 0..per {
                let i = n * per + u;
                let (qa, ka) = (lay.query(i), lay.key(i));
                query_item_backward(
                    slices,
                    (i, qa, ka, vis),
                    (lay, scale),
                    (p, ds),
                    (
                        &mut dq[qa.0 - q_base..],
                        &mut dk[ka.0 - k_base..],
                        &mut dv[ka.0 - k_base..],
                    ),
                )?;
            }
            Ok(())
        })
    };
    let kv_len = lay.backward_kv_len().max(1);
    dq.par_chunks_mut((per * t * lay.d).max(1))
        .zip(dk.par_chunks_mut(kv_len).zip(dv.par_chunks_mut(kv_len)))
        .enumerate()
        .try_for_each(task)?;
    Ok((
        NdTensor::from_vec(dq, q.shape().dims())?,
        NdTensor::from_vec(dk, k.shape().dims())?,
        NdTensor::from_vec(dv, v.shape().dims())?,
    ))
}

/// The backward of query item `i` (its matrices at `qa`, its key/value item's at `ka`):
/// writes its `dq` and adds its share to the `dk`, `dv` of its key/value item, each slice
/// starting at the item's first element. `p` and `ds` are scratch blocks.
#[allow(clippy::type_complexity)]
fn query_item_backward(
    (qs, ks, vs, ls, gs): (&[f32], &[f32], &[f32], &[f32], &[f32]),
    (i, qa, ka, vis): (usize, At, At, Visibility<'_>),
    (lay, scale): (Layout, f32),
    (p, ds): (&mut [f32], &mut [f32]),
    (dq, dk, dv): (&mut [f32], &mut [f32], &mut [f32]),
) -> Result<()> {
    let Layout { t, kv, d, .. } = lay;
    let keep = vis.keep(i, kv);
    for q0 in (0..t).step_by(vis.block()) {
        let q1 = (q0 + vis.block()).min(t);
        let (bq, nk) = (q1 - q0, vis.keys(q1, kv));
        let p = &mut p[..bq * kv];
        block_scores((qs, ks), (qa, ka), (q0, q1, nk, d, kv), scale, p)?;
        for (r, row) in p.chunks_mut(kv).enumerate() {
            let (seen, l) = (vis.seen(q0 + r, nk), ls[i * t + q0 + r]);
            // Keys past the query's last visible one, and padding, to -inf (weight 0).
            vectorize::mask_and_max(&mut row[..seen], keep);
            row[seen..nk].fill(f32::NEG_INFINITY);
            vectorize::exp_scale_in_place(&mut row[..nk], l, 1.0);
        }
        let p = view(p, 0, bq, nk, kv);
        let (q_block, g) = (
            view(qs, qa.0 + q0 * qa.1, bq, d, qa.1),
            view(gs, qa.0 + q0 * qa.1, bq, d, qa.1),
        );
        // dv[:nk] += pᵀ·g
        gemm_serial(1.0, p.t(), g, 1.0, dv, ka.1)?;
        // dp = g·v[:nk]ᵀ, then ds = p ⊙ (dp - rowsum(p ⊙ dp)).
        let ds = &mut ds[..bq * kv];
        gemm_serial(1.0, g, view(vs, ka.0, nk, d, ka.1).t(), 0.0, ds, kv)?;
        for (r, row) in ds.chunks_mut(kv).enumerate() {
            vectorize::softmax_backward_row(&p.data[r * kv..r * kv + nk], &mut row[..nk]);
        }
        let ds = view(ds, 0, bq, nk, kv);
        // dq = scale·ds·k[:nk]; dk[:nk] += scale·dsᵀ·q
        gemm_serial(
            scale,
            ds,
            view(ks, ka.0, nk, d, ka.1),
            0.0,
            &mut dq[q0 * qa.1..],
            qa.1,
        )?;
        gemm_serial(scale, ds.t(), q_block, 1.0, dk, ka.1)?;
    }
    Ok(())
}
