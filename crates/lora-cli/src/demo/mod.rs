//! `lora demo`: the seeds' sine-wave experiment, end to end, as a user would run it.
//!
//! 1. Pretrain an MLP on `y = sin(x)` (full fine-tuning of every weight).
//! 2. Freeze it and save it as a plain checkpoint (`base_model.safetensors`).
//! 3. Inject LoRA adapters into named hidden layers (PEFT's `target_modules` rules) and
//!    check that a fresh adapter leaves the output bit-identical.
//! 4. Train only the adapters on the shifted task `y = sin(x + shift)`.
//! 5. Save the PEFT adapter directory and two PNG charts.
//! 6. Reload base + adapter from disk, compare with the trained model, merge, and confirm
//!    that the merged model computes what the unmerged one did.
//!
//! With `--quant nf4|fp4|int8` the frozen base is quantized after step 2 (`lora quantize`'s
//! code path, into `base_model.<format>.safetensors` in bitsandbytes' layout) and the
//! adapters train on the quantized layers: QLoRA. Merging then re-quantizes, and the
//! summary reports the rounding.
//!
//! Each step lives in its own file; [`run_on`] calls them in order.

mod data;
mod finetune;
mod freeze;
mod inject;
mod outputs;
mod pretrain;
mod summary;
mod verify;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lora::models::Mlp;
use lora::mse_loss;
use lora::prelude::*;

use crate::backend_choice::BackendKind;
use data::SineData;

/// Options of `lora demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Backend to run on.
    #[arg(long, value_enum, default_value = "ndarray")]
    pub backend: BackendKind,
    /// LoRA fine-tuning steps (full batch).
    #[arg(long, default_value_t = 600)]
    pub steps: usize,
    /// Pretraining steps of the base MLP.
    #[arg(long, default_value_t = 1500)]
    pub pretrain_steps: usize,
    /// Seed of the shared generator (init, dropout).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory: becomes a PEFT adapter directory, plus the base checkpoint and
    /// the charts.
    #[arg(long, default_value = "lora-demo-out")]
    pub out: PathBuf,
    /// LoRA rank.
    #[arg(long, default_value_t = 4)]
    pub rank: usize,
    /// lora_alpha.
    #[arg(long, default_value_t = 8.0)]
    pub alpha: f64,
    /// Dropout on the LoRA input during training.
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f64,
    /// Learning rate of the adapters (AdamW).
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f32,
    /// Hidden width of the MLP (three hidden layers).
    #[arg(long, default_value_t = 256)]
    pub hidden: usize,
    /// Phase shift of the fine-tuning task `sin(x + shift)`.
    #[arg(long, default_value_t = 0.5)]
    pub shift: f32,
    /// Quantize the frozen base (QLoRA): nf4 or fp4 (blocksize 64, double quantization)
    /// or int8 (row-wise). The output layer stays f32, as transformers leaves the head.
    #[arg(long, value_enum)]
    pub quant: Option<QuantArg>,
    /// Store the frozen base in bf16 or f16 (2 bytes per weight; products accumulate in
    /// f32, the adapters stay f32). `auto` has no checkpoint to read here.
    #[arg(long, value_enum, default_value = "f32", conflicts_with = "quant")]
    pub dtype: crate::dtype_arg::DtypeArg,
}

pub use crate::quant_arg::QuantArg;

/// Points on `[-π, π]`.
const POINTS: usize = 256;

/// Runs the demo on the chosen backend.
pub fn run(args: &DemoArgs) -> Result<()> {
    if args.steps == 0 || args.pretrain_steps == 0 {
        bail!("--steps and --pretrain-steps must be at least 1");
    }
    // Refused here, not after pretraining.
    freeze::frozen_half(args)?;
    crate::with_backend!(args.backend, |b| run_on(&b, args))
}

/// The demo's steps, in order.
fn run_on<B: QuantBackend>(b: &B, args: &DemoArgs) -> Result<()> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating output directory {}", args.out.display()))?;
    let data = SineData::new(b, args.shift)?;
    println!(
        "lora demo: LoRA fine-tuning of a sine-wave MLP on {} ({})",
        b.name(),
        b.device()
    );
    // 1. Pretrain the base model (every weight trains: this is the expensive way).
    let (mut model, pretrained) = pretrain::pretrain(b, args, &data)?;
    // 2. Freeze and save it (and quantize it with `--quant`).
    let base = freeze::freeze_and_save(b, args, &mut model)?;
    // 3. Inject adapters, check the no-op property.
    let adapters = inject::inject_adapters(b, args, &mut model, &pretrained.sizes, &data)?;
    // 4. Fine-tune only the adapters.
    let tuned = finetune::fine_tune(b, args, &mut model, &data)?;
    // 5. Save the adapter and the charts.
    outputs::save(b, args, &model, &data, &adapters, &tuned)?;
    // 6. Reload from disk, compare, merge, compare.
    let check = verify::reload_and_merge(b, args, &pretrained.sizes, &base, &data.x, &tuned.pred)?;
    summary::print(
        args,
        &model,
        &summary::Outcome {
            pretrained: &pretrained,
            base: &base,
            adapters: &adapters,
            tuned: &tuned,
            check: &check,
        },
    );
    Ok(())
}

/// A progress bar of `len` steps showing the loss.
fn progress(len: usize, prefix: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    let style = ProgressStyle::with_template(
        "{prefix:>11} [{bar:32.cyan/blue}] {pos:>5}/{len} loss {msg} ({per_sec}, eta {eta})",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(prefix);
    bar
}

/// Mean squared error of the model's evaluation-mode output against `y`.
fn eval_loss<B: FullBackend>(
    b: &B,
    model: &mut Mlp<B>,
    x: &B::Tensor,
    y: &B::Tensor,
) -> Result<f64> {
    let pred = model.forward(b, x, Mode::Eval)?;
    Ok(mse_loss(b, &pred, y)?.0)
}

/// Largest elementwise `|a - b|`.
fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
