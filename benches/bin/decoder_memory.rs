//! Peak-RSS probe of the decoder training step (`cargo xtask bench` runs it under GNU
//! time): builds the random Llama of `benches/decoder.rs` with LoRA r=16 on every
//! projection and runs three AdamW steps at batch 4 x 256. The first argument picks the
//! run: `plain`; `checkpointing` (each layer recomputed in the backward); `bf16 DIR`
//! (loaded from the bf16 checkpoint in DIR with its weights kept at 2 bytes);
//! `write-bf16 DIR` writes that checkpoint and exits (in its own process, so that the f32
//! tensors it is made from do not count in the `bf16` run's peak) (`LORA_BENCH_STEPS` steps instead of three, for profiling). Prints the mode, shape and
//! median step time as JSON.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use lora::quant::HalfType;
use lora::{Adam, NdArray};
use lora_benches::random_llama::{
    load_llama, random_batch, random_llama, shape, train_step, write_bf16_checkpoint,
};

fn main() {
    lora_benches::keep_freed_memory();
    let mode = std::env::args().nth(1).unwrap_or_else(|| "plain".into());
    let dir = std::env::args().nth(2).map(std::path::PathBuf::from);
    let b = NdArray::new();
    let mut model = match (mode.as_str(), dir) {
        ("write-bf16", Some(dir)) => return write_bf16_checkpoint(&dir).unwrap(),
        ("bf16", Some(dir)) => load_llama(&b, &dir, Some(HalfType::Bf16)).unwrap(),
        ("plain" | "checkpointing", None) => random_llama(&b).unwrap(),
        _ => panic!("usage: lora-decoder-memory plain|checkpointing|bf16 DIR|write-bf16 DIR"),
    };
    model.set_gradient_checkpointing(mode == "checkpointing");
    let (batch, labels) = random_batch(model.config().vocab_size).unwrap();
    let mut opt = Adam::<NdArray>::adamw(1e-4).unwrap();
    let mut times = Vec::new();
    // `LORA_BENCH_STEPS` runs more steps, for profiling the steady state.
    let steps = std::env::var("LORA_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    for _ in 0..steps {
        let t = Instant::now();
        train_step(&b, &mut model, &mut opt, &batch, &labels).unwrap();
        times.push(t.elapsed().as_secs_f64());
    }
    println!(
        "{{\"mode\": \"{mode}\", \"shape\": \"{}\", \"step_s\": {:.4}}}",
        shape(),
        lora_benches::median(times)
    );
}
