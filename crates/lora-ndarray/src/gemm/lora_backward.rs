//! `LoraOps::lora_dense_backward` on our blocked kernel: LoRA's whole backward through a
//! dense frozen weight with one read of `dy` from memory.
//!
//! Composed from products, the backward reads `dy` (`[tokens, out]`, the largest operand)
//! three times: for the base's `dx = dy W`, for `dB = s·dyᵀ H` and for `g = dy B`. Here
//! the input gradient's product walks `dy` block by block (rows `MC` at a time, columns
//! `KC` at a time), and a [`BlockHook`](sgemm::BlockHook) computes both of LoRA's
//! projections from each block just before the product's tiles read it (in place, so the
//! hook's read brings it into L2 for them): `g`'s rows (a narrow product added slice by
//! slice) and each thread's partial `dyᵀ H` (a token reduction). `g` is complete for a
//! row block when its last slice has been seen, which is when the kernel packs it as the
//! product's second segment, so `dx = dy W + s·g A` still comes out of the same product;
//! the same call adds the block's `gᵀ x` to the thread's partial `dA`, reading those rows
//! of `x` whole (a separate `gᵀ x` product split the columns of `x` between threads and
//! read it a few hundred bytes per row: 10% of the layer's backward at 2048x384x384 r8).
//! Each thread takes a band of rows (tokens); the partial `dA`s and `dB`s are summed at
//! the end.
#![allow(unsafe_code)]

use lora_core::backend::{Transpose, check_gemm};
use lora_core::{Error, LoraGrads, Result, Tensor};
use rayon::prelude::*;

use super::{ConstPtr, PARALLEL_MIN_WORK, SendPtr};
use crate::few_rows::narrow_times_wt;
use crate::sgemm::{self, Operand};
use crate::tensor::NdTensor;
use crate::{pool, skinny, token_reduction};

/// `(dx, dA, dB)` of LoRA `(a, b, s)` over the dense weight `w` (`[out, in]`) for the
/// output gradient `dy` (`[.., out]`), the input `x` and `h = x Aᵀ`; `dx` of shape
/// `dx_shape`. `None` where the fused product does not apply ([`row_bands`]).
pub(crate) fn lora_dense_backward(
    dy: &NdTensor,
    w: &NdTensor,
    (a, b, s): (&NdTensor, &NdTensor, f32),
    (x, h): (&NdTensor, &NdTensor),
    dx_shape: &[usize],
) -> Result<Option<(NdTensor, LoraGrads<NdTensor>)>> {
    let c_shape = lora_core::Shape::new(dx_shape);
    let (m, inp, out) = check_gemm(
        dy.shape(),
        Transpose::No,
        w.shape(),
        Transpose::No,
        &c_shape,
    )?;
    let what = "fused LoRA backward";
    let r = adapter_rank(what, (a, b), (inp, out))?;
    expect_matrix(what, "input x", x, [m, inp])?;
    expect_matrix(what, "saved projection x Aᵀ", h, [m, r])?;
    let Some(bands) = row_bands((m, inp, out), r) else {
        return Ok(None);
    };
    // Row strides of each band's partial dBᵀ ([r, out]) and dA ([r, inp]): whole 16-lane
    // vectors. A band's partials lie together: dBᵀ, then dA.
    let (ld, ld_a) = (out.div_ceil(16) * 16, inp.div_ceil(16) * 16);
    let band_len = r * (ld + ld_a);
    let mut partials = pool::zeros(bands * band_len);
    // Stale values from the pool: every element of `dx` and `g` is written before it is
    // read (`g`'s rows by their first slice, with beta = 0).
    let mut dx = pool::take_for_overwrite(m * inp);
    let mut g = pool::take_for_overwrite(m * r);
    let (dst, g_ptr, part) = (
        SendPtr(dx.as_mut_ptr()),
        SendPtr(g.as_mut_ptr()),
        SendPtr(partials.as_mut_ptr()),
    );
    // On AVX-512, Bᵀ (`[r, out]`), so that each hook's `g = dy B` slice reads B contiguous
    // along the depth (`slice_product`'s dot products): r x out values, against the m x out
    // of dy. The AVX2 kernels read B as it is (see `slice_product`).
    let b_t = dots_on_this_cpu().then(|| {
        let mut b_t = pool::take_for_overwrite(r * out);
        for (q, row) in b.as_slice().chunks_exact(r).enumerate() {
            for (j, v) in row.iter().enumerate() {
                b_t[j * out + q] = *v;
            }
        }
        b_t
    });
    let src = |t: &NdTensor| ConstPtr(t.as_slice().as_ptr());
    let b_rows_at = match &b_t {
        Some(b_t) => (ConstPtr(b_t.as_ptr()), 1, out as isize),
        None => (src(b), r as isize, 1),
    };
    let (dy_p, w_p, a_p, h_p, x_p) = (src(dy), src(w), src(a), src(h), src(x));
    // A frozen weight's panels, packed once (from its second use on).
    let kept_w = w.kept_b(Transpose::No);
    for_each_band(m, bands, |band, r0, rows| {
        // SAFETY (whole band): `check_gemm` and the checks above matched every operand to
        // (m, inp, out, r); this band reads rows r0..r0 + rows of dy, h and g, writes
        // those rows of dx and g and its own partial, disjoint from other bands'.
        unsafe {
            let dy_band = dy_p.get().add(r0 * out);
            let g_band = g_ptr.get().add(r0 * r);
            let partial = part.get().add(band * band_len);
            let partial_a = partial.add(r * ld);
            // Rows ic..ic + mc, columns pc..pc + kc of dy, before the tiles read them.
            let hook = |ic: usize, mc: usize, pc: usize, kc: usize| {
                let block = dy_band.add(ic * out + pc);
                let g_rows = g_band.add(ic * r);
                let (b_p, b_rs, b_cs) = b_rows_at;
                let b_rows = (b_p.get().offset(pc as isize * b_rs), b_rs, b_cs);
                slice_product((mc, r, kc), (block, out), b_rows, pc == 0, g_rows);
                token_reduction::accumulate(
                    (r, kc, mc),
                    (h_p.get().add((r0 + ic) * r), r as isize),
                    (block, out as isize),
                    (partial.add(pc), ld),
                );
                if pc + kc == out {
                    // g's rows ic..ic + mc are complete: their part of gᵀ x.
                    token_reduction::accumulate(
                        (r, inp, mc),
                        (g_rows, r as isize),
                        (x_p.get().add((r0 + ic) * inp), inp as isize),
                        (partial_a, ld_a),
                    );
                }
            };
            sgemm::sgemm_plus(
                (rows, inp),
                (
                    (dy_band, out as isize, 1),
                    ((w_p.get(), inp as isize, 1), kept_w.map(|w| (w, 0))),
                    out,
                ),
                s,
                ((g_band, r as isize, 1), (a_p.get(), inp as isize, 1), r),
                None,
                (None, Some(&hook as &dyn Fn(usize, usize, usize, usize))),
                dst.get().add(r0 * inp),
                inp,
            );
        }
    });
    // dB[q, j] = s · Σ_bands partial[j, q]; dA[j, p] = s · Σ_bands partial_a[j, p].
    let band_sum = |at: usize| -> f32 {
        s * partials[at..]
            .iter()
            .step_by(band_len)
            .take(bands)
            .sum::<f32>()
    };
    let mut d_b = pool::take_for_overwrite(out * r);
    for (q, row) in d_b.chunks_exact_mut(r).enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = band_sum(j * ld + q);
        }
    }
    let mut d_a = pool::take_for_overwrite(r * inp);
    for (j, row) in d_a.chunks_exact_mut(inp).enumerate() {
        for (p, v) in row.iter_mut().enumerate() {
            *v = band_sum(r * ld + j * ld_a + p);
        }
    }
    pool::give(partials);
    if let Some(b_t) = b_t {
        pool::give(b_t);
    }
    pool::give(g);
    let grads = LoraGrads {
        d_a: NdTensor::from_vec(d_a, &[r, inp])?,
        d_b: NdTensor::from_vec(d_b, &[out, r])?,
    };
    Ok(Some((NdTensor::from_vec(dx, dx_shape)?, grads)))
}

/// Runs `run(band, r0, rows)` in parallel over `bands` bands of rows covering `0..m`
/// (rows `r0..r0 + rows`; the last band may be shorter).
pub(super) fn for_each_band(m: usize, bands: usize, run: impl Fn(usize, usize, usize) + Sync) {
    let per = m.div_ceil(bands.max(1));
    (0..m.div_ceil(per.max(1)))
        .into_par_iter()
        .for_each(|band| run(band, band * per, per.min(m - band * per)));
}

/// The rank of LoRA `(a, b)` on a layer of `inp` inputs and `out` outputs, or an error
/// naming the operation `op` and the factor of the wrong shape.
pub(super) fn adapter_rank(
    op: &str,
    (a, b): (&NdTensor, &NdTensor),
    (inp, out): (usize, usize),
) -> Result<usize> {
    let r = a.shape().as_matrix().0;
    expect_matrix(op, "lora_A", a, [r, inp])?;
    expect_matrix(op, "lora_B", b, [out, r])?;
    Ok(r)
}

/// An error naming `what` of operation `op` unless `t`'s matrix view is `want`.
pub(super) fn expect_matrix(op: &str, what: &str, t: &NdTensor, want: [usize; 2]) -> Result<()> {
    match t.shape().as_matrix() == (want[0], want[1]) {
        true => Ok(()),
        false => Err(Error::shape(
            format!("{op} {what}"),
            format!("{want:?}"),
            t.shape(),
        )),
    }
}

/// How many bands of rows (one per thread, or one for a small product) a fused LoRA
/// product over `m x n x k` with a rank-`r` second segment runs in; `None` where it is
/// not fused: no kernel of ours on this CPU, a product too small or shallow for it, a
/// rank of 64 or more, or a shape our kernel threads by columns (each thread would pack
/// all of the row operand, and the hooks would run twice).
pub(super) fn row_bands((m, n, k): (usize, usize, usize), r: usize) -> Option<usize> {
    let bands = match m * n * k < PARALLEL_MIN_WORK {
        true => 1,
        false => rayon::current_num_threads(),
    };
    let fused = sgemm::available()
        && sgemm::suits(m, n, k)
        && r > 0
        && r < skinny::NARROW
        && r <= sgemm::MAX_EXTRA_DEPTH
        && (bands == 1 || sgemm::prefers_row_panels(m, n, bands, false));
    fused.then_some(bands)
}

/// Whether [`slice_product`] runs a depth-contiguous `y` as dot products: on AVX-512.
fn dots_on_this_cpu() -> bool {
    sgemm::isa() == Some(sgemm::Isa::Avx512)
}

/// One depth slice of a hook's narrow product: `c = a y` for the first slice (`first`),
/// `c += a y` after, with `a` (`mc x kc`, row stride `lda`), `y` (`kc x r`, any strides)
/// and `c` (`mc x r` row-major). On AVX-512 with `y` contiguous along the depth, dot
/// products (`few_rows.rs`); else on the skinny kernels; element by
/// element for a slice shallower than the others take (under 8 deep).
///
/// # Safety
/// The three operands are addressable over those extents; `c` is touched by no one else;
/// the CPU runs our kernels.
pub(super) unsafe fn slice_product(
    (mc, r, kc): (usize, usize, usize),
    (a, lda): (*const f32, usize),
    (y, y_rs, y_cs): Operand,
    first: bool,
    c: *mut f32,
) {
    let beta = if first { 0.0 } else { 1.0 };
    // On AVX-512, with `y` contiguous along the depth (`Aᵀ` read across A's rows, or `B`
    // transposed): dot products of four rows of `a` against four columns of `y` at a time
    // in 16-lane chunks, where `narrow_output` broadcasts every element of `a` into 8-lane
    // FMAs (nine loads per eight FMAs at rank 8). LoRA fwd+bwd over the frozen layer on
    // the Xeon, five interleaved pairs: 2048x384x1536 r8 1.085-1.104 -> 1.070-1.084,
    // 2048x384x384 r8 1.111-1.131 -> 1.101-1.116. The 8-lane dots lost to `narrow_output`
    // there (1.092 -> 1.116-1.132 at 1536, 1.053-1.058 -> 1.095 at 384).
    if dots_on_this_cpu() && y_rs == 1 && y_cs > 0 && kc >= 16 {
        // SAFETY: the r rows of y's transpose are kc long; the rest is forwarded to the
        // caller's contract.
        unsafe { narrow_times_wt((mc, r, kc), 1.0, (a, lda), (y, y_cs as usize), beta, (c, r)) };
        return;
    }
    // SAFETY: forwarded to the caller's contract.
    let done = unsafe {
        skinny::try_run(
            (mc, r, kc),
            1.0,
            (a, lda as isize, 1),
            (y, y_rs, y_cs),
            beta,
            (c, r),
        )
    };
    if done {
        return;
    }
    for i in 0..mc {
        for j in 0..r {
            // SAFETY: forwarded to the caller's contract.
            unsafe {
                let dot: f32 = (0..kc)
                    .map(|p| *a.add(i * lda + p) * *y.offset(p as isize * y_rs + j as isize * y_cs))
                    .sum();
                let at = c.add(i * r + j);
                *at = if first { dot } else { dot + *at };
            }
        }
    }
}
