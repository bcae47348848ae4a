//! `lora train --task causal-lm`: LoRA (or QLoRA with `--quant`) fine-tuning of a decoder
//! LLM (Llama, Mistral, Qwen2, Qwen3) on text: batches with gradient accumulation, AdamW
//! with linear warm-up and cosine decay, gradient clipping by global norm, a held-out
//! split evaluated for perplexity, a progress bar with loss, tokens per second and ETA, a
//! loss-curve PNG, and a PEFT adapter with `task_type` `CAUSAL_LM`.

mod schedule;

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use lora::models::TokenBatch;
use lora::models::decoder::{DecoderModel, DecoderTokenizer, IGNORE_INDEX, causal_lm_loss_grad};
use lora::peft::{self, LoraConfig, TargetModules, TokenIndices};
use lora::prelude::*;
use lora::{Adam, ParamGrad, UnaryOp};
use lora_cli::lm_data as data;

use self::data::Sequence;
use crate::checkpoint::{self, History, Interrupt, TrainerState};
use crate::plots;
use crate::report::{bytes, duration, peak_rss_bytes, thousands};
use crate::train::TrainArgs;

/// Runs the causal-LM task.
pub fn run<B: QuantBackend>(b: &B, args: &TrainArgs) -> Result<()> {
    let model_dir = args
        .model
        .as_deref()
        .context("--task causal-lm needs --model DIR (a Llama/Mistral/Qwen checkpoint)")?;
    let data_path = args
        .data
        .as_deref()
        .context("--task causal-lm needs --data FILE (.jsonl or .txt)")?;
    let tok_path = model_dir.join("tokenizer.json");
    if !tok_path.is_file() {
        bail!(
            "{}: no tokenizer.json in the model directory",
            tok_path.display()
        );
    }
    let tok = DecoderTokenizer::from_file(&tok_path)?;
    let mut model = DecoderModel::from_pretrained_as(b, model_dir, args.dtype.half(model_dir)?)
        .with_context(|| format!("loading {}", model_dir.display()))?;
    let eos = model.config().eos_token_ids.first().copied();
    let seqs = data::read(data_path, &tok, args.max_length, eos)?;
    let (train, held_out) = split(seqs, args.seed);
    if let Some(q) = args.quant {
        let (qb, fb) = model.quantize_base(b, &q.config())?;
        println!(
            "  base quantized to {}: {} instead of {} in f32",
            q.name(),
            bytes(qb as u64),
            bytes(fb as u64)
        );
    }
    model.set_gradient_checkpointing(args.gradient_checkpointing);
    let config = lora_config(args, model_dir)?;
    // A checkpoint's state first (refused before anything loads when it does not fit),
    // then its adapter in place of the seeded initialisation.
    let resumed = match &args.resume {
        Some(dir) => Some(checkpoint::load(dir, args)?),
        None => None,
    };
    let injected = match &args.resume {
        Some(dir) => {
            peft::load_pretrained(dir, &mut model, b)
                .with_context(|| format!("--resume: loading the adapter in {}", dir.display()))?;
            model
                .linears()
                .iter()
                .filter(|l| l.adapter_named(lora::DEFAULT_ADAPTER).is_some())
                .map(|l| l.name().to_string())
                .collect()
        }
        None => peft::inject_adapters(&mut model, b, &config, args.seed)?,
    };
    let pad = tok.token_id("<pad>").or(eos).unwrap_or(0);
    println!(
        "lora train --task causal-lm: {} on {} ({}), {} train / {} held-out sequences",
        model.config().model_type,
        b.name(),
        b.device(),
        train.len(),
        held_out.len()
    );
    println!(
        "  LoRA r={} alpha={} on {} modules; {} of {} parameters trainable{}",
        config.r,
        config.lora_alpha,
        injected.len(),
        thousands(model.num_trainable()),
        thousands(model.num_parameters()),
        if args.gradient_checkpointing {
            "; gradient checkpointing"
        } else {
            ""
        }
    );
    let before = match &resumed {
        Some((state, _)) => state.evals.first().map_or(f64::NAN, |e| f64::from(e.1)),
        None => perplexity(b, &mut model, &held_out, args.batch_size, pad)?,
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let started = Instant::now();
    let run = Run {
        train: &train,
        pad,
        config: &config,
    };
    let (losses, interrupted) = train_loop(b, args, &mut model, &run, (before, resumed))?;
    if let Some(dir) = interrupted {
        println!(
            "lora train: interrupted after step {}; checkpoint {} (continue with --resume {})",
            losses.len(),
            dir.display(),
            dir.display()
        );
        return Ok(());
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = perplexity(b, &mut model, &held_out, args.batch_size, pad)?;
    peft::save_pretrained(&args.out, &model, b, &config)?;
    plots::loss_curve(
        &args.out.join("loss.png"),
        "causal-LM loss (train)",
        &losses,
    )?;
    println!("  held-out perplexity {before:.3} -> {after:.3}");
    println!(
        "  {} optimizer steps in {} ({:.2} s/step); peak RSS {}",
        losses.len(),
        duration(elapsed),
        elapsed / losses.len().max(1) as f64,
        peak_rss_bytes().map_or("unknown".into(), bytes)
    );
    println!("  wrote {} (PEFT adapter, loss.png)", args.out.display());
    Ok(())
}

/// PEFT config from the flags: `--target-modules` names or `all-linear` (`embed_tokens`
/// included: LoRA on the embedding), `--trainable-tokens`.
fn lora_config(args: &TrainArgs, model_dir: &Path) -> Result<LoraConfig> {
    let targets = if args.target_modules == "all-linear" {
        TargetModules::Pattern("all-linear".into())
    } else {
        TargetModules::List(
            args.target_modules
                .split(',')
                .map(|s| s.trim().to_string())
                .collect(),
        )
    };
    Ok(LoraConfig {
        r: args.rank,
        lora_alpha: args.alpha,
        target_modules: Some(targets),
        task_type: Some("CAUSAL_LM".into()),
        base_model_name_or_path: Some(model_dir.display().to_string()),
        trainable_token_indices: (!args.trainable_tokens.is_empty())
            .then(|| TokenIndices::List(args.trainable_tokens.clone())),
        ..LoraConfig::default()
    })
}

/// One held-out sequence in ten (at least one), chosen by the seed.
fn split(mut seqs: Vec<Sequence>, seed: u64) -> (Vec<Sequence>, Vec<Sequence>) {
    let n = seqs.len();
    let held = (n / 10).max(1).min(n.saturating_sub(1));
    let offset = (seed as usize) % n.max(1);
    seqs.rotate_left(offset);
    let train = seqs.split_off(held);
    (train, seqs)
}

/// A right-padded batch: ids, mask and labels (`-100` on padding).
fn collate(seqs: &[&Sequence], pad: u32) -> Result<(TokenBatch, Vec<i64>)> {
    let t = seqs.iter().map(|s| s.ids.len()).max().unwrap_or(0);
    let (mut ids, mut mask, mut labels) = (Vec::new(), Vec::new(), Vec::new());
    for s in seqs {
        let n = s.ids.len();
        ids.extend(s.ids.iter().copied().chain(std::iter::repeat_n(pad, t - n)));
        mask.extend(std::iter::repeat_n(1u32, n).chain(std::iter::repeat_n(0, t - n)));
        labels.extend(
            s.labels
                .iter()
                .copied()
                .chain(std::iter::repeat_n(IGNORE_INDEX, t - n)),
        );
    }
    Ok((TokenBatch::new(ids, mask, seqs.len())?, labels))
}

/// What the training loop reads besides the model.
struct Run<'a> {
    train: &'a [Sequence],
    pad: u32,
    /// Saved with the adapter in checkpoints.
    config: &'a LoraConfig,
}

/// The optimizer steps (from a checkpoint's step when resumed); returns the loss of every
/// step, and the checkpoint written when Ctrl-C stopped the run.
fn train_loop<B: QuantBackend>(
    b: &B,
    args: &TrainArgs,
    model: &mut DecoderModel<B>,
    run: &Run<'_>,
    (ppl_before, resumed): (f64, Option<(TrainerState, lora::AdamState)>),
) -> Result<(Vec<f64>, Option<std::path::PathBuf>)> {
    let Run { train, pad, config } = *run;
    let mut opt = Adam::<B>::adamw(args.lr)?;
    let interrupt = Interrupt::install();
    let mut state = checkpoint::start(b, args, &mut opt, ppl_before as f32, resumed)?;
    let bar = ProgressBar::new(args.steps as u64);
    bar.set_style(
        ProgressStyle::with_template("  {bar:30} {pos}/{len} steps  loss {msg}  ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(state.step as u64);
    let mut losses = std::mem::take(&mut state.losses);
    // The data position follows from the step: every step reads grad_accum batches.
    let mut cursor = (state.step * args.grad_accum * args.batch_size) % train.len().max(1);
    let started = Instant::now();
    let mut tokens = 0usize;
    let mut interrupted = None;
    for step in state.step..args.steps {
        // The accumulated gradients stay on the backend; only the loss comes back.
        let mut acc: Option<Vec<B::Tensor>> = None;
        let mut step_loss = 0.0;
        for _ in 0..args.grad_accum {
            let chunk: Vec<&Sequence> = (0..args.batch_size)
                .map(|i| &train[(cursor + i) % train.len()])
                .collect();
            cursor = (cursor + args.batch_size) % train.len();
            let (batch, labels) = collate(&chunk, pad)?;
            tokens += batch.attention_mask.iter().filter(|&&m| m != 0).count();
            let logits = model.logits(b, &batch, Mode::Train)?;
            let (loss, _, grad) =
                causal_lm_loss_grad(b, logits, &labels, batch.batch, batch.seq_len)?;
            step_loss += loss / args.grad_accum as f64;
            let d = match args.grad_accum {
                1 => grad,
                n => {
                    // Moved in so that the unscaled gradient is freed here.
                    let grad = grad;
                    b.affine(&grad, 1.0 / n as f32, 0.0)?
                }
            };
            model.backward_logits(b, d)?;
            let params = model.params_and_grads();
            acc = Some(match acc {
                // A copy: the next backward must not write into the running sum.
                None => params
                    .iter()
                    .map(|p| b.affine(p.grad, 1.0, 0.0))
                    .collect::<lora::Result<_>>()?,
                Some(mut a) => {
                    for (x, p) in a.iter_mut().zip(&params) {
                        b.axpby(1.0, p.grad, 1.0, x)?;
                    }
                    a
                }
            });
        }
        let mut grads = acc.unwrap_or_default();
        clip_global_norm(b, &mut grads, args.max_grad_norm)?;
        opt.set_learning_rate(schedule::lr_at(
            step,
            args.steps,
            args.warmup_steps,
            args.lr,
        ));
        step_with(b, &mut opt, model, &grads)?;
        losses.push(step_loss);
        let tps = tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
        bar.set_position(step as u64 + 1);
        bar.set_message(format!("{step_loss:.4}  {tps:.0} tok/s"));
        let history = History {
            losses: &losses,
            evals: &state.evals,
            seconds: state.seconds + started.elapsed().as_secs_f64(),
        };
        interrupted =
            checkpoint::after_step(b, args, (step + 1, &interrupt), &opt, history, |dir| {
                Ok(peft::save_pretrained(dir, model, b, config)?)
            })?;
        if interrupted.is_some() {
            break;
        }
    }
    bar.finish_and_clear();
    Ok((losses, interrupted))
}

/// Scales all gradients so that their global L2 norm is at most `max_norm` (0: off).
fn clip_global_norm<B: QuantBackend>(b: &B, grads: &mut [B::Tensor], max_norm: f32) -> Result<()> {
    if max_norm <= 0.0 {
        return Ok(());
    }
    let mut sq = 0.0f64;
    for g in grads.iter() {
        sq += b.sum_all(&b.unary(UnaryOp::Square, g)?)?;
    }
    // torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when below 1.
    let coef = max_norm as f64 / (sq.sqrt() + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            *g = b.affine(g, coef as f32, 0.0)?;
        }
    }
    Ok(())
}

/// An optimizer step with the given (accumulated, clipped) gradients in the adapters'
/// parameter order.
fn step_with<B: QuantBackend>(
    b: &B,
    opt: &mut Adam<B>,
    model: &mut DecoderModel<B>,
    grads: &[B::Tensor],
) -> Result<()> {
    let mut params = model.params_and_grads();
    let mut with: Vec<ParamGrad<'_, B::Tensor>> = params
        .iter_mut()
        .zip(grads)
        .map(|(p, g)| ParamGrad {
            param: &mut *p.param,
            grad: g,
        })
        .collect();
    opt.step(b, &mut with)?;
    Ok(())
}

/// exp(mean NLL) over the held-out sequences.
fn perplexity<B: QuantBackend>(
    b: &B,
    model: &mut DecoderModel<B>,
    seqs: &[Sequence],
    batch: usize,
    pad: u32,
) -> Result<f64> {
    let (mut sum, mut count) = (0.0f64, 0usize);
    for chunk in seqs.chunks(batch.max(1)) {
        let refs: Vec<&Sequence> = chunk.iter().collect();
        let (batch, labels) = collate(&refs, pad)?;
        let logits = model.logits(b, &batch, Mode::Eval)?;
        let (loss, n) =
            lora::models::decoder::causal_lm_loss(b, &logits, &labels, batch.batch, batch.seq_len)?;
        if n > 0 {
            sum += loss * n as f64;
            count += n;
        }
    }
    Ok((sum / count.max(1) as f64).exp())
}
