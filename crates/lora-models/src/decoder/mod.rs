//! Decoder LLMs of the Llama family (transformers' `LlamaForCausalLM`,
//! `MistralForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM`): config in both styles,
//! RMSNorm, rotary embedding with `default`/`linear`/`dynamic`/`llama3` scaling,
//! grouped-query attention with causal and padding masks, Qwen2's q/k/v biases, Qwen3's
//! q/k norm, SwiGLU, tied embeddings, and the causal-LM loss.
//!
//! Forward, loss, the backward into the adapters (and, when asked, the embedding table),
//! the KV cache, sampling and the tokenizer are checked against transformers, PEFT,
//! PyTorch autograd and the `tokenizers` library on tiny random checkpoints
//! (`tests/decoder.rs`, `tests/decoder_loading.rs`).

mod config;
mod generate;
mod kv_cache;
mod layer;
mod layer_backward;
mod loss;
mod model;
mod quantize;
mod rope;
mod step;
mod tokenizer;
mod weights;

pub use config::{DecoderConfig, RopeScaling, SUPPORTED_MODEL_TYPES};
pub use generate::{GenerationConfig, generate};
pub use kv_cache::KvCache;
pub use loss::{IGNORE_INDEX, causal_lm_loss, causal_lm_loss_grad, next_token_targets};
pub use model::DecoderModel;
pub use step::positions;
pub use tokenizer::DecoderTokenizer;
