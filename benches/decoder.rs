//! A random Llama-shaped decoder (issue 13): one LoRA training step (r=16 on every
//! projection; forward, causal-LM loss, backward, AdamW) at batch 4 x 256 tokens, and
//! greedy generation of 32 tokens after a 16-token prompt with the KV cache. The weights
//! are random (the speed does not depend on them). PyTorch + PEFT runs the same workloads
//! on the same shapes in `benches/python/decoder_llama.py`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{Criterion, criterion_group, criterion_main};
use lora::models::TokenBatch;
use lora::models::decoder::{
    DecoderConfig, DecoderModel, GenerationConfig, causal_lm_loss_grad, generate,
};
use lora::peft::{self, LoraConfig, TargetModules};
use lora::{Adam, FullBackend, HostTensor, Mode, NdArray, Optimizer};
use lora_benches::rand_host;

const BATCH: usize = 4;
const SEQ: usize = 256;

/// `(hidden, layers, heads, kv_heads, intermediate, vocab)`: the issue's model in full
/// runs, a smaller one with `LORA_BENCH_QUICK` (the Python baseline reads the same).
fn dims() -> (usize, usize, usize, usize, usize, usize) {
    if std::env::var_os("LORA_BENCH_QUICK").is_some() {
        (512, 8, 8, 4, 1408, 8000)
    } else {
        (1024, 8, 16, 4, 2816, 32000)
    }
}

fn shape() -> String {
    let (h, l, _, _, _, v) = dims();
    format!("h{h}-l{l}-v{v}-{BATCH}x{SEQ}")
}

/// A Llama with random weights (std 0.02, norms 1), built without a checkpoint.
fn random_llama<B: FullBackend>(b: &B) -> DecoderModel<B> {
    let (h, layers, heads, kv, inter, vocab) = dims();
    let hd = h / heads;
    let config = DecoderConfig::from_json(
        &format!(
            r#"{{"model_type": "llama", "vocab_size": {vocab}, "hidden_size": {h},
            "intermediate_size": {inter}, "num_hidden_layers": {layers},
            "num_attention_heads": {heads}, "num_key_value_heads": {kv},
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}}"#
        ),
        "bench config",
    )
    .unwrap();
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
    DecoderModel::from_state_dict(b, config, &tensors, "random llama").unwrap()
}

fn bench_backend<B: FullBackend>(c: &mut Criterion, b: &B) {
    let name = b.name();
    let shape = shape();
    let mut model = random_llama(b);
    let cfg = LoraConfig {
        r: 16,
        lora_alpha: 32.0,
        target_modules: Some(TargetModules::Pattern("all-linear".into())),
        ..LoraConfig::default()
    };
    peft::inject_adapters(&mut model, b, &cfg, 0).unwrap();
    let vocab = model.config().vocab_size;
    let ids: Vec<u32> = rand_host(BATCH * SEQ, 9)
        .iter()
        .map(|v| 4 + ((v + 1.0) * 0.5 * (vocab - 5) as f32) as u32)
        .collect();
    let labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let batch = TokenBatch::new(ids.clone(), vec![1; BATCH * SEQ], BATCH).unwrap();
    let mut opt = Adam::<B>::adamw(1e-4).unwrap();
    let mut g = c.benchmark_group(format!("decoder_{name}"));
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(5));
    g.bench_function(format!("{name}/train_step/{shape}"), |bch| {
        bch.iter(|| {
            let logits = model.logits(b, &batch, Mode::Train).unwrap();
            let (_, _, d) = causal_lm_loss_grad(b, logits, &labels, BATCH, SEQ).unwrap();
            model.backward_logits(b, &d).unwrap();
            opt.step(b, &mut lora::Model::params_and_grads(&mut model))
                .unwrap();
        })
    });
    let gen_cfg = GenerationConfig {
        max_new_tokens: 32,
        ..GenerationConfig::default()
    };
    let prompt = &ids[..16];
    g.bench_function(format!("{name}/generate/{shape}"), |bch| {
        bch.iter(|| black_box(generate(&mut model, b, prompt, &gen_cfg, |_| Ok(())).unwrap()))
    });
    g.finish();
}

fn bench(c: &mut Criterion) {
    lora_benches::keep_freed_memory();
    bench_backend(c, &NdArray::new());
}

criterion_group!(benches, bench);
criterion_main!(benches);
