//! # lora-peft
//!
//! Compatibility with Hugging Face PEFT:
//!
//! * [`LoraConfig`]: `adapter_config.json` with PEFT's field names and defaults; unknown
//!   fields are kept, unsupported number-changing fields are clear errors.
//! * [`inject_adapters`]: PEFT's `target_modules` / `exclude_modules` / `rank_pattern` /
//!   `alpha_pattern` rules over a model's dotted layer names.
//! * [`save_pretrained`] / [`load_pretrained`]: PEFT adapter directories
//!   (`adapter_model.safetensors` with `base_model.model.<path>.lora_A.weight` keys).
//! * [`merge_checkpoint`]: `lora merge`, streaming, into plain or quantized bases.
//! * [`quantize_checkpoint`] / [`dequantize_checkpoint`]: whole checkpoints in
//!   transformers' bitsandbytes layout ([`bnb_format`]).

mod adapter_file;
pub mod bnb_format;
mod checkpoint;
mod config;
mod error;
mod merge_checkpoint;
mod peft_model;
mod quantize_checkpoint;
mod targeting;

pub use adapter_file::{
    CONFIG_FILE, KEY_PREFIX, WEIGHTS_FILE, load_adapter, load_pretrained, lora_modules,
    read_safetensors, save_adapter, save_pretrained, write_safetensors,
};
pub use checkpoint::{
    Checkpoint, MappedFile, decode_f32, encode_f32, is_float, read_checkpoint_f32,
};
pub use config::{InitLoraWeights, IntOrList, LoraConfig, StrOrList, TargetModules};
pub use error::{PeftError, Result};
pub use merge_checkpoint::{MergeReport, OutDtype, adapter_dir_for, merge_checkpoint};
pub use peft_model::{Combination, PeftModel};
pub use quantize_checkpoint::{
    LoadedCheckpoint, QuantSummary, QuantTargets, QuantizeReport, dequantize_checkpoint,
    is_quantized_checkpoint, quant_summary, quantize_checkpoint,
};
/// safetensors' dtype enum, for callers inspecting files.
pub use safetensors::Dtype as SafetensorsDtype;
pub use targeting::{inject_adapter, inject_adapters, matches, pattern_value, selects};
