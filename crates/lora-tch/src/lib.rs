//! # lora-tch
//!
//! The libtorch backend of lora-rs through [`tch`] (PyTorch 2.13.0). Runs on the CPU, and
//! on CUDA when libtorch sees a GPU (`Tch::cuda(i)`). Tensors are contiguous f32 libtorch
//! tensors with value semantics ([`TchTensor`]); the LoRA forward's epilogue uses
//! libtorch's fused `addmm_`; everything else follows `lora-core`'s reference defaults.
//! Dropout masks come from the shared Philox generator, not torch's RNG, so runs are
//! reproducible across backends.
//!
//! Building needs libtorch: with the PyTorch wheel, set `LIBTORCH_USE_PYTORCH=1` with that
//! Python first on `PATH`, and put torch's `lib/` folder on `LD_LIBRARY_PATH` at run time
//! (`cargo xtask test` does both).

mod backend;
mod lora_ops;
mod tensor;

pub use backend::Tch;
pub use tensor::TchTensor;
