//! Causal self-attention on ndarray, fused per (sequence, head) item: one task per item
//! across the cores, queries in blocks of [`BLOCK`] rows, and each block multiplies only
//! the keys it may see (`j <= past + last query of the block`), so the masked upper
//! triangle of the scores is never computed, in the forward or the backward. The masked
//! softmax runs on the visible prefix of each row. Same results as the default
//! (`lora_core::ops::attention_forward`) within rounding, which the cross-backend suite
//! checks.

use lora_core::ops::{AttentionMask, check_attention, check_attention_backward};
use lora_core::{Result, Transpose};
use rayon::prelude::*;

use crate::gemm::{View, gemm_serial};
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

/// Keys visible to the query block `q0..q1`: a prefix of the `kv` keys.
fn visible_keys(past: usize, q1: usize, kv: usize) -> usize {
    (past + q1).min(kv)
}

/// Forward; returns `(out [items, t, d], probs [items * t, kv])`.
pub(crate) fn forward(
    q: &NdTensor,
    k: &NdTensor,
    v: &NdTensor,
    mask: &AttentionMask<'_, NdTensor>,
    scale: f32,
) -> Result<(NdTensor, NdTensor)> {
    let (items, t, kv, d) = check_attention(q, k, v, mask)?;
    let (qs, ks, vs) = (q.as_slice(), k.as_slice(), v.as_slice());
    let mut out = vec![0.0f32; items * t * d];
    let mut probs = vec![0.0f32; items * t * kv];
    let heads = mask.heads.max(1);
    let item = |(i, (o, p)): (usize, (&mut [f32], &mut [f32]))| -> Result<()> {
        let keep = &mask.keep[(i / heads) * kv..(i / heads + 1) * kv];
        let (qi, ki, vi) = (i * t * d, i * kv * d, i * kv * d);
        for q0 in (0..t).step_by(BLOCK) {
            let q1 = (q0 + BLOCK).min(t);
            let nk = visible_keys(mask.past, q1, kv);
            let rows = &mut p[q0 * kv..q1 * kv];
            gemm_serial(
                scale,
                view(qs, qi + q0 * d, q1 - q0, d, d),
                view(ks, ki, nk, d, d).t(),
                0.0,
                rows,
                kv,
            )?;
            for (r, row) in rows.chunks_mut(kv).enumerate() {
                softmax_visible(row, keep, mask.past + q0 + r, nk);
            }
            gemm_serial(
                1.0,
                view(rows, 0, q1 - q0, nk, kv),
                view(vs, vi, nk, d, d),
                0.0,
                &mut o[q0 * d..q1 * d],
                d,
            )?;
        }
        Ok(())
    };
    out.par_chunks_mut(t * d)
        .zip(probs.par_chunks_mut(t * kv))
        .enumerate()
        .try_for_each(item)?;
    Ok((
        NdTensor::from_vec(out, &[items, t, d])?,
        NdTensor::from_vec(probs, &[items * t, kv])?,
    ))
}

/// In place: the softmax of `row[..nk]` over the keys `j <= pos` with `keep[j] != 0`, every
/// other entry 0 (all of them when the query sees no key).
fn softmax_visible(row: &mut [f32], keep: &[u32], pos: usize, nk: usize) {
    let seen = (pos + 1).min(nk);
    let mut max = f32::NEG_INFINITY;
    for (s, &m) in row[..seen].iter().zip(keep) {
        if m != 0 {
            max = max.max(*s);
        }
    }
    row[seen..].iter_mut().for_each(|s| *s = 0.0);
    if max == f32::NEG_INFINITY {
        row[..seen].iter_mut().for_each(|s| *s = 0.0);
        return;
    }
    // Masked keys to -inf: their exponential is 0.
    for (s, &m) in row[..seen].iter_mut().zip(keep) {
        if m == 0 {
            *s = f32::NEG_INFINITY;
        }
    }
    let inv = (1.0 / vectorize::exp_in_place_sum(&mut row[..seen], max)) as f32;
    row[..seen].iter_mut().for_each(|s| *s *= inv);
}

/// One item's `dq`, and its `dk` and `dv`.
type ItemGrads<'a> = (&'a mut [f32], (&'a mut [f32], &'a mut [f32]));

/// Backward; returns `(dq, dk, dv)`. Keys beyond a block's causal prefix have zero
/// probability, so the same prefixes as the forward's are skipped (`past = kv - t`).
pub(crate) fn backward(
    q: &NdTensor,
    k: &NdTensor,
    v: &NdTensor,
    probs: &NdTensor,
    d_out: &NdTensor,
    scale: f32,
) -> Result<(NdTensor, NdTensor, NdTensor)> {
    let (items, t, d, kv) = check_attention_backward(q, k, v, probs, d_out)?;
    let past = kv.saturating_sub(t);
    let (qs, ks, vs, ps, gs) = (
        q.as_slice(),
        k.as_slice(),
        v.as_slice(),
        probs.as_slice(),
        d_out.as_slice(),
    );
    let mut dq = vec![0.0f32; items * t * d];
    let mut dk = vec![0.0f32; items * kv * d];
    let mut dv = vec![0.0f32; items * kv * d];
    let item = |(i, (dq, (dk, dv))): (usize, ItemGrads<'_>)| {
        let (qi, ki, pi) = (i * t * d, i * kv * d, i * t * kv);
        let mut ds = vec![0.0f32; BLOCK * kv];
        for q0 in (0..t).step_by(BLOCK) {
            let q1 = (q0 + BLOCK).min(t);
            let (bq, nk) = (q1 - q0, visible_keys(past, q1, kv));
            let p = view(ps, pi + q0 * kv, bq, nk, kv);
            let g = view(gs, qi + q0 * d, bq, d, d);
            // dv[:nk] += pᵀ·g
            gemm_serial(1.0, p.t(), g, 1.0, dv, d)?;
            // dp = g·v[:nk]ᵀ, then ds = p ⊙ (dp - rowsum(p ⊙ dp)).
            let ds = &mut ds[..bq * kv];
            gemm_serial(1.0, g, view(vs, ki, nk, d, d).t(), 0.0, ds, kv)?;
            for (r, row) in ds.chunks_mut(kv).enumerate() {
                let pr = &ps[pi + (q0 + r) * kv..pi + (q0 + r) * kv + nk];
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
    };
    dq.par_chunks_mut(t * d)
        .zip(dk.par_chunks_mut(kv * d).zip(dv.par_chunks_mut(kv * d)))
        .enumerate()
        .try_for_each(item)?;
    Ok((
        NdTensor::from_vec(dq, &[items, t, d])?,
        NdTensor::from_vec(dk, &[items, kv, d])?,
        NdTensor::from_vec(dv, &[items, kv, d])?,
    ))
}
