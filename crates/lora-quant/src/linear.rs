//! The quantized frozen layer: QLoRA's base. It implements [`Linear`], so LoRA adapters sit
//! on top of it exactly as on a dense layer.

use lora_core::backend::check_same_shape;
use lora_core::{Error, Linear, Result, Tensor, Transpose, WeightRounding};

use crate::int8::{INV_127_SQ, quantize_rows};
use crate::ops::QuantOps;
use crate::weight::{QuantConfig, QuantizedWeight};

/// Dequantized values per block of rows: 4 MiB of f32, so the block stays in cache
/// next to the GEMM that consumes it.
const CHUNK_VALUES: usize = 1 << 20;

/// A frozen linear layer whose weight is stored quantized (NF4 / FP4 / int8).
///
/// Forward and backward dequantize the weight a block of output rows at a time
/// ([`QuantOps::dequantize_rows`]) right before the GEMM that uses it, so the resident
/// weight is the quantized data and at most one f32 block exists at a time.
#[derive(Debug)]
pub struct QuantLinear<B: QuantOps> {
    weight: QuantizedWeight,
    bias: Option<B::Tensor>,
    /// LLM.int8 inference for int8 weights, with this outlier threshold (`None`: every
    /// column in f32 against the dequantized weight, as bitsandbytes' CPU training path).
    outlier_threshold: Option<f32>,
}

impl<B: QuantOps> QuantLinear<B> {
    /// Wraps a quantized `[out, in]` weight and an optional `[out]` bias.
    pub fn new(weight: QuantizedWeight, bias: Option<B::Tensor>) -> Result<Self> {
        let (out_f, _) = weight.dims();
        if let Some(b) = &bias
            && b.shape().dims() != [out_f]
        {
            return Err(Error::shape(
                "quantized linear bias",
                format!("[{out_f}]"),
                b.shape(),
            ));
        }
        Ok(QuantLinear {
            weight,
            bias,
            outlier_threshold: None,
        })
    }

    /// Quantizes a dense layer's weight (the bias stays f32, as in bitsandbytes).
    pub fn quantize(
        backend: &B,
        weight: &B::Tensor,
        bias: Option<B::Tensor>,
        config: &QuantConfig,
    ) -> Result<Self> {
        let host = backend.to_host(weight)?;
        Self::new(config.quantize(&host, weight.shape().dims())?, bias)
    }

    /// LLM.int8 inference (bitsandbytes' `Linear8bitLt` in eval mode): the input is
    /// quantized to int8 per row and multiplied with the int8 weight; with `threshold > 0`,
    /// input columns holding any `|x| >= threshold` are computed in f32 against the
    /// dequantized weight instead (usually 6.0; `0` disables the outlier split, as in
    /// bitsandbytes). Int8 weights only.
    pub fn with_outlier_threshold(mut self, threshold: Option<f32>) -> Result<Self> {
        if threshold.is_some() && !matches!(self.weight, QuantizedWeight::Int8(_)) {
            return Err(Error::InvalidConfig {
                context: "quantized linear".into(),
                field: "outlier_threshold",
                value: format!("{threshold:?}"),
                reason: "the LLM.int8 outlier path applies to int8 weights only".into(),
            });
        }
        if let Some(t) = threshold
            && !(t >= 0.0 && t.is_finite())
        {
            return Err(Error::InvalidConfig {
                context: "quantized linear".into(),
                field: "outlier_threshold",
                value: t.to_string(),
                reason: "must be a finite number >= 0".into(),
            });
        }
        self.outlier_threshold = threshold;
        Ok(self)
    }

    /// The quantized weight.
    pub fn quantized(&self) -> &QuantizedWeight {
        &self.weight
    }

    fn dims(&self) -> (usize, usize) {
        self.weight.dims()
    }

    fn rows_per_chunk(&self) -> usize {
        (CHUNK_VALUES / self.dims().1.max(1)).max(1)
    }

    fn check_last(&self, what: &str, t: &B::Tensor, expected: usize) -> Result<()> {
        if t.shape().rank() == 0 || t.shape().last() != expected {
            let (o, i) = self.dims();
            return Err(Error::shape(
                format!("quantized linear [{o}, {i}] {what}"),
                format!("[..., {expected}]"),
                t.shape(),
            ));
        }
        Ok(())
    }

    /// LLM.int8's mixed-precision product (bitsandbytes `int8_mixed_scaled_mm`): the input
    /// is rounded to f16 and quantized row-wise to int8 with the outlier columns zeroed,
    /// multiplied by the int8 weight (exact integer sums), rescaled, and the outlier
    /// columns are added in f32 against the dequantized weight.
    fn forward_llm_int8(&self, backend: &B, x: &B::Tensor, threshold: f32) -> Result<B::Tensor> {
        let QuantizedWeight::Int8(w) = &self.weight else {
            return Err(Error::state(
                "quantized linear",
                "outlier path needs int8 weights",
            ));
        };
        let (out_f, in_f) = self.dims();
        let (n, _) = x.shape().as_matrix();
        let xh = backend.to_host(x)?;
        let x16: Vec<f32> = xh
            .iter()
            .map(|&v| half::f16::from_f32(v).to_f32())
            .collect();
        let outlier_cols: Vec<usize> = if threshold > 0.0 {
            (0..in_f)
                .filter(|&c| (0..n).any(|r| x16[r * in_f + c].abs() >= threshold))
                .collect()
        } else {
            Vec::new()
        };
        // As bitsandbytes: the outlier values (not their whole columns) are left out of the
        // row scales, then the outlier columns' codes are zeroed.
        let inlier: Vec<f32> = x16
            .iter()
            .map(|&v| {
                if threshold > 0.0 && v.abs() >= threshold {
                    0.0
                } else {
                    v
                }
            })
            .collect();
        let (mut ca, sca) = quantize_rows(&inlier, in_f);
        if n > 1 {
            for r in 0..n {
                for &c in &outlier_cols {
                    ca[r * in_f + c] = 0;
                }
            }
        }
        let ca: Vec<f32> = ca.into_iter().map(f32::from).collect();
        let ca = backend.from_host(&ca, &[n, in_f])?;
        // Integer products summed in f32: exact while partial sums stay below 2^24.
        let mut acc = backend.zeros(&[n, out_f])?;
        let step = self.rows_per_chunk();
        for row0 in (0..out_f).step_by(step) {
            let rows = step.min(out_f - row0);
            let cb: Vec<f32> = w.cb[row0 * in_f..(row0 + rows) * in_f]
                .iter()
                .map(|&c| f32::from(c))
                .collect();
            let cb = backend.from_host(&cb, &[rows, in_f])?;
            let mut part = backend.zeros(&[n, rows])?;
            backend.gemm(1.0, &ca, Transpose::No, &cb, Transpose::Yes, 0.0, &mut part)?;
            backend.assign_cols(&mut acc, row0, &part)?;
        }
        let acc = backend.to_host(&acc)?;
        let bias = match &self.bias {
            Some(b) => Some(backend.to_host(b)?),
            None => None,
        };
        let mut y = vec![0.0f32; n * out_f];
        for r in 0..n {
            for j in 0..out_f {
                let mut v = acc[r * out_f + j] * (sca[r] * w.scb[j]) * INV_127_SQ;
                if let Some(b) = &bias {
                    v += b[j];
                }
                y[r * out_f + j] = v;
            }
        }
        if !outlier_cols.is_empty() {
            // The outlier columns in the input's own precision against the dequantized
            // weight columns (only those columns are dequantized).
            let mut deq = vec![0.0f32; outlier_cols.len()];
            for j in 0..out_f {
                w.dequantize_cols(j, &outlier_cols, &mut deq);
                for r in 0..n {
                    let s: f32 = outlier_cols
                        .iter()
                        .zip(&deq)
                        .map(|(&c, d)| xh[r * in_f + c] * d)
                        .sum();
                    y[r * out_f + j] += s;
                }
            }
        }
        backend.from_host(&y, x.shape().with_last(out_f).dims())
    }
}

impl<B: QuantOps> Linear<B> for QuantLinear<B> {
    fn in_features(&self) -> usize {
        self.dims().1
    }

    fn out_features(&self) -> usize {
        self.dims().0
    }

    fn forward(&self, backend: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let (out_f, in_f) = self.dims();
        self.check_last("forward input x", x, in_f)?;
        if let Some(t) = self.outlier_threshold {
            return self.forward_llm_int8(backend, x, t);
        }
        let (n, _) = x.shape().as_matrix();
        let mut y = backend.zeros(x.shape().with_last(out_f).dims())?;
        let step = self.rows_per_chunk();
        if step >= out_f {
            let w = backend.dequantize_rows(&self.weight, 0, out_f)?;
            backend.gemm(1.0, x, Transpose::No, &w, Transpose::Yes, 0.0, &mut y)?;
        } else {
            for row0 in (0..out_f).step_by(step) {
                let rows = step.min(out_f - row0);
                let w = backend.dequantize_rows(&self.weight, row0, rows)?;
                let mut part = backend.zeros(&[n, rows])?;
                backend.gemm(1.0, x, Transpose::No, &w, Transpose::Yes, 0.0, &mut part)?;
                backend.assign_cols(&mut y, row0, &part)?;
            }
        }
        if let Some(b) = &self.bias {
            backend.add_row_broadcast(&mut y, b)?;
        }
        Ok(y)
    }

    fn backward(&self, backend: &B, dy: &B::Tensor) -> Result<B::Tensor> {
        let (out_f, in_f) = self.dims();
        self.check_last("backward gradient dy", dy, out_f)?;
        let mut dx = backend.zeros(dy.shape().with_last(in_f).dims())?;
        let step = self.rows_per_chunk();
        if step >= out_f {
            let w = backend.dequantize_rows(&self.weight, 0, out_f)?;
            backend.gemm(1.0, dy, Transpose::No, &w, Transpose::No, 0.0, &mut dx)?;
        } else {
            // dx = Σ_blocks dy[:, block] W[block, :]
            for (i, row0) in (0..out_f).step_by(step).enumerate() {
                let rows = step.min(out_f - row0);
                let w = backend.dequantize_rows(&self.weight, row0, rows)?;
                let dy_part = backend.slice_cols(dy, row0, rows)?;
                let beta = if i == 0 { 0.0 } else { 1.0 };
                backend.gemm(
                    1.0,
                    &dy_part,
                    Transpose::No,
                    &w,
                    Transpose::No,
                    beta,
                    &mut dx,
                )?;
            }
        }
        Ok(dx)
    }

    fn weight(&self, backend: &B) -> Result<B::Tensor> {
        backend.dequantize_rows(&self.weight, 0, self.dims().0)
    }

    fn bias(&self) -> Option<&B::Tensor> {
        self.bias.as_ref()
    }

    /// Dequantize, add, quantize again with the same settings; the returned rounding is
    /// the stored result against the exact f32 sum.
    fn add_to_weight(
        &mut self,
        backend: &B,
        delta: &B::Tensor,
        alpha: f32,
    ) -> Result<WeightRounding> {
        let (o, i) = self.dims();
        check_same_shape(
            "quantized add_to_weight",
            &[o, i].as_slice().into(),
            delta.shape(),
        )?;
        let d = backend.to_host(delta)?;
        let mut exact = self.weight.dequantize();
        exact.iter_mut().zip(&d).for_each(|(w, d)| *w += alpha * d);
        let requantized = self.weight.config().quantize(&exact, &[o, i])?;
        let rounding = WeightRounding::between(&requantized.dequantize(), &exact);
        self.weight = requantized;
        Ok(rounding)
    }

    fn num_parameters(&self) -> usize {
        let (o, i) = self.dims();
        o * i + self.bias.as_ref().map_or(0, |b| b.numel())
    }

    fn resident_bytes(&self) -> usize {
        self.weight.storage_bytes() + self.bias.as_ref().map_or(0, |b| b.size_in_bytes())
    }
}
