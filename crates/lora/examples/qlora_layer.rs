//! QLoRA on one layer: quantize a frozen weight to NF4 with double quantization (as
//! bitsandbytes does), put a LoRA adapter on it and train the adapter on the 4-bit base.
//!
//! ```sh
//! cargo run --release -p lora --example qlora_layer
//! ```

use lora::mse_loss;
use lora::prelude::*;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let b = lora::NdArray::new();
    let (inp, out, n) = (256, 128, 64);
    let mut rng = lora::rng::RngState::new(1, 0);
    let mut w = vec![0.0f32; out * inp];
    lora::rng::uniform(rng, -0.05, 0.05, &mut w);
    rng.stream = 1;
    let mut xs = vec![0.0f32; n * inp];
    lora::rng::uniform(rng, -1.0, 1.0, &mut xs);
    let weight = b.from_host(&w, &[out, inp])?;
    let x = b.from_host(&xs, &[n, inp])?;

    // The 4-bit base: NF4, blocks of 64, double quantization (QLoRA's settings).
    let base = QuantLinear::quantize(&b, &weight, None, &QuantConfig::qlora())?;
    println!(
        "NF4 base: {} bytes resident instead of {} in f32",
        base.quantized().storage_bytes(),
        out * inp * 4
    );
    let mut layer = LoraLinear::new("proj", Box::new(base));
    layer.inject_lora(
        &b,
        &LoraSpec {
            r: 8,
            alpha: 16.0,
            ..LoraSpec::default()
        },
    )?;

    // A target the frozen layer cannot produce: the base output plus a fixed shift.
    let base_y = b.to_host(&layer.forward(&b, &x, Mode::Eval)?)?;
    let target: Vec<f32> = base_y.iter().map(|v| v + 0.1).collect();
    let y = b.from_host(&target, &[n, out])?;

    let mut opt = Adam::<lora::NdArray>::adamw(1e-2)?;
    let mut losses = Vec::new();
    for _ in 0..200 {
        let pred = layer.forward(&b, &x, Mode::Train)?;
        let (loss, dy) = mse_loss(&b, &pred, &y)?;
        layer.backward(&b, &dy)?;
        opt.step(&b, &mut layer.params_and_grads())?;
        losses.push(loss);
    }
    println!(
        "MSE {:.3e} -> {:.3e} after 200 steps; only the adapter (r = 8) trained",
        losses[0],
        losses[losses.len() - 1]
    );
    Ok(())
}
