//! `lora combine`: several PEFT adapters into one, by PEFT's `add_weighted_adapter` rules
//! (`linear`, `cat`, `ties`, `magnitude_prune`, `dare_linear`, `dare_ties`, and the SVD-based
//! `svd`, `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd`).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use lora::ops::{MajoritySign, TaskMerge, TaskMethod};
use lora::peft::{self, Combination, SvdCombination};

/// `--combination-type` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum CombinationArg {
    /// Same ranks; factors weighted by the square roots of the weights.
    Linear,
    /// Ranks concatenated: exactly the weighted sum of the deltas.
    Cat,
    /// TIES: prune by magnitude to `--density`, elect signs, disjoint mean.
    Ties,
    /// Prune by magnitude to `--density`, weighted sum.
    MagnitudePrune,
    /// DARE: random pruning to `--density` (rescaled), weighted sum.
    DareLinear,
    /// DARE's pruning with TIES' sign election.
    DareTies,
    /// The weighted sum of the deltas, cut to `--svd-rank` by an SVD (any source ranks).
    Svd,
    /// TIES on the deltas, then the SVD.
    TiesSvd,
    /// Magnitude pruning on the deltas, then the SVD.
    MagnitudePruneSvd,
    /// DARE on the deltas, then the SVD.
    DareLinearSvd,
    /// DARE with TIES' sign election on the deltas, then the SVD.
    DareTiesSvd,
}

/// `--majority-sign-method` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MajorityArg {
    /// The sign of the sum.
    Total,
    /// The most frequent sign.
    Frequency,
}

/// Options of `lora combine`.
#[derive(Debug, Args)]
pub struct CombineArgs {
    /// A PEFT adapter directory; give two or more.
    #[arg(long = "adapter", required = true)]
    pub adapters: Vec<PathBuf>,
    /// One weight per adapter, comma-separated (`0.7,-0.3`).
    #[arg(
        long,
        value_delimiter = ',',
        required = true,
        allow_hyphen_values = true
    )]
    pub weights: Vec<f32>,
    /// How to combine (PEFT's `combination_type`).
    #[arg(long, value_enum, default_value = "cat")]
    pub combination_type: CombinationArg,
    /// Fraction of values kept by the pruning methods, in [0, 1].
    #[arg(long, default_value_t = 1.0)]
    pub density: f32,
    /// Sign election of the TIES methods.
    #[arg(long, value_enum, default_value = "total")]
    pub majority_sign_method: MajorityArg,
    /// Seed of DARE's random masks.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Rank of the SVD-based combinations (default: the largest source rank).
    #[arg(long)]
    pub svd_rank: Option<usize>,
    /// Clip the SVD factors to this quantile of their values, in (0, 1].
    #[arg(long)]
    pub svd_clamp: Option<f32>,
    /// Output adapter directory.
    #[arg(long)]
    pub out: PathBuf,
}

impl CombineArgs {
    fn combination(&self) -> Result<Combination> {
        let task = |method| {
            Combination::Task(TaskMerge {
                method,
                density: self.density,
                majority_sign: match self.majority_sign_method {
                    MajorityArg::Total => MajoritySign::Total,
                    MajorityArg::Frequency => MajoritySign::Frequency,
                },
                seed: self.seed,
            })
        };
        let svd = |method: Option<TaskMethod>| {
            let merge = method.map(|m| match task(m) {
                Combination::Task(t) => t,
                _ => unreachable!("task() builds a Task"),
            });
            Combination::Svd(SvdCombination {
                merge,
                rank: self.svd_rank,
                clamp: self.svd_clamp,
            })
        };
        let combination = match self.combination_type {
            CombinationArg::Linear => Combination::Linear,
            CombinationArg::Cat => Combination::Cat,
            CombinationArg::Ties => task(TaskMethod::Ties),
            CombinationArg::MagnitudePrune => task(TaskMethod::MagnitudePrune),
            CombinationArg::DareLinear => task(TaskMethod::DareLinear),
            CombinationArg::DareTies => task(TaskMethod::DareTies),
            CombinationArg::Svd => svd(None),
            CombinationArg::TiesSvd => svd(Some(TaskMethod::Ties)),
            CombinationArg::MagnitudePruneSvd => svd(Some(TaskMethod::MagnitudePrune)),
            CombinationArg::DareLinearSvd => svd(Some(TaskMethod::DareLinear)),
            CombinationArg::DareTiesSvd => svd(Some(TaskMethod::DareTies)),
        };
        let is_svd = matches!(combination, Combination::Svd(_));
        if !is_svd && (self.svd_rank.is_some() || self.svd_clamp.is_some()) {
            bail!(
                "--svd-rank and --svd-clamp apply to the SVD-based combinations only, not to --combination-type {}",
                combination.name()
            );
        }
        Ok(combination)
    }
}

/// Runs `lora combine`.
pub fn run(args: &CombineArgs) -> Result<()> {
    if args.weights.len() != args.adapters.len() {
        bail!(
            "--weights has {} values for {} --adapter directories",
            args.weights.len(),
            args.adapters.len()
        );
    }
    if let Some(w) = args.weights.iter().find(|w| !w.is_finite()) {
        bail!("--weights: {w} is not a finite number");
    }
    let combination = args.combination()?;
    let sources: Vec<(&std::path::Path, f32)> = args
        .adapters
        .iter()
        .map(PathBuf::as_path)
        .zip(args.weights.iter().copied())
        .collect();
    let config =
        peft::combine_adapter_dirs(&lora::NdArray::new(), &sources, combination, &args.out)
            .with_context(|| format!("combining into {}", args.out.display()))?;
    println!(
        "lora combine: {} adapters by {} into {} (r={}, lora_alpha={})",
        sources.len(),
        combination.name(),
        args.out.display(),
        config.r,
        config.lora_alpha
    );
    Ok(())
}
