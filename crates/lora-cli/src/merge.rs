//! `lora merge`: fold a PEFT adapter into a plain Hugging Face checkpoint.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use lora::peft::{self, OutDtype};

use crate::report::{bytes, duration, peak_rss_bytes};

/// Output dtype choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    /// Each tensor keeps the base's dtype.
    Keep,
    /// f32.
    F32,
    /// f16.
    F16,
    /// bf16.
    Bf16,
}

/// Options of `lora merge`.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Base checkpoint: a `.safetensors` file, or a model directory with `model.safetensors`
    /// or sharded files plus `model.safetensors.index.json`. A bitsandbytes-quantized base
    /// gives a quantized result (with the rounding printed).
    #[arg(long)]
    pub base: PathBuf,
    /// PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output file (one `.safetensors`), written atomically.
    #[arg(long)]
    pub out: PathBuf,
    /// Which adapter of the directory (non-default adapters live in `<dir>/<name>/`).
    #[arg(long, default_value = "default")]
    pub adapter_name: String,
    /// Dtype of the floating-point tensors written.
    #[arg(long, value_enum, default_value = "keep")]
    pub dtype: DtypeArg,
}

/// Runs `lora merge`.
pub fn run(args: &MergeArgs) -> Result<()> {
    let backend = lora::NdArray::new();
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>7} [{bar:32.cyan/blue}] {pos}/{len} tensors ({eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_prefix("merge");
    let dtype = match args.dtype {
        DtypeArg::Keep => OutDtype::Keep,
        DtypeArg::F32 => OutDtype::F32,
        DtypeArg::F16 => OutDtype::F16,
        DtypeArg::Bf16 => OutDtype::BF16,
    };
    let started = Instant::now();
    let report = peft::merge_checkpoint(
        &backend,
        &args.base,
        &args.adapter,
        &args.adapter_name,
        &args.out,
        dtype,
        &|done, total| {
            bar.set_length(total);
            bar.set_position(done);
        },
    )
    .with_context(|| {
        format!(
            "merging {} into {}",
            args.adapter.display(),
            args.base.display()
        )
    })?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "merged {} tensors ({} copied byte for byte, {} converted) into {} ({}) in {}; max |delta W| {:.3e}{}",
        report.merged.len(),
        report.copied,
        report.converted,
        args.out.display(),
        bytes(report.bytes),
        duration(secs),
        report.max_abs_delta,
        peak_rss_bytes().map_or(String::new(), |r| format!("; peak RSS {}", bytes(r))),
    );
    if let Some(r) = report.rounding {
        eprintln!(
            "the base is quantized: merged weights were re-quantized; rounding against the exact f32 merge: max |err| {:.3e} (relative to the largest weight {:.3e})",
            r.max_abs, r.max_rel
        );
    }
    Ok(())
}
