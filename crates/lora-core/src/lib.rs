//! # lora-core
//!
//! The backend contract and the LoRA math of lora-rs, independent of any backend:
//!
//! * [`Backend`] and [`Tensor`]: device tensors and op-level primitives (GEMM,
//!   elementwise, reductions, activations, dropout masks) that every backend supplies.
//! * [`LoraOps`] and [`OptimOps`]: layer-level operations (LoRA forward/backward, optimizer
//!   steps) with default implementations over the primitives, which a backend may override
//!   with fused kernels.
//! * [`Linear`] (frozen layers), [`Adapter`] (trainable additions, [`LoraAdapter`]),
//!   [`LoraLinear`] (a named layer with its adapter), [`Model`] (layers by dotted name) and
//!   [`Optimizer`] ([`Sgd`], [`Adam`]).
//! * [`rng`]: the counter-based Philox generator shared by all backends, so the same seed
//!   gives the same init and dropout masks everywhere.
//!
//! See `docs/architecture.md` in the repository for the design.

pub mod adapter;
pub mod backend;
pub mod dora;
pub mod dtype;
mod embedding_dora;
pub mod error;
pub mod host_tensor;
pub mod linear;
pub mod lora_embedding;
pub mod lora_linear;
pub mod loss;
pub mod module;
pub mod ops;
pub mod optim;
pub mod rng;
pub mod shape;
mod through_base;
mod trainable_tokens;

pub use adapter::{Adapter, LoraAdapter, LoraInit, LoraSpec, Mode, ParamGrad};
pub use backend::{Backend, BinaryOp, Tensor, Transpose, UnaryOp};
pub use dora::DoraAdapter;
pub use dtype::DType;
pub use error::{Error, Result};
pub use host_tensor::HostTensor;
pub use linear::{DenseLinear, Linear, LowRank, WeightRounding};
pub use lora_embedding::LoraEmbedding;
pub use lora_linear::{DEFAULT_ADAPTER, FullGrads, LoraLinear, RowAdapter};
pub use loss::{cross_entropy_loss, mse_loss};
pub use module::Model;
pub use ops::{
    AdamHyper, AttentionMask, DecoderOps, LoraGrads, LoraOps, OptimOps, RowOrCol, SgdHyper,
    WeightedFactors,
};
pub use optim::{Adam, AdamState, Optimizer, Sgd};
pub use shape::Shape;

/// Everything a backend implements: the primitives plus the layer-level operations.
/// Blanket-implemented; use it as the bound for code generic over backends.
pub trait FullBackend: Backend + LoraOps + OptimOps + DecoderOps {}

impl<B: Backend + LoraOps + OptimOps + DecoderOps> FullBackend for B {}
