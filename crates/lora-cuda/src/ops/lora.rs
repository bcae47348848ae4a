//! `LoraOps` for [`Cuda`]: the lora-core defaults.

use lora_core::LoraOps;

use crate::device::Cuda;

/// LoRA forward and backward run the lora-core defaults over cuBLAS and our kernels.
impl LoraOps for Cuda {}
