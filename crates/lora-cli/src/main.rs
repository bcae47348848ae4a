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
mod train;
mod train_lm;

use clap::{Parser, Subcommand};
use lora_cli::sentiment_data;

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
            eprintln!("error: {}", error_text(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes joined by ": ", each cause left out when the text so far
/// already says it (our error types print their source in their own message, so anyhow's
/// `{:#}` repeated it: "x.json: No such file or directory (os error 2): No such file or
/// directory (os error 2)").
fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if text.contains(&c) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&c);
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn causes_already_in_the_message_are_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let e = anyhow::Error::new(lora::io::Error::Io {
            path: "a.json".into(),
            source: io,
        })
        .context("--resume: loading the adapter in d");
        assert_eq!(
            super::error_text(&e),
            "--resume: loading the adapter in d: a.json: No such file"
        );
    }
}
