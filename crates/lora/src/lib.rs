//! # lora
//!
//! LoRA (low-rank adaptation) for Rust: freeze a model's weights `W`, train small
//! adapters `ΔW = (α/r) B A`, then save them in Hugging Face PEFT's format, merge them or
//! serve them.
//!
//! This facade re-exports the workspace's public API. Backends are cargo features:
//! `ndarray` (default, pure Rust), `tch` (libtorch) and `cuda` (cudarc + our kernels). Code written against
//! [`FullBackend`] runs on any of them.
//!
//! ```
//! use lora::prelude::*;
//!
//! # fn main() -> lora::Result<()> {
//! let backend = lora::NdArray::new();
//! let w = backend.from_host(&[1.0, 0.0, 0.0, 1.0], &[2, 2])?;
//! let mut layer = LoraLinear::new("proj", Box::new(DenseLinear::new(w, None)?));
//! layer.inject_lora(&backend, &LoraSpec { r: 1, alpha: 2.0, ..LoraSpec::default() })?;
//! let x = backend.from_host(&[1.0, 2.0], &[1, 2])?;
//! let y = layer.forward(&backend, &x, Mode::Eval)?;
//! // A fresh adapter (B = 0) leaves the output exactly as the base computes it.
//! assert_eq!(backend.to_host(&y)?, vec![1.0, 2.0]);
//! # Ok(())
//! # }
//! ```

pub use lora_core::*;
pub use lora_io as io;
pub use lora_models as models;
pub use lora_peft as peft;
pub use lora_quant as quant;

#[cfg(feature = "cuda")]
pub use lora_cuda::{Cuda, CudaTensor, cuda_unavailable_reason};
#[cfg(feature = "ndarray")]
pub use lora_ndarray::{NdArray, NdTensor, pool as ndarray_pool};
#[cfg(feature = "tch")]
pub use lora_tch::{Tch, TchTensor};

/// The names most programs need.
pub mod prelude {
    pub use lora_core::{
        Adam, Adapter, Backend, DenseLinear, FullBackend, Linear, LoraLinear, LoraOps, LoraSpec,
        Mode, Model, OptimOps, Optimizer, Sgd, Tensor,
    };
    pub use lora_quant::{QuantBackend, QuantConfig, QuantFormat, QuantLinear, QuantOps};
}

/// Backend names compiled into this build, in the order the CLI lists them.
pub fn compiled_backends() -> Vec<&'static str> {
    let mut v = Vec::new();
    if cfg!(feature = "ndarray") {
        v.push("ndarray");
    }
    if cfg!(feature = "tch") {
        v.push("tch");
    }
    if cfg!(feature = "cuda") {
        v.push("cuda");
    }
    v
}

// The README's Rust examples are compiled and run as doctests.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
