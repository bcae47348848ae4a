//! # lora-cuda
//!
//! The CUDA backend of lora-rs: cudarc 0.19 for the driver API, cuBLAS for the large
//! matrix products (GEMM, strided-batched GEMM for attention) and our own kernels
//! (`src/kernels/lora_rs.cu`, compiled with NVRTC the first time a context is created)
//! for everything else: elementwise ops and activations, reductions, softmax and
//! LayerNorm with their backwards, permutes, row gathers, the Philox dropout mask
//! (bit-identical to the CPU backends), the Adam/AdamW step, and NF4/FP4/int8
//! dequantization.
//!
//! cudarc is built with `dynamic-loading`: this crate compiles on machines without CUDA,
//! and [`Cuda::new`] returns an error (never a panic) when `libcuda` cannot be loaded.
//! See `docs/cuda.md` for what has and has not been run on a GPU.
#![allow(unsafe_code)]

mod device;
mod launch;
mod ops;
mod tensor;

pub use device::{Cuda, cuda_unavailable_reason};
pub use tensor::CudaTensor;
