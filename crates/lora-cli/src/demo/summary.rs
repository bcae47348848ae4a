//! The demo's closing summary: model, quantization, LoRA, losses, timing, memory, checks
//! and the files written.

use lora::models::Mlp;
use lora::peft;
use lora::prelude::*;

use super::finetune::FineTuned;
use super::freeze::{FrozenBase, QUANTIZED};
use super::inject::Adapters;
use super::pretrain::Pretrained;
use super::verify::MergeCheck;
use super::{DemoArgs, POINTS};
use crate::report::{bytes, duration, peak_rss_bytes, thousands};

/// The results of every step, for the summary.
pub(super) struct Outcome<'a> {
    pub(super) pretrained: &'a Pretrained,
    pub(super) base: &'a FrozenBase,
    pub(super) adapters: &'a Adapters,
    pub(super) tuned: &'a FineTuned,
    pub(super) check: &'a MergeCheck,
}

/// Prints the summary of a finished run; `model` is the trained model (base + adapters).
pub(super) fn print<B: QuantBackend>(args: &DemoArgs, model: &Mlp<B>, outcome: &Outcome<'_>) {
    let Outcome {
        pretrained,
        base,
        adapters,
        tuned,
        check,
    } = outcome;
    let full_params = pretrained.parameters;
    let trainable = model.num_trainable();
    let total = model.num_parameters();
    println!(
        "  model           MLP {} (ReLU), {} parameters",
        pretrained.sizes.map(|s| s.to_string()).join("-"),
        thousands(full_params)
    );
    println!(
        "  pretrained on   y = sin(x), {} full-batch steps (Adam), final MSE {:.2e}",
        args.pretrain_steps, pretrained.final_loss
    );
    let half = args.dtype != crate::dtype_arg::DtypeArg::F32;
    match args.quant {
        None if half => println!(
            "  frozen base     {} on every layer: {} resident vs {} in f32 ({:.1}x smaller)",
            args.dtype.name(),
            bytes(base.bytes as u64),
            bytes(base.f32_bytes as u64),
            base.f32_bytes as f64 / base.bytes.max(1) as f64
        ),
        Some(q) => println!(
            "  frozen base     {} on {}: {} resident vs {} in f32 ({:.1}x smaller)",
            q.config().format,
            QUANTIZED.join(", "),
            bytes(base.bytes as u64),
            bytes(base.f32_bytes as u64),
            base.f32_bytes as f64 / base.bytes.max(1) as f64
        ),
        None => println!(
            "  frozen base     f32, {} resident",
            bytes(base.bytes as u64)
        ),
    }
    println!(
        "  LoRA            r={}, alpha={}, scaling={}, dropout={}, on {}",
        args.rank,
        args.alpha,
        args.alpha / args.rank as f64,
        args.dropout,
        adapters.modules.join(", ")
    );
    println!(
        "  trainable       {} of {} parameters ({:.2}%); full fine-tuning trains {} ({:.0}x more)",
        thousands(trainable),
        thousands(total),
        100.0 * trainable as f64 / total as f64,
        thousands(full_params),
        full_params as f64 / trainable as f64
    );
    println!(
        "  new task        y = sin(x + {}) on {POINTS} points in [-pi, pi]",
        args.shift
    );
    let (loss_before, loss_after) = (adapters.loss_before, tuned.loss_after);
    println!("  loss before     {loss_before:.3e}  (frozen base on the new task)");
    println!(
        "  loss after      {loss_after:.3e}  ({:.0}x lower after {} steps, AdamW lr {})",
        loss_before / loss_after.max(f64::MIN_POSITIVE),
        args.steps,
        args.lr
    );
    println!(
        "  time per step   {} (forward + backward + optimizer; {} in all)",
        duration(tuned.seconds / args.steps as f64),
        duration(tuned.seconds)
    );
    println!(
        "  optimizer state {} (adapters only)",
        bytes(tuned.optimizer_bytes as u64)
    );
    if let Some(rss) = peak_rss_bytes() {
        println!("  peak memory     {} RSS", bytes(rss));
    }
    print_checks(check, half);
    println!(
        "  wrote           {}: {}, {}, base_model.safetensors{}, loss.png, predictions.png",
        args.out.display(),
        peft::CONFIG_FILE,
        peft::WEIGHTS_FILE,
        base.quantized_path
            .as_ref()
            .and_then(|p| p.file_name())
            .map_or(String::new(), |n| format!(", {}", n.to_string_lossy()))
    );
}

/// The reload and merge lines.
fn print_checks(check: &MergeCheck, half: bool) {
    let MergeCheck {
        reload_diff,
        merge_diff,
        rounding,
    } = check;
    println!(
        "  reload check    adapter reloaded from disk: max |diff| {reload_diff:.1e} vs the trained model"
    );
    match rounding {
        Some(r) => println!(
            "  merge check     merged into the {} base: weight rounding max |err| {:.1e} (rel {:.1e}); output max |diff| {merge_diff:.1e}",
            if half { "half-precision" } else { "quantized" },
            r.max_abs,
            r.max_rel
        ),
        None => println!("  merge check     merged vs unmerged: max |diff| {merge_diff:.1e}  (ok)"),
    }
}
