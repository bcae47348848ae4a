//! `lora quantize` and `lora dequantize`: checkpoints to and from bitsandbytes' layout.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lora::io::QuantTargets;
use lora::peft::{self, TargetModules};
use lora::quant::{QuantConfig, QuantFormat};

use crate::report::{bytes, duration, peak_rss_bytes, thousands};

/// Options of `lora quantize`.
#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// Input checkpoint: a `.safetensors` file or a model directory (sharded or not).
    #[arg(long = "in")]
    pub input: PathBuf,
    /// Output `.safetensors` file, written atomically. Named `model.safetensors` in another
    /// directory, it also gets the model's `config.json` with a `quantization_config`.
    #[arg(long)]
    pub out: PathBuf,
    /// nf4, fp4 or int8.
    #[arg(long)]
    pub format: String,
    /// Values per block for 4-bit formats (a power of two, 32..4096).
    #[arg(long, default_value_t = 64)]
    pub blocksize: usize,
    /// Quantize the 4-bit scales too (QLoRA's double quantization).
    #[arg(long)]
    pub double_quant: bool,
    /// Modules to quantize: comma-separated names (PEFT suffix matching) or one regex.
    /// Default: every 2-D linear `.weight` except embeddings and output heads.
    #[arg(long)]
    pub target_modules: Option<String>,
}

/// Options of `lora dequantize`.
#[derive(Debug, Args)]
pub struct DequantizeArgs {
    /// Quantized checkpoint (bitsandbytes layout).
    #[arg(long = "in")]
    pub input: PathBuf,
    /// Output `.safetensors` file with plain float weights, written atomically.
    #[arg(long)]
    pub out: PathBuf,
}

fn targets(arg: &Option<String>) -> QuantTargets {
    match arg {
        None => QuantTargets::AllLinear,
        // PEFT reads a string as a regex and a list as names; a comma means a list here.
        Some(s)
            if s.contains(',')
                || s.chars()
                    .all(|c| c.is_alphanumeric() || c == '_' || c == '.') =>
        {
            peft::quant_targets(TargetModules::List(
                s.split(',')
                    .map(|p| p.trim().to_string())
                    .filter(|p| !p.is_empty())
                    .collect(),
            ))
        }
        Some(s) => peft::quant_targets(TargetModules::Pattern(s.clone())),
    }
}

/// Runs `lora quantize`.
pub fn run_quantize(args: &QuantizeArgs) -> Result<()> {
    let format: QuantFormat = args.format.parse()?;
    let config = QuantConfig {
        format,
        blocksize: args.blocksize,
        double_quant: args.double_quant && format != QuantFormat::Int8,
    };
    config.validate()?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>9} [{bar:32.cyan/blue}] {pos}/{len} weights ({eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_prefix("quantize");
    let started = Instant::now();
    let report = lora::io::quantize_checkpoint(
        &args.input,
        &args.out,
        &config,
        &targets(&args.target_modules),
        &|done, total| {
            bar.set_length(total);
            bar.set_position(done);
        },
    )
    .with_context(|| format!("quantizing {}", args.input.display()))?;
    bar.finish_and_clear();
    let dq = if config.double_quant {
        ", double quantization"
    } else {
        ""
    };
    let bs = if format == QuantFormat::Int8 {
        String::new()
    } else {
        format!(", blocksize {}", config.blocksize)
    };
    println!(
        "quantized {} weights ({} values) to {format}{bs}{dq}: {} -> {} ({:.3} bits per parameter); {} tensors copied; wrote {} in {}{}",
        report.quantized.len(),
        thousands(report.quantized_values),
        bytes(report.bytes_before as u64),
        bytes(report.bytes_after as u64),
        report.bits_per_parameter(),
        report.copied,
        args.out.display(),
        duration(started.elapsed().as_secs_f64()),
        peak_rss_bytes().map_or(String::new(), |r| format!("; peak RSS {}", bytes(r))),
    );
    Ok(())
}

/// Runs `lora dequantize`.
pub fn run_dequantize(args: &DequantizeArgs) -> Result<()> {
    let started = Instant::now();
    let report = lora::io::dequantize_checkpoint(&args.input, &args.out)
        .with_context(|| format!("dequantizing {}", args.input.display()))?;
    println!(
        "dequantized {} weights ({} values): {} -> {}; {} tensors copied; wrote {} in {}",
        report.quantized.len(),
        thousands(report.quantized_values),
        bytes(report.bytes_before as u64),
        bytes(report.bytes_after as u64),
        report.copied,
        args.out.display(),
        duration(started.elapsed().as_secs_f64()),
    );
    Ok(())
}
