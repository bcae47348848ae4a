//! # lora-models
//!
//! Models built from `lora-core` layers, generic over the backend. Each model names its
//! linear layers exactly as the equivalent PyTorch module does, so PEFT's
//! `target_modules` and adapter keys carry over unchanged.
//!
//! * [`Mlp`]: `nn.Sequential` of linear layers and activations (the seeds' sine-wave model).
//! * [`bert::BertModel`]: transformers' `BertModel` (embeddings, self-attention, GELU
//!   feed-forward, pooler) loaded from a Hugging Face checkpoint, with forward and backward,
//!   plus [`bert::BertTokenizer`] (`tokenizer.json` through the `tokenizers` crate) and
//!   sentence-transformers' mean pooling.
//! * [`decoder::DecoderModel`]: decoder LLMs of the Llama family (`llama`, `mistral`,
//!   `qwen2`, `qwen3`) as transformers computes them, with the causal-LM loss, the
//!   backward into LoRA adapters, a KV cache and sampling
//!   ([`decoder::generate`]), plus [`decoder::DecoderTokenizer`].

pub mod bert;
pub mod cache;
pub mod decoder;
mod error;
mod mlp;
mod token_batch;

pub use error::{ModelError, Result};
pub use mlp::{DenseGrads, Mlp};
pub use token_batch::TokenBatch;
