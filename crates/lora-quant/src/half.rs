//! Half-precision storage of frozen weights (bf16 or f16): 2 bytes per parameter instead
//! of 4. Products widen a block of rows to f32 right before the GEMM that uses it (exact:
//! every bf16 and f16 value is an f32) and accumulate in f32, so the only difference from
//! an f32 layer is the weight's own rounding, made once when it is stored. A checkpoint
//! saved in the same half type keeps its bits unchanged ([`HalfWeight::from_bits`]).

use std::fmt;

use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use half::{bf16, f16};
use lora_core::{Error, Linear, LoraLinear, Result};

use crate::linear::QuantLinear;
use crate::ops::QuantOps;
use crate::weight::{QuantConfig, QuantFormat};

/// Which 2-byte float.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HalfType {
    /// IEEE binary16: 10 mantissa bits, range ±65504.
    F16,
    /// bfloat16: 7 mantissa bits, f32's range.
    Bf16,
}

impl HalfType {
    /// `f16` or `bf16`, as safetensors and PyTorch name them.
    pub fn as_str(self) -> &'static str {
        match self {
            HalfType::F16 => "f16",
            HalfType::Bf16 => "bf16",
        }
    }

    /// The unit roundoff `2^-(mantissa bits + 1)`: the largest relative error of one
    /// rounding to this type (bf16 `2^-8`, f16 `2^-11`), from which tests derive their
    /// tolerances (docs/formats.md).
    pub fn unit_roundoff(self) -> f64 {
        match self {
            HalfType::F16 => 2f64.powi(-11),
            HalfType::Bf16 => 2f64.powi(-8),
        }
    }

    /// Rounds f32 values to this type, to nearest with ties to even (as PyTorch's `.to()`).
    pub fn round(self, data: &[f32]) -> Vec<u16> {
        let mut bits = vec![0u16; data.len()];
        match self {
            HalfType::F16 => bits
                .reinterpret_cast_mut::<f16>()
                .convert_from_f32_slice(data),
            HalfType::Bf16 => bits
                .reinterpret_cast_mut::<bf16>()
                .convert_from_f32_slice(data),
        }
        bits
    }

    /// Rounds f32 values to this type in place, keeping them as f32 (what a tensor holds
    /// after `.to(half).float()` in PyTorch).
    pub fn round_in_place(self, values: &mut [f32]) {
        let bits = self.round(values);
        self.widen(&bits, values);
    }

    /// Widens values of this type to f32 (exact).
    pub fn widen(self, bits: &[u16], out: &mut [f32]) {
        match self {
            HalfType::F16 => bits.reinterpret_cast::<f16>().convert_to_f32_slice(out),
            HalfType::Bf16 => bits.reinterpret_cast::<bf16>().convert_to_f32_slice(out),
        }
    }
}

impl fmt::Display for HalfType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A frozen `[out, in]` weight stored as bf16 or f16 bits, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct HalfWeight {
    /// The storage type.
    pub half_type: HalfType,
    /// `[out, in]`.
    pub shape: [usize; 2],
    /// One value per element, row-major.
    pub bits: Vec<u16>,
}

impl HalfWeight {
    /// Rounds an f32 `[out, in]` weight to `half_type` (f16 overflows to ±inf as PyTorch's
    /// conversion does; loading such a weight is refused by the layer's finiteness check).
    pub fn from_f32(data: &[f32], shape: &[usize], half_type: HalfType) -> Result<Self> {
        let shape = check_shape(shape, data.len(), half_type)?;
        Ok(HalfWeight {
            half_type,
            shape,
            bits: half_type.round(data),
        })
    }

    /// Takes values already in `half_type` (a bf16 checkpoint loaded as bf16: no rounding,
    /// no f32 copy).
    pub fn from_bits(bits: Vec<u16>, shape: &[usize], half_type: HalfType) -> Result<Self> {
        let shape = check_shape(shape, bits.len(), half_type)?;
        Ok(HalfWeight {
            half_type,
            shape,
            bits,
        })
    }

    /// Bytes of storage (2 per parameter).
    pub fn storage_bytes(&self) -> usize {
        self.bits.len() * 2
    }

    /// Widens rows `row0..row0 + out.len() / in` into `out`.
    pub fn dequantize_rows(&self, row0: usize, out: &mut [f32]) {
        let start = (row0 * self.shape[1]).min(self.bits.len());
        let end = (start + out.len()).min(self.bits.len());
        self.half_type
            .widen(&self.bits[start..end], &mut out[..end - start]);
    }

    /// The whole weight in f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.bits.len()];
        self.half_type.widen(&self.bits, &mut out);
        out
    }
}

fn check_shape(shape: &[usize], len: usize, half_type: HalfType) -> Result<[usize; 2]> {
    match *shape {
        [o, i] if o.checked_mul(i) == Some(len) => Ok([o, i]),
        _ => Err(Error::InvalidConfig {
            context: format!("{half_type} weight"),
            field: "shape",
            value: format!("{shape:?}"),
            reason: format!("a 2-D [out, in] weight of {len} values was expected"),
        }),
    }
}

/// Stores the frozen weight of every layer in `layers` as `half` (unless it is already
/// quantized), keeping biases in f32; returns the resident bytes of the new bases and what
/// they took before. Adapters and their gradients are untouched (they stay f32, PEFT's
/// `autocast_adapter_dtype`). Call before merging any adapter.
pub fn store_frozen_as<B: QuantOps + lora_core::LoraOps>(
    backend: &B,
    layers: Vec<&mut LoraLinear<B>>,
    half: HalfType,
) -> Result<(usize, usize)> {
    let config = QuantConfig::new(match half {
        HalfType::F16 => QuantFormat::F16,
        HalfType::Bf16 => QuantFormat::Bf16,
    });
    let (mut now, mut before) = (0, 0);
    for layer in layers {
        before += layer.base().resident_bytes();
        if layer.base_mut().as_dense_mut().is_none() {
            // Quantized already (QLoRA): stays as it is.
            now += layer.base().resident_bytes();
            continue;
        }
        let base = layer.base();
        let q = QuantLinear::quantize(
            backend,
            &base.weight(backend)?,
            base.bias().cloned(),
            &config,
        )?;
        now += q.resident_bytes();
        layer.replace_base(Box::new(q))?;
    }
    Ok((now, before))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_to_nearest_even_and_widening_exact() {
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0);
        // 1 + 3·2^-8 ties too and goes up to the even 1 + 2^-6. A subnormal survives.
        let subnormal = f32::from_bits(0x0008_0000);
        let w = HalfWeight::from_f32(
            &[
                1.0 + 2f32.powi(-8),
                1.0 + 3.0 * 2f32.powi(-8),
                -2.5,
                subnormal,
            ],
            &[2, 2],
            HalfType::Bf16,
        )
        .unwrap();
        assert_eq!(w.dequantize(), [1.0, 1.0 + 2f32.powi(-6), -2.5, subnormal]);
        let h =
            HalfWeight::from_f32(&[65504.0, 70000.0, 1e-8, 0.1], &[1, 4], HalfType::F16).unwrap();
        let back = h.dequantize();
        assert_eq!(back[0], 65504.0);
        assert_eq!(back[1], f32::INFINITY);
        assert!((back[3] - 0.1).abs() <= 0.1 * HalfType::F16.unit_roundoff() as f32);
    }

    #[test]
    fn rows_widen_in_place_and_shapes_are_checked() {
        let data: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let w = HalfWeight::from_f32(&data, &[3, 4], HalfType::F16).unwrap();
        let mut rows = [0.0; 8];
        w.dequantize_rows(1, &mut rows);
        assert_eq!(rows, [4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]);
        assert!(HalfWeight::from_bits(vec![0; 5], &[2, 3], HalfType::Bf16).is_err());
        assert!(HalfWeight::from_f32(&data, &[12], HalfType::Bf16).is_err());
    }
}
