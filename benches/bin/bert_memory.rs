//! Peak-RSS probe of the all-MiniLM-L6-v2 LoRA training step (`cargo xtask bench` runs it
//! under GNU time, and `benches/python/bert_minilm.py train-memory` for PyTorch + PEFT):
//! the workload of `benches/bert.rs` (batch 32 x 128, LoRA r=8 on query and value, a
//! linear head, AdamW), three steps in one process. Prints the shape and the median step
//! time as JSON; exits with status 2 and a message when the model is not in the cache.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use lora::models::bert::{BertModel, classification_step};
use lora::{Adam, NdArray};
use lora_benches::minilm::{self, BATCH, SEQ};

fn main() {
    lora_benches::keep_freed_memory();
    let Some(dir) = minilm::dir() else {
        eprintln!("all-MiniLM-L6-v2 is not in the cache (cargo xtask fetch-model minilm)");
        std::process::exit(2);
    };
    let b = NdArray::new();
    let batch = minilm::batch().unwrap();
    let mut model = BertModel::from_pretrained(&b, &dir).unwrap();
    let (mut head, labels) = minilm::add_lora(&b, &mut model).unwrap();
    let mut opt = Adam::<NdArray>::adamw(1e-4).unwrap();
    let mut times = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        classification_step(&b, &mut model, &mut head, &mut opt, &batch, &labels).unwrap();
        times.push(t.elapsed().as_secs_f64());
    }
    println!(
        "{{\"shape\": \"{BATCH}x{SEQ}\", \"step_s\": {:.4}}}",
        lora_benches::median(times)
    );
}
