//! Train a LoRA adapter on a frozen MLP and save it in PEFT's format.
//!
//! ```sh
//! cargo run --release -p lora --example train_mlp_adapter [OUT_DIR]
//! ```
//!
//! A random MLP stands in for a pretrained model: its weights stay frozen, adapters
//! (r = 4) go into the hidden layers `layers.2` and `layers.4` by PEFT's `target_modules`
//! rules, and AdamW trains only them to fit `y = sin(x)`. The adapter directory it writes
//! (`adapter_config.json` + `adapter_model.safetensors`) loads in PEFT.

use lora::models::Mlp;
use lora::peft::{self, LoraConfig, TargetModules};
use lora::prelude::*;
use lora::{UnaryOp, mse_loss};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "lora-example-adapter".into());
    let b = lora::NdArray::new();

    // 64 points of y = sin(x) on [-pi, pi].
    let xs: Vec<f32> = (0..64)
        .map(|i| -std::f32::consts::PI + i as f32 * std::f32::consts::TAU / 63.0)
        .collect();
    let ys: Vec<f32> = xs.iter().map(|x| x.sin()).collect();
    let x = b.from_host(&xs, &[64, 1])?;
    let y = b.from_host(&ys, &[64, 1])?;

    // The frozen base: Linear(1, 64), ReLU, Linear(64, 64), ReLU, Linear(64, 64), ReLU, Linear(64, 1).
    let mut model = Mlp::new(&b, &[1, 64, 64, 64, 1], UnaryOp::Relu, 0)?;
    let config = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: Some(TargetModules::List(vec![
            "layers.2".into(),
            "layers.4".into(),
        ])),
        ..LoraConfig::default()
    };
    let injected = peft::inject_adapters(&mut model, &b, &config, 7)?;
    println!("adapters on {injected:?}");

    let mut opt = Adam::<lora::NdArray>::adamw(1e-2)?;
    let mut first = None;
    let mut last = 0.0;
    for _ in 0..300 {
        let pred = model.forward(&b, &x, Mode::Train)?;
        let (loss, dy) = mse_loss(&b, &pred, &y)?;
        model.backward(&b, &dy)?;
        opt.step(&b, &mut model.params_and_grads())?;
        first.get_or_insert(loss);
        last = loss;
    }
    println!(
        "MSE {:.3e} -> {last:.3e} after 300 AdamW steps on the adapters only",
        first.unwrap_or(last)
    );

    let dir = std::path::Path::new(&out);
    peft::save_pretrained(dir, &model, &b, &config)?;
    println!("saved the PEFT adapter to {}", dir.display());
    Ok(())
}
