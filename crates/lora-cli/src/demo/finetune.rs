//! Step 4: train only the adapters on the shifted task, behind a progress bar.

use std::time::Instant;

use anyhow::Result;
use lora::models::Mlp;
use lora::prelude::*;
use lora::{AdamHyper, mse_loss};

use super::data::SineData;
use super::{DemoArgs, eval_loss, progress};

/// The fine-tuning run.
pub(super) struct FineTuned {
    /// Loss of every step.
    pub(super) losses: Vec<f64>,
    /// Wall-clock seconds of the training loop.
    pub(super) seconds: f64,
    /// Loss on the new task after training.
    pub(super) loss_after: f64,
    /// The trained model's predictions.
    pub(super) pred: Vec<f32>,
    /// Bytes of optimizer state (adapters only).
    pub(super) optimizer_bytes: usize,
}

/// Trains the adapters with AdamW on `sin(x + shift)` and evaluates the result.
pub(super) fn fine_tune<B: QuantBackend>(
    b: &B,
    args: &DemoArgs,
    model: &mut Mlp<B>,
    data: &SineData<B>,
) -> Result<FineTuned> {
    let mut opt = Adam::<B>::new(AdamHyper {
        lr: args.lr,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        decoupled: true,
    })?;
    let bar = progress(args.steps, "fine-tune");
    let mut losses = Vec::with_capacity(args.steps);
    let started = Instant::now();
    for step in 0..args.steps {
        let pred = model.forward(b, &data.x, Mode::Train)?;
        let (loss, dy) = mse_loss(b, &pred, &data.y_new)?;
        model.backward(b, &dy)?;
        opt.step(b, &mut model.params_and_grads())?;
        losses.push(loss);
        if step % 10 == 0 || step + 1 == args.steps {
            bar.set_position(step as u64 + 1);
            bar.set_message(format!("{loss:.2e}"));
        }
    }
    b.synchronize()?;
    let train_s = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let loss_after = eval_loss(b, model, &data.x, &data.y_new)?;
    let lora_pred = b.to_host(&model.forward(b, &data.x, Mode::Eval)?)?;
    Ok(FineTuned {
        losses,
        seconds: train_s,
        loss_after,
        pred: lora_pred,
        optimizer_bytes: opt.state_bytes(),
    })
}
