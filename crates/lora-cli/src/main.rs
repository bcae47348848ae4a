//! `lora`: the lora-rs command line.

mod backend_choice;
mod demo;
mod inspect;
mod merge;
mod plots;
mod report;

use clap::{Parser, Subcommand};

// Training allocates and frees activation-sized buffers every step; mimalloc reuses them
// without the page faults glibc's mmap threshold causes (measured: docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Fold a PEFT adapter into a plain Hugging Face checkpoint (streamed, atomic).
    Merge(merge::MergeArgs),
    /// Show an adapter directory's config and per-module ranks, scalings and sizes.
    Inspect(inspect::InspectArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo::run(&args),
        Command::Merge(args) => merge::run(&args),
        Command::Inspect(args) => inspect::run(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
