//! # lora-peft
//!
//! Hugging Face PEFT's rules and files, over any backend:
//!
//! * [`LoraConfig`]: `adapter_config.json` with PEFT's field names and defaults; unknown
//!   fields are kept, unsupported number-changing fields are clear errors.
//! * [`inject_adapters`]: PEFT's `target_modules` / `exclude_modules` / `rank_pattern` /
//!   `alpha_pattern` rules over a model's dotted layer names.
//! * [`save_pretrained`] / [`load_pretrained`]: PEFT adapter directories
//!   (`adapter_model.safetensors` with `base_model.model.<path>.lora_A.weight` keys).
//! * [`PeftModel`]: named adapters, weighted combinations, merge and unmerge.
//! * [`merge_checkpoint`]: `lora merge`, an adapter folded into a checkpoint (plain or
//!   quantized) while streaming it; [`quant_targets`]: PEFT's `target_modules` rules as
//!   the module selection of `lora quantize`.
//!
//! Checkpoint files themselves (safetensors, shards, the bitsandbytes layout) are
//! `lora-io`'s concern.

mod adapter_file;
mod combine_files;
mod config;
mod error;
mod hotswap;
mod init_conversion;
mod init_methods;
mod merge_checkpoint;
mod merge_token_rows;
mod name_patterns;
mod peft_model;
mod svd_combination;
mod targeting;
mod weighted_adapter;

pub use adapter_file::{
    BASE_LAYER_WEIGHT, CONFIG_FILE, KEY_PREFIX, ModuleTensors, WEIGHTS_FILE, load_adapter,
    load_pretrained, lora_modules, save_adapter, save_pretrained, tensor_key, token_rows,
};
pub use combine_files::combine_adapter_dirs;
pub use config::{InitLoraWeights, IntOrList, LoraConfig, StrOrList, TargetModules, TokenIndices};
pub use error::{PeftError, Result};
pub use init_conversion::convert_to_lora;
pub use init_methods::{InitMethod, initialise};
pub use merge_checkpoint::{MergeReport, OutDtype, adapter_dir_for, merge_checkpoint};
pub use name_patterns::pattern_value;
pub use peft_model::PeftModel;
pub use svd_combination::{SvdCombination, svd_clamp};
pub use targeting::{inject_adapter, inject_adapters, matches, quant_targets, selects};
pub use weighted_adapter::Combination;
