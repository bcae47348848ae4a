//! The layer-level operations decoder LLMs (Llama, Mistral, Qwen) add to the backend
//! contract, written once over the primitives: RMSNorm, SiLU, rotary position embedding.
//! A backend may override any of them with a fused kernel; the defaults are the reference
//! semantics (transformers' `LlamaRMSNorm`, `nn.SiLU`, `apply_rotary_pos_emb`).

use crate::backend::{Backend, BinaryOp, Tensor, Transpose, UnaryOp};
use crate::error::{Error, Result};
use crate::ops::lora::TensorShapeExt;

/// Decoder-LLM operations with default implementations over [`Backend`] primitives.
pub trait DecoderOps: Backend {
    /// RMSNorm over the last axis of `x` (`[rows, n]` as a matrix view):
    /// `y = x / sqrt(mean(x²) + eps) * weight`. Returns `y` and the per-row
    /// `1 / sqrt(mean(x²) + eps)` (`[rows]`) for the backward.
    fn rms_norm(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        eps: f32,
    ) -> Result<(Self::Tensor, Self::Tensor)> {
        let (rows, n) = x.shape_matrix();
        if weight.shape().numel() != n {
            return Err(Error::shape(
                "rms_norm weight",
                format!("[{n}]"),
                weight.shape(),
            ));
        }
        let x2 = self.reshape(x, &[rows, n])?;
        let mean_sq = self.affine(
            &self.sum_cols(&self.unary(UnaryOp::Square, &x2)?)?,
            1.0 / n as f32,
            eps,
        )?;
        let ones = self.affine(&mean_sq, 0.0, 1.0)?;
        let inv_rms = self.binary(BinaryOp::Div, &ones, &self.unary(UnaryOp::Sqrt, &mean_sq)?)?;
        let normed = self.binary(
            BinaryOp::Mul,
            &x2,
            &self.outer(&inv_rms, rows, n, RowOrCol::PerRow)?,
        )?;
        let y = self.binary(
            BinaryOp::Mul,
            &normed,
            &self.outer(weight, rows, n, RowOrCol::PerCol)?,
        )?;
        Ok((self.reshape(&y, x.shape_dims())?, inv_rms))
    }

    /// SiLU, `x · sigmoid(x)` (with `sigmoid(x) = (1 + tanh(x / 2)) / 2`).
    fn silu(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        let half = self.affine(x, 0.5, 0.0)?;
        let sig = self.affine(&self.unary(UnaryOp::Tanh, &half)?, 0.5, 0.5)?;
        self.binary(BinaryOp::Mul, x, &sig)
    }

    /// Rotary position embedding in transformers' `rotate_half` layout on `x` (`[rows, d]`
    /// as a matrix view, one attention head of one token per row) with per-row tables
    /// `cos`, `sin` (`[rows, d]`): `x·cos + rotate_half(x)·sin`, where
    /// `rotate_half([x1, x2]) = [-x2, x1]` over the two halves of the head.
    fn rotary(
        &self,
        x: &Self::Tensor,
        cos: &Self::Tensor,
        sin: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        let (rows, d) = x.shape_matrix();
        if d % 2 != 0 || cos.shape().dims() != [rows, d] || sin.shape().dims() != [rows, d] {
            return Err(Error::shape(
                "rotary cos/sin",
                format!("[{rows}, {d}] each, with an even head size"),
                cos.shape(),
            ));
        }
        let x2 = self.reshape(x, &[rows, d])?;
        let half = d / 2;
        let mut rotated = self.zeros(&[rows, d])?;
        let second = self.slice_cols(&x2, half, half)?;
        self.assign_cols(&mut rotated, 0, &self.affine(&second, -1.0, 0.0)?)?;
        self.assign_cols(&mut rotated, half, &self.slice_cols(&x2, 0, half)?)?;
        let mut y = self.binary(BinaryOp::Mul, &x2, cos)?;
        self.axpby(
            1.0,
            &self.binary(BinaryOp::Mul, &rotated, sin)?,
            1.0,
            &mut y,
        )?;
        self.reshape(&y, x.shape_dims())
    }

    /// `v` (`n` values) spread to a `[rows, cols]` matrix: each row `i` filled with
    /// `v[i]` (`PerRow`, `n = rows`) or each row equal to `v` (`PerCol`, `n = cols`), as the
    /// rank-1 product of `v` with ones (exact: one multiplication by 1 per element).
    fn outer(
        &self,
        v: &Self::Tensor,
        rows: usize,
        cols: usize,
        how: RowOrCol,
    ) -> Result<Self::Tensor> {
        let mut out = self.zeros(&[rows, cols])?;
        match how {
            RowOrCol::PerRow => {
                let v = self.reshape(v, &[rows, 1])?;
                let ones = self.affine(&self.zeros(&[1, cols])?, 0.0, 1.0)?;
                self.gemm(1.0, &v, Transpose::No, &ones, Transpose::No, 0.0, &mut out)?;
            }
            RowOrCol::PerCol => {
                let v = self.reshape(v, &[1, cols])?;
                let ones = self.affine(&self.zeros(&[rows, 1])?, 0.0, 1.0)?;
                self.gemm(1.0, &ones, Transpose::No, &v, Transpose::No, 0.0, &mut out)?;
            }
        }
        Ok(out)
    }
}

/// How [`DecoderOps::outer`] spreads a vector over a matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowOrCol {
    /// One value per row.
    PerRow,
    /// One value per column.
    PerCol,
}
