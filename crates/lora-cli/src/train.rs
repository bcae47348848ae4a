//! `lora train`: LoRA fine-tuning. `--task classify` (the default): a real pretrained
//! encoder (all-MiniLM-L6-v2) on a real task, telling positive from negative words of the
//! VADER sentiment lexicon, from the mean-pooled sentence embedding through a linear head;
//! only the adapters and the head train. `--task causal-lm`: a decoder LLM on text
//! (`crate::train_lm`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lora::HostTensor;
use lora::models::bert::{BertModel, BertTokenizer, TokenBatch, classification_step, classify};
use lora::peft::{self, LoraConfig, TargetModules};
use lora::prelude::*;
use lora::rng::{RngState, uniform};
use plotters::style::RGBColor;

use crate::backend_choice::BackendKind;
use crate::checkpoint::{self, History, Interrupt, TrainerState};
use crate::plots::{self, Curve};
use crate::report::{bytes, duration, peak_rss_bytes, thousands};
use crate::sentiment_data::{Example, read_vader, split};

/// What `lora train` trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TrainTask {
    /// Sentence classification with a BERT encoder + linear head (the VADER example).
    Classify,
    /// Next-token prediction with a decoder LLM (Llama, Mistral, Qwen2, Qwen3).
    CausalLm,
}

/// Options of `lora train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The task.
    #[arg(long, value_enum, default_value = "classify")]
    pub task: TrainTask,
    /// Model directory (config.json, model.safetensors, tokenizer.json); default: the
    /// cache that `cargo xtask fetch-model minilm` fills.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// `vader_lexicon.txt`; default: the cache that `cargo xtask fetch-data vader` fills.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Output directory: PEFT adapter, head weights, charts.
    #[arg(long, default_value = "lora-train-out")]
    pub out: PathBuf,
    /// Backend to run on.
    #[arg(long, value_enum, default_value = "ndarray")]
    pub backend: BackendKind,
    /// Optimizer steps.
    #[arg(long, default_value_t = 300)]
    pub steps: usize,
    /// Words per step.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// lora_alpha.
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f64,
    /// Modules that get adapters (PEFT target_modules names); `none` trains the head alone
    /// (a linear probe on the frozen encoder, the baseline LoRA should beat).
    #[arg(long, default_value = "query,value")]
    pub target_modules: String,
    /// Causal LM: train these token ids' embedding rows directly (PEFT's
    /// `trainable_token_indices`, for new tokens), comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub trainable_tokens: Vec<i64>,
    /// AdamW learning rate (adapters and head).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f32,
    /// Keep words whose mean valence is at least this far from neutral (scale -4..4).
    #[arg(long, default_value_t = 1.0)]
    pub min_valence: f64,
    /// Evaluate on the held-out words every this many steps.
    #[arg(long, default_value_t = 50)]
    pub eval_every: usize,
    /// Seed (split, adapter init, head init).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// causal-lm: tokens per sequence at most (`.txt` data is packed into such blocks).
    #[arg(long, default_value_t = 256)]
    pub max_length: usize,
    /// causal-lm: micro-batches accumulated per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// causal-lm: linear warm-up steps before the cosine decay.
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    /// causal-lm: clip gradients to this global L2 norm (0: off).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f32,
    /// causal-lm: keep only each decoder layer's input in the forward and recompute the
    /// layer in the backward (less activation memory, one more forward).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// causal-lm: quantize the frozen base (QLoRA).
    #[arg(long, value_enum)]
    pub quant: Option<crate::quant_arg::QuantArg>,
    /// Storage of the frozen weights: f32, bf16 or f16 (2 bytes per weight; products and
    /// adapters stay f32), or auto (the checkpoint's dtype from config.json).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: crate::dtype_arg::DtypeArg,
    /// Write `OUT/checkpoint-<step>/` every this many steps (0: only at Ctrl-C).
    #[arg(long, default_value_t = 0)]
    pub save_every: usize,
    /// Continue from a checkpoint directory written by `--save-every` or Ctrl-C, with the
    /// same arguments: the result equals an uninterrupted run's, bit for bit.
    #[arg(long)]
    pub resume: Option<PathBuf>,
}

/// Runs `lora train`.
pub fn run(args: &TrainArgs) -> Result<()> {
    if args.steps == 0 || args.batch_size == 0 || args.eval_every == 0 {
        bail!("--steps, --batch-size and --eval-every must be at least 1");
    }
    if args.task == TrainTask::CausalLm {
        if args.grad_accum == 0 || args.max_length < 2 {
            bail!("--grad-accum must be at least 1 and --max-length at least 2");
        }
        return crate::with_backend!(args.backend, |b| crate::train_lm::run(&b, args));
    }
    if !args.trainable_tokens.is_empty() {
        bail!("--trainable-tokens applies to --task causal-lm only");
    }
    crate::with_backend!(args.backend, |b| run_on(&b, args))
}

/// Accuracy of the model + head on `data`.
fn accuracy<B: FullBackend>(
    b: &B,
    model: &mut BertModel<B>,
    head: &DenseLinear<B>,
    tok: &BertTokenizer,
    data: &[Example],
) -> Result<f64> {
    let mut correct = 0usize;
    for chunk in data.chunks(128) {
        let texts: Vec<&str> = chunk.iter().map(|e| e.text.as_str()).collect();
        let predicted = classify(b, model, head, &tok.encode_batch(&texts)?)?;
        correct += chunk
            .iter()
            .zip(predicted)
            .filter(|(e, p)| e.label == *p)
            .count();
    }
    Ok(correct as f64 / data.len().max(1) as f64)
}

/// The word lists and the tokenizer that encodes them.
struct Task {
    tok: BertTokenizer,
    train: Vec<Example>,
    test: Vec<Example>,
}

/// The encoder (with its adapters) and the linear head on its mean-pooled output.
struct Classifier<B: FullBackend> {
    model: BertModel<B>,
    head: DenseLinear<B>,
}

/// The adapters `--target-modules` asked for.
struct Adapters {
    /// The PEFT configuration, as saved with the adapter.
    config: LoraConfig,
    /// `--target-modules none`: no adapters, the head trains alone.
    head_only: bool,
    /// Names of the modules that got an adapter.
    injected: Vec<String>,
}

/// The training run.
struct Training {
    /// Set when Ctrl-C stopped the run: the checkpoint written then.
    interrupted: Option<PathBuf>,
    /// Cross-entropy of every step.
    losses: Vec<f64>,
    /// `(step, held-out accuracy)`, starting with step 0.
    evals: Vec<(f32, f32)>,
    /// Seconds spent in the training steps (tokenization excluded).
    seconds: f64,
    /// Bytes of AdamW state.
    optimizer_bytes: usize,
}

/// Held-out accuracy before and after training.
struct Accuracy {
    before: f64,
    after: f64,
}

/// The steps of `lora train`, in order.
fn run_on<B: QuantBackend>(b: &B, args: &TrainArgs) -> Result<()> {
    let model_dir = args
        .model
        .clone()
        .unwrap_or_else(lora::models::cache::minilm_dir);
    let task = load_task(args, &model_dir)?;
    let model = load_model(b, &model_dir, args.dtype)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating output directory {}", args.out.display()))?;
    println!(
        "lora train: LoRA fine-tuning of {} on {} ({})",
        model_dir
            .file_name()
            .map_or("the model".into(), |n| n.to_string_lossy()),
        b.name(),
        b.device()
    );
    // The checkpoint's state first: a directory that is not a checkpoint, or one made
    // with other arguments, is refused before anything loads.
    let resumed = match &args.resume {
        Some(dir) => Some(checkpoint::load(dir, args)?),
        None => None,
    };
    let (mut clf, adapters) = attach_adapters_and_head(b, args, model)?;
    if let (Some(dir), Some((state, _))) = (&args.resume, &resumed) {
        resume_head(b, dir, &mut clf)?;
        println!(
            "  resumed         {} at step {} ({} adapter modules)",
            dir.display(),
            state.step,
            adapters.injected.len()
        );
    }
    let before = match &resumed {
        Some((state, _)) => state.evals.first().map_or(0.0, |e| f64::from(e.1)),
        None => accuracy(b, &mut clf.model, &clf.head, &task.tok, &task.test)?,
    };
    let training = train_loop(b, args, &mut clf, &adapters, &task, (before, resumed))?;
    if let Some(dir) = &training.interrupted {
        println!(
            "lora train: interrupted after step {}; checkpoint {} (continue with --resume {})",
            training.losses.len(),
            dir.display(),
            dir.display()
        );
        return Ok(());
    }
    let after = training.evals.last().map_or(before, |e| f64::from(e.1));
    save_outputs(b, args, &clf, &adapters, &training)?;
    print_summary(
        args,
        &task,
        &clf,
        &adapters,
        &training,
        &Accuracy { before, after },
    );
    Ok(())
}

/// Reads the VADER words, splits them, and loads the model's tokenizer.
fn load_task(args: &TrainArgs, model_dir: &Path) -> Result<Task> {
    let data_path = args
        .data
        .clone()
        .unwrap_or_else(lora::models::cache::vader_lexicon_path);
    let (train, test) = split(read_vader(&data_path, args.min_valence)?, 0.2, args.seed);
    let tok = BertTokenizer::from_file(&model_dir.join("tokenizer.json"), 32)?;
    Ok(Task { tok, train, test })
}

/// Loads the pretrained encoder.
fn load_model<B: QuantBackend>(
    b: &B,
    model_dir: &Path,
    dtype: crate::dtype_arg::DtypeArg,
) -> Result<BertModel<B>> {
    BertModel::from_pretrained_as(b, model_dir, dtype.half(model_dir)?).with_context(|| {
        format!(
            "loading {} (run `cargo xtask fetch-model minilm` to fetch all-MiniLM-L6-v2)",
            model_dir.display()
        )
    })
}

/// Injects the adapters (unless `--target-modules none`) and builds a fresh 2-class head.
fn attach_adapters_and_head<B: FullBackend>(
    b: &B,
    args: &TrainArgs,
    mut model: BertModel<B>,
) -> Result<(Classifier<B>, Adapters)> {
    let config = LoraConfig {
        r: args.rank,
        lora_alpha: args.alpha,
        target_modules: Some(TargetModules::List(
            args.target_modules
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
        )),
        base_model_name_or_path: Some("sentence-transformers/all-MiniLM-L6-v2".into()),
        inference_mode: true,
        ..LoraConfig::default()
    };
    let head_only = args.target_modules.trim() == "none";
    let injected = match (&args.resume, head_only) {
        (_, true) => Vec::new(),
        // The checkpoint's adapter replaces the seeded initialisation.
        (Some(dir), false) => {
            peft::load_pretrained(dir, &mut model, b)
                .with_context(|| format!("--resume: loading the adapter in {}", dir.display()))?;
            model
                .linears()
                .iter()
                .filter(|l| l.adapter_named(lora::DEFAULT_ADAPTER).is_some())
                .map(|l| l.name().to_string())
                .collect()
        }
        (None, false) => peft::inject_adapters(&mut model, b, &config, args.seed)?,
    };
    let h = model.config().hidden_size;
    // nn.Linear's default init: U(-1/sqrt(in), 1/sqrt(in)).
    let mut w = vec![0.0f32; 2 * h];
    let bound = 1.0 / (h as f32).sqrt();
    uniform(RngState::new(args.seed, 0x4ead), -bound, bound, &mut w);
    let head = DenseLinear::new(b.from_host(&w, &[2, h])?, Some(b.zeros(&[2])?))?;
    Ok((
        Classifier { model, head },
        Adapters {
            config,
            head_only,
            injected,
        },
    ))
}

/// The progress bar of the training loop.
fn progress(steps: usize) -> ProgressBar {
    let bar = ProgressBar::new(steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>9} [{bar:32.cyan/blue}] {pos:>4}/{len} loss {msg} ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_prefix("train");
    bar
}

/// Trains adapters and head with AdamW on cycling batches of training words, evaluating
/// on the held-out words every `--eval-every` steps.
fn train_loop<B: FullBackend>(
    b: &B,
    args: &TrainArgs,
    clf: &mut Classifier<B>,
    adapters: &Adapters,
    task: &Task,
    (acc_before, resumed): (f64, Option<(TrainerState, lora::AdamState)>),
) -> Result<Training> {
    let Task { tok, train, test } = task;
    // PyTorch's AdamW defaults: betas (0.9, 0.999), eps 1e-8, weight decay 0.01.
    let mut opt = Adam::<B>::adamw(args.lr)?;
    let interrupt = Interrupt::install();
    let mut state = checkpoint::start(b, args, &mut opt, acc_before as f32, resumed)?;
    let bar = progress(args.steps);
    bar.set_position(state.step as u64);
    let mut losses = std::mem::take(&mut state.losses);
    let mut evals = std::mem::take(&mut state.evals);
    let mut train_s = state.seconds;
    let mut interrupted = None;
    for step in state.step..args.steps {
        let start = (step * args.batch_size) % train.len();
        let rows: Vec<&Example> = (0..args.batch_size)
            .map(|i| &train[(start + i) % train.len()])
            .collect();
        let texts: Vec<&str> = rows.iter().map(|e| e.text.as_str()).collect();
        let labels: Vec<usize> = rows.iter().map(|e| e.label).collect();
        let batch: TokenBatch = tok.encode_batch(&texts)?;
        let t0 = Instant::now();
        let loss =
            classification_step(b, &mut clf.model, &mut clf.head, &mut opt, &batch, &labels)?;
        b.synchronize()?;
        train_s += t0.elapsed().as_secs_f64();
        losses.push(loss);
        bar.set_position(step as u64 + 1);
        bar.set_message(format!("{loss:.3}"));
        if (step + 1) % args.eval_every == 0 || step + 1 == args.steps {
            let acc = accuracy(b, &mut clf.model, &clf.head, tok, test)?;
            evals.push(((step + 1) as f32, acc as f32));
        }
        let history = History {
            losses: &losses,
            evals: &evals,
            seconds: train_s,
        };
        interrupted =
            checkpoint::after_step(b, args, (step + 1, &interrupt), &opt, history, |dir| {
                save_model_files(b, dir, clf, adapters)
            })?;
        if interrupted.is_some() {
            break;
        }
    }
    bar.finish_and_clear();
    Ok(Training {
        interrupted,
        losses,
        evals,
        seconds: train_s,
        optimizer_bytes: opt.state_bytes(),
    })
}

/// Writes the adapter (unless head-only), `head.safetensors`, `loss.png` and
/// `accuracy.png` into `--out`.
fn save_outputs<B: FullBackend>(
    b: &B,
    args: &TrainArgs,
    clf: &Classifier<B>,
    adapters: &Adapters,
    training: &Training,
) -> Result<()> {
    save_model_files(b, &args.out, clf, adapters)?;
    plots::loss_curve(
        &args.out.join("loss.png"),
        "LoRA fine-tuning loss (cross-entropy, per step)",
        &training.losses,
    )?;
    let xs: Vec<f32> = training.evals.iter().map(|e| e.0).collect();
    let ys: Vec<f32> = training.evals.iter().map(|e| e.1).collect();
    plots::predictions(
        &args.out.join("accuracy.png"),
        "held-out accuracy: positive vs negative VADER words",
        &xs,
        &[Curve {
            label: "test accuracy",
            ys: &ys,
            color: RGBColor(30, 90, 220),
        }],
    )
}

/// Loads the head's weights from a checkpoint (its adapter is loaded in
/// [`attach_adapters_and_head`], the trainer and optimizer state by `checkpoint::load`).
fn resume_head<B: FullBackend>(b: &B, dir: &Path, clf: &mut Classifier<B>) -> Result<()> {
    let head_path = dir.join(HEAD_FILE);
    let mut t = lora::io::read_safetensors(&head_path)
        .with_context(|| format!("--resume: reading {}", head_path.display()))?;
    let h = clf.model.config().hidden_size;
    let mut take = |name: &str, shape: &[usize]| -> Result<B::Tensor> {
        let t = t
            .remove(name)
            .with_context(|| format!("--resume: {} has no tensor {name}", head_path.display()))?;
        t.expect_shape(&format!("{} {name}", head_path.display()), shape)?;
        Ok(t.into_backend(b)?)
    };
    clf.head = DenseLinear::new(take("weight", &[2, h])?, Some(take("bias", &[2])?))?;
    Ok(())
}

/// The head's file in the output and in checkpoints.
const HEAD_FILE: &str = "head.safetensors";

/// Writes the adapter (unless head-only) and `head.safetensors` into `dir`.
fn save_model_files<B: FullBackend>(
    b: &B,
    dir: &Path,
    clf: &Classifier<B>,
    adapters: &Adapters,
) -> Result<()> {
    let Classifier { model, head } = clf;
    if !adapters.head_only {
        peft::save_pretrained(dir, model, b, &adapters.config)?;
    }
    let head_path = dir.join(HEAD_FILE);
    lora::io::write_safetensors(
        &head_path,
        &[
            (
                "weight".to_string(),
                HostTensor::from_backend(b, head.weight_tensor())?,
            ),
            (
                "bias".to_string(),
                HostTensor::from_backend(
                    b,
                    head.bias()
                        .ok_or_else(|| anyhow::anyhow!("head has no bias"))?,
                )?,
            ),
        ],
    )?;
    Ok(())
}

/// Prints the summary of a finished run.
fn print_summary<B: FullBackend>(
    args: &TrainArgs,
    task: &Task,
    clf: &Classifier<B>,
    adapters: &Adapters,
    training: &Training,
    acc: &Accuracy,
) {
    let Classifier { model, head } = clf;
    let losses = &training.losses;
    let trainable = model.num_trainable() + head.num_parameters();
    let total = model.num_parameters() + head.num_parameters();
    println!(
        "  task            VADER lexicon (vaderSentiment 3.3.2 wheel, MIT): positive vs negative words, |valence| >= {}",
        args.min_valence
    );
    println!(
        "  data            {} training words, {} held out (seed {})",
        thousands(task.train.len()),
        thousands(task.test.len()),
        args.seed
    );
    println!(
        "  LoRA            r={}, alpha={}, on {} modules ({}), plus a linear head on the mean-pooled embedding",
        args.rank,
        args.alpha,
        adapters.injected.len(),
        args.target_modules
    );
    println!(
        "  trainable       {} of {} parameters ({:.2}%)",
        thousands(trainable),
        thousands(total),
        100.0 * trainable as f64 / total as f64
    );
    println!(
        "  accuracy        {:.1}% before -> {:.1}% after {} steps (held-out words)",
        100.0 * acc.before,
        100.0 * acc.after,
        args.steps
    );
    println!(
        "  loss            {:.3} first step -> {:.3} last step",
        losses.first().copied().unwrap_or(f64::NAN),
        losses.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "  time per step   {} (batch {}, forward + backward + AdamW; tokenization excluded)",
        duration(training.seconds / args.steps as f64),
        args.batch_size
    );
    println!(
        "  optimizer state {}",
        bytes(training.optimizer_bytes as u64)
    );
    if let Some(rss) = peak_rss_bytes() {
        println!("  peak memory     {} RSS", bytes(rss));
    }
    let adapter_files = if adapters.head_only {
        String::new()
    } else {
        format!("{}, {}, ", peft::CONFIG_FILE, peft::WEIGHTS_FILE)
    };
    println!(
        "  wrote           {}: {adapter_files}head.safetensors, loss.png, accuracy.png",
        args.out.display()
    );
}
