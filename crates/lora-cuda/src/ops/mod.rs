//! `Backend`, `LoraOps`, `OptimOps` and `QuantOps` for [`Cuda`](crate::Cuda): cuBLAS for
//! products, our kernels (`kernels/lora_rs.cu`) for the rest. Every method checks shapes
//! with the shared `lora_core::backend::check_*` helpers first, so bad input gets the same
//! message as on the CPU backends and never reaches a kernel.
//!
//! One file per trait: `primitives` (the core `Backend` methods), `optim` (`OptimOps`),
//! `quant` (`QuantOps`) and `lora` (`LoraOps`).

mod decoder;
mod lora;
mod optim;
mod primitives;
mod quant;
