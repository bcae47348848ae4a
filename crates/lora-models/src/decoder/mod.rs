//! Decoder LLMs of the Llama family (transformers' `LlamaForCausalLM`,
//! `MistralForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM`): config in both styles,
//! RMSNorm, rotary embedding with `default`/`linear`/`dynamic`/`llama3` scaling,
//! grouped-query attention with causal and padding masks, Qwen2's q/k/v biases, Qwen3's
//! q/k norm, SwiGLU, tied embeddings, and the causal-LM loss.
//!
//! Status: forward, loss and the backward into the adapters, checked against
//! transformers and PyTorch autograd on tiny random checkpoints (`tests/decoder.rs`).
//! The KV cache, sampling, tokenizer glue and the CLI are still to come.

mod config;
mod generate;
mod kv_cache;
mod layer;
mod layer_backward;
mod loss;
mod model;
mod quantize;
mod rope;
mod tokenizer;

pub use config::{DecoderConfig, RopeScaling, SUPPORTED_MODEL_TYPES};
pub use generate::{GenerationConfig, generate};
pub use kv_cache::KvCache;
pub use loss::{IGNORE_INDEX, causal_lm_loss, causal_lm_loss_grad, next_token_targets};
pub use model::{DecoderModel, positions};
pub use tokenizer::DecoderTokenizer;
