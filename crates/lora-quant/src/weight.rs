//! A quantized weight of any supported format, and the settings that make one.

use std::fmt;
use std::str::FromStr;

use lora_core::{Error, Result};

use crate::codes::FourBitType;
use crate::four_bit::{FourBitWeight, check_blocksize};
use crate::half::{HalfType, HalfWeight};
use crate::int8::Int8Weight;

/// A storage format for frozen weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    /// 4-bit NormalFloat (QLoRA).
    Nf4,
    /// 4-bit float.
    Fp4,
    /// LLM.int8 row-wise 8-bit.
    Int8,
    /// IEEE half precision (2 bytes, not a quantization: the weight rounded once).
    F16,
    /// bfloat16 (2 bytes).
    Bf16,
}

impl QuantFormat {
    /// `nf4`, `fp4` or `int8`.
    pub fn as_str(self) -> &'static str {
        match self {
            QuantFormat::Nf4 => "nf4",
            QuantFormat::Fp4 => "fp4",
            QuantFormat::Int8 => "int8",
            QuantFormat::F16 => "f16",
            QuantFormat::Bf16 => "bf16",
        }
    }

    /// The 4-bit type, if this is a 4-bit format.
    pub fn four_bit(self) -> Option<FourBitType> {
        match self {
            QuantFormat::Nf4 => Some(FourBitType::Nf4),
            QuantFormat::Fp4 => Some(FourBitType::Fp4),
            QuantFormat::Int8 | QuantFormat::F16 | QuantFormat::Bf16 => None,
        }
    }

    /// The half type, if this is a 2-byte float format.
    pub fn half(self) -> Option<HalfType> {
        match self {
            QuantFormat::F16 => Some(HalfType::F16),
            QuantFormat::Bf16 => Some(HalfType::Bf16),
            _ => None,
        }
    }
}

impl fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for QuantFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "nf4" => Ok(QuantFormat::Nf4),
            "fp4" => Ok(QuantFormat::Fp4),
            "int8" => Ok(QuantFormat::Int8),
            "f16" => Ok(QuantFormat::F16),
            "bf16" => Ok(QuantFormat::Bf16),
            other => Err(Error::InvalidConfig {
                context: "quantization".into(),
                field: "format",
                value: other.into(),
                reason: "expected nf4, fp4, int8, f16 or bf16".into(),
            }),
        }
    }
}

/// How to quantize: the format, and for 4-bit the blocksize and double quantization.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuantConfig {
    /// The format.
    pub format: QuantFormat,
    /// Values per block (4-bit only; bitsandbytes' default is 64).
    pub blocksize: usize,
    /// Quantize the 4-bit scales too (QLoRA's double quantization).
    pub double_quant: bool,
}

impl QuantConfig {
    /// QLoRA's setting: NF4, blocks of 64, double quantization.
    pub fn qlora() -> QuantConfig {
        QuantConfig {
            format: QuantFormat::Nf4,
            blocksize: 64,
            double_quant: true,
        }
    }

    /// The format with bitsandbytes' defaults (blocksize 64, double quantization on for
    /// 4-bit).
    pub fn new(format: QuantFormat) -> QuantConfig {
        QuantConfig {
            format,
            blocksize: 64,
            double_quant: format.four_bit().is_some(),
        }
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        if self.format.four_bit().is_some() {
            check_blocksize(self.blocksize)?;
        }
        Ok(())
    }

    /// Quantizes a `[out, in]` row-major weight.
    pub fn quantize(&self, data: &[f32], shape: &[usize]) -> Result<QuantizedWeight> {
        self.validate()?;
        if shape.len() != 2 {
            return Err(Error::InvalidConfig {
                context: format!("{} quantization", self.format),
                field: "shape",
                value: format!("{shape:?}"),
                reason: "only 2-D [out, in] linear weights are quantized".into(),
            });
        }
        Ok(match (self.format.four_bit(), self.format.half()) {
            (Some(t), _) => QuantizedWeight::FourBit(FourBitWeight::quantize(
                data,
                shape,
                t,
                self.blocksize,
                self.double_quant,
            )?),
            (None, Some(h)) => QuantizedWeight::Half(HalfWeight::from_f32(data, shape, h)?),
            (None, None) => QuantizedWeight::Int8(Int8Weight::quantize(data, shape)?),
        })
    }
}

/// A quantized `[out, in]` weight.
#[derive(Clone, Debug, PartialEq)]
pub enum QuantizedWeight {
    /// NF4 / FP4 blockwise.
    FourBit(FourBitWeight),
    /// Row-wise int8.
    Int8(Int8Weight),
    /// bf16 / f16.
    Half(HalfWeight),
}

impl QuantizedWeight {
    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            QuantizedWeight::FourBit(w) => (w.shape[0], w.shape.get(1).copied().unwrap_or(1)),
            QuantizedWeight::Int8(w) => (w.shape[0], w.shape[1]),
            QuantizedWeight::Half(w) => (w.shape[0], w.shape[1]),
        }
    }

    /// The settings that re-create this weight's format.
    pub fn config(&self) -> QuantConfig {
        match self {
            QuantizedWeight::FourBit(w) => QuantConfig {
                format: match w.quant_type {
                    FourBitType::Nf4 => QuantFormat::Nf4,
                    FourBitType::Fp4 => QuantFormat::Fp4,
                },
                blocksize: w.blocksize,
                double_quant: w.double_quant(),
            },
            QuantizedWeight::Int8(_) => QuantConfig::new(QuantFormat::Int8),
            QuantizedWeight::Half(w) => QuantConfig::new(match w.half_type {
                HalfType::F16 => QuantFormat::F16,
                HalfType::Bf16 => QuantFormat::Bf16,
            }),
        }
    }

    /// Bytes of storage.
    pub fn storage_bytes(&self) -> usize {
        match self {
            QuantizedWeight::FourBit(w) => w.storage_bytes(),
            QuantizedWeight::Int8(w) => w.storage_bytes(),
            QuantizedWeight::Half(w) => w.storage_bytes(),
        }
    }

    /// Storage bits per weight value (QLoRA's 4.127 for NF4 + double quant at 64).
    pub fn bits_per_parameter(&self) -> f64 {
        let (o, i) = self.dims();
        self.storage_bytes() as f64 * 8.0 / (o * i) as f64
    }

    /// Dequantizes rows `row0..row0 + out.len() / in` into `out`.
    pub fn dequantize_rows(&self, row0: usize, out: &mut [f32]) {
        match self {
            QuantizedWeight::FourBit(w) => w.dequantize_range(row0 * self.dims().1, out),
            QuantizedWeight::Int8(w) => w.dequantize_rows(row0, out),
            QuantizedWeight::Half(w) => w.dequantize_rows(row0, out),
        }
    }

    /// The whole weight in f32.
    pub fn dequantize(&self) -> Vec<f32> {
        match self {
            QuantizedWeight::FourBit(w) => w.dequantize(),
            QuantizedWeight::Int8(w) => w.dequantize(),
            QuantizedWeight::Half(w) => w.dequantize(),
        }
    }
}
