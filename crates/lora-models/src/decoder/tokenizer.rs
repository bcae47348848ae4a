//! A decoder checkpoint's `tokenizer.json` through Hugging Face's `tokenizers` crate: the
//! special tokens its post-processor adds (Llama's `<s>`), and decoding back to text.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::error::{ModelError, Result};

/// The tokenizer of a decoder LLM.
#[derive(Debug)]
pub struct DecoderTokenizer {
    inner: Tokenizer,
    path: String,
}

impl DecoderTokenizer {
    /// Loads `tokenizer.json` (e.g. `<model dir>/tokenizer.json`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = Tokenizer::from_file(path).map_err(|e| ModelError::Tokenizer {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok(DecoderTokenizer {
            inner,
            path: path.display().to_string(),
        })
    }

    /// Token ids of `text` with the special tokens the post-processor adds, as
    /// `tokenizer(text)` gives them in Python. An empty text is an error.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        if text.is_empty() {
            return Err(ModelError::Input("the text is empty".into()));
        }
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| self.error(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` without special tokens (a completion appended to a prompt).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| self.error(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| self.error(e.to_string()))
    }

    /// The id of a token such as `<pad>`, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    fn error(&self, reason: String) -> ModelError {
        ModelError::Tokenizer {
            path: self.path.clone(),
            reason,
        }
    }
}
