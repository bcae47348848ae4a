//! An adapter's term handed to its base layer's products (LoRA and DoRA without dropout):
//! the forward's `s·H Bᵀ` joins the base's `x Wᵀ`, the backward's `s·(dy B) A` joins its
//! `dy W`, so neither costs a second pass over the output. For a dense base the whole
//! backward can be one backend operation ([`LoraOps::lora_dense_backward`]), which reads
//! `dy` once for the base product and both of LoRA's projections of it.

use crate::backend::{Tensor, Transpose};
use crate::error::Result;
use crate::linear::{Linear, LowRank};
use crate::ops::{LoraGrads, LoraOps};

/// A low-rank adapter's forward with its term handed to the base's product: `h = x_lora Aᵀ`
/// (`x_lora` is `x`, or `dropped`, `x` under the dropout mask), which `check` accepts or
/// rejects, then `base(x) + s·h Bᵀ` in one [`Linear::forward_plus`]. Returns the output
/// and `h`. Without dropout, a dense base on a backend that fuses it
/// ([`LoraOps::lora_dense_forward`]) takes both in one product over `x`.
pub(crate) fn forward_through_base<B: LoraOps>(
    backend: &B,
    base: &dyn Linear<B>,
    (a, b, s): (&B::Tensor, &B::Tensor, f32),
    (x, dropped): (&B::Tensor, Option<&B::Tensor>),
    check: impl FnOnce(&B::Tensor) -> Result<()>,
) -> Result<(B::Tensor, B::Tensor)> {
    // Without dropout a dense base can take the whole forward.
    if let Some(dense) = base.as_dense().filter(|_| dropped.is_none()) {
        let weights = dense.weight_for_forward(x)?;
        let y_shape = x.shape().with_last(dense.out_features());
        if let Some((y, h)) = backend.lora_dense_forward(x, weights, (a, b, s), y_shape.dims())? {
            check(&h)?;
            return Ok((y, h));
        }
    }
    let x_lora = dropped.unwrap_or(x);
    let (rows, r) = (x_lora.shape().as_matrix().0, a.shape().as_matrix().0);
    let h = backend.matmul(
        1.0,
        (x_lora, Transpose::No),
        (a, Transpose::Yes),
        &[rows, r],
    )?;
    check(&h)?;
    let term = LowRank {
        u: &h,
        v: b,
        scale: s,
    };
    let y = base.forward_plus(backend, x, term)?;
    Ok((y, h))
}

/// A low-rank adapter's backward with its input gradient handed to the base's product
/// (no dropout): with `g = dy B`, `dB = s·dyᵀ h`, `dA = s·gᵀ x`, and
/// `dx = base'(dy) + s·g A` in one [`Linear::backward_plus`]. `(a, b, s)` are `lora_A`,
/// `lora_B` and the scaling; `h = x Aᵀ` from the forward. A dense base on a backend that
/// fuses it ([`LoraOps::lora_dense_backward`]) takes the whole backward in one product
/// over `dy` instead.
pub(crate) fn backward_through_base<B: LoraOps>(
    backend: &B,
    base: &dyn Linear<B>,
    (a, b, s): (&B::Tensor, &B::Tensor, f32),
    x: &B::Tensor,
    h: &B::Tensor,
    dy: &B::Tensor,
) -> Result<(B::Tensor, LoraGrads<B::Tensor>)> {
    if let Some(dense) = base.as_dense() {
        let w = dense.weight_for_input_grad(dy)?;
        let dx_shape = dy.shape().with_last(dense.in_features());
        if let Some(fused) =
            backend.lora_dense_backward(dy, w, (a, b, s), (x, h), dx_shape.dims())?
        {
            return Ok(fused);
        }
    }
    let (r, in_f) = a.shape().as_matrix();
    let (rows, out_f) = (x.shape().as_matrix().0, b.shape().as_matrix().0);
    let d_b = backend.matmul(s, (dy, Transpose::Yes), (h, Transpose::No), &[out_f, r])?;
    let g_b = backend.matmul(1.0, (dy, Transpose::No), (b, Transpose::No), &[rows, r])?;
    let d_a = backend.matmul(s, (&g_b, Transpose::Yes), (x, Transpose::No), &[r, in_f])?;
    let term = LowRank {
        u: &g_b,
        v: a,
        scale: s,
    };
    let dx = base.backward_plus(backend, dy, term)?;
    Ok((dx, LoraGrads { d_a, d_b }))
}
