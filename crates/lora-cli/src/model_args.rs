//! The options every command that runs a pretrained model shares: the model directory,
//! an optional PEFT adapter, the backend, and the frozen weights' storage dtype.

use std::path::PathBuf;

use clap::Args;

use crate::backend_choice::BackendKind;
use crate::dtype_arg::DtypeArg;

/// `--model DIR [--adapter DIR] [--backend B] [--dtype D]`.
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
    /// Storage of the frozen weights: f32, bf16 or f16 (2 bytes per weight, products
    /// accumulate in f32), or auto (the checkpoint's dtype from config.json).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DtypeArg,
}
