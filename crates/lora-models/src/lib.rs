//! # lora-models
//!
//! Models built from `lora-core` layers, generic over the backend. Each model names its
//! linear layers exactly as the equivalent PyTorch module does, so PEFT's
//! `target_modules` and adapter keys carry over unchanged.
//!
//! * [`Mlp`]: `nn.Sequential` of linear layers and activations (the seeds' sine-wave model).

mod mlp;

pub use mlp::{DenseGrads, Mlp};
