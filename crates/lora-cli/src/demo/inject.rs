//! Step 3: inject LoRA adapters into the named hidden layers (PEFT's `target_modules`
//! rules) and check that a fresh adapter leaves the output bit-identical.

use anyhow::{Result, ensure};
use lora::models::Mlp;
use lora::peft::{self, LoraConfig, TargetModules};
use lora::prelude::*;

use super::data::SineData;
use super::{DemoArgs, eval_loss, max_abs_diff};

/// Layers that get adapters (the hidden-to-hidden projections).
const TARGETS: [&str; 2] = ["layers.2", "layers.4"];

/// The injected adapters and the frozen base's output they start from.
pub(super) struct Adapters {
    /// The PEFT configuration, as saved with the adapter.
    pub(super) config: LoraConfig,
    /// Names of the modules that got an adapter.
    pub(super) modules: Vec<String>,
    /// The frozen base's predictions (for the chart).
    pub(super) base_pred: Vec<f32>,
    /// The frozen base's loss on the new task.
    pub(super) loss_before: f64,
}

/// Evaluates the frozen base, injects the adapters and checks the output did not move.
pub(super) fn inject_adapters<B: QuantBackend>(
    b: &B,
    args: &DemoArgs,
    model: &mut Mlp<B>,
    sizes: &[usize; 5],
    data: &SineData<B>,
) -> Result<Adapters> {
    let base_pred = b.to_host(&model.forward(b, &data.x, Mode::Eval)?)?;
    let loss_before = eval_loss(b, model, &data.x, &data.y_new)?;
    let config = LoraConfig {
        r: args.rank,
        lora_alpha: args.alpha,
        lora_dropout: args.dropout,
        target_modules: Some(TargetModules::List(
            TARGETS.iter().map(|s| s.to_string()).collect(),
        )),
        base_model_name_or_path: Some(format!(
            "lora-demo-mlp-{}",
            sizes.map(|s| s.to_string()).join("-")
        )),
        task_type: None,
        inference_mode: true,
        ..LoraConfig::default()
    };
    let injected = peft::inject_adapters(model, b, &config, args.seed)?;
    let fresh_pred = b.to_host(&model.forward(b, &data.x, Mode::Eval)?)?;
    ensure!(
        fresh_pred == base_pred,
        "a freshly injected adapter changed the output (max |diff| {})",
        max_abs_diff(&fresh_pred, &base_pred)
    );
    Ok(Adapters {
        config,
        modules: injected,
        base_pred,
        loss_before,
    })
}
