//! Step 1: pretrain the base MLP on `sin(x)`, every weight training (the expensive way).

use anyhow::Result;
use lora::models::Mlp;
use lora::prelude::*;
use lora::{UnaryOp, mse_loss};

use super::data::SineData;
use super::{DemoArgs, progress};

/// What the summary reports about pretraining.
pub(super) struct Pretrained {
    /// Layer widths of the MLP.
    pub(super) sizes: [usize; 5],
    /// Parameters of the whole MLP: what full fine-tuning trains.
    pub(super) parameters: usize,
    /// MSE of the last pretraining step.
    pub(super) final_loss: f64,
}

/// Trains a fresh MLP on `sin(x)` with Adam, behind a progress bar.
pub(super) fn pretrain<B: QuantBackend>(
    b: &B,
    args: &DemoArgs,
    data: &SineData<B>,
) -> Result<(Mlp<B>, Pretrained)> {
    let sizes = [1, args.hidden, args.hidden, args.hidden, 1];
    let mut model = Mlp::new(b, &sizes, UnaryOp::Relu, args.seed)?;
    let mut opt = Adam::<B>::plain(3e-3)?;
    let bar = progress(args.pretrain_steps, "pretrain");
    let mut pre_loss = f64::NAN;
    for step in 0..args.pretrain_steps {
        let pred = model.forward(b, &data.x, Mode::Train)?;
        let (loss, dy) = mse_loss(b, &pred, &data.y_base)?;
        let grads = model.backward_full(b, &dy)?;
        opt.step(b, &mut model.dense_params_and_grads(&grads)?)?;
        pre_loss = loss;
        if step % 25 == 0 || step + 1 == args.pretrain_steps {
            bar.set_position(step as u64 + 1);
            bar.set_message(format!("{loss:.2e}"));
        }
    }
    bar.finish_and_clear();
    let parameters = model.num_parameters();
    Ok((
        model,
        Pretrained {
            sizes,
            parameters,
            final_loss: pre_loss,
        },
    ))
}
