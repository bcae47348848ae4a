//! Loading a decoder LLM for `lora score` and `lora generate`: the checkpoint, its
//! `tokenizer.json`, and an optional PEFT adapter.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use lora::models::decoder::{DecoderModel, DecoderTokenizer};
use lora::peft;
use lora::prelude::*;

use crate::dtype_arg::DtypeArg;

/// A decoder model with its tokenizer.
pub struct LoadedDecoder<B: FullBackend> {
    pub model: DecoderModel<B>,
    pub tokenizer: DecoderTokenizer,
}

/// `tokenizer.json` in the model directory.
fn tokenizer_path(model: &Path) -> PathBuf {
    model.join("tokenizer.json")
}

/// Loads `model` (a Hugging Face model directory), its frozen weights stored as `dtype`,
/// and the adapter in `adapter`, if any.
pub fn load<B: QuantBackend>(
    b: &B,
    model: &Path,
    adapter: Option<&Path>,
    dtype: DtypeArg,
) -> Result<LoadedDecoder<B>> {
    let tok = tokenizer_path(model);
    if !tok.is_file() {
        anyhow::bail!(
            "{}: no tokenizer.json in the model directory (lora score/generate tokenize with the checkpoint's own tokenizer)",
            tok.display()
        );
    }
    let tokenizer = DecoderTokenizer::from_file(&tok)?;
    let mut model_ = DecoderModel::from_pretrained_as(b, model, dtype.half(model)?)
        .with_context(|| format!("loading {}", model.display()))?;
    if let Some(a) = adapter {
        peft::load_pretrained(a, &mut model_, b)
            .with_context(|| format!("loading adapter {}", a.display()))?;
    }
    Ok(LoadedDecoder {
        model: model_,
        tokenizer,
    })
}
