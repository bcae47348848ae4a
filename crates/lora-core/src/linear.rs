//! Frozen linear layers: the `Linear` trait and its dense f32 implementation.

use std::fmt::Debug;

use crate::backend::{Backend, Tensor, Transpose, UnaryOp, check_same_shape};
use crate::error::{Error, Result};

/// A frozen linear layer `y = x Wᵀ + b` with `W` stored `[out, in]` (PyTorch layout).
///
/// Frozen means: the backward returns only `dx = dy W`; there is no weight gradient, no
/// optimizer state and no extra copy of `W` kept for it. A quantized layer implements the
/// same trait with its own storage.
pub trait Linear<B: Backend>: Debug + Send + Sync {
    /// Input features.
    fn in_features(&self) -> usize;
    /// Output features.
    fn out_features(&self) -> usize;
    /// `y = x Wᵀ + b` over the matrix view of `x` (`[..., in] -> [..., out]`).
    fn forward(&self, backend: &B, x: &B::Tensor) -> Result<B::Tensor>;
    /// `dx = dy W` (`[..., out] -> [..., in]`).
    fn backward(&self, backend: &B, dy: &B::Tensor) -> Result<B::Tensor>;
    /// `forward(x) + s·u vᵀ` for a low-rank term (`u`: `[rows, r]`, `v`: `[out, r]`; a
    /// LoRA adapter's `x Aᵀ` and `B`). The default adds it with a second product; a dense
    /// layer runs both in one pass over the output ([`Backend::matmul_plus`]).
    fn forward_plus(&self, backend: &B, x: &B::Tensor, term: LowRank<'_, B>) -> Result<B::Tensor> {
        let mut y = self.forward(backend, x)?;
        backend.gemm(
            term.scale,
            term.u,
            Transpose::No,
            term.v,
            Transpose::Yes,
            1.0,
            &mut y,
        )?;
        Ok(y)
    }
    /// `(forward(x), act(forward(x)))`: the pre-activation (for the activation's backward)
    /// and the activation. The default applies `act` as a second pass; a dense layer hands
    /// it to its product ([`Backend::matmul_plus_act`]).
    fn forward_act(
        &self,
        backend: &B,
        x: &B::Tensor,
        act: UnaryOp,
    ) -> Result<(B::Tensor, B::Tensor)> {
        let pre = self.forward(backend, x)?;
        let post = backend.unary(act, &pre)?;
        Ok((pre, post))
    }
    /// `acc += backward(dy)`: the input gradient added into a running sum (`acc` shaped as
    /// the input gradient). The default computes it, then adds; a dense layer accumulates
    /// inside its product (`beta = 1`), without the add's pass over `acc`.
    fn backward_add(&self, backend: &B, dy: &B::Tensor, acc: &mut B::Tensor) -> Result<()> {
        let dx = self.backward(backend, dy)?;
        backend.axpby(1.0, &dx, 1.0, acc)
    }
    /// `backward(dy) + s·g a` for a low-rank term (`g`: `[rows, r]`, `a`: `[r, in]`; a LoRA
    /// adapter's `dy B` and `A`), as [`forward_plus`](Linear::forward_plus).
    fn backward_plus(
        &self,
        backend: &B,
        dy: &B::Tensor,
        term: LowRank<'_, B>,
    ) -> Result<B::Tensor> {
        let mut dx = self.backward(backend, dy)?;
        backend.gemm(
            term.scale,
            term.u,
            Transpose::No,
            term.v,
            Transpose::No,
            1.0,
            &mut dx,
        )?;
        Ok(dx)
    }
    /// The weight as a dense f32 `[out, in]` tensor (dequantized if stored otherwise).
    fn weight(&self, backend: &B) -> Result<B::Tensor>;
    /// The bias, `[out]`, if any.
    fn bias(&self) -> Option<&B::Tensor>;
    /// In place `W += alpha * delta` (merge / unmerge). A quantized layer re-quantizes the
    /// sum and reports how far the stored result is from the exact f32 sum; a dense layer
    /// reports [`WeightRounding::EXACT`].
    fn add_to_weight(
        &mut self,
        backend: &B,
        delta: &B::Tensor,
        alpha: f32,
    ) -> Result<WeightRounding>;
    /// Number of scalar parameters (weight and bias).
    fn num_parameters(&self) -> usize;
    /// Bytes of device memory the layer keeps resident.
    fn resident_bytes(&self) -> usize;
    /// The dense layer behind this one, for full fine-tuning (pretraining a model, or the
    /// baseline LoRA is compared with). Quantized layers return `None`.
    fn as_dense_mut(&mut self) -> Option<&mut DenseLinear<B>> {
        None
    }
    /// The dense layer behind this one, read-only: an adapter's backward through a dense
    /// base can run as one fused operation ([`crate::LoraOps::lora_dense_backward`]).
    fn as_dense(&self) -> Option<&DenseLinear<B>> {
        None
    }
}

/// A rank-`r` term `scale · u · op(v)` that an adapter adds to a layer's output (`v`
/// transposed: `[out, r]`) or input gradient (`v` as is: `[r, in]`).
#[derive(Clone, Copy, Debug)]
pub struct LowRank<'a, B: Backend> {
    /// `[rows, r]`.
    pub u: &'a B::Tensor,
    /// `B` (`[out, r]`) in the forward, `A` (`[r, in]`) in the backward.
    pub v: &'a B::Tensor,
    /// The adapter's scaling.
    pub scale: f32,
}

/// How far a weight update's stored result is from the exact f32 result: re-quantizing a
/// merged weight rounds, and lora-rs reports it instead of hiding it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct WeightRounding {
    /// Largest `|stored - exact|` over the weight.
    pub max_abs: f32,
    /// `max_abs` relative to the largest `|exact|` value of the weight.
    pub max_rel: f32,
}

impl WeightRounding {
    /// No rounding beyond f32 arithmetic (dense weights).
    pub const EXACT: WeightRounding = WeightRounding {
        max_abs: 0.0,
        max_rel: 0.0,
    };

    /// The element-wise larger of two reports (for a model: the worst layer).
    pub fn max(self, other: WeightRounding) -> WeightRounding {
        WeightRounding {
            max_abs: self.max_abs.max(other.max_abs),
            max_rel: self.max_rel.max(other.max_rel),
        }
    }

    /// Compares a stored result with the exact one.
    pub fn between(stored: &[f32], exact: &[f32]) -> WeightRounding {
        let mut max_abs = 0.0f32;
        let mut scale = 0.0f32;
        for (s, e) in stored.iter().zip(exact) {
            max_abs = max_abs.max((s - e).abs());
            scale = scale.max(e.abs());
        }
        let max_rel = if scale > 0.0 { max_abs / scale } else { 0.0 };
        WeightRounding { max_abs, max_rel }
    }
}

/// A dense f32 linear layer.
#[derive(Debug, Clone)]
pub struct DenseLinear<B: Backend> {
    weight: B::Tensor,
    bias: Option<B::Tensor>,
}

impl<B: Backend> DenseLinear<B> {
    /// Wraps a `[out, in]` weight and an optional `[out]` bias.
    pub fn new(weight: B::Tensor, bias: Option<B::Tensor>) -> Result<Self> {
        if weight.shape().rank() != 2 {
            return Err(Error::shape("linear weight", "[out, in]", weight.shape()));
        }
        let out_f = weight.shape().dims()[0];
        if let Some(b) = &bias
            && b.shape().dims() != [out_f]
        {
            return Err(Error::shape("linear bias", format!("[{out_f}]"), b.shape()));
        }
        Ok(DenseLinear { weight, bias })
    }

    /// The weight tensor.
    pub fn weight_tensor(&self) -> &B::Tensor {
        &self.weight
    }

    /// Mutable weight and bias, for full fine-tuning.
    pub fn params_mut(&mut self) -> (&mut B::Tensor, Option<&mut B::Tensor>) {
        (&mut self.weight, self.bias.as_mut())
    }

    /// Full fine-tuning gradients: `dW = dyᵀ x` (`[out, in]`) and `db = Σ_rows dy`.
    pub fn param_grads(
        &self,
        backend: &B,
        x: &B::Tensor,
        dy: &B::Tensor,
    ) -> Result<(B::Tensor, Option<B::Tensor>)> {
        let d_w = backend.matmul(
            1.0,
            (dy, Transpose::Yes),
            (x, Transpose::No),
            self.weight.shape().dims(),
        )?;
        let d_b = match &self.bias {
            Some(_) => Some(backend.sum_rows(dy)?),
            None => None,
        };
        Ok((d_w, d_b))
    }

    /// `x Wᵀ [+ s·u vᵀ] + b` in one backend call.
    fn output(
        &self,
        backend: &B,
        x: &B::Tensor,
        term: Option<LowRank<'_, B>>,
    ) -> Result<B::Tensor> {
        self.check_features("forward input x", x, self.inp())?;
        let out_shape = x.shape().with_last(self.out());
        backend.matmul_plus(
            ((x, Transpose::No), (&self.weight, Transpose::Yes)),
            term.map(|t| (t.scale, ((t.u, Transpose::No), (t.v, Transpose::Yes)))),
            self.bias.as_ref(),
            out_shape.dims(),
        )
    }

    /// `dy W [+ s·g a]` in one backend call.
    fn input_grad(
        &self,
        backend: &B,
        dy: &B::Tensor,
        term: Option<LowRank<'_, B>>,
    ) -> Result<B::Tensor> {
        self.check_features("backward gradient dy", dy, self.out())?;
        let dx_shape = dy.shape().with_last(self.inp());
        backend.matmul_plus(
            ((dy, Transpose::No), (&self.weight, Transpose::No)),
            term.map(|t| (t.scale, ((t.u, Transpose::No), (t.v, Transpose::No)))),
            None,
            dx_shape.dims(),
        )
    }

    fn check_features(&self, what: &str, t: &B::Tensor, expected: usize) -> Result<()> {
        if t.shape().last() != expected || t.shape().rank() == 0 {
            return Err(Error::shape(
                format!("linear [{}, {}] {what}", self.out(), self.inp()),
                format!("[..., {expected}]"),
                t.shape(),
            ));
        }
        Ok(())
    }

    fn out(&self) -> usize {
        self.weight.shape().dims()[0]
    }

    /// The weight and bias, once `x` has this layer's input features (the check
    /// [`Linear::forward`] makes, with the same error).
    pub(crate) fn weight_for_forward(
        &self,
        x: &B::Tensor,
    ) -> Result<(&B::Tensor, Option<&B::Tensor>)> {
        self.check_features("forward input x", x, self.inp())?;
        Ok((&self.weight, self.bias.as_ref()))
    }

    /// The weight, once `dy` has this layer's output features (the check
    /// [`Linear::backward`] makes, with the same error).
    pub(crate) fn weight_for_input_grad(&self, dy: &B::Tensor) -> Result<&B::Tensor> {
        self.check_features("backward gradient dy", dy, self.out())?;
        Ok(&self.weight)
    }

    fn inp(&self) -> usize {
        self.weight.shape().dims()[1]
    }
}

impl<B: Backend> Linear<B> for DenseLinear<B> {
    fn in_features(&self) -> usize {
        self.inp()
    }

    fn out_features(&self) -> usize {
        self.out()
    }

    fn forward(&self, backend: &B, x: &B::Tensor) -> Result<B::Tensor> {
        self.output(backend, x, None)
    }

    fn backward(&self, backend: &B, dy: &B::Tensor) -> Result<B::Tensor> {
        self.input_grad(backend, dy, None)
    }

    fn backward_add(&self, backend: &B, dy: &B::Tensor, acc: &mut B::Tensor) -> Result<()> {
        let weight = self.weight_for_input_grad(dy)?;
        let dx_shape = dy.shape().with_last(self.inp());
        if acc.shape() != &dx_shape {
            return Err(Error::shape(
                format!("linear [{}, {}] input gradient sum", self.out(), self.inp()),
                format!("{dx_shape}"),
                acc.shape(),
            ));
        }
        backend.gemm(1.0, dy, Transpose::No, weight, Transpose::No, 1.0, acc)
    }

    fn forward_plus(&self, backend: &B, x: &B::Tensor, term: LowRank<'_, B>) -> Result<B::Tensor> {
        self.output(backend, x, Some(term))
    }

    fn forward_act(
        &self,
        backend: &B,
        x: &B::Tensor,
        act: UnaryOp,
    ) -> Result<(B::Tensor, B::Tensor)> {
        self.check_features("forward input x", x, self.inp())?;
        let out_shape = x.shape().with_last(self.out());
        backend.matmul_plus_act(
            ((x, Transpose::No), (&self.weight, Transpose::Yes)),
            None,
            self.bias.as_ref(),
            act,
            out_shape.dims(),
        )
    }

    fn backward_plus(
        &self,
        backend: &B,
        dy: &B::Tensor,
        term: LowRank<'_, B>,
    ) -> Result<B::Tensor> {
        self.input_grad(backend, dy, Some(term))
    }

    fn weight(&self, _backend: &B) -> Result<B::Tensor> {
        Ok(self.weight.clone())
    }

    fn bias(&self) -> Option<&B::Tensor> {
        self.bias.as_ref()
    }

    fn add_to_weight(
        &mut self,
        backend: &B,
        delta: &B::Tensor,
        alpha: f32,
    ) -> Result<WeightRounding> {
        check_same_shape("add_to_weight", self.weight.shape(), delta.shape())?;
        backend.axpby(alpha, delta, 1.0, &mut self.weight)?;
        Ok(WeightRounding::EXACT)
    }

    fn num_parameters(&self) -> usize {
        self.weight.numel() + self.bias.as_ref().map_or(0, |b| b.numel())
    }

    fn resident_bytes(&self) -> usize {
        self.weight.size_in_bytes() + self.bias.as_ref().map_or(0, |b| b.size_in_bytes())
    }

    fn as_dense_mut(&mut self) -> Option<&mut DenseLinear<B>> {
        Some(self)
    }

    fn as_dense(&self) -> Option<&DenseLinear<B>> {
        Some(self)
    }
}
