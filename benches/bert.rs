//! all-MiniLM-L6-v2 at batch 32 x 128 tokens (issue 7): the encoder forward (inference)
//! and one LoRA training step (r=8 on query and value, mean pooling, a linear head,
//! cross-entropy, full backward, AdamW). PyTorch + PEFT runs the same workloads in
//! `benches/python/bert_minilm.py`. Skips with a printed reason when the model is not in
//! the cache (`cargo xtask fetch-model minilm`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{Criterion, criterion_group, criterion_main};
use lora::models::bert::{BertModel, TokenBatch, classification_step};
use lora::peft::{self, LoraConfig, TargetModules};
use lora::{Adam, DenseLinear, FullBackend, Mode, NdArray};
use lora_benches::rand_host;

const BATCH: usize = 32;
const SEQ: usize = 128;

fn minilm() -> Option<PathBuf> {
    let dir = lora::models::cache::minilm_dir();
    dir.join("model.safetensors").is_file().then_some(dir)
}

fn bench_backend<B: FullBackend>(c: &mut Criterion, b: &B, dir: &std::path::Path) {
    let name = b.name();
    // Random ids in the ordinary vocabulary range, [CLS] first, every token attended.
    let ids: Vec<u32> = rand_host(BATCH * SEQ, 7)
        .iter()
        .enumerate()
        .map(|(i, v)| {
            if i % SEQ == 0 {
                101
            } else {
                2000 + ((v + 1.0) * 10_000.0) as u32
            }
        })
        .collect();
    let batch = TokenBatch::new(ids, vec![1; BATCH * SEQ], BATCH).unwrap();
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
    let cfg = LoraConfig {
        r: 8,
        lora_alpha: 16.0,
        target_modules: Some(TargetModules::List(vec!["query".into(), "value".into()])),
        ..LoraConfig::default()
    };
    peft::inject_adapters(&mut model, b, &cfg, 0).unwrap();
    let h = model.config().hidden_size;
    let mut head = DenseLinear::new(
        b.from_host(&rand_host(2 * h, 8), &[2, h]).unwrap(),
        Some(b.zeros(&[2]).unwrap()),
    )
    .unwrap();
    let labels: Vec<usize> = (0..BATCH).map(|i| i % 2).collect();
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
    let Some(dir) = minilm() else {
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
