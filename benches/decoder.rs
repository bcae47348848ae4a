//! A random Llama-shaped decoder (issue 13): one LoRA training step (r=16 on every
//! projection; forward, causal-LM loss, backward, AdamW) at batch 4 x 256 tokens, and
//! greedy generation of 32 tokens after a 16-token prompt with the KV cache. The weights
//! are random (the speed does not depend on them). PyTorch + PEFT runs the same workloads
//! on the same shapes in `benches/python/decoder_llama.py`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Duration;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{Criterion, criterion_group, criterion_main};
use lora::models::decoder::{GenerationConfig, generate};
use lora::{Adam, FullBackend, NdArray};
use lora_benches::random_llama::{random_batch, random_llama, shape, train_step};

fn bench_backend<B: FullBackend>(c: &mut Criterion, b: &B) {
    let name = b.name();
    let shape = shape();
    let mut model = random_llama(b).unwrap();
    let (batch, labels) = random_batch(model.config().vocab_size).unwrap();
    let mut opt = Adam::<B>::adamw(1e-4).unwrap();
    let mut g = c.benchmark_group(format!("decoder_{name}"));
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(5));
    g.bench_function(format!("{name}/train_step/{shape}"), |bch| {
        bch.iter(|| train_step(b, &mut model, &mut opt, &batch, &labels).unwrap())
    });
    let gen_cfg = GenerationConfig {
        max_new_tokens: 32,
        ..GenerationConfig::default()
    };
    let prompt = &batch.ids[..16];
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
