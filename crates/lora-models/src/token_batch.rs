//! A padded batch of token sequences, shared by every model family.

use crate::error::{ModelError, Result};

/// A batch of token sequences, padded to the longest (row-major `[batch, seq_len]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBatch {
    /// Token ids.
    pub ids: Vec<u32>,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<u32>,
    /// Segment ids (0 for single sentences).
    pub token_type_ids: Vec<u32>,
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence after padding.
    pub seq_len: usize,
}

impl TokenBatch {
    /// A batch from explicit ids and mask (token types 0), e.g. from a fixture.
    pub fn new(ids: Vec<u32>, attention_mask: Vec<u32>, batch: usize) -> Result<Self> {
        if batch == 0 || !ids.len().is_multiple_of(batch) || ids.len() != attention_mask.len() {
            return Err(ModelError::Input(format!(
                "token batch: {} ids and {} mask values do not form {batch} sequences",
                ids.len(),
                attention_mask.len()
            )));
        }
        let seq_len = ids.len() / batch;
        Ok(TokenBatch {
            token_type_ids: vec![0; ids.len()],
            ids,
            attention_mask,
            batch,
            seq_len,
        })
    }

    /// A batch from token ids held as numbers in a `[batch, seq]` tensor, every token
    /// attended (the `Model::forward` entry point of the token models).
    pub fn from_id_tensor<B: lora_core::Backend>(
        b: &B,
        x: &B::Tensor,
        context: &str,
    ) -> lora_core::Result<Self> {
        use lora_core::Tensor;
        let dims = x.shape().dims().to_vec();
        let [batch, seq] = dims[..] else {
            return Err(lora_core::Error::shape(
                format!("{context} token ids"),
                "[batch, seq]",
                x.shape(),
            ));
        };
        let ids: Vec<u32> = b.to_host(x)?.iter().map(|&v| v as u32).collect();
        TokenBatch::new(ids, vec![1; batch * seq], batch)
            .map_err(|e| lora_core::Error::state(context, e.to_string()))
    }

    /// Rows `range` of the batch.
    pub fn rows(&self, range: std::ops::Range<usize>) -> TokenBatch {
        let (a, b) = (range.start * self.seq_len, range.end * self.seq_len);
        TokenBatch {
            ids: self.ids[a..b].to_vec(),
            attention_mask: self.attention_mask[a..b].to_vec(),
            token_type_ids: self.token_type_ids[a..b].to_vec(),
            batch: range.len(),
            seq_len: self.seq_len,
        }
    }
}
