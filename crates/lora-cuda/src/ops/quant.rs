//! `QuantOps` for [`Cuda`]: NF4/FP4 and int8 dequantization on the device.

use cudarc::driver::PushKernelArg;
use lora_core::{Error, Result};
use lora_quant::{Absmax, QuantOps, QuantizedWeight};

use crate::device::Cuda;
use crate::launch::{elems, launch};
use crate::tensor::CudaTensor;

/// Dequantization on the device. The packed rows (and the scales) are uploaded for each
/// call: the quantized weight itself lives on the host today (see docs/cuda.md).
impl QuantOps for Cuda {
    fn dequantize_rows(
        &self,
        weight: &QuantizedWeight,
        row0: usize,
        rows: usize,
    ) -> Result<CudaTensor> {
        let (out_f, in_f) = weight.dims();
        if row0.checked_add(rows).is_none_or(|end| end > out_f) {
            return Err(Error::state(
                format!("dequantize_rows of a [{out_f}, {in_f}] weight"),
                format!(
                    "rows {row0}..{} are out of range",
                    row0.saturating_add(rows)
                ),
            ));
        }
        if let QuantizedWeight::Half(_) = weight {
            // Widened on the host and uploaded: bf16/f16 products on the device are issue
            // 14's tensor-core path, not written yet.
            let buf = lora_quant::dequantize_rows_host(weight, row0, rows)?;
            return lora_core::Backend::from_host_vec(self, buf, &[rows, in_f]);
        }
        let n = rows * in_f;
        let mut out = self.alloc(n)?;
        let n64 = n as u64;
        match weight {
            QuantizedWeight::FourBit(w) => {
                let start = row0 * in_f;
                let byte0 = start / 2;
                let byte1 = (start + n).div_ceil(2);
                let packed = self.upload(&w.packed[byte0..byte1])?;
                let code = self.upload(&w.code)?;
                let (start64, base64, bs64) = (start as u64, byte0 as u64, w.blocksize as u64);
                match &w.absmax {
                    Absmax::F32(a) => {
                        let a = self.upload(a)?;
                        let (null, zero, one) = (0u64, 0.0f32, 1u64);
                        launch!(
                            self,
                            "dequantize_4bit",
                            elems(n),
                            &packed,
                            &code,
                            &a,
                            &null,
                            &null,
                            &null,
                            &zero,
                            &one,
                            &bs64,
                            &start64,
                            &base64,
                            &mut out,
                            &n64
                        );
                    }
                    Absmax::Double { scales, offset } => {
                        let q = self.upload(&scales.codes)?;
                        let ncode = self.upload(&scales.code)?;
                        let nabs = self.upload(&scales.absmax)?;
                        let (null, nbs) = (0u64, scales.blocksize as u64);
                        launch!(
                            self,
                            "dequantize_4bit",
                            elems(n),
                            &packed,
                            &code,
                            &null,
                            &q,
                            &ncode,
                            &nabs,
                            offset,
                            &nbs,
                            &bs64,
                            &start64,
                            &base64,
                            &mut out,
                            &n64
                        );
                    }
                }
            }
            QuantizedWeight::Half(_) => unreachable!("handled above"),
            QuantizedWeight::Int8(w) => {
                let cb: Vec<i8> = w.cb[row0 * in_f..(row0 + rows) * in_f].to_vec();
                let cb = self.upload(&cb)?;
                let scb = self.upload(&w.scb)?;
                let (r64, c64) = (row0 as u64, in_f as u64);
                launch!(
                    self,
                    "dequantize_int8",
                    elems(n),
                    &cb,
                    &scb,
                    &r64,
                    &c64,
                    &mut out,
                    &n64
                );
            }
        }
        Ok(CudaTensor::new(out, &[rows, in_f]))
    }
}
