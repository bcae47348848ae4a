//! `lora generate`: continue a prompt with a decoder LLM (optionally with a PEFT adapter),
//! streaming tokens to stdout as they are produced; greedy at temperature 0, else
//! sampled with top-k / top-p and a seed.

use std::io::Write;

use anyhow::Result;
use clap::Args;
use lora::models::decoder::{GenerationConfig, generate};
use lora::prelude::*;

use crate::model_args::ModelArgs;
use crate::report::print_stdout;

/// Arguments of `lora generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The model, adapter and backend.
    #[command(flatten)]
    pub source: ModelArgs,
    /// New tokens at most.
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Sample from the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling threshold (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print only JSON (no streaming).
    #[arg(long)]
    pub json: bool,
    /// The prompt.
    pub prompt: String,
}

/// Runs `lora generate`.
pub fn run(args: &GenerateArgs) -> Result<()> {
    crate::with_backend!(args.source.backend, |b| run_on(&b, args))
}

fn run_on<B: QuantBackend>(b: &B, args: &GenerateArgs) -> Result<()> {
    let mut loaded = crate::decoder_load::load(
        b,
        &args.source.model,
        args.source.adapter.as_deref(),
        args.source.dtype,
    )?;
    let prompt_ids = loaded.tokenizer.encode(&args.prompt)?;
    let cfg = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        eos_token_ids: loaded.model.config().eos_token_ids.clone(),
    };
    let tokenizer = &loaded.tokenizer;
    let mut so_far: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let stream = !args.json;
    if stream {
        print!("{}", args.prompt);
    }
    let generated = generate(&mut loaded.model, b, &prompt_ids, &cfg, |id| {
        if stream {
            // Decode the whole continuation and print what is new, so multi-byte
            // characters split across tokens come out whole.
            so_far.push(id);
            let text = tokenizer.decode(&so_far)?;
            if text.len() > printed && text.is_char_boundary(printed) {
                print!("{}", &text[printed..]);
                let _ = std::io::stdout().flush();
                printed = text.len();
            }
        }
        Ok(())
    })?;
    let text = tokenizer.decode(&generated)?;
    if args.json {
        let out = serde_json::json!({
            "prompt_ids": prompt_ids,
            "generated_ids": generated,
            "text": text,
        });
        print_stdout(&format!("{}\n", serde_json::to_string(&out)?));
    } else {
        println!();
    }
    Ok(())
}
