//! LLM.int8's row-wise 8-bit weights (bitsandbytes `Linear8bitLt`, weight format "row"):
//! per output row `SCB = max |W_row|`, `CB = round(W * 127 / SCB)`.

use lora_core::{Error, Result};

/// `1 / 127` as bitsandbytes writes it in `int8_vectorwise_dequant`.
// bitsandbytes' literal, kept digit for digit (it rounds to the f32 nearest 1/127).
#[allow(clippy::excessive_precision)]
const INV_127: f32 = 7.874_015_718_698_502e-3;

/// `1 / 127²` as bitsandbytes writes it in `int8_mm_dequant`.
pub(crate) const INV_127_SQ: f32 = 6.200_124e-5;

/// A row-wise int8 weight `[out, in]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Int8Weight {
    /// `[out, in]`.
    pub shape: [usize; 2],
    /// Row-major int8 codes.
    pub cb: Vec<i8>,
    /// Per-row absmax (`SCB`), `[out]`.
    pub scb: Vec<f32>,
}

/// Row-wise int8 quantization of a `[rows, cols]` matrix: `(codes, row absmax)`.
/// bitsandbytes: `round(A * (127 / row_absmax))`, round half to even. A zero row gets
/// zero codes.
pub(crate) fn quantize_rows(data: &[f32], cols: usize) -> (Vec<i8>, Vec<f32>) {
    let mut codes = Vec::with_capacity(data.len());
    let mut stats = Vec::with_capacity(data.len() / cols.max(1));
    for row in data.chunks(cols) {
        let absmax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        // `127.0 / row_stats` in torch is `row_stats.reciprocal() * 127` (Tensor.__rtruediv__),
        // which differs from a division in the last bit and so flips .5 ties.
        let mul = (1.0 / absmax) * 127.0;
        codes.extend(row.iter().map(|&v| {
            if absmax > 0.0 {
                (v * mul).round_ties_even() as i8
            } else {
                0
            }
        }));
        stats.push(absmax);
    }
    (codes, stats)
}

impl Int8Weight {
    /// Quantizes a `[out, in]` f32 weight.
    pub fn quantize(data: &[f32], shape: &[usize]) -> Result<Int8Weight> {
        let &[out_f, in_f] = shape else {
            return Err(Error::InvalidConfig {
                context: "int8 quantization".into(),
                field: "shape",
                value: format!("{shape:?}"),
                reason: "row-wise int8 quantizes 2-D [out, in] weights".into(),
            });
        };
        if data.len() != out_f * in_f || data.is_empty() {
            return Err(Error::InvalidConfig {
                context: "int8 quantization".into(),
                field: "shape",
                value: format!("{shape:?}"),
                reason: format!("{} values given", data.len()),
            });
        }
        if data.iter().any(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                context: "int8 quantization".into(),
                tensor: "weight".into(),
                shape: shape.into(),
            });
        }
        let (cb, scb) = quantize_rows(data, in_f);
        Ok(Int8Weight {
            shape: [out_f, in_f],
            cb,
            scb,
        })
    }

    /// Dequantizes rows `row0..row0 + out.len() / in` into `out`: `CB * SCB / 127`.
    pub fn dequantize_rows(&self, row0: usize, out: &mut [f32]) {
        let cols = self.shape[1];
        for (r, row) in out.chunks_mut(cols).enumerate() {
            let s = self.scb[row0 + r];
            let src = &self.cb[(row0 + r) * cols..(row0 + r + 1) * cols];
            for (o, &c) in row.iter_mut().zip(src) {
                *o = f32::from(c) * s * INV_127;
            }
        }
    }

    /// Dequantizes columns `cols` of row `row` into `out` (LLM.int8's outlier columns).
    pub fn dequantize_cols(&self, row: usize, cols: &[usize], out: &mut [f32]) {
        let (width, s) = (self.shape[1], self.scb[row]);
        for (o, &c) in out.iter_mut().zip(cols) {
            *o = f32::from(self.cb[row * width + c]) * s * INV_127;
        }
    }

    /// The whole weight in f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.cb.len()];
        self.dequantize_rows(0, &mut out);
        out
    }

    /// Bytes of storage: codes plus row scales.
    pub fn storage_bytes(&self) -> usize {
        self.cb.len() + self.scb.len() * 4
    }
}
