//! The random Llama of the decoder benchmarks (issue 13), shared by `benches/decoder.rs`
//! (speed) and `benches/bin/decoder_memory.rs` (peak RSS): the issue's model in full runs,
//! a smaller one with `LORA_BENCH_QUICK`; `benches/python/decoder_llama.py` builds the same
//! shapes for PyTorch + PEFT.

use std::collections::BTreeMap;
use std::path::Path;

use lora::io::RawTensor;
use lora::models::TokenBatch;
use lora::models::decoder::{DecoderConfig, DecoderModel, causal_lm_loss_grad};
use lora::peft::{self, LoraConfig, TargetModules};
use lora::quant::HalfType;
use lora::{Adam, FullBackend, HostTensor, Mode, Optimizer};

use crate::rand_host;

/// Sequences per batch.
pub const BATCH: usize = 4;
/// Tokens per sequence.
pub const SEQ: usize = 256;

/// `(hidden, layers, heads, kv_heads, intermediate, vocab)`.
pub fn dims() -> (usize, usize, usize, usize, usize, usize) {
    if std::env::var_os("LORA_BENCH_QUICK").is_some() {
        (512, 8, 8, 4, 1408, 8000)
    } else {
        (1024, 8, 16, 4, 2816, 32000)
    }
}

/// `h<hidden>-l<layers>-v<vocab>-<batch>x<tokens>`, the benchmarks' shape label.
pub fn shape() -> String {
    let (h, l, _, _, _, v) = dims();
    format!("h{h}-l{l}-v{v}-{BATCH}x{SEQ}")
}

/// The random Llama's `config.json`.
fn config_json() -> String {
    let (h, layers, heads, kv, inter, vocab) = dims();
    format!(
        r#"{{"model_type": "llama", "vocab_size": {vocab}, "hidden_size": {h},
        "intermediate_size": {inter}, "num_hidden_layers": {layers},
        "num_attention_heads": {heads}, "num_key_value_heads": {kv},
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}}"#
    )
}

/// Its weights (uniform, std 0.02; norms 1) by PyTorch name.
fn random_tensors() -> BTreeMap<String, HostTensor> {
    let (h, layers, heads, kv, inter, vocab) = dims();
    let hd = h / heads;
    let mut tensors = BTreeMap::new();
    let mut stream = 0u64;
    let mut add = |name: String, shape: Vec<usize>, ones: bool| {
        stream += 1;
        let n: usize = shape.iter().product();
        let data = if ones {
            vec![1.0; n]
        } else {
            rand_host(n, stream).iter().map(|v| v * 0.035).collect()
        };
        tensors.insert(name, HostTensor { shape, data });
    };
    add("model.embed_tokens.weight".into(), vec![vocab, h], false);
    add("model.norm.weight".into(), vec![h], true);
    add("lm_head.weight".into(), vec![vocab, h], false);
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for (n, out, inp) in [
            ("self_attn.q_proj", heads * hd, h),
            ("self_attn.k_proj", kv * hd, h),
            ("self_attn.v_proj", kv * hd, h),
            ("self_attn.o_proj", h, heads * hd),
            ("mlp.gate_proj", inter, h),
            ("mlp.up_proj", inter, h),
            ("mlp.down_proj", h, inter),
        ] {
            add(format!("{p}.{n}.weight"), vec![out, inp], false);
        }
        add(format!("{p}.input_layernorm.weight"), vec![h], true);
        add(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            true,
        );
    }
    tensors
}

/// With LoRA r=16 (alpha 32) on every projection (`all-linear`, so not `lm_head`).
fn with_adapters<B: FullBackend>(
    b: &B,
    mut model: DecoderModel<B>,
) -> lora::Result<DecoderModel<B>> {
    let cfg = LoraConfig {
        r: 16,
        lora_alpha: 32.0,
        target_modules: Some(TargetModules::Pattern("all-linear".into())),
        ..LoraConfig::default()
    };
    peft::inject_adapters(&mut model, b, &cfg, 0)
        .map_err(|e| lora::Error::state("random llama", e.to_string()))?;
    Ok(model)
}

/// The random Llama built in memory (f32), with adapters.
pub fn random_llama<B: FullBackend>(b: &B) -> lora::Result<DecoderModel<B>> {
    let config = DecoderConfig::from_json(&config_json(), "bench config")
        .map_err(|e| lora::Error::state("random llama", e.to_string()))?;
    let model = DecoderModel::from_state_dict(b, config, random_tensors(), "random llama")
        .map_err(|e| lora::Error::state("random llama", e.to_string()))?;
    with_adapters(b, model)
}

/// Writes the random Llama as a Hugging Face directory (`config.json`, `model.safetensors`)
/// with every tensor in bf16, as `save_pretrained` of a bf16 model does.
pub fn write_bf16_checkpoint(dir: &Path) -> lora::Result<()> {
    let err =
        |e: &dyn std::fmt::Display| lora::Error::state("random llama checkpoint", e.to_string());
    std::fs::create_dir_all(dir).map_err(|e| err(&e))?;
    std::fs::write(dir.join("config.json"), config_json()).map_err(|e| err(&e))?;
    let bf16 = lora::io::SafetensorsDtype::BF16;
    let raw: BTreeMap<String, RawTensor<'static>> = random_tensors()
        .into_iter()
        .map(|(name, t)| {
            let data = lora::io::encode_f32(bf16, &t.data).unwrap_or_default();
            let raw = RawTensor {
                dtype: bf16,
                shape: t.shape,
                data: data.into(),
            };
            (name, raw)
        })
        .collect();
    let metadata = [("format".to_string(), "pt".to_string())].into();
    lora::io::write_raw(&dir.join("model.safetensors"), &raw, metadata).map_err(|e| err(&e))
}

/// The random Llama loaded from `dir` with its frozen weights stored as `half`, with
/// adapters.
pub fn load_llama<B: FullBackend + lora::quant::QuantOps>(
    b: &B,
    dir: &Path,
    half: Option<HalfType>,
) -> lora::Result<DecoderModel<B>> {
    let model = DecoderModel::from_pretrained_as(b, dir, half)
        .map_err(|e| lora::Error::state("random llama", e.to_string()))?;
    with_adapters(b, model)
}

/// A batch of random token ids (every token attended) and its labels (the ids).
pub fn random_batch(vocab: usize) -> lora::Result<(TokenBatch, Vec<i64>)> {
    let ids: Vec<u32> = rand_host(BATCH * SEQ, 9)
        .iter()
        .map(|v| 4 + ((v + 1.0) * 0.5 * (vocab - 5) as f32) as u32)
        .collect();
    let labels = ids.iter().map(|&i| i64::from(i)).collect();
    let batch = TokenBatch::new(ids, vec![1; BATCH * SEQ], BATCH)
        .map_err(|e| lora::Error::state("random batch", e.to_string()))?;
    Ok((batch, labels))
}

/// One LoRA training step: forward, causal-LM loss, backward, AdamW.
pub fn train_step<B: FullBackend>(
    b: &B,
    model: &mut DecoderModel<B>,
    opt: &mut Adam<B>,
    batch: &TokenBatch,
    labels: &[i64],
) -> lora::Result<f64> {
    let err = |e: lora::models::ModelError| lora::Error::state("decoder train step", e.to_string());
    let logits = model.logits(b, batch, Mode::Train).map_err(err)?;
    let (loss, _, d) = causal_lm_loss_grad(b, logits, labels, BATCH, SEQ).map_err(err)?;
    model.backward_logits(b, d).map_err(err)?;
    opt.step(b, &mut lora::Model::params_and_grads(model))?;
    Ok(loss)
}
