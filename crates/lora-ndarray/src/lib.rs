//! # lora-ndarray
//!
//! The default, pure-Rust backend of lora-rs and the reference all other backends are
//! tested against. Tensors are [`ndarray`] arrays in standard layout; matrix products go
//! through the [`gemm`](https://docs.rs/gemm) crate with rayon threading (see the
//! `gemm` module for why). Layer-level ops use `lora-core`'s default implementations,
//! except the decoder-LLM family (`decoder`), fused here into one pass per row, and
//! causal attention (`attention`), fused per head with the masked triangle skipped.

mod attention;
mod backend;
mod decoder;
mod fast_exp;
mod few_rows;
mod gemm;
mod lora_ops;
mod norm;
mod permute;
pub mod pool;
mod sgemm;
mod skinny;
mod tensor;
mod token_reduction;
mod vectorize;

pub use backend::NdArray;
pub use tensor::NdTensor;
