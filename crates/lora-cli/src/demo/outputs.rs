//! Step 5: save the PEFT adapter directory and the two charts (loss, predictions).

use anyhow::Result;
use lora::models::Mlp;
use lora::peft;
use lora::prelude::*;
use plotters::style::RGBColor;

use super::DemoArgs;
use super::data::SineData;
use super::finetune::FineTuned;
use super::inject::Adapters;
use crate::plots::{self, Curve};

/// Writes the adapter, `loss.png` and `predictions.png` into `--out`.
pub(super) fn save<B: QuantBackend>(
    b: &B,
    args: &DemoArgs,
    model: &Mlp<B>,
    data: &SineData<B>,
    adapters: &Adapters,
    tuned: &FineTuned,
) -> Result<()> {
    peft::save_pretrained(&args.out, model, b, &adapters.config)?;
    let loss_png = args.out.join("loss.png");
    let pred_png = args.out.join("predictions.png");
    plots::loss_curve(
        &loss_png,
        "LoRA fine-tuning loss (adapters only, base frozen)",
        &tuned.losses,
    )?;
    plots::predictions(
        &pred_png,
        &format!(
            "sin(x + {}) learned by LoRA on a frozen sin(x) model",
            args.shift
        ),
        &data.xs,
        &[
            Curve {
                label: "target sin(x + shift)",
                ys: &data.new_task,
                color: RGBColor(0, 0, 0),
            },
            Curve {
                label: "frozen base model",
                ys: &adapters.base_pred,
                color: RGBColor(200, 120, 0),
            },
            Curve {
                label: "base + LoRA",
                ys: &tuned.pred,
                color: RGBColor(30, 90, 220),
            },
        ],
    )
}
