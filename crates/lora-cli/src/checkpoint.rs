//! Training checkpoints of `lora train` (`--save-every N`, `--resume DIR`, Ctrl-C):
//! `OUT/checkpoint-<step>/` holds what the task saves (the PEFT adapter, the classifier's
//! head), `optimizer.safetensors` (AdamW's moments, PyTorch's `exp_avg` / `exp_avg_sq`
//! names, one index per parameter) and `trainer_state.json` (steps done, AdamW's step
//! count, the loss and evaluation history, and the arguments that decide the result). The
//! data position and the learning-rate schedule follow from the step count, and no step
//! draws random numbers (no dropout), so a resumed run repeats an uninterrupted one bit
//! for bit. Each checkpoint is written into a temporary directory and renamed into place
//! whole (`lora_io::fs::PendingDir`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use lora::io::fs::{PendingDir, write_atomic};
use lora::{Adam, AdamState, HostTensor, OptimOps};
use serde::{Deserialize, Serialize};

use crate::train::TrainArgs;

/// The run's history and position, as `trainer_state.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    /// AdamW's own step count (its bias correction).
    pub adam_step: u64,
    /// Loss of every step so far.
    pub losses: Vec<f64>,
    /// `(step, value)` of every evaluation so far (accuracy or perplexity).
    pub evals: Vec<(f32, f32)>,
    /// Seconds spent in training steps so far.
    pub seconds: f64,
    /// The arguments that decide the result (a resumed run must give the same).
    pub arguments: BTreeMap<String, String>,
}

/// `trainer_state.json` in a checkpoint.
const STATE_FILE: &str = "trainer_state.json";
/// `optimizer.safetensors` in a checkpoint.
const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// The arguments that change what a run computes, by their command-line names.
pub fn arguments(args: &TrainArgs) -> BTreeMap<String, String> {
    let path = |p: &Option<PathBuf>| {
        p.as_ref()
            .map_or("default".into(), |p| p.display().to_string())
    };
    [
        ("--task", format!("{:?}", args.task)),
        ("--model", path(&args.model)),
        ("--data", path(&args.data)),
        ("--steps", args.steps.to_string()),
        ("--batch-size", args.batch_size.to_string()),
        ("--rank", args.rank.to_string()),
        ("--alpha", args.alpha.to_string()),
        ("--target-modules", args.target_modules.clone()),
        ("--trainable-tokens", format!("{:?}", args.trainable_tokens)),
        ("--lr", args.lr.to_string()),
        ("--min-valence", args.min_valence.to_string()),
        ("--seed", args.seed.to_string()),
        ("--max-length", args.max_length.to_string()),
        ("--grad-accum", args.grad_accum.to_string()),
        ("--warmup-steps", args.warmup_steps.to_string()),
        ("--max-grad-norm", args.max_grad_norm.to_string()),
        ("--quant", format!("{:?}", args.quant)),
        ("--dtype", format!("{:?}", args.dtype)),
        ("--backend", format!("{:?}", args.backend)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Ctrl-C: asks the training loop to write a checkpoint and stop after the current step.
#[derive(Clone, Debug)]
pub struct Interrupt(Arc<AtomicBool>);

impl Interrupt {
    /// Installs the SIGINT handler (once per process; a second call keeps the first).
    pub fn install() -> Self {
        let flag = Arc::new(AtomicBool::new(false));
        let set = Arc::clone(&flag);
        if ctrlc::set_handler(move || set.store(true, Ordering::SeqCst)).is_err() {
            eprintln!("lora train: Ctrl-C will stop without a checkpoint (no signal handler)");
        }
        Self(flag)
    }

    /// Whether Ctrl-C was pressed.
    pub fn requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// When to save: every `--save-every` steps, at a Ctrl-C, never for the last step (the
/// final outputs are that).
fn due(args: &TrainArgs, step: usize, interrupt: &Interrupt) -> bool {
    step < args.steps
        && (interrupt.requested() || (args.save_every > 0 && step.is_multiple_of(args.save_every)))
}

/// The state a training loop starts from: `resumed`'s (its AdamW state loaded into `opt`),
/// or a fresh one whose first evaluation (step 0) is `first_eval`.
pub fn start<B: OptimOps>(
    b: &B,
    args: &TrainArgs,
    opt: &mut Adam<B>,
    first_eval: f32,
    resumed: Option<(TrainerState, AdamState)>,
) -> Result<TrainerState> {
    if let Some((state, adam)) = resumed {
        opt.load_state(b, adam)?;
        return Ok(state);
    }
    Ok(TrainerState {
        evals: vec![(0.0, first_eval)],
        arguments: arguments(args),
        ..TrainerState::default()
    })
}

/// The history a checkpoint records after a step.
pub struct History<'a> {
    pub losses: &'a [f64],
    pub evals: &'a [(f32, f32)],
    pub seconds: f64,
}

/// After step `step` (1-based) of a training loop: writes a checkpoint when one is due
/// (`task_files` writes the task's own files into it) and returns it when Ctrl-C asked the
/// loop to stop.
pub fn after_step<B: OptimOps>(
    b: &B,
    args: &TrainArgs,
    (step, interrupt): (usize, &Interrupt),
    opt: &Adam<B>,
    history: History<'_>,
    task_files: impl FnOnce(&Path) -> Result<()>,
) -> Result<Option<PathBuf>> {
    if !due(args, step, interrupt) {
        return Ok(None);
    }
    let state = TrainerState {
        step,
        adam_step: opt.steps(),
        losses: history.losses.to_vec(),
        evals: history.evals.to_vec(),
        seconds: history.seconds,
        arguments: arguments(args),
    };
    let dir = save(&args.out, &state, &opt.state(b)?, task_files)?;
    Ok(interrupt.requested().then_some(dir))
}

/// Writes `OUT/checkpoint-<state.step>/`: `task_files` writes the task's own files into
/// the directory it is given, then the optimizer and the trainer state follow. Returns the
/// checkpoint's path.
fn save(
    out: &Path,
    state: &TrainerState,
    optimizer: &AdamState,
    task_files: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let target = out.join(format!("checkpoint-{}", state.step));
    let pending = PendingDir::create(&target)?;
    task_files(pending.path())?;
    let mut tensors = Vec::with_capacity(2 * optimizer.m.len());
    for (i, (m, v)) in optimizer.m.iter().zip(&optimizer.v).enumerate() {
        tensors.push((format!("exp_avg.{i}"), m.clone()));
        tensors.push((format!("exp_avg_sq.{i}"), v.clone()));
    }
    lora::io::write_safetensors(&pending.path().join(OPTIMIZER_FILE), &tensors)?;
    let json = serde_json::to_string_pretty(state)?;
    write_atomic(&pending.path().join(STATE_FILE), json.as_bytes())?;
    pending.commit()?;
    Ok(target)
}

/// Reads a checkpoint for `--resume`, refusing one made with other arguments (the error
/// names the argument and both values).
pub fn load(dir: &Path, args: &TrainArgs) -> Result<(TrainerState, AdamState)> {
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path)
        .with_context(|| format!("--resume: reading {}", state_path.display()))?;
    let state: TrainerState = serde_json::from_str(&text)
        .with_context(|| format!("--resume: {} is not a trainer state", state_path.display()))?;
    let now = arguments(args);
    for (name, then) in &state.arguments {
        let given = now.get(name).map_or("(absent)", String::as_str);
        if given != then {
            bail!(
                "--resume {}: the checkpoint was trained with {name} {then}, this run has {name} {given}",
                dir.display()
            );
        }
    }
    if state.step >= args.steps || state.losses.len() != state.step {
        bail!(
            "--resume {}: the checkpoint is at step {} with {} losses; --steps is {}",
            dir.display(),
            state.step,
            state.losses.len(),
            args.steps
        );
    }
    let opt_path = dir.join(OPTIMIZER_FILE);
    let mut tensors = lora::io::read_safetensors(&opt_path)
        .with_context(|| format!("--resume: reading {}", opt_path.display()))?;
    let n = tensors.len() / 2;
    let mut take = |key: String| -> Result<HostTensor> {
        tensors
            .remove(&key)
            .with_context(|| format!("--resume: {} has no tensor {key}", opt_path.display()))
    };
    let mut adam = AdamState {
        step: state.adam_step,
        m: Vec::with_capacity(n),
        v: Vec::with_capacity(n),
    };
    for i in 0..n {
        adam.m.push(take(format!("exp_avg.{i}"))?);
        adam.v.push(take(format!("exp_avg_sq.{i}"))?);
    }
    if let Some(extra) = tensors.keys().next() {
        bail!(
            "--resume: {} has an unexpected tensor {extra}",
            opt_path.display()
        );
    }
    Ok((state, adam))
}
