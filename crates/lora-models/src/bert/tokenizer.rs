//! Tokenization with Hugging Face's `tokenizers` crate from a checkpoint's `tokenizer.json`.

use std::path::Path;

use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::error::{ModelError, Result};
pub use crate::token_batch::TokenBatch;

/// A BERT WordPiece tokenizer: `tokenizer.json` with padding to the longest sequence of
/// each batch and truncation at `max_length` tokens (special tokens included).
#[derive(Debug)]
pub struct BertTokenizer {
    inner: Tokenizer,
    path: String,
    max_length: usize,
}

impl BertTokenizer {
    /// Loads `tokenizer.json`; sequences are cut at `max_length` tokens (256 is what
    /// sentence-transformers uses for all-MiniLM-L6-v2; BERT allows 512).
    pub fn from_file(path: &Path, max_length: usize) -> Result<Self> {
        let p = path.display().to_string();
        let err = |reason: String| ModelError::Tokenizer {
            path: p.clone(),
            reason,
        };
        if !path.is_file() {
            return Err(err("no such file".into()));
        }
        if max_length < 2 {
            return Err(err(format!(
                "max_length {max_length} leaves no room for [CLS] and [SEP]"
            )));
        }
        let mut inner = Tokenizer::from_file(path).map_err(|e| err(e.to_string()))?;
        let (pad_id, pad_token) = match inner.get_padding() {
            Some(p) => (p.pad_id, p.pad_token.clone()),
            None => (inner.token_to_id("[PAD]").unwrap_or(0), "[PAD]".to_string()),
        };
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            pad_id,
            pad_token,
            ..PaddingParams::default()
        }));
        inner
            .with_truncation(Some(TruncationParams {
                max_length,
                ..TruncationParams::default()
            }))
            .map_err(|e| err(e.to_string()))?;
        Ok(BertTokenizer {
            inner,
            path: p,
            max_length,
        })
    }

    /// The truncation length.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Encodes texts with `[CLS]` / `[SEP]`, padded to the longest. An empty (or
    /// whitespace-only) text is an error naming its position.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<TokenBatch> {
        if texts.is_empty() {
            return Err(ModelError::Input("no text to encode".into()));
        }
        if let Some(i) = texts.iter().position(|t| t.trim().is_empty()) {
            return Err(ModelError::Input(format!(
                "text {i} is empty: every input needs at least one token"
            )));
        }
        let enc =
            self.inner
                .encode_batch(texts.to_vec(), true)
                .map_err(|e| ModelError::Tokenizer {
                    path: self.path.clone(),
                    reason: e.to_string(),
                })?;
        let seq_len = enc.first().map_or(0, |e| e.get_ids().len());
        let mut batch = TokenBatch {
            ids: Vec::with_capacity(texts.len() * seq_len),
            attention_mask: Vec::with_capacity(texts.len() * seq_len),
            token_type_ids: Vec::with_capacity(texts.len() * seq_len),
            batch: texts.len(),
            seq_len,
        };
        for e in &enc {
            batch.ids.extend_from_slice(e.get_ids());
            batch
                .attention_mask
                .extend_from_slice(e.get_attention_mask());
            batch.token_type_ids.extend_from_slice(e.get_type_ids());
        }
        Ok(batch)
    }
}
