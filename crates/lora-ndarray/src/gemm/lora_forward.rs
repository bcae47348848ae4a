//! `LoraOps::lora_dense_forward` on our blocked kernel: a LoRA layer's training forward
//! through a dense frozen weight with one read of `x` from memory.
//!
//! Composed, the forward reads `x` twice: for `H = x Aᵀ`, then for the base product
//! `x Wᵀ` (which takes `s·H Bᵀ` and the bias in the same pass, `gemm_plus_new`). Here the
//! base product walks `x` block by block and a [`BlockHook`](crate::sgemm::BlockHook)
//! adds each block's `x Aᵀ` to `H`'s rows just before the tiles read the block (the
//! hook's read brings it into L2 for them); `H`'s rows are complete when the kernel packs
//! them as the product's second segment. Each thread
//! takes a band of rows (tokens), as in the fused backward (`lora_backward.rs`).
#![allow(unsafe_code)]

use lora_core::backend::{Transpose, check_gemm, check_row_broadcast};
use lora_core::{Result, Tensor};

use super::lora_backward::{adapter_rank, for_each_band, row_bands, slice_product};
use super::{ConstPtr, SendPtr};
use crate::pool;
use crate::sgemm;
use crate::tensor::NdTensor;

/// `(y, H)` of LoRA `(a, b, s)` over the dense weight `w` (`[out, in]`) and `bias` for
/// the input `x` (`[.., in]`): `H = x Aᵀ` (`[rows, r]`) and `y = x Wᵀ + s·H Bᵀ + bias`
/// of shape `y_shape`. `None` where the fused product does not apply (`row_bands`).
pub(crate) fn lora_dense_forward(
    x: &NdTensor,
    (w, bias): (&NdTensor, Option<&NdTensor>),
    (a, b, s): (&NdTensor, &NdTensor, f32),
    y_shape: &[usize],
) -> Result<Option<(NdTensor, NdTensor)>> {
    let c_shape = lora_core::Shape::new(y_shape);
    let (m, out, inp) = check_gemm(
        x.shape(),
        Transpose::No,
        w.shape(),
        Transpose::Yes,
        &c_shape,
    )?;
    let r = adapter_rank("fused LoRA forward", (a, b), (inp, out))?;
    if let Some(bias) = bias {
        check_row_broadcast(&c_shape, bias.shape())?;
    }
    let Some(bands) = row_bands((m, out, inp), r) else {
        return Ok(None);
    };
    // Stale values from the pool: the kernel writes every element of `y`, and each row of
    // `H` is written by its first depth slice (beta = 0) before anything reads it.
    let mut y = pool::take_for_overwrite(m * out);
    let mut h = pool::take_for_overwrite(m * r);
    let (dst, h_ptr) = (SendPtr(y.as_mut_ptr()), SendPtr(h.as_mut_ptr()));
    let src = |t: &NdTensor| ConstPtr(t.as_slice().as_ptr());
    let (x_p, w_p, a_p, b_p) = (src(x), src(w), src(a), src(b));
    // A frozen weight's panels, packed once (from its second use on).
    let kept_w = w.kept_b(Transpose::Yes);
    let bias = bias.map(src);
    for_each_band(m, bands, |_, r0, rows| {
        // SAFETY (whole band): `check_gemm` and the checks above matched every operand to
        // (m, out, inp, r); this band reads rows r0..r0 + rows of x and H and writes those
        // rows of y and H, disjoint from other bands'.
        unsafe {
            let x_band = x_p.get().add(r0 * inp);
            let h_band = h_ptr.get().add(r0 * r);
            // Rows ic..ic + mc, columns pc..pc + kc of x, before the tiles read them: x Aᵀ.
            let hook = |ic: usize, mc: usize, pc: usize, kc: usize| {
                let block = x_band.add(ic * inp + pc);
                let h_rows = h_band.add(ic * r);
                // Aᵀ's rows pc..pc + kc: A read across its rows (A is [r, in]).
                let a_t = (a_p.get().add(pc), 1, inp as isize);
                slice_product((mc, r, kc), (block, inp), a_t, pc == 0, h_rows);
            };
            sgemm::sgemm_plus(
                (rows, out),
                (
                    (x_band, inp as isize, 1),
                    ((w_p.get(), 1, inp as isize), kept_w.map(|w| (w, 0))),
                    inp,
                ),
                s,
                ((h_band, r as isize, 1), (b_p.get(), 1, r as isize), r),
                bias.map(|b| b.get()),
                (None, Some(&hook as &dyn Fn(usize, usize, usize, usize))),
                dst.get().add(r0 * out),
                out,
            );
        }
    });
    Ok(Some((
        NdTensor::from_vec(y, y_shape)?,
        NdTensor::from_vec(h, &[m, r])?,
    )))
}
