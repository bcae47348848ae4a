//! `lora embed`: sentence embeddings from a BERT-family model (optionally with a PEFT
//! adapter), as sentence-transformers computes them for all-MiniLM-L6-v2: mean pooling
//! over the attention mask, then L2 normalization.

use anyhow::{Context, Result, bail};
use clap::Args;
use lora::models::bert::{BertModel, BertTokenizer, l2_normalize, mean_pool};
use lora::peft;
use lora::prelude::*;

use crate::model_args::ModelArgs;
use crate::report::print_stdout;

/// Options of `lora embed`.
#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// The model, adapter and backend.
    #[command(flatten)]
    pub source: ModelArgs,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Truncate texts to this many tokens ([CLS] and [SEP] included).
    #[arg(long, default_value_t = 256)]
    pub max_length: usize,
    /// Print a JSON array of arrays on stdout and nothing else.
    #[arg(long)]
    pub json: bool,
    /// The texts.
    #[arg(required = true)]
    pub texts: Vec<String>,
}

/// Runs `lora embed`.
pub fn run(args: &EmbedArgs) -> Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    crate::with_backend!(args.source.backend, |b| run_on(&b, args))
}

fn run_on<B: QuantBackend>(b: &B, args: &EmbedArgs) -> Result<()> {
    let tok = BertTokenizer::from_file(&args.source.model.join("tokenizer.json"), args.max_length)?;
    let half = args.source.dtype.half(&args.source.model)?;
    let mut model = BertModel::from_pretrained_as(b, &args.source.model, half)
        .with_context(|| format!("loading {}", args.source.model.display()))?;
    if let Some(a) = &args.source.adapter {
        peft::load_pretrained(a, &mut model, b)
            .with_context(|| format!("loading adapter {}", a.display()))?;
    }
    let hidden_size = model.config().hidden_size;
    let texts: Vec<&str> = args.texts.iter().map(String::as_str).collect();
    let mut all = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(args.batch_size) {
        let batch = tok.encode_batch(chunk)?;
        let hidden = model.forward_batch(b, &batch, Mode::Eval)?;
        let mut emb = b.to_host(&mean_pool(b, &hidden, &batch)?)?;
        l2_normalize(&mut emb, hidden_size);
        all.extend(emb.chunks(hidden_size).map(<[f32]>::to_vec));
    }
    let mut out = String::new();
    if args.json {
        out.push_str(&serde_json::to_string(&all)?);
        out.push('\n');
    } else {
        for (t, e) in texts.iter().zip(&all) {
            let vals: Vec<String> = e.iter().map(|v| format!("{v:.6}")).collect();
            out.push_str(&format!(
                "{t:?} ({} dims): [{}]\n",
                e.len(),
                vals.join(", ")
            ));
        }
    }
    print_stdout(&out);
    Ok(())
}
