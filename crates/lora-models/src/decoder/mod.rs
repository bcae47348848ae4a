//! Decoder LLMs of the Llama family (transformers' `LlamaForCausalLM`,
//! `MistralForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM`): config in both styles,
//! RMSNorm, rotary embedding with `default`/`linear`/`dynamic`/`llama3` scaling,
//! grouped-query attention with causal and padding masks, Qwen2's q/k/v biases, Qwen3's
//! q/k norm, SwiGLU, tied embeddings, and the causal-LM loss.
//!
//! Status: forward and loss, checked against transformers on tiny random checkpoints
//! (`tests/decoder.rs`). The backward, KV cache, sampling and the CLI are still to come.

mod config;
mod layer;
mod loss;
mod model;
mod rope;

pub use config::{DecoderConfig, RopeScaling, SUPPORTED_MODEL_TYPES};
pub use loss::{IGNORE_INDEX, causal_lm_loss};
pub use model::{DecoderModel, positions};
