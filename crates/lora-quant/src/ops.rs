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
    check_row_range(weight, row0, rows)?;
    let mut buf = vec![0.0f32; rows * weight.dims().1];
    dequantize_rows_into(weight, row0, &mut buf)?;
    Ok(buf)
}

/// Rows `row0..` of the weight in f32 into `out` (whole rows: its length is a multiple of
/// the row length), every element written; an error names the range when it is outside.
pub fn dequantize_rows_into(weight: &QuantizedWeight, row0: usize, out: &mut [f32]) -> Result<()> {
    let in_f = weight.dims().1;
    let rows = out.len().checked_div(in_f).unwrap_or(0);
    check_row_range(weight, row0, rows)?;
    if rows * in_f != out.len() {
        return Err(Error::InvalidState {
            context: format!("dequantize_rows of a [{}, {in_f}] weight", weight.dims().0),
            reason: format!("{} values are not whole rows", out.len()),
        });
    }
    weight.dequantize_rows(row0, out);
    Ok(())
}

/// An error naming the range unless rows `row0..row0 + rows` lie inside the weight
/// (checked before a buffer for them is allocated).
pub fn check_row_range(weight: &QuantizedWeight, row0: usize, rows: usize) -> Result<()> {
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
    Ok(())
}
