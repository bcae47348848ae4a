//! `config.json` of a Hugging Face BERT-family checkpoint.

use std::path::Path;

use serde::Deserialize;

use crate::error::{ModelError, Result};

/// The fields of a transformers `BertConfig` that change the computation. Other fields
/// (dropout probabilities, `initializer_range`, ...) are read and ignored.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct BertConfig {
    /// Tokens in the vocabulary.
    pub vocab_size: usize,
    /// Hidden width.
    pub hidden_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// The feed-forward activation; `gelu` (erf form) and `relu` are supported.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Longest sequence the position embeddings cover.
    pub max_position_embeddings: usize,
    /// Token types (segments).
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// `bert` (checked).
    #[serde(default)]
    pub model_type: Option<String>,
    /// Only `absolute` is supported.
    #[serde(default)]
    pub position_embedding_type: Option<String>,
    /// Architectures named by the checkpoint (informational).
    #[serde(default)]
    pub architectures: Vec<String>,
    /// The padding token, whose word-embedding row gets no gradient (transformers'
    /// `padding_idx`; `BertConfig`'s default 0).
    #[serde(default = "default_pad")]
    pub pad_token_id: Option<usize>,
}

fn default_pad() -> Option<usize> {
    Some(0)
}

fn default_act() -> String {
    "gelu".into()
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

impl BertConfig {
    /// Reads and checks `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        let config: BertConfig = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: path.display().to_string(),
            field: "config.json".into(),
            reason: e.to_string(),
        })?;
        config.validate(&path.display().to_string())?;
        Ok(config)
    }

    /// Checks the architecture is one this implementation computes exactly.
    pub fn validate(&self, path: &str) -> Result<()> {
        let bad = |field: &str, reason: String| ModelError::Config {
            path: path.to_string(),
            field: field.to_string(),
            reason,
        };
        if let Some(t) = &self.model_type
            && t != "bert"
        {
            return Err(bad(
                "model_type",
                format!("{t:?} is not supported (this is a BERT encoder: model_type \"bert\")"),
            ));
        }
        if !matches!(self.hidden_act.as_str(), "gelu" | "relu") {
            return Err(bad(
                "hidden_act",
                format!("{:?} is not supported (gelu, relu)", self.hidden_act),
            ));
        }
        if let Some(p) = &self.position_embedding_type
            && p != "absolute"
        {
            return Err(bad(
                "position_embedding_type",
                format!("{p:?} is not supported (absolute)"),
            ));
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(bad(
                "num_attention_heads",
                format!(
                    "{} heads do not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            ));
        }
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ] {
            if v == 0 {
                return Err(bad(field, "must be at least 1".into()));
            }
        }
        Ok(())
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> BertConfig {
        match serde_json::from_str(json) {
            Ok(c) => c,
            Err(e) => panic!("{e}: {json}"),
        }
    }

    const MINI: &str = r#"{"model_type": "bert", "vocab_size": 64, "hidden_size": 16,
        "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
        "max_position_embeddings": 32, "type_vocab_size": 2, "hidden_act": "gelu"}"#;

    #[test]
    fn a_bert_config_parses_with_transformers_defaults() {
        let c = parse(MINI);
        assert!(c.validate("config.json").is_ok());
        assert_eq!(c.head_dim(), 8);
        assert_eq!(c.layer_norm_eps, 1e-12);
    }

    #[test]
    fn unsupported_architectures_name_the_field() {
        for (field, json) in [
            ("model_type", MINI.replace("\"bert\"", "\"llama\"")),
            ("hidden_act", MINI.replace("\"gelu\"", "\"swish\"")),
            (
                "num_attention_heads",
                MINI.replace("\"num_attention_heads\": 2", "\"num_attention_heads\": 3"),
            ),
            (
                "vocab_size",
                MINI.replace("\"vocab_size\": 64", "\"vocab_size\": 0"),
            ),
        ] {
            match parse(&json).validate("m/config.json") {
                Err(e) => {
                    let msg = e.to_string();
                    assert!(
                        msg.contains(field) && msg.contains("m/config.json"),
                        "{msg}"
                    );
                }
                Ok(()) => panic!("{field}: accepted {json}"),
            }
        }
    }
}
