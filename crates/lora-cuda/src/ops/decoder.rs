//! Decoder-LLM operations (RMSNorm, SiLU, rotary embedding): the lora-core defaults over
//! the CUDA primitives for now; fused kernels can override them here.

use crate::device::Cuda;

impl lora_core::DecoderOps for Cuda {}
