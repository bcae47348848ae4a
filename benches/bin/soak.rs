//! Soak run (issue 17, item 6; `cargo xtask soak`): thousands of LoRA training steps and
//! hundreds of `lora merge`s in one process, sampling the resident set after each, to show
//! that nothing grows once the first steps have sized the allocator's pools.
//!
//! `lora-soak MODEL_DIR STEPS MERGES OUT_DIR`: `MODEL_DIR` is a decoder checkpoint (the
//! tiny Llama of the tests); the training phase runs AdamW on LoRA r=8 over every projection
//! at batch 8 x 128, saving the adapter every 500 steps as a user's run would; the merge
//! phase folds that adapter into the checkpoint `MERGES` times (the same output path,
//! written atomically each time). Prints one JSON object: per phase the RSS samples (KiB),
//! the largest RSS during the first tenth (warm-up) and after it, and the growth.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::Path;

use lora::models::TokenBatch;
use lora::models::decoder::{DecoderModel, causal_lm_loss_grad};
use lora::peft::{self, LoraConfig, TargetModules};
use lora::{Adam, Mode, Model, NdArray, Optimizer};

const BATCH: usize = 8;
const SEQ: usize = 128;
const SAVE_EVERY: usize = 500;

/// This process's resident set in KiB (`VmRSS` of `/proc/self/status`).
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// One phase's samples as JSON, with the warm-up (first tenth) and steady-state maxima.
fn phase_json(name: &str, iterations: usize, samples: &[(usize, u64)]) -> String {
    let warm = (iterations / 10).max(1);
    let max_in = |keep: &dyn Fn(usize) -> bool| {
        samples
            .iter()
            .filter(|(i, _)| keep(*i))
            .map(|s| s.1)
            .max()
            .unwrap_or(0)
    };
    let warm_max = max_in(&|i| i <= warm);
    let after_max = max_in(&|i| i > warm);
    let last = samples.last().map_or(0, |s| s.1);
    let pairs: Vec<String> = samples.iter().map(|(i, r)| format!("[{i}, {r}]")).collect();
    format!(
        "\"{name}\": {{\"iterations\": {iterations}, \"warmup_iterations\": {warm}, \"warmup_max_rss_kib\": {warm_max}, \"after_warmup_max_rss_kib\": {after_max}, \"last_rss_kib\": {last}, \"growth_kib\": {}, \"samples\": [{}]}}",
        after_max as i64 - warm_max as i64,
        pairs.join(", ")
    )
}

/// A fixed batch of token ids drawn from the vocabulary (every token attended).
fn batch(vocab: usize) -> (TokenBatch, Vec<i64>) {
    let ids: Vec<u32> = lora_benches::rand_host(BATCH * SEQ, 5)
        .iter()
        .map(|v| 4 + ((v + 1.0) * 0.5 * (vocab - 5) as f32) as u32)
        .collect();
    let labels = ids.iter().map(|&i| i64::from(i)).collect();
    (
        TokenBatch::new(ids, vec![1; BATCH * SEQ], BATCH).unwrap(),
        labels,
    )
}

fn train(b: &NdArray, model_dir: &Path, steps: usize, out: &Path) -> Vec<(usize, u64)> {
    let mut model = DecoderModel::from_pretrained(b, model_dir).unwrap();
    let config = LoraConfig {
        r: 8,
        lora_alpha: 16.0,
        target_modules: Some(TargetModules::Pattern("all-linear".into())),
        task_type: Some("CAUSAL_LM".into()),
        ..LoraConfig::default()
    };
    peft::inject_adapters(&mut model, b, &config, 0).unwrap();
    let (tb, labels) = batch(model.config().vocab_size);
    let mut opt = Adam::<NdArray>::adamw(1e-3).unwrap();
    let mut samples = vec![(0, rss_kib())];
    for step in 1..=steps {
        let logits = model.logits(b, &tb, Mode::Train).unwrap();
        let (_, _, d) = causal_lm_loss_grad(b, logits, &labels, BATCH, SEQ).unwrap();
        model.backward_logits(b, d).unwrap();
        opt.step(b, &mut model.params_and_grads()).unwrap();
        if step % SAVE_EVERY == 0 || step == steps {
            peft::save_pretrained(out, &model, b, &config).unwrap();
        }
        if step % 10 == 0 || step == steps {
            samples.push((step, rss_kib()));
        }
    }
    samples
}

fn merge(b: &NdArray, model_dir: &Path, adapter: &Path, merges: usize) -> Vec<(usize, u64)> {
    let out = adapter.join("merged.safetensors");
    let mut samples = vec![(0, rss_kib())];
    for i in 1..=merges {
        peft::merge_checkpoint(
            b,
            model_dir,
            adapter,
            lora::DEFAULT_ADAPTER,
            &out,
            peft::OutDtype::Keep,
            &|_, _| {},
        )
        .unwrap();
        samples.push((i, rss_kib()));
    }
    samples
}

fn main() {
    lora_benches::keep_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model_dir, steps, merges, out] = args.as_slice() else {
        panic!("usage: lora-soak MODEL_DIR STEPS MERGES OUT_DIR");
    };
    let (steps, merges): (usize, usize) = (steps.parse().unwrap(), merges.parse().unwrap());
    let (model_dir, out) = (Path::new(model_dir), Path::new(out));
    let b = NdArray::new();
    let start = std::time::Instant::now();
    let t = train(&b, model_dir, steps, out);
    let train_s = start.elapsed().as_secs_f64();
    let start = std::time::Instant::now();
    let m = merge(&b, model_dir, out, merges);
    let merge_s = start.elapsed().as_secs_f64();
    println!(
        "{{\"shape\": \"{BATCH}x{SEQ}\", \"train_seconds\": {train_s:.1}, \"merge_seconds\": {merge_s:.1}, {}, {}}}",
        phase_json("train", steps, &t),
        phase_json("merge", merges, &m)
    );
}
