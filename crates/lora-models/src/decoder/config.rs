//! `config.json` of the Llama family (`model_type` `llama`, `mistral`, `qwen2`, `qwen3`),
//! in both styles that exist: the one most published checkpoints carry (`rope_theta` plus
//! `rope_scaling`, whose type key is `type` or `rope_type`) and the one transformers 5
//! writes (`rope_parameters`).

use std::path::Path;

use serde::Deserialize;

use crate::error::{ModelError, Result};

/// The model types this decoder computes exactly as transformers does.
pub const SUPPORTED_MODEL_TYPES: [&str; 4] = ["llama", "mistral", "qwen2", "qwen3"];

/// How the rotary frequencies are scaled (`rope_type`).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Positions divided by `factor` (`linear`).
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// NTK-aware scaling of the base once a sequence exceeds `max_position_embeddings`
    /// (`dynamic`).
    Dynamic {
        /// The scaling factor.
        factor: f64,
    },
    /// Llama 3.1's band-wise scaling (`llama3`).
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f64,
        /// Wavelengths above `original / low_freq_factor` are divided by `factor`.
        low_freq_factor: f64,
        /// Wavelengths below `original / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The pretraining context length.
        original_max_position_embeddings: f64,
    },
}

/// The checked configuration of a decoder LLM.
#[derive(Clone, Debug, PartialEq)]
pub struct DecoderConfig {
    /// `llama`, `mistral`, `qwen2` or `qwen3`.
    pub model_type: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than the query heads).
    pub num_key_value_heads: usize,
    /// Width of one head (`head_dim`, else `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    /// Length of the position table the model was trained for.
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Biases on q/k/v (Qwen2 always; `attention_bias` elsewhere).
    pub qkv_bias: bool,
    /// Bias on `o_proj` (`attention_bias`).
    pub o_bias: bool,
    /// Biases in the MLP (`mlp_bias`).
    pub mlp_bias: bool,
    /// Qwen3's per-head RMSNorm on queries and keys.
    pub qk_norm: bool,
    /// `lm_head` shares the token embedding.
    pub tie_word_embeddings: bool,
    /// Sliding-window attention width, when the model uses one.
    pub sliding_window: Option<usize>,
    /// End-of-sequence token ids.
    pub eos_token_ids: Vec<u32>,
    /// The padding token, whose embedding row `nn.Embedding(padding_idx=...)` never
    /// gives a gradient.
    pub pad_token_id: Option<u32>,
}

/// `config.json` as written, before checking.
#[derive(Debug, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    rope_parameters: Option<serde_json::Value>,
    attention_bias: Option<bool>,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default)]
    tie_word_embeddings: bool,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    partial_rotary_factor: Option<f64>,
    eos_token_id: Option<serde_json::Value>,
    pad_token_id: Option<serde_json::Value>,
}

fn default_act() -> String {
    "silu".into()
}
fn default_max_pos() -> usize {
    2048
}
fn default_eps() -> f64 {
    1e-6
}

impl DecoderConfig {
    /// Reads and checks `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Parses and checks a `config.json` text (`path` names it in errors).
    pub fn from_json(text: &str, path: &str) -> Result<Self> {
        let bad = |field: &str, reason: String| ModelError::Config {
            path: path.to_string(),
            field: field.to_string(),
            reason,
        };
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| bad("config.json", e.to_string()))?;
        let model_type = raw.model_type.clone().unwrap_or_default();
        if !SUPPORTED_MODEL_TYPES.contains(&model_type.as_str()) {
            return Err(bad(
                "model_type",
                format!("{model_type:?} is not supported (supported: {SUPPORTED_MODEL_TYPES:?})"),
            ));
        }
        if raw.hidden_act != "silu" {
            return Err(bad(
                "hidden_act",
                format!("{:?} is not supported (silu)", raw.hidden_act),
            ));
        }
        if let Some(f) = raw.partial_rotary_factor.filter(|f| *f != 1.0) {
            return Err(bad(
                "partial_rotary_factor",
                format!("{f} is not supported (1.0)"),
            ));
        }
        for (field, v) in [
            ("vocab_size", raw.vocab_size),
            ("hidden_size", raw.hidden_size),
            ("intermediate_size", raw.intermediate_size),
            ("num_hidden_layers", raw.num_hidden_layers),
            ("num_attention_heads", raw.num_attention_heads),
            ("max_position_embeddings", raw.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(bad(field, "must be at least 1".into()));
            }
        }
        let kv = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        if kv == 0 || !raw.num_attention_heads.is_multiple_of(kv) {
            return Err(bad(
                "num_key_value_heads",
                format!(
                    "{kv} does not divide num_attention_heads {}",
                    raw.num_attention_heads
                ),
            ));
        }
        let head_dim = raw
            .head_dim
            .unwrap_or(raw.hidden_size / raw.num_attention_heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(bad(
                "head_dim",
                format!("{head_dim}: rotary embedding needs an even head size"),
            ));
        }
        // Projection widths are products of claims: they must not overflow (they size the
        // expected weight shapes that the checkpoint's tensors are compared with).
        for (field, heads) in [
            ("num_attention_heads", raw.num_attention_heads),
            ("num_key_value_heads", kv),
        ] {
            if heads
                .checked_mul(head_dim)
                .and_then(|w| w.checked_mul(raw.hidden_size))
                .is_none()
            {
                return Err(bad(
                    field,
                    format!(
                        "{heads} heads of head_dim {head_dim} by hidden_size {} overflow",
                        raw.hidden_size
                    ),
                ));
            }
        }
        let (rope_theta, rope_scaling) = rope_settings(&raw, &bad)?;
        let qwen2 = model_type == "qwen2";
        let sliding_window = match raw.use_sliding_window {
            Some(false) => None,
            _ => raw.sliding_window,
        };
        Ok(DecoderConfig {
            qkv_bias: raw.attention_bias.unwrap_or(false) || qwen2,
            o_bias: raw.attention_bias.unwrap_or(false),
            qk_norm: model_type == "qwen3",
            model_type,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads: kv,
            head_dim,
            max_position_embeddings: raw.max_position_embeddings,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta,
            rope_scaling,
            mlp_bias: raw.mlp_bias,
            tie_word_embeddings: raw.tie_word_embeddings,
            sliding_window,
            eos_token_ids: token_ids(raw.eos_token_id.as_ref()),
            pad_token_id: token_ids(raw.pad_token_id.as_ref()).first().copied(),
        })
    }
}

/// An int or a list of ints.
fn token_ids(v: Option<&serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|n| vec![n as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|n| n as u32))
            .collect(),
        _ => Vec::new(),
    }
}

/// `rope_theta` and the scaling from either `rope_parameters` (transformers 5) or
/// `rope_theta` + `rope_scaling` (type key `type` or `rope_type`).
fn rope_settings(
    raw: &RawConfig,
    bad: &dyn Fn(&str, String) -> ModelError,
) -> Result<(f64, RopeScaling)> {
    let (field, params) = match (&raw.rope_parameters, &raw.rope_scaling) {
        (Some(p), _) => ("rope_parameters", Some(p)),
        (None, Some(s)) if !s.is_null() => ("rope_scaling", Some(s)),
        _ => ("rope_scaling", None),
    };
    let theta = params
        .and_then(|p| p.get("rope_theta"))
        .and_then(serde_json::Value::as_f64)
        .or(raw.rope_theta)
        .unwrap_or(10000.0);
    let Some(p) = params else {
        return Ok((theta, RopeScaling::Default));
    };
    let kind = p
        .get("rope_type")
        .or_else(|| p.get("type"))
        .and_then(serde_json::Value::as_str)
        .unwrap_or("default");
    let num = |key: &str| -> Result<f64> {
        p.get(key)
            .and_then(serde_json::Value::as_f64)
            .ok_or_else(|| {
                bad(
                    &format!("{field}.{key}"),
                    format!("missing for rope_type {kind:?}"),
                )
            })
    };
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: num("factor")?,
        },
        "dynamic" => RopeScaling::Dynamic {
            factor: num("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        },
        other => {
            return Err(bad(
                &format!("{field}.rope_type"),
                format!("{other:?} is not supported (default, linear, dynamic, llama3)"),
            ));
        }
    };
    Ok((theta, scaling))
}
