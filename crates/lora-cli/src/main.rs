//! `lora`: the lora-rs command line.

mod alloc;
mod backend_choice;
mod checkpoint;
mod combine;
mod decoder_load;
mod demo;
mod dtype_arg;
mod embed;
mod generate;
mod inspect;
mod merge;
mod model_args;
mod plots;
mod quant_arg;
mod quantize;
mod report;
mod score;
mod sentiment_data;
mod train;
mod train_lm;

use clap::{Parser, Subcommand};

/// LoRA fine-tuning in Rust.
#[derive(Debug, Parser)]
#[command(name = "lora", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Pretrain a small MLP on sin(x), freeze it, LoRA-fine-tune it on a shifted task, save
    /// a PEFT adapter and plots, then reload, merge and verify.
    Demo(demo::DemoArgs),
    /// Sentence embeddings from a BERT-family model (mean pooling, L2-normalized), with an
    /// optional PEFT adapter.
    Embed(embed::EmbedArgs),
    /// LoRA-fine-tune all-MiniLM-L6-v2 on the VADER sentiment lexicon (positive vs
    /// negative words), with a progress bar, charts and before/after accuracy.
    Train(train::TrainArgs),
    /// Fold a PEFT adapter into a plain Hugging Face checkpoint (streamed, atomic).
    Merge(merge::MergeArgs),
    /// Combine PEFT adapters into one (linear, cat, ties, magnitude_prune, dare_linear,
    /// dare_ties), as PEFT's add_weighted_adapter.
    Combine(combine::CombineArgs),
    /// Show an adapter directory (config, per-module ranks, scalings, sizes) or a
    /// checkpoint (tensors, quantized modules, bits per parameter).
    Inspect(inspect::InspectArgs),
    /// Quantize a checkpoint's linear weights to NF4 / FP4 / int8 in bitsandbytes' layout.
    Quantize(quantize::QuantizeArgs),
    /// Turn a bitsandbytes-quantized checkpoint back into plain float weights.
    Dequantize(quantize::DequantizeArgs),
    /// Mean next-token NLL and perplexity of texts under a decoder LLM (Llama, Mistral,
    /// Qwen2, Qwen3), with an optional PEFT adapter.
    Score(score::ScoreArgs),
    /// Continue a prompt with a decoder LLM, streaming tokens (greedy or sampled).
    Generate(generate::GenerateArgs),
}

fn main() -> std::process::ExitCode {
    alloc::keep_freed_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo::run(&args),
        Command::Merge(args) => merge::run(&args),
        Command::Combine(args) => combine::run(&args),
        Command::Embed(args) => embed::run(&args),
        Command::Train(args) => train::run(&args),
        Command::Inspect(args) => inspect::run(&args),
        Command::Quantize(args) => quantize::run_quantize(&args),
        Command::Dequantize(args) => quantize::run_dequantize(&args),
        Command::Score(args) => score::run(&args),
        Command::Generate(args) => generate::run(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
