//! `--quant nf4|fp4|int8`: the frozen base quantized for QLoRA (`lora demo`, `lora train`).

use lora::quant::{QuantConfig, QuantFormat};

/// `--quant` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QuantArg {
    /// 4-bit NormalFloat with double quantization (QLoRA).
    Nf4,
    /// 4-bit float with double quantization.
    Fp4,
    /// LLM.int8 row-wise 8-bit.
    Int8,
}

impl QuantArg {
    /// The quantization settings (blocksize 64, double quantization for 4-bit).
    pub fn config(self) -> QuantConfig {
        QuantConfig::new(match self {
            QuantArg::Nf4 => QuantFormat::Nf4,
            QuantArg::Fp4 => QuantFormat::Fp4,
            QuantArg::Int8 => QuantFormat::Int8,
        })
    }

    /// The format's name.
    pub fn name(self) -> &'static str {
        match self {
            QuantArg::Nf4 => "nf4",
            QuantArg::Fp4 => "fp4",
            QuantArg::Int8 => "int8",
        }
    }
}
