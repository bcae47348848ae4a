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

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lora::models::Mlp;
use lora::peft::{self, LoraConfig, TargetModules};
use lora::prelude::*;
use lora::{AdamHyper, UnaryOp, WeightRounding, mse_loss};
use plotters::style::RGBColor;

use crate::backend_choice::BackendKind;
use crate::plots::{self, Curve};
use crate::report::{bytes, duration, peak_rss_bytes, thousands};

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
}

/// `--quant` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QuantArg {
    /// 4-bit NormalFloat with double quantization (QLoRA).
    Nf4,
    /// 4-bit float with double quantization.
    Fp4,
    /// LLM.int8 row-wise 8-bit.
    Int8,
}

impl QuantArg {
    fn config(self) -> QuantConfig {
        QuantConfig::new(match self {
            QuantArg::Nf4 => QuantFormat::Nf4,
            QuantArg::Fp4 => QuantFormat::Fp4,
            QuantArg::Int8 => QuantFormat::Int8,
        })
    }
}

/// Layers whose weights `--quant` stores quantized: all but the output head.
const QUANTIZED: [&str; 3] = ["layers.0", "layers.2", "layers.4"];

/// Points on `[-π, π]`.
const POINTS: usize = 256;
/// Layers that get adapters (the hidden-to-hidden projections).
const TARGETS: [&str; 2] = ["layers.2", "layers.4"];

/// Runs the demo on the chosen backend.
pub fn run(args: &DemoArgs) -> Result<()> {
    if args.steps == 0 || args.pretrain_steps == 0 {
        bail!("--steps and --pretrain-steps must be at least 1");
    }
    crate::with_backend!(args.backend, |b| run_on(&b, args))
}

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

fn eval_loss<B: FullBackend>(
    b: &B,
    model: &mut Mlp<B>,
    x: &B::Tensor,
    y: &B::Tensor,
) -> Result<f64> {
    let pred = model.forward(b, x, Mode::Eval)?;
    Ok(mse_loss(b, &pred, y)?.0)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Quantizes the base checkpoint into `out` (bitsandbytes layout) and swaps the model's
/// frozen layers for quantized ones read back from that file.
fn quantize_base<B: QuantBackend>(
    model: &mut Mlp<B>,
    base_path: &Path,
    quantized_path: &Path,
    quant: QuantArg,
) -> Result<()> {
    if !quantized_path.exists() {
        let targets = peft::quant_targets(TargetModules::List(
            QUANTIZED.iter().map(|s| s.to_string()).collect(),
        ));
        lora::io::quantize_checkpoint(
            base_path,
            quantized_path,
            &quant.config(),
            &targets,
            &|_, _| {},
        )?;
    }
    let ck = lora::io::Checkpoint::open(quantized_path)?;
    let tensors = ck.tensors()?;
    let path = quantized_path.display().to_string();
    for layer in model.linears_mut() {
        if !QUANTIZED.contains(&layer.name()) {
            continue;
        }
        let q = lora::io::bnb_format::decode(layer.name(), &tensors, &path)?;
        let bias = layer.base().bias().cloned();
        layer.replace_base(Box::new(QuantLinear::new(q, bias)?))?;
    }
    Ok(())
}

/// Bytes the frozen base layers keep resident.
fn frozen_bytes<B: QuantBackend>(model: &Mlp<B>) -> usize {
    model
        .linears()
        .iter()
        .map(|l| l.base().resident_bytes())
        .sum()
}

fn run_on<B: QuantBackend>(b: &B, args: &DemoArgs) -> Result<()> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating output directory {}", args.out.display()))?;
    let sizes = [1, args.hidden, args.hidden, args.hidden, 1];
    let xs: Vec<f32> = (0..POINTS)
        .map(|i| {
            -std::f32::consts::PI + 2.0 * std::f32::consts::PI * i as f32 / (POINTS - 1) as f32
        })
        .collect();
    let base_task: Vec<f32> = xs.iter().map(|x| x.sin()).collect();
    let new_task: Vec<f32> = xs.iter().map(|x| (x + args.shift).sin()).collect();
    let x = b.from_host(&xs, &[POINTS, 1])?;
    let y_base = b.from_host(&base_task, &[POINTS, 1])?;
    let y_new = b.from_host(&new_task, &[POINTS, 1])?;

    println!(
        "lora demo: LoRA fine-tuning of a sine-wave MLP on {} ({})",
        b.name(),
        b.device()
    );

    // 1. Pretrain the base model (every weight trains: this is the expensive way).
    let mut model = Mlp::new(b, &sizes, UnaryOp::Relu, args.seed)?;
    let mut opt = Adam::<B>::plain(3e-3)?;
    let bar = progress(args.pretrain_steps, "pretrain");
    let mut pre_loss = f64::NAN;
    for step in 0..args.pretrain_steps {
        let pred = model.forward(b, &x, Mode::Train)?;
        let (loss, dy) = mse_loss(b, &pred, &y_base)?;
        let grads = model.backward_full(b, &dy)?;
        opt.step(b, &mut model.dense_params_and_grads(&grads)?)?;
        pre_loss = loss;
        if step % 25 == 0 || step + 1 == args.pretrain_steps {
            bar.set_position(step as u64 + 1);
            bar.set_message(format!("{loss:.2e}"));
        }
    }
    bar.finish_and_clear();
    let full_params = model.num_parameters();
    let base_path = args.out.join("base_model.safetensors");
    lora::io::write_safetensors(&base_path, &model.state_dict(b)?)?;
    let f32_frozen = frozen_bytes(&model);
    let quantized_path = args.quant.map(|q| {
        args.out
            .join(format!("base_model.{}.safetensors", q.config().format))
    });
    if let (Some(q), Some(qp)) = (args.quant, &quantized_path) {
        // A fresh file each run: the base was just retrained.
        let _ = std::fs::remove_file(qp);
        quantize_base(&mut model, &base_path, qp, q)?;
    }
    let frozen = frozen_bytes(&model);

    // 2-3. Freeze, inject adapters, check the no-op property.
    let base_pred = b.to_host(&model.forward(b, &x, Mode::Eval)?)?;
    let loss_before = eval_loss(b, &mut model, &x, &y_new)?;
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
    let injected = peft::inject_adapters(&mut model, b, &config, args.seed)?;
    let fresh_pred = b.to_host(&model.forward(b, &x, Mode::Eval)?)?;
    ensure!(
        fresh_pred == base_pred,
        "a freshly injected adapter changed the output (max |diff| {})",
        max_abs_diff(&fresh_pred, &base_pred)
    );

    // 4. Fine-tune only the adapters.
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
        let pred = model.forward(b, &x, Mode::Train)?;
        let (loss, dy) = mse_loss(b, &pred, &y_new)?;
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
    let loss_after = eval_loss(b, &mut model, &x, &y_new)?;
    let lora_pred = b.to_host(&model.forward(b, &x, Mode::Eval)?)?;

    // 5. Save the adapter and the charts.
    peft::save_pretrained(&args.out, &model, b, &config)?;
    let loss_png = args.out.join("loss.png");
    let pred_png = args.out.join("predictions.png");
    plots::loss_curve(
        &loss_png,
        "LoRA fine-tuning loss (adapters only, base frozen)",
        &losses,
    )?;
    plots::predictions(
        &pred_png,
        &format!(
            "sin(x + {}) learned by LoRA on a frozen sin(x) model",
            args.shift
        ),
        &xs,
        &[
            Curve {
                label: "target sin(x + shift)",
                ys: &new_task,
                color: RGBColor(0, 0, 0),
            },
            Curve {
                label: "frozen base model",
                ys: &base_pred,
                color: RGBColor(200, 120, 0),
            },
            Curve {
                label: "base + LoRA",
                ys: &lora_pred,
                color: RGBColor(30, 90, 220),
            },
        ],
    )?;

    // 6. Reload from disk, compare, merge, compare.
    let (reload_diff, merge_diff, rounding) = reload_and_merge(
        b,
        &sizes,
        args,
        &base_path,
        quantized_path.as_deref(),
        &x,
        &lora_pred,
    )?;

    let trainable = model.num_trainable();
    let total = model.num_parameters();
    println!(
        "  model           MLP {} (ReLU), {} parameters",
        sizes.map(|s| s.to_string()).join("-"),
        thousands(full_params)
    );
    println!(
        "  pretrained on   y = sin(x), {} full-batch steps (Adam), final MSE {pre_loss:.2e}",
        args.pretrain_steps
    );
    match args.quant {
        Some(q) => println!(
            "  frozen base     {} on {}: {} resident vs {} in f32 ({:.1}x smaller)",
            q.config().format,
            QUANTIZED.join(", "),
            bytes(frozen as u64),
            bytes(f32_frozen as u64),
            f32_frozen as f64 / frozen.max(1) as f64
        ),
        None => println!("  frozen base     f32, {} resident", bytes(frozen as u64)),
    }
    println!(
        "  LoRA            r={}, alpha={}, scaling={}, dropout={}, on {}",
        args.rank,
        args.alpha,
        args.alpha / args.rank as f64,
        args.dropout,
        injected.join(", ")
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
    println!("  loss before     {loss_before:.3e}  (frozen base on the new task)");
    println!(
        "  loss after      {loss_after:.3e}  ({:.0}x lower after {} steps, AdamW lr {})",
        loss_before / loss_after.max(f64::MIN_POSITIVE),
        args.steps,
        args.lr
    );
    println!(
        "  time per step   {} (forward + backward + optimizer; {} in all)",
        duration(train_s / args.steps as f64),
        duration(train_s)
    );
    println!(
        "  optimizer state {} (adapters only)",
        bytes(opt.state_bytes() as u64)
    );
    if let Some(rss) = peak_rss_bytes() {
        println!("  peak memory     {} RSS", bytes(rss));
    }
    println!(
        "  reload check    adapter reloaded from disk: max |diff| {reload_diff:.1e} vs the trained model"
    );
    match rounding {
        Some(r) => println!(
            "  merge check     merged into the quantized base: weight rounding max |err| {:.1e} (rel {:.1e}); output max |diff| {merge_diff:.1e}",
            r.max_abs, r.max_rel
        ),
        None => println!("  merge check     merged vs unmerged: max |diff| {merge_diff:.1e}  (ok)"),
    }
    println!(
        "  wrote           {}: {}, {}, base_model.safetensors{}, loss.png, predictions.png",
        args.out.display(),
        peft::CONFIG_FILE,
        peft::WEIGHTS_FILE,
        quantized_path
            .as_ref()
            .and_then(|p| p.file_name())
            .map_or(String::new(), |n| format!(", {}", n.to_string_lossy()))
    );
    Ok(())
}

/// Builds a fresh model from the saved files, checks it reproduces the trained model,
/// merges, and checks the merged model; returns both max differences.
fn reload_and_merge<B: QuantBackend>(
    b: &B,
    sizes: &[usize],
    args: &DemoArgs,
    base_path: &Path,
    quantized_path: Option<&Path>,
    x: &B::Tensor,
    trained_pred: &[f32],
) -> Result<(f32, f32, Option<WeightRounding>)> {
    let mut reloaded = Mlp::new(b, sizes, UnaryOp::Relu, args.seed.wrapping_add(1))?;
    reloaded.load_state_dict(b, &lora::io::read_safetensors(base_path)?)?;
    if let (Some(q), Some(qp)) = (args.quant, quantized_path) {
        quantize_base(&mut reloaded, base_path, qp, q)?;
    }
    peft::load_pretrained(&args.out, &mut reloaded, b)?;
    let unmerged = b.to_host(&reloaded.forward(b, x, Mode::Eval)?)?;
    let reload_diff = max_abs_diff(&unmerged, trained_pred);
    ensure!(
        reload_diff == 0.0,
        "the adapter reloaded from {} does not reproduce the trained model (max |diff| {reload_diff})",
        args.out.display()
    );
    let mut rounding = WeightRounding::EXACT;
    for layer in reloaded.linears_mut() {
        if layer.adapter().is_some() {
            rounding = rounding.max(layer.merge(b, true)?);
        }
    }
    let merged = b.to_host(&reloaded.forward(b, x, Mode::Eval)?)?;
    let merge_diff = max_abs_diff(&merged, &unmerged);
    let scale = unmerged.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    if args.quant.is_none() {
        ensure!(
            merge_diff <= 1e-5 * scale,
            "merged output differs from unmerged by {merge_diff} (tolerance {})",
            1e-5 * scale
        );
        return Ok((reload_diff, merge_diff, None));
    }
    // Re-quantizing rounds: the check is that it stays within the format's resolution.
    ensure!(
        merge_diff.is_finite() && rounding.max_rel <= 0.2,
        "merging into the quantized base rounded by {rounding:?}, output max |diff| {merge_diff}"
    );
    Ok((reload_diff, merge_diff, Some(rounding)))
}
