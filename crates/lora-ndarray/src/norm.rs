//! LayerNorm on ndarray, forward and backward: rows across the cores, each through a row
//! kernel compiled for the CPU at hand (`vectorize::layer_norm_row` and its backward), with
//! a post-LayerNorm block's residual add fused into the forward (`add_layer_norm`: the sum
//! is written and normalized while its row is in L1, instead of in a pass of its own).

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use lora_core::backend::{check_layer_norm, check_layer_norm_backward, check_same_shape};
use lora_core::{Result, Tensor};
use rayon::prelude::*;

use crate::backend::PAR_MIN_ELEMS;
use crate::pool;
use crate::tensor::NdTensor;
use crate::vectorize;

/// `layer_norm(x)`: `(out, stats)`, the per-row `(mean, 1/sqrt(var + eps))` in `stats`.
pub(crate) fn layer_norm(
    x: &NdTensor,
    gamma: &NdTensor,
    beta: &NdTensor,
    eps: f32,
) -> Result<(NdTensor, NdTensor)> {
    normalize(x, None, (gamma, beta), eps)
}

/// `layer_norm(x + residual)`: `(sum, out, stats)`.
pub(crate) fn add_layer_norm(
    x: &NdTensor,
    residual: &NdTensor,
    (gamma, beta): (&NdTensor, &NdTensor),
    eps: f32,
) -> Result<(NdTensor, NdTensor, NdTensor)> {
    check_same_shape("add_layer_norm residual", x.shape(), residual.shape())?;
    let mut sum = pool::take_for_overwrite(x.numel());
    let (out, stats) = normalize(x, Some((residual, &mut sum)), (gamma, beta), eps)?;
    Ok((NdTensor::from_vec(sum, x.shape().dims())?, out, stats))
}

/// LayerNorm of `x`, or of `x + residual` written into the sum buffer on the way.
fn normalize(
    x: &NdTensor,
    residual: Option<(&NdTensor, &mut Vec<f32>)>,
    (gamma, beta): (&NdTensor, &NdTensor),
    eps: f32,
) -> Result<(NdTensor, NdTensor)> {
    let (rows, n) = check_layer_norm(x.shape(), gamma.shape(), beta.shape())?;
    let (src, norm) = (x.as_slice(), (gamma.as_slice(), beta.as_slice(), eps));
    let mut out = pool::take_for_overwrite(src.len());
    let mut stats = pool::take_for_overwrite(rows * 2);
    let (res, mut sum) = residual.map(|(r, s)| (r.as_slice(), s)).unzip();
    let bad = AtomicBool::new(false);
    let work = |r: usize, o: &mut [f32], st: &mut [f32], s: Option<&mut [f32]>| {
        let row = &src[r * n..(r + 1) * n];
        let (mean, rstd) = match (res, s) {
            (Some(res), Some(s)) => {
                vectorize::add_layer_norm_row(row, &res[r * n..(r + 1) * n], s, norm, o)
            }
            _ => vectorize::layer_norm_row(row, norm.0, norm.1, eps, o),
        };
        st[0] = mean;
        st[1] = rstd;
        // The row is in L1: whether it is finite costs no pass over memory (see `NdTensor`).
        if !vectorize::all_finite(o) {
            bad.store(true, Relaxed);
        }
    };
    match (sum.as_mut(), src.len() < PAR_MIN_ELEMS) {
        (Some(s), true) => {
            let parts = out
                .chunks_mut(n)
                .zip(stats.chunks_mut(2))
                .zip(s.chunks_mut(n));
            for (r, ((o, st), s)) in parts.enumerate() {
                work(r, o, st, Some(s));
            }
        }
        (None, true) => {
            for (r, (o, st)) in out.chunks_mut(n).zip(stats.chunks_mut(2)).enumerate() {
                work(r, o, st, None);
            }
        }
        (Some(s), false) => out
            .par_chunks_mut(n)
            .zip(stats.par_chunks_mut(2))
            .zip(s.par_chunks_mut(n))
            .enumerate()
            .for_each(|(r, ((o, st), s))| work(r, o, st, Some(s))),
        (None, false) => out
            .par_chunks_mut(n)
            .zip(stats.par_chunks_mut(2))
            .enumerate()
            .for_each(|(r, (o, st))| work(r, o, st, None)),
    }
    let out = NdTensor::from_vec(out, x.shape().dims())?;
    out.set_finite(!bad.into_inner());
    Ok((out, NdTensor::from_vec(stats, &[rows, 2])?))
}

/// `dx` of [`layer_norm`] from its input `x` (the sum, for [`add_layer_norm`]).
pub(crate) fn layer_norm_backward(
    x: &NdTensor,
    stats: &NdTensor,
    gamma: &NdTensor,
    dy: &NdTensor,
) -> Result<NdTensor> {
    let (_, n) = check_layer_norm_backward(x.shape(), stats.shape(), gamma.shape(), dy.shape())?;
    let (src, st, g, gy) = (
        x.as_slice(),
        stats.as_slice(),
        gamma.as_slice(),
        dy.as_slice(),
    );
    let mut out = pool::take_for_overwrite(src.len());
    let work = |(r, o): (usize, &mut [f32])| {
        let rows = r * n..(r + 1) * n;
        let stats = (st[2 * r], st[2 * r + 1]);
        vectorize::layer_norm_backward_row(&src[rows.clone()], &gy[rows], g, stats, o);
    };
    if src.len() < PAR_MIN_ELEMS {
        out.chunks_mut(n).enumerate().for_each(work);
    } else {
        out.par_chunks_mut(n).enumerate().for_each(work);
    }
    NdTensor::from_vec(out, x.shape().dims())
}
