//! # lora-io
//!
//! Reading and writing Hugging Face checkpoints: safetensors files (memory-mapped, or
//! streamed with positioned reads), f32/f16/bf16 conversion, sharded checkpoints with a
//! `model.safetensors.index.json`, the layout in which transformers + bitsandbytes store
//! quantized layers, and crash-safe output.
//!
//! * [`Checkpoint`]: a checkpoint opened once (every shard mapped) and handed down to
//!   whatever reads it: model loaders ([`Checkpoint::read_f32`]), `lora merge`,
//!   `lora quantize`.
//! * [`read_safetensors`] / [`write_safetensors`]: one file of f32 tensors (adapters).
//! * [`bnb_format`]: one quantized module in transformers' bitsandbytes layout;
//!   [`quantize_checkpoint`], [`dequantize_checkpoint`], [`merge_into_quantized`] and
//!   [`quant_summary`]: whole checkpoints in that layout.
//! * [`fs`]: nothing appears under a final path until it is complete.

pub mod bnb_checkpoint;
pub mod bnb_format;
pub mod checkpoint;
pub mod dtype;
pub mod error;
pub mod fs;
pub mod safetensors_file;

pub use bnb_checkpoint::{
    MergeTarget, ModuleSelector, QuantMergeReport, QuantSummary, QuantTargets, QuantizeReport,
    dequantize_checkpoint, is_quantized_checkpoint, merge_into_quantized, quant_summary,
    quantize_checkpoint,
};
pub use checkpoint::{Checkpoint, TensorEntry, read_checkpoint_f32};
pub use dtype::{decode_f32, encode_f32, is_float};
pub use error::{Error, Result};
/// safetensors' dtype enum, for callers inspecting files.
pub use safetensors::Dtype as SafetensorsDtype;
pub use safetensors_file::{
    MappedFile, RawTensor, read_safetensors, serialize_to_writer, write_raw, write_safetensors,
};
