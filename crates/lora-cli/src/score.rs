//! `lora score`: the mean next-token negative log-likelihood and perplexity of each text
//! under a decoder LLM (optionally with a PEFT adapter), exactly as transformers computes
//! `model(ids, labels=ids).loss`.

use anyhow::{Result, bail};
use clap::Args;
use lora::models::TokenBatch;
use lora::models::decoder::causal_lm_loss;
use lora::prelude::*;

use crate::model_args::ModelArgs;
use crate::report::print_stdout;

/// Arguments of `lora score`.
#[derive(Debug, Args)]
pub struct ScoreArgs {
    /// The model, adapter and backend.
    #[command(flatten)]
    pub source: ModelArgs,
    /// Print only JSON.
    #[arg(long)]
    pub json: bool,
    /// Texts to score.
    #[arg(required = true)]
    pub texts: Vec<String>,
}

/// Runs `lora score`.
pub fn run(args: &ScoreArgs) -> Result<()> {
    crate::with_backend!(args.source.backend, |b| run_on(&b, args))
}

fn run_on<B: QuantBackend>(b: &B, args: &ScoreArgs) -> Result<()> {
    let mut loaded = crate::decoder_load::load(
        b,
        &args.source.model,
        args.source.adapter.as_deref(),
        args.source.dtype,
    )?;
    let mut results = Vec::new();
    for (i, text) in args.texts.iter().enumerate() {
        let ids = loaded.tokenizer.encode(text)?;
        if ids.len() < 2 {
            bail!(
                "text {i} ({text:?}) has {} token(s); scoring needs at least 2",
                ids.len()
            );
        }
        let n = ids.len();
        let batch = TokenBatch::new(ids.clone(), vec![1; n], 1)?;
        let logits = loaded.model.logits(b, &batch, Mode::Eval)?;
        let labels: Vec<i64> = ids.iter().map(|&v| v as i64).collect();
        let (nll, _) = causal_lm_loss(b, &logits, &labels, 1, n)?;
        results.push(serde_json::json!({
            "text": text,
            "tokens": n,
            "mean_nll": nll,
            "perplexity": nll.exp(),
        }));
    }
    let mut out = String::new();
    if args.json {
        out.push_str(&serde_json::to_string(
            &serde_json::json!({ "results": results }),
        )?);
        out.push('\n');
    } else {
        for r in &results {
            out.push_str(&format!(
                "{}  tokens {}  mean NLL {:.4}  perplexity {:.3}\n",
                r["text"],
                r["tokens"],
                r["mean_nll"].as_f64().unwrap_or(f64::NAN),
                r["perplexity"].as_f64().unwrap_or(f64::NAN)
            ));
        }
    }
    print_stdout(&out);
    Ok(())
}
