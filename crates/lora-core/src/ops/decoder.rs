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

    /// Backward of [`DecoderOps::rms_norm`] with respect to `x` (the weight is frozen):
    /// with `g = dy·weight` and `r` the saved per-row `1/rms`,
    /// `dx = r·g - x·r³·mean(g·x)`.
    fn rms_norm_backward(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        inv_rms: &Self::Tensor,
        dy: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        let (rows, n) = x.shape_matrix();
        if dy.shape_dims() != x.shape_dims() || inv_rms.shape().numel() != rows {
            return Err(Error::shape(
                "rms_norm_backward dy / saved 1/rms",
                format!("{:?} and [{rows}]", x.shape_dims()),
                dy.shape(),
            ));
        }
        let x2 = self.reshape(x, &[rows, n])?;
        let g = self.binary(
            BinaryOp::Mul,
            &self.reshape(dy, &[rows, n])?,
            &self.outer(weight, rows, n, RowOrCol::PerCol)?,
        )?;
        let gx = self.sum_cols(&self.binary(BinaryOp::Mul, &g, &x2)?)?;
        let r2 = self.binary(BinaryOp::Mul, inv_rms, inv_rms)?;
        let r3 = self.binary(BinaryOp::Mul, &r2, inv_rms)?;
        let coef = self.affine(&self.binary(BinaryOp::Mul, &gx, &r3)?, 1.0 / n as f32, 0.0)?;
        let mut dx = self.binary(
            BinaryOp::Mul,
            &g,
            &self.outer(inv_rms, rows, n, RowOrCol::PerRow)?,
        )?;
        let corr = self.binary(
            BinaryOp::Mul,
            &x2,
            &self.outer(&coef, rows, n, RowOrCol::PerRow)?,
        )?;
        self.axpby(-1.0, &corr, 1.0, &mut dx)?;
        self.reshape(&dx, x.shape_dims())
    }

    /// SiLU, `x · sigmoid(x)` (with `sigmoid(x) = (1 + tanh(x / 2)) / 2`).
    fn silu(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        let half = self.affine(x, 0.5, 0.0)?;
        let sig = self.affine(&self.unary(UnaryOp::Tanh, &half)?, 0.5, 0.5)?;
        self.binary(BinaryOp::Mul, x, &sig)
    }

    /// Backward of [`DecoderOps::silu`]: `dy · s·(1 + x·(1 - s))` with `s = sigmoid(x)`.
    fn silu_backward(&self, x: &Self::Tensor, dy: &Self::Tensor) -> Result<Self::Tensor> {
        let half = self.affine(x, 0.5, 0.0)?;
        let sig = self.affine(&self.unary(UnaryOp::Tanh, &half)?, 0.5, 0.5)?;
        let one_minus = self.affine(&sig, -1.0, 1.0)?;
        let inner = self.affine(&self.binary(BinaryOp::Mul, x, &one_minus)?, 1.0, 1.0)?;
        let d = self.binary(BinaryOp::Mul, &sig, &inner)?;
        self.binary(BinaryOp::Mul, dy, &d)
    }

    /// Backward of [`DecoderOps::rotary`]: the rotation is orthogonal per pair, so
    /// `dx = dy·cos + rotate_half_transposed(dy·sin)` with
    /// `rotate_half_transposed([a1, a2]) = [a2, -a1]`.
    fn rotary_backward(
        &self,
        dy: &Self::Tensor,
        cos: &Self::Tensor,
        sin: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        let (rows, d) = dy.shape_matrix();
        if !d.is_multiple_of(2)
            || cos.shape().dims() != [rows, d]
            || sin.shape().dims() != [rows, d]
        {
            return Err(Error::shape(
                "rotary_backward cos/sin",
                format!("[{rows}, {d}] each, with an even head size"),
                cos.shape(),
            ));
        }
        let dy2 = self.reshape(dy, &[rows, d])?;
        let half = d / 2;
        let ds = self.binary(BinaryOp::Mul, &dy2, sin)?;
        let mut back = self.zeros(&[rows, d])?;
        self.assign_cols(&mut back, 0, &self.slice_cols(&ds, half, half)?)?;
        self.assign_cols(
            &mut back,
            half,
            &self.affine(&self.slice_cols(&ds, 0, half)?, -1.0, 0.0)?,
        )?;
        let mut dx = self.binary(BinaryOp::Mul, &dy2, cos)?;
        self.axpby(1.0, &back, 1.0, &mut dx)?;
        self.reshape(&dx, dy.shape_dims())
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
        if !d.is_multiple_of(2)
            || cos.shape().dims() != [rows, d]
            || sin.shape().dims() != [rows, d]
        {
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
