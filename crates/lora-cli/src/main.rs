//! `lora`: the lora-rs command line.

mod backend_choice;
mod demo;
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
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo::run(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
