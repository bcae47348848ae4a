//! all-MiniLM-L6-v2 at batch 32 x 128 tokens (issue 7): the encoder forward (inference)
//! and one LoRA training step (r=8 on query and value, mean pooling, a linear head,
//! cross-entropy, full backward, AdamW). PyTorch + PEFT runs the same workloads in
//! `benches/python/bert_minilm.py`. Skips with a printed reason when the model is not in
//! the cache (`cargo xtask fetch-model minilm`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Duration;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{Criterion, criterion_group, criterion_main};
use lora::models::bert::{BertModel, classification_step};
use lora::{Adam, FullBackend, Mode, NdArray};
use lora_benches::minilm::{self, BATCH, SEQ};

fn bench_backend<B: FullBackend>(c: &mut Criterion, b: &B, dir: &std::path::Path) {
    let name = b.name();
    let batch = minilm::batch().unwrap();
    let mut model = BertModel::from_pretrained(b, dir).unwrap();
    let mut g = c.benchmark_group(format!("bert_{name}"));
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(5));
    g.bench_function(format!("{name}/encoder_fwd/{BATCH}x{SEQ}"), |bch| {
        bch.iter(|| {
            black_box(model.forward_batch(b, &batch, Mode::Eval).unwrap());
            b.synchronize().unwrap();
        })
    });
    let (mut head, labels) = minilm::add_lora(b, &mut model).unwrap();
    let mut opt = Adam::<B>::adamw(1e-4).unwrap();
    g.measurement_time(Duration::from_secs(12));
    g.bench_function(format!("{name}/lora_train_step/{BATCH}x{SEQ}"), |bch| {
        bch.iter(|| {
            black_box(
                classification_step(b, &mut model, &mut head, &mut opt, &batch, &labels).unwrap(),
            );
            b.synchronize().unwrap();
        })
    });
    g.finish();
}

fn bench(c: &mut Criterion) {
    lora_benches::keep_freed_memory();
    let Some(dir) = minilm::dir() else {
        eprintln!(
            "bert benchmarks skipped: all-MiniLM-L6-v2 not in the cache (cargo xtask fetch-model minilm)"
        );
        return;
    };
    bench_backend(c, &NdArray::new(), &dir);
    #[cfg(feature = "tch")]
    bench_backend(
        c,
        &lora::Tch::cuda(0).unwrap_or_else(|_| lora::Tch::cpu()),
        &dir,
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
