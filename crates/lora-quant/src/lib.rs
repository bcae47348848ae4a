//! # lora-quant
//!
//! Quantized frozen bases for lora-rs, in bitsandbytes' formats so that checkpoints move
//! between Rust and Python:
//!
//! * [`FourBitWeight`]: blockwise NF4 / FP4 (blocksize 32..4096), two codes per byte,
//!   optional double quantization of the scales ([`Absmax::Double`]): QLoRA's base.
//! * [`Int8Weight`]: LLM.int8's row-wise int8 with per-row scales (`SCB`).
//! * [`HalfWeight`]: bf16 / f16 storage (2 bytes per parameter), widened to f32 per block
//!   of rows inside the product.
//! * [`QuantOps`]: dequantize as a backend operation (host default, device override).
//! * [`QuantLinear`]: a frozen [`lora_core::Linear`] over a quantized weight; LoRA
//!   adapters train on top of it as on a dense layer (QLoRA). Merging into it re-quantizes
//!   and reports the rounding.
//!
//! The file layout (transformers' serialization of bitsandbytes layers) is in `lora-io`.

mod absmax;
pub mod blockwise8;
pub mod codes;
pub mod four_bit;
pub mod half;
pub mod int8;
pub mod linear;
pub mod ops;
pub mod weight;

pub use blockwise8::BlockwiseU8;
pub use codes::{FourBitType, NF4, dynamic_map};
pub use four_bit::{Absmax, FOUR_BIT_BLOCKSIZES, FourBitWeight, NESTED_BLOCKSIZE};
pub use half::{HalfType, HalfWeight, store_frozen_as};
pub use int8::Int8Weight;
pub use linear::QuantLinear;
pub use ops::{QuantOps, check_row_range, dequantize_rows_host, dequantize_rows_into};
pub use weight::{QuantConfig, QuantFormat, QuantizedWeight};

/// A backend with every operation a QLoRA model needs.
pub trait QuantBackend: lora_core::FullBackend + QuantOps {}

impl<B: lora_core::FullBackend + QuantOps> QuantBackend for B {}
