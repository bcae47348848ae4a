//! Fused decoder-LLM operations on ndarray: each is one pass over its rows, split across
//! threads, instead of the default's chain of primitives (each of which allocates and
//! walks the whole tensor). Same semantics as `lora_core::DecoderOps`'s defaults, which
//! the cross-backend suite checks them against.

use lora_core::ops::{
    AttentionMask, check_cross_entropy, check_embedding_backward, check_rms_norm,
    check_rms_norm_backward, check_rotary,
};
use lora_core::{DecoderOps, Result, Tensor};
use rayon::prelude::*;

use crate::attention;
use crate::backend::{NdArray, PAR_MIN_ELEMS};
use crate::pool;
use crate::tensor::NdTensor;
use crate::vectorize;

/// Runs `work(row index, out row)` over the `n`-wide rows of `out`, on several threads when
/// the tensor is large.
fn for_rows(out: &mut [f32], n: usize, work: impl Fn(usize, &mut [f32]) + Sync + Send) {
    let n = n.max(1);
    if out.len() < PAR_MIN_ELEMS {
        out.chunks_mut(n).enumerate().for_each(|(r, o)| work(r, o));
    } else {
        out.par_chunks_mut(n)
            .enumerate()
            .for_each(|(r, o)| work(r, o));
    }
}

/// Log-sum-exp of a row: exponentials within 2 ulp after the max shift, summed in f64.
fn logsumexp(row: &[f32]) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    f64::from(max) + vectorize::sum_exp(row, max).ln()
}

impl DecoderOps for NdArray {
    fn self_attention(
        &self,
        q: &NdTensor,
        k: &NdTensor,
        v: &NdTensor,
        mask: &AttentionMask<'_, NdTensor>,
        scale: f32,
    ) -> Result<(NdTensor, NdTensor)> {
        attention::forward(q, k, v, mask, scale)
    }

    fn self_attention_backward(
        &self,
        qkv: (&NdTensor, &NdTensor, &NdTensor),
        saved: &NdTensor,
        mask: &AttentionMask<'_, NdTensor>,
        d_out: &NdTensor,
        scale: f32,
    ) -> Result<(NdTensor, NdTensor, NdTensor)> {
        attention::backward(qkv, saved, mask, d_out, scale)
    }

    fn self_attention_rows(
        &self,
        q: &NdTensor,
        k: &NdTensor,
        v: &NdTensor,
        mask: &AttentionMask<'_, NdTensor>,
        seqs: usize,
        scale: f32,
    ) -> Result<(NdTensor, NdTensor)> {
        attention::forward_rows(q, k, v, mask, seqs, scale)
    }

    fn self_attention_rows_backward(
        &self,
        qkv: (&NdTensor, &NdTensor, &NdTensor),
        saved: &NdTensor,
        mask: &AttentionMask<'_, NdTensor>,
        seqs: usize,
        d_out: &NdTensor,
        scale: f32,
    ) -> Result<(NdTensor, NdTensor, NdTensor)> {
        attention::backward_rows(qkv, saved, mask, seqs, d_out, scale)
    }

    fn rms_norm(&self, x: &NdTensor, weight: &NdTensor, eps: f32) -> Result<(NdTensor, NdTensor)> {
        let (rows, n) = check_rms_norm(x, weight)?;
        let (src, w) = (x.as_slice(), weight.as_slice());
        let inv_rms: Vec<f32> = (0..rows)
            .map(|r| {
                let row = &src[r * n..(r + 1) * n];
                let mean_sq = row
                    .iter()
                    .map(|&v| f64::from(v) * f64::from(v))
                    .sum::<f64>()
                    / n as f64;
                (1.0 / (mean_sq + f64::from(eps)).sqrt()) as f32
            })
            .collect();
        let mut out = pool::take_for_overwrite(src.len());
        // transformers' order: `weight * (x * rsqrt(mean(x²) + eps))`.
        for_rows(&mut out, n, |r, o| {
            let row = &src[r * n..(r + 1) * n];
            let ir = inv_rms[r];
            for ((o, &v), &g) in o.iter_mut().zip(row).zip(w) {
                *o = g * (v * ir);
            }
        });
        Ok((
            NdTensor::from_vec(out, x.shape().dims())?,
            NdTensor::from_vec(inv_rms, &[rows])?,
        ))
    }

    fn rms_norm_backward(
        &self,
        x: &NdTensor,
        weight: &NdTensor,
        inv_rms: &NdTensor,
        dy: &NdTensor,
    ) -> Result<NdTensor> {
        let (_, n) = check_rms_norm_backward(x, weight, inv_rms, dy)?;
        let (src, w, ir, g) = (
            x.as_slice(),
            weight.as_slice(),
            inv_rms.as_slice(),
            dy.as_slice(),
        );
        let mut out = pool::take_for_overwrite(src.len());
        // dx = r·(dy·w) - x·r³·mean(dy·w·x)
        for_rows(&mut out, n, |r, o| {
            let (xr, gr) = (&src[r * n..(r + 1) * n], &g[r * n..(r + 1) * n]);
            let gx: f64 = xr
                .iter()
                .zip(gr)
                .zip(w)
                .map(|((&x, &g), &w)| f64::from(g * w) * f64::from(x))
                .sum();
            let inv = ir[r];
            let coef = (gx / n as f64) as f32 * inv * inv * inv;
            for (((o, &x), &g), &w) in o.iter_mut().zip(xr).zip(gr).zip(w) {
                *o = g * w * inv - x * coef;
            }
        });
        NdTensor::from_vec(out, x.shape().dims())
    }

    fn silu(&self, x: &NdTensor) -> Result<NdTensor> {
        let src = x.as_slice();
        let out = vectorize::par_kernel(src, src, vectorize::silu);
        NdTensor::from_vec(out, x.shape().dims())
    }

    fn silu_backward(&self, x: &NdTensor, dy: &NdTensor) -> Result<NdTensor> {
        lora_core::backend::check_same_shape("silu_backward", x.shape(), dy.shape())?;
        let out = vectorize::par_kernel(x.as_slice(), dy.as_slice(), vectorize::silu_backward);
        NdTensor::from_vec(out, x.shape().dims())
    }

    fn rotary(&self, x: &NdTensor, cos: &NdTensor, sin: &NdTensor) -> Result<NdTensor> {
        let (_, d) = check_rotary("rotary", x, cos, sin)?;
        rotate(x, cos, sin, d, false)
    }

    fn rotary_backward(&self, dy: &NdTensor, cos: &NdTensor, sin: &NdTensor) -> Result<NdTensor> {
        let (_, d) = check_rotary("rotary_backward", dy, cos, sin)?;
        rotate(dy, cos, sin, d, true)
    }

    fn cross_entropy(&self, logits: &NdTensor, targets: &[Option<usize>]) -> Result<NdTensor> {
        let (_, vocab) = check_cross_entropy(logits, targets)?;
        let src = logits.as_slice();
        let nll: Vec<f32> = targets
            .par_iter()
            .enumerate()
            .map(|(r, t)| match t {
                Some(t) => {
                    let row = &src[r * vocab..(r + 1) * vocab];
                    (logsumexp(row) - f64::from(row[*t])) as f32
                }
                None => 0.0,
            })
            .collect();
        NdTensor::from_vec(nll, &[targets.len()])
    }

    fn cross_entropy_backward(
        &self,
        logits: &NdTensor,
        targets: &[Option<usize>],
        scale: f32,
    ) -> Result<NdTensor> {
        // The clone shares the storage, so the fused call writes into a copy.
        Ok(self
            .cross_entropy_with_grad(logits.clone(), targets, scale)?
            .1)
    }

    fn cross_entropy_with_grad(
        &self,
        logits: NdTensor,
        targets: &[Option<usize>],
        scale: f32,
    ) -> Result<(NdTensor, NdTensor)> {
        let (rows, vocab) = check_cross_entropy(&logits, targets)?;
        let mut grad = logits;
        let mut nll = vec![0.0f32; rows];
        // The gradient overwrites the logits (a copy only if they are shared).
        grad.as_mut_slice()
            .par_chunks_mut(vocab.max(1))
            .zip(nll.par_iter_mut())
            .zip(targets.par_iter())
            .for_each(|((row, nll), t)| {
                let Some(t) = *t else {
                    row.fill(0.0);
                    return;
                };
                let lse = logsumexp(row);
                *nll = (lse - f64::from(row[t])) as f32;
                vectorize::exp_scale_in_place(row, lse as f32, scale);
                row[t] -= scale;
            });
        Ok((NdTensor::from_vec(nll, &[rows])?, grad))
    }

    fn embedding_backward(
        &self,
        d_out: &NdTensor,
        ids: &[usize],
        vocab: usize,
    ) -> Result<NdTensor> {
        let hidden = check_embedding_backward(d_out, ids, vocab)?;
        let src = d_out.as_slice();
        let mut grad = pool::zeros(vocab * hidden);
        // In the order of `ids`, like the default (and PyTorch's CPU embedding backward).
        for (i, &id) in ids.iter().enumerate() {
            let dst = &mut grad[id * hidden..(id + 1) * hidden];
            let row = &src[i * hidden..(i + 1) * hidden];
            dst.iter_mut().zip(row).for_each(|(d, &s)| *d += s);
        }
        NdTensor::from_vec(grad, &[vocab, hidden])
    }
}

/// Rotary embedding per row of `d`: `x·cos + rotate_half(x)·sin` with
/// `rotate_half([x1, x2]) = [-x2, x1]`, or with `transpose` its adjoint
/// `x·cos + rotate_half_transposed(x·sin)` (`[a1, a2] -> [a2, -a1]`), the backward.
fn rotate(
    x: &NdTensor,
    cos: &NdTensor,
    sin: &NdTensor,
    d: usize,
    transpose: bool,
) -> Result<NdTensor> {
    let (src, c, s) = (x.as_slice(), cos.as_slice(), sin.as_slice());
    let half = d / 2;
    let mut out = pool::take_for_overwrite(src.len());
    for_rows(&mut out, d, |r, o| {
        let at = r * d;
        let (xr, cr, sr) = (&src[at..at + d], &c[at..at + d], &s[at..at + d]);
        for j in 0..half {
            let (lo, hi) = (j, j + half);
            if transpose {
                o[lo] = xr[lo] * cr[lo] + xr[hi] * sr[hi];
                o[hi] = xr[hi] * cr[hi] - xr[lo] * sr[lo];
            } else {
                o[lo] = xr[lo] * cr[lo] - xr[hi] * sr[lo];
                o[hi] = xr[hi] * cr[hi] + xr[lo] * sr[hi];
            }
        }
    });
    NdTensor::from_vec(out, x.shape().dims())
}
