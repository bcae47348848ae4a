//! The LoRA forward and backward, written once over the backend primitives.
//!
//! Notation (PyTorch layout, see `docs/architecture.md`): `x` is `[n, in]`, `A` is
//! `[r, in]`, `B` is `[out, r]`, `s` the scaling, `M` the dropout mask (or all ones),
//! `X = x ⊙ M`, `H = X Aᵀ` (`[n, r]`), `G = dL/dy`.
//!
//! * forward:  `y += s · H Bᵀ`
//! * backward: `dB = s · Gᵀ H`, `dA = s · (G B)ᵀ X`, `dx += s · ((G B) A) ⊙ M`
//!
//! Nothing here ever forms the `[out, in]` product `B A`: all work goes through the rank-r
//! dimension, which is what keeps LoRA's overhead over the frozen layer at a few percent.

use crate::backend::{Backend, BinaryOp, Tensor as _, Transpose};
use crate::error::{Error, Result};

/// Gradients of one adapter's parameters.
#[derive(Debug, Clone)]
pub struct LoraGrads<T> {
    /// `dL/dA`, `[r, in]`.
    pub d_a: T,
    /// `dL/dB`, `[out, r]`.
    pub d_b: T,
}

/// LoRA forward and backward. Shapes have been checked by the caller
/// ([`LoraAdapter`](crate::LoraAdapter)); the defaults are the reference semantics.
pub trait LoraOps: Backend {
    /// `t ⊙ v` with `v` (`[features]`) broadcast along the last axis of `t` (DoRA's
    /// per-output-feature scale). The default spreads `v` to `t`'s shape with a rank-1
    /// product; a backend overrides it with one pass.
    fn scale_features(&self, t: &Self::Tensor, v: &Self::Tensor) -> Result<Self::Tensor> {
        let (rows, cols) = t.shape_matrix();
        if v.numel() != cols {
            return Err(crate::error::Error::shape(
                "scale_features scale",
                format!("[{cols}]"),
                v.shape(),
            ));
        }
        let ones = self.affine(&self.zeros(&[rows, 1])?, 0.0, 1.0)?;
        let spread = self.matmul(
            1.0,
            (&ones, Transpose::No),
            (&self.reshape(v, &[1, cols])?, Transpose::No),
            t.shape().dims(),
        )?;
        self.binary(BinaryOp::Mul, t, &spread)
    }

    /// DoRA's output without dropout: `y` holds `base(x) + lo` on entry; returns
    /// `u = y - bias` and leaves `y = bias + scale ⊙ u` (`scale`, `bias`: `[out]`). The
    /// default composes primitives; a backend fuses it into one pass.
    fn dora_output(
        &self,
        y: &mut Self::Tensor,
        bias: Option<&Self::Tensor>,
        scale: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        let mut u = y.clone();
        if let Some(b) = bias {
            self.add_row_broadcast(&mut u, &self.affine(b, -1.0, 0.0)?)?;
        }
        *y = self.scale_features(&u, scale)?;
        if let Some(b) = bias {
            self.add_row_broadcast(y, b)?;
        }
        Ok(u)
    }

    /// DoRA's backward terms: `(Σ_rows dy ⊙ u, dy ⊙ scale)`, the magnitude gradient's
    /// numerator (`[out]`) and the gradient of the rescaled base output. The default
    /// composes primitives; a backend fuses it into one pass.
    fn dora_backward_terms(
        &self,
        dy: &Self::Tensor,
        u: &Self::Tensor,
        scale: &Self::Tensor,
    ) -> Result<(Self::Tensor, Self::Tensor)> {
        let numer = self.dora_magnitude_numerator(dy, u)?;
        Ok((numer, self.scale_features(dy, scale)?))
    }

    /// The numerator of DoRA's magnitude gradient alone, `Σ_rows dy ⊙ u` (`[out]`; the
    /// dropout path, where the base term is recomputed inside the adapter). The default
    /// forms the product; a backend reduces it in one pass without writing it.
    fn dora_magnitude_numerator(
        &self,
        dy: &Self::Tensor,
        u: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        self.sum_rows(&self.binary(BinaryOp::Mul, dy, u)?)
    }

    /// Accumulates the LoRA term into `y` (which already holds the base output) and
    /// returns `H = (x ⊙ mask) Aᵀ` for the backward.
    fn lora_forward(
        &self,
        x: &Self::Tensor,
        a: &Self::Tensor,
        b: &Self::Tensor,
        scaling: f32,
        mask: Option<&Self::Tensor>,
        y: &mut Self::Tensor,
    ) -> Result<Self::Tensor> {
        let dropped;
        let x_lora = match mask {
            Some(m) => {
                dropped = self.binary(BinaryOp::Mul, x, m)?;
                &dropped
            }
            None => x,
        };
        let (n, _) = x.shape_matrix();
        let r = a.shape_matrix().0;
        let mut h = self.zeros(&[n, r])?;
        self.gemm(1.0, x_lora, Transpose::No, a, Transpose::Yes, 0.0, &mut h)?;
        self.gemm(scaling, &h, Transpose::No, b, Transpose::Yes, 1.0, y)?;
        Ok(h)
    }

    /// Computes `dA` and `dB` alone, for a layer whose input gradient nothing needs (the
    /// first layer over frozen embeddings, where PyTorch's autograd skips it too).
    #[allow(clippy::too_many_arguments)]
    fn lora_grads(
        &self,
        x: &Self::Tensor,
        a: &Self::Tensor,
        b: &Self::Tensor,
        scaling: f32,
        mask: Option<&Self::Tensor>,
        h: &Self::Tensor,
        dy: &Self::Tensor,
    ) -> Result<LoraGrads<Self::Tensor>> {
        Ok(grads_and_projection(self, x, (a, b, scaling), mask, h, dy)?.0)
    }

    /// Computes `dA`, `dB` and accumulates the LoRA part of the input gradient into `dx`
    /// (which already holds the base layer's `dy W`).
    #[allow(clippy::too_many_arguments)]
    fn lora_backward(
        &self,
        x: &Self::Tensor,
        a: &Self::Tensor,
        b: &Self::Tensor,
        scaling: f32,
        mask: Option<&Self::Tensor>,
        h: &Self::Tensor,
        dy: &Self::Tensor,
        dx: &mut Self::Tensor,
    ) -> Result<LoraGrads<Self::Tensor>> {
        let (grads, g_b) = grads_and_projection(self, x, (a, b, scaling), mask, h, dy)?;
        match mask {
            Some(m) => {
                let mut dx_lora = self.zeros(dx.shape_dims())?;
                self.gemm(
                    scaling,
                    &g_b,
                    Transpose::No,
                    a,
                    Transpose::No,
                    0.0,
                    &mut dx_lora,
                )?;
                let dx_lora = self.binary(BinaryOp::Mul, &dx_lora, m)?;
                self.axpby(1.0, &dx_lora, 1.0, dx)?;
            }
            None => self.gemm(scaling, &g_b, Transpose::No, a, Transpose::No, 1.0, dx)?,
        }
        Ok(grads)
    }

    /// LoRA's training forward through a dense frozen weight `w` (`[out, in]`) and `bias`
    /// without dropout, as one operation: `H = x Aᵀ` and `y = x wᵀ + s·H Bᵀ + bias` (of
    /// shape `y_shape`), returned as `(y, H)`. The point is reading `x` once: a backend
    /// computes `H` from each block of `x` its base product has just packed. `None` (the
    /// default, and a backend's answer for shapes it does not fuse): the caller composes
    /// `matmul`s and the base's `forward_plus`.
    #[allow(clippy::type_complexity)]
    fn lora_dense_forward(
        &self,
        x: &Self::Tensor,
        base: (&Self::Tensor, Option<&Self::Tensor>),
        adapter: (&Self::Tensor, &Self::Tensor, f32),
        y_shape: &[usize],
    ) -> Result<Option<(Self::Tensor, Self::Tensor)>> {
        let _ = (x, base, adapter, y_shape);
        Ok(None)
    }

    /// LoRA's backward through a dense frozen weight `w` (`[out, in]`) without dropout, as
    /// one operation: `dx = dy w + s·(dy B) A` (of shape `dx_shape`), `dA = s·(dy B)ᵀ x`
    /// and `dB = s·dyᵀ H`; `saved` is `(x, H)`, `H = x Aᵀ` from the forward. The point is
    /// reading `dy` once: a backend computes `dy B` and `dyᵀ H` from each block of `dy`
    /// its base product has just packed. `None` (the default, and a backend's answer for shapes it
    /// does not fuse): the caller composes `matmul`s and the base's input gradient.
    #[allow(clippy::type_complexity)]
    fn lora_dense_backward(
        &self,
        dy: &Self::Tensor,
        w: &Self::Tensor,
        adapter: (&Self::Tensor, &Self::Tensor, f32),
        saved: (&Self::Tensor, &Self::Tensor),
        dx_shape: &[usize],
    ) -> Result<Option<(Self::Tensor, LoraGrads<Self::Tensor>)>> {
        let _ = (dy, w, adapter, saved, dx_shape);
        Ok(None)
    }

    /// `delta_W = s · B A`, `[out, in]` (or its transpose `s · Aᵀ Bᵀ`, `[in, out]`, for
    /// `fan_in_fan_out` bases such as GPT-2's `Conv1D`, which store `[in, out]`): only for
    /// merging and inspection, never in training.
    fn lora_delta_weight(
        &self,
        a: &Self::Tensor,
        b: &Self::Tensor,
        scaling: f32,
        fan_in_fan_out: bool,
    ) -> Result<Self::Tensor> {
        let in_f = a.shape_matrix().1;
        let out_f = b.shape_matrix().0;
        if fan_in_fan_out {
            let mut delta = self.zeros(&[in_f, out_f])?;
            self.gemm(
                scaling,
                a,
                Transpose::Yes,
                b,
                Transpose::Yes,
                0.0,
                &mut delta,
            )?;
            Ok(delta)
        } else {
            let mut delta = self.zeros(&[out_f, in_f])?;
            self.gemm(scaling, b, Transpose::No, a, Transpose::No, 0.0, &mut delta)?;
            Ok(delta)
        }
    }

    /// PEFT's `linear` combination (`add_weighted_adapter`): with `w` each source's weight
    /// times its scaling, `A = Σ sign(w)·√|w|·A_i` and `B = Σ √|w|·B_i`, so that
    /// `B A = Σ w·B_i A_i` when the sources share their `A` (and approximately otherwise,
    /// exactly as PEFT computes it). All sources have the same rank.
    fn lora_combine_linear(
        &self,
        parts: &[WeightedFactors<'_, Self::Tensor>],
    ) -> Result<(Self::Tensor, Self::Tensor)> {
        let rank = parts.first().map_or(0, |p| p.a.shape_matrix().0);
        let (mut a_new, mut b_new) = combined_zeros(self, parts, rank)?;
        for p in parts {
            let root = p.weight.abs().sqrt();
            let sign = if p.weight >= 0.0 { 1.0 } else { -1.0 };
            check_same_dims(p.a, &a_new, "lora_combine_linear: lora_A")?;
            check_same_dims(p.b, &b_new, "lora_combine_linear: lora_B")?;
            self.axpby(sign * root, p.a, 1.0, &mut a_new)?;
            self.axpby(root, p.b, 1.0, &mut b_new)?;
        }
        Ok((a_new, b_new))
    }

    /// PEFT's task-arithmetic combinations (`ties`, `magnitude_prune`, `dare_linear`,
    /// `dare_ties`) of same-rank adapters: every `lora_A` weighted by
    /// `sign(wᵢ)·√|wᵢ|`, every `lora_B` by `√|wᵢ|`, each factor combined per
    /// [`TaskMerge`](crate::ops::TaskMerge) on the host. `layer` names DARE's random
    /// streams.
    fn lora_combine_task(
        &self,
        parts: &[WeightedFactors<'_, Self::Tensor>],
        merge: &crate::ops::TaskMerge,
        layer: &str,
    ) -> Result<(Self::Tensor, Self::Tensor)> {
        let first = parts.first().ok_or_else(|| Error::InvalidState {
            context: "lora_combine_task".into(),
            reason: "no adapter to combine".into(),
        })?;
        let (a_dims, b_dims) = (
            first.a.shape().dims().to_vec(),
            first.b.shape().dims().to_vec(),
        );
        let mut hosts = (Vec::new(), Vec::new());
        for p in parts {
            check_same_dims(p.a, first.a, "lora_combine_task: lora_A")?;
            check_same_dims(p.b, first.b, "lora_combine_task: lora_B")?;
            hosts.0.push(self.to_host(p.a)?);
            hosts.1.push(self.to_host(p.b)?);
        }
        let root = |w: f32| w.abs().sqrt();
        let w_a: Vec<f32> = parts
            .iter()
            .map(|p| root(p.weight) * p.weight.signum())
            .collect();
        let w_b: Vec<f32> = parts.iter().map(|p| root(p.weight)).collect();
        let (a_parts, b_parts): (Vec<&[f32]>, Vec<&[f32]>) = (
            hosts.0.iter().map(Vec::as_slice).collect(),
            hosts.1.iter().map(Vec::as_slice).collect(),
        );
        let a = merge.combine(&a_parts, &w_a, &format!("{layer}.lora_A"))?;
        let b = merge.combine(&b_parts, &w_b, &format!("{layer}.lora_B"))?;
        Ok((
            self.from_host_vec(a, &a_dims)?,
            self.from_host_vec(b, &b_dims)?,
        ))
    }

    /// PEFT's `cat` combination: the sources' ranks concatenated, `A = [w_1·A_1; w_2·A_2; ..]`
    /// and `B = [B_1, B_2, ..]`, so that `B A = Σ w_i·B_i A_i` exactly.
    fn lora_combine_cat(
        &self,
        parts: &[WeightedFactors<'_, Self::Tensor>],
    ) -> Result<(Self::Tensor, Self::Tensor)> {
        let rank = parts.iter().map(|p| p.a.shape_matrix().0).sum();
        let (mut a_new, mut b_new) = combined_zeros(self, parts, rank)?;
        let mut row = 0;
        for p in parts {
            let r = p.a.shape_matrix().0;
            let rows: Vec<usize> = (row..row + r).collect();
            self.scatter_add_rows(&mut a_new, &rows, &self.affine(p.a, p.weight, 0.0)?)?;
            self.assign_cols(&mut b_new, row, p.b)?;
            row += r;
        }
        Ok((a_new, b_new))
    }
}

/// One source adapter of a weighted combination: its factors (`A` `[r, in]`, `B`
/// `[out, r]`) and `weight × scaling`.
#[derive(Debug, Clone, Copy)]
pub struct WeightedFactors<'a, T> {
    /// `lora_A`, `[r, in]`.
    pub a: &'a T,
    /// `lora_B`, `[out, r]`.
    pub b: &'a T,
    /// The user's weight for this adapter times the adapter's own scaling.
    pub weight: f32,
}

/// Zero `[rank, in]` and `[out, rank]` tensors for a combination of `parts`.
fn combined_zeros<B: Backend>(
    backend: &B,
    parts: &[WeightedFactors<'_, B::Tensor>],
    rank: usize,
) -> Result<(B::Tensor, B::Tensor)> {
    let first = parts.first().ok_or_else(|| Error::InvalidState {
        context: "lora_combine".into(),
        reason: "no adapter to combine".into(),
    })?;
    let in_f = first.a.shape_matrix().1;
    let out_f = first.b.shape_matrix().0;
    Ok((
        backend.zeros(&[rank, in_f])?,
        backend.zeros(&[out_f, rank])?,
    ))
}

fn check_same_dims<T: crate::backend::Tensor>(x: &T, like: &T, what: &'static str) -> Result<()> {
    if x.shape_dims() != like.shape_dims() {
        return Err(Error::ShapeMismatch {
            context: format!("{what} (a linear combination needs equal ranks; use cat)"),
            expected: format!("{:?}", like.shape_dims()),
            got: x.shape().clone(),
        });
    }
    Ok(())
}

/// Small conveniences on tensors used by the default implementations.
pub(crate) trait TensorShapeExt {
    fn shape_matrix(&self) -> (usize, usize);
    fn shape_dims(&self) -> &[usize];
}

impl<T: crate::backend::Tensor> TensorShapeExt for T {
    fn shape_matrix(&self) -> (usize, usize) {
        self.shape().as_matrix()
    }
    fn shape_dims(&self) -> &[usize] {
        self.shape().dims()
    }
}

/// `dA`, `dB` and `G B` (`[n, r]`, the output gradient projected into the rank-r space,
/// from which the input gradient's LoRA part follows): the work
/// [`LoraOps::lora_grads`] and [`LoraOps::lora_backward`]'s defaults share.
fn grads_and_projection<B: LoraOps>(
    backend: &B,
    x: &B::Tensor,
    (a, b, scaling): (&B::Tensor, &B::Tensor, f32),
    mask: Option<&B::Tensor>,
    h: &B::Tensor,
    dy: &B::Tensor,
) -> Result<(LoraGrads<B::Tensor>, B::Tensor)> {
    let (n, _) = x.shape_matrix();
    let (r, in_f) = a.shape_matrix();
    let out_f = b.shape_matrix().0;

    let mut d_b = backend.zeros(&[out_f, r])?;
    backend.gemm(scaling, dy, Transpose::Yes, h, Transpose::No, 0.0, &mut d_b)?;

    let mut g_b = backend.zeros(&[n, r])?;
    backend.gemm(1.0, dy, Transpose::No, b, Transpose::No, 0.0, &mut g_b)?;

    let dropped;
    let x_lora = match mask {
        Some(m) => {
            dropped = backend.binary(BinaryOp::Mul, x, m)?;
            &dropped
        }
        None => x,
    };
    let mut d_a = backend.zeros(&[r, in_f])?;
    backend.gemm(
        scaling,
        &g_b,
        Transpose::Yes,
        x_lora,
        Transpose::No,
        0.0,
        &mut d_a,
    )?;
    Ok((LoraGrads { d_a, d_b }, g_b))
}
