//! Text generation with the KV cache: the prompt in one pass, then one token per step;
//! greedy at temperature 0, else sampling with transformers' processors in its order
//! (temperature, top-k, top-p) and a seeded Philox stream; stopping at an end-of-sequence
//! id or after `max_new_tokens`.

use lora_core::rng::{RngState, uniform};
use lora_core::{DecoderOps, LoraOps};

use super::model::DecoderModel;
use crate::error::{ModelError, Result};

/// How to pick each new token.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationConfig {
    /// Tokens to add at most.
    pub max_new_tokens: usize,
    /// 0 for greedy decoding; otherwise logits are divided by it before sampling.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`
    /// (1: all).
    pub top_p: f32,
    /// Seed of the sampling stream (the same seed gives the same text).
    pub seed: u64,
    /// Ids that end the generation (included in the output).
    pub eos_token_ids: Vec<u32>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_new_tokens: 32,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            eos_token_ids: Vec::new(),
        }
    }
}

impl GenerationConfig {
    fn validate(&self) -> Result<()> {
        let bad = |field: &str, reason: &str| {
            Err(ModelError::Input(format!("generation {field}: {reason}")))
        };
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad("temperature", "must be a finite number >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", "must be in (0, 1]");
        }
        Ok(())
    }
}

/// Generates up to `cfg.max_new_tokens` tokens after `prompt` (ids with the special tokens
/// the tokenizer adds), calling `on_token` with each new id as it is produced. Returns the
/// new ids.
pub fn generate<B: LoraOps + DecoderOps>(
    model: &mut DecoderModel<B>,
    b: &B,
    prompt: &[u32],
    cfg: &GenerationConfig,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
    cfg.validate()?;
    if prompt.is_empty() {
        return Err(ModelError::Input("the prompt has no tokens".into()));
    }
    let max_pos = model.config().max_position_embeddings;
    if prompt.len() > max_pos {
        return Err(ModelError::Input(format!(
            "the prompt has {} tokens; max_position_embeddings is {max_pos}",
            prompt.len()
        )));
    }
    let total = (prompt.len() + cfg.max_new_tokens).min(max_pos);
    let vocab = model.config().vocab_size;
    let mut cache = model.new_cache(1, total);
    let mut keep = vec![1u32; prompt.len()];
    let positions: Vec<usize> = (0..prompt.len()).collect();
    let logits = model.forward_cached(b, prompt, &keep, &positions, &mut cache)?;
    let mut last = b.to_host(&logits)?.split_off((prompt.len() - 1) * vocab);
    let mut out = Vec::new();
    for step in 0..cfg.max_new_tokens {
        let id = pick(&last, cfg, step as u64);
        out.push(id);
        on_token(id)?;
        if cfg.eos_token_ids.contains(&id) || cache.len() >= total {
            break;
        }
        keep.push(1);
        let logits = model.forward_cached(b, &[id], &keep, &[cache.len()], &mut cache)?;
        last = b.to_host(&logits)?;
    }
    Ok(out)
}

/// The next token from one row of logits.
fn pick(logits: &[f32], cfg: &GenerationConfig, step: u64) -> u32 {
    if cfg.temperature == 0.0 {
        return argmax(logits);
    }
    let scaled: Vec<f64> = logits
        .iter()
        .map(|&l| (l / cfg.temperature) as f64)
        .collect();
    let mut order: Vec<usize> = (0..scaled.len()).collect();
    order.sort_by(|&a, &b| scaled[b].total_cmp(&scaled[a]).then(a.cmp(&b)));
    let mut keep = order.len();
    if cfg.top_k > 0 && cfg.top_k < keep {
        // Ties with the k-th value stay, as transformers' TopKLogitsWarper keeps them.
        let kth = scaled[order[cfg.top_k - 1]];
        keep = order.iter().take_while(|&&i| scaled[i] >= kth).count();
    }
    let max = scaled[order[0]];
    let weights: Vec<f64> = order[..keep]
        .iter()
        .map(|&i| (scaled[i] - max).exp())
        .collect();
    let sum: f64 = weights.iter().sum();
    if cfg.top_p < 1.0 {
        let mut cum = 0.0;
        let mut n = 0;
        for w in &weights {
            cum += w / sum;
            n += 1;
            if cum >= cfg.top_p as f64 {
                break;
            }
        }
        keep = n.max(1);
    }
    let total: f64 = weights[..keep].iter().sum();
    let mut u = [0.0f32];
    uniform(RngState::new(cfg.seed, step), 0.0, 1.0, &mut u);
    let target = u[0] as f64 * total;
    let mut cum = 0.0;
    for (w, &i) in weights[..keep].iter().zip(&order) {
        cum += w;
        if cum > target {
            return i as u32;
        }
    }
    order[keep - 1] as u32
}

/// The first index of the largest value (as `torch.argmax`).
fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.1, 3.0, 3.0, -1.0]), 1);
        let cfg = GenerationConfig::default();
        assert_eq!(pick(&[0.0, 5.0, 1.0], &cfg, 0), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_sampling_is_seeded() {
        let logits = [0.5, 2.0, 1.9, -3.0, 1.0];
        let k1 = GenerationConfig {
            temperature: 1.0,
            top_k: 1,
            ..GenerationConfig::default()
        };
        assert!((0..20).all(|s| pick(&logits, &k1, s) == 1));
        let free = GenerationConfig {
            temperature: 1.0,
            seed: 7,
            ..GenerationConfig::default()
        };
        let a: Vec<u32> = (0..50).map(|s| pick(&logits, &free, s)).collect();
        let b: Vec<u32> = (0..50).map(|s| pick(&logits, &free, s)).collect();
        assert_eq!(a, b, "same seed, same tokens");
        assert!(a.iter().any(|&t| t != 1), "sampling explores: {a:?}");
        // top_p just above the top token's probability keeps two tokens, never the rest.
        let p = GenerationConfig {
            temperature: 1.0,
            top_p: 0.5,
            ..GenerationConfig::default()
        };
        assert!((0..100).all(|s| matches!(pick(&logits, &p, s), 1 | 2)));
    }

    #[test]
    fn invalid_settings_name_the_field() {
        let e = GenerationConfig {
            top_p: 0.0,
            ..GenerationConfig::default()
        }
        .validate();
        assert!(e.is_err_and(|e| e.to_string().contains("top_p")));
        let e = GenerationConfig {
            temperature: -1.0,
            ..GenerationConfig::default()
        }
        .validate();
        assert!(e.is_err_and(|e| e.to_string().contains("temperature")));
    }
}
