//! The options every command that runs a pretrained model shares: the model directory,
//! an optional PEFT adapter, and the backend.

use std::path::PathBuf;

use clap::Args;

use crate::backend_choice::BackendKind;

/// `--model DIR [--adapter DIR] [--backend B]`.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Model directory: `config.json`, `model.safetensors` (or shards), `tokenizer.json`.
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT adapter directory to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Backend to run on.
    #[arg(long, value_enum, default_value = "ndarray")]
    pub backend: BackendKind,
}
