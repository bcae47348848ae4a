//! Dequantization as a backend operation. The default runs on the host and uploads the
//! result; a device backend (CUDA) overrides it with a kernel reading the packed codes.

use lora_core::{Backend, Error, Result};

use crate::weight::QuantizedWeight;

/// Layer-level quantization operations with default implementations over the
/// [`Backend`] primitives (burn's pattern, as [`lora_core::LoraOps`]).
pub trait QuantOps: Backend {
    /// Rows `row0..row0 + rows` of the dequantized `[out, in]` weight as a `[rows, in]`
    /// f32 tensor. Quantized layers call it a block of rows at a time, so the full f32
    /// weight never exists.
    fn dequantize_rows(
        &self,
        weight: &QuantizedWeight,
        row0: usize,
        rows: usize,
    ) -> Result<Self::Tensor> {
        let buf = dequantize_rows_host(weight, row0, rows)?;
        self.from_host(&buf, &[rows, weight.dims().1])
    }
}

/// The host half of [`QuantOps::dequantize_rows`], with its range check; backends that
/// keep tensors in host memory wrap the buffer without a copy.
pub fn dequantize_rows_host(
    weight: &QuantizedWeight,
    row0: usize,
    rows: usize,
) -> Result<Vec<f32>> {
    let (out_f, in_f) = weight.dims();
    if row0.checked_add(rows).is_none_or(|end| end > out_f) {
        return Err(Error::InvalidState {
            context: format!("dequantize_rows of a [{out_f}, {in_f}] weight"),
            reason: format!(
                "rows {row0}..{} are out of range",
                row0.saturating_add(rows)
            ),
        });
    }
    let mut buf = vec![0.0f32; rows * in_f];
    weight.dequantize_rows(row0, &mut buf);
    Ok(buf)
}
