//! The all-MiniLM-L6-v2 LoRA workload of `benches/bert.rs` and `bin/bert_memory.rs`:
//! batch 32 x 128 of random ordinary-vocabulary ids (`[CLS]` first, every token attended),
//! LoRA r=8 (alpha 16) on query and value, and a two-class linear head, as
//! `benches/python/bert_minilm.py` builds it for PyTorch + PEFT.

use lora::models::bert::{BertModel, TokenBatch};
use lora::peft::{self, LoraConfig, TargetModules};
use lora::{DenseLinear, FullBackend};

use crate::rand_host;

/// Sequences per batch.
pub const BATCH: usize = 32;
/// Tokens per sequence.
pub const SEQ: usize = 128;

/// The model directory when all-MiniLM-L6-v2 is in the cache.
pub fn dir() -> Option<std::path::PathBuf> {
    let dir = lora::models::cache::minilm_dir();
    dir.join("model.safetensors").is_file().then_some(dir)
}

/// Errors of the setup (model loading, injection).
pub type SetupResult<T> = Result<T, Box<dyn std::error::Error>>;

/// The benchmark batch.
pub fn batch() -> SetupResult<TokenBatch> {
    let ids: Vec<u32> = rand_host(BATCH * SEQ, 7)
        .iter()
        .enumerate()
        .map(|(i, v)| match i % SEQ {
            0 => 101,
            _ => 2000 + ((v + 1.0) * 10_000.0) as u32,
        })
        .collect();
    Ok(TokenBatch::new(ids, vec![1; BATCH * SEQ], BATCH)?)
}

/// LoRA on query and value of `model`, a fresh two-class head and the batch's labels.
pub fn add_lora<B: FullBackend>(
    b: &B,
    model: &mut BertModel<B>,
) -> SetupResult<(DenseLinear<B>, Vec<usize>)> {
    let cfg = LoraConfig {
        r: 8,
        lora_alpha: 16.0,
        target_modules: Some(TargetModules::List(vec!["query".into(), "value".into()])),
        ..LoraConfig::default()
    };
    peft::inject_adapters(model, b, &cfg, 0)?;
    let h = model.config().hidden_size;
    let head = DenseLinear::new(
        b.from_host(&rand_host(2 * h, 8), &[2, h])?,
        Some(b.zeros(&[2])?),
    )?;
    Ok((head, (0..BATCH).map(|i| i % 2).collect()))
}
