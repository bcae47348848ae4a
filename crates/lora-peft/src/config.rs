//! `LoraConfig`: PEFT's `adapter_config.json`, field for field.

use std::collections::BTreeMap;
use std::path::Path;

use lora_core::{LoraInit, LoraSpec};
use serde::{Deserialize, Serialize};

use crate::error::{PeftError, Result};
use crate::name_patterns::pattern_value;

/// `target_modules` / `exclude_modules`: a list of names, or one regular expression
/// (`"all-linear"` is a special string).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Exact names or `.`-suffixes.
    List(Vec<String>),
    /// A regex that must match the whole module name, or `"all-linear"`.
    Pattern(String),
}

/// `init_lora_weights`: `true`, `false` or a method name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InitLoraWeights {
    /// `true` (Kaiming A, zero B) or `false` (random, not a no-op).
    Bool(bool),
    /// `"gaussian"`, `"pissa"`, `"pissa_niter_K"`, `"olora"`, `"orthogonal"`, or methods
    /// lora-rs does not implement (`"loftq"`, ...), which are refused by name.
    Method(String),
}

/// `trainable_token_indices`: token ids of the input embedding, or ids per embedding
/// module (names matched as a `.`-suffix, as PEFT matches them).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIndices {
    /// Ids in the model's input embedding.
    List(Vec<i64>),
    /// Ids per embedding module.
    PerModule(BTreeMap<String, Vec<i64>>),
}

/// An integer or a list of integers (`layers_to_transform`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum IntOrList {
    /// One index.
    One(i64),
    /// Several.
    Many(Vec<i64>),
}

/// A string or a list of strings (`layers_pattern`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StrOrList {
    /// One.
    One(String),
    /// Several.
    Many(Vec<String>),
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_bias() -> String {
    "none".into()
}
fn default_init() -> InitLoraWeights {
    InitLoraWeights::Bool(true)
}
fn default_peft_type() -> String {
    "LORA".into()
}

/// Writes whole alphas as integers (`16`, not `16.0`), as PEFT's configs have them.
fn serialize_number<S: serde::Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        s.serialize_i64(*v as i64)
    } else {
        s.serialize_f64(*v)
    }
}

fn serialize_alpha_pattern<S: serde::Serializer>(
    m: &BTreeMap<String, f64>,
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(m.len()))?;
    for (k, v) in m {
        if v.fract() == 0.0 && v.abs() < 9.0e15 {
            map.serialize_entry(k, &(*v as i64))?;
        } else {
            map.serialize_entry(k, v)?;
        }
    }
    map.end()
}

/// PEFT's `LoraConfig`, with PEFT's field names and defaults. Unknown fields (PEFT adds
/// some every release) are kept in [`LoraConfig::extra`] and written back unchanged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Always `"LORA"`.
    #[serde(default = "default_peft_type")]
    pub peft_type: String,
    /// Rank.
    #[serde(default = "default_r")]
    pub r: usize,
    /// `lora_alpha`; scaling is `lora_alpha / r` (or `/ sqrt(r)` with rsLoRA).
    #[serde(default = "default_alpha", serialize_with = "serialize_number")]
    pub lora_alpha: f64,
    /// Dropout on the LoRA input.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Which modules get adapters.
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Modules removed from the targets.
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    /// GPT-2 style `Conv1D` weights (`[in, out]`); irrelevant for `nn.Linear` layers.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// `"none"`, `"all"` or `"lora_only"`.
    #[serde(default = "default_bias")]
    pub bias: String,
    /// rsLoRA scaling.
    #[serde(default)]
    pub use_rslora: bool,
    /// Initialisation.
    #[serde(default = "default_init")]
    pub init_lora_weights: InitLoraWeights,
    /// Extra modules trained fully and saved.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Only these layer indices.
    #[serde(default)]
    pub layers_to_transform: Option<IntOrList>,
    /// The name part before the layer index.
    #[serde(default)]
    pub layers_pattern: Option<StrOrList>,
    /// Per-module rank overrides (keys are regexes).
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha overrides (keys are regexes).
    #[serde(default, serialize_with = "serialize_alpha_pattern")]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// DoRA.
    #[serde(default)]
    pub use_dora: bool,
    /// Rows of an embedding trained directly (new tokens), saved as
    /// `<module>.token_adapter.trainable_tokens_delta`.
    #[serde(default)]
    pub trainable_token_indices: Option<TokenIndices>,
    /// LoftQ's settings (`{"loftq_bits": 4, "loftq_iter": 1}`), read with
    /// `init_lora_weights: "loftq"`; PEFT writes `{}` otherwise.
    #[serde(default)]
    pub loftq_config: BTreeMap<String, serde_json::Value>,
    /// A bias on lora_B.
    #[serde(default)]
    pub lora_bias: bool,
    /// Task type (informational).
    #[serde(default)]
    pub task_type: Option<String>,
    /// The base model's name or path (informational).
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Whether the adapter was saved for inference.
    #[serde(default)]
    pub inference_mode: bool,
    /// Base model revision (informational).
    #[serde(default)]
    pub revision: Option<String>,
    /// The PEFT version that wrote the file, if any.
    #[serde(default)]
    pub peft_version: Option<String>,
    /// Fields this version does not know, kept verbatim.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            peft_type: default_peft_type(),
            r: default_r(),
            lora_alpha: default_alpha(),
            lora_dropout: 0.0,
            target_modules: None,
            exclude_modules: None,
            fan_in_fan_out: false,
            bias: default_bias(),
            use_rslora: false,
            init_lora_weights: default_init(),
            modules_to_save: None,
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            use_dora: false,
            trainable_token_indices: None,
            loftq_config: BTreeMap::new(),
            lora_bias: false,
            task_type: None,
            base_model_name_or_path: None,
            inference_mode: false,
            revision: None,
            peft_version: None,
            extra: BTreeMap::new(),
        }
    }
}

impl LoraConfig {
    /// Reads `adapter_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| PeftError::Io {
            path: path.display().to_string(),
            source,
        })?;
        // serde_path_to_error names the field a type error is in (`target_modules: data did
        // not match any variant ...`), which serde_json alone does not.
        let de = &mut serde_json::Deserializer::from_str(&text);
        let cfg: LoraConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            PeftError::Config {
                path: path.display().to_string(),
                reason: match field.as_str() {
                    "." | "" => e.inner().to_string(),
                    _ => format!("field {field}: {}", e.inner()),
                },
            }
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Range checks of the numeric fields, naming the field and the file: `r` at least 1,
    /// `lora_alpha` finite, `lora_dropout` in [0, 1), every `rank_pattern` rank at least 1
    /// and every `alpha_pattern` alpha finite. (The rank against each module's tensors is
    /// checked where the tensors are read.)
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, value: String, why: &str| PeftError::Config {
            path: path.display().to_string(),
            reason: format!("field {field} = {value}: {why}"),
        };
        if self.r == 0 {
            return Err(bad("r", "0".into(), "the rank must be at least 1"));
        }
        if !self.lora_alpha.is_finite() {
            return Err(bad(
                "lora_alpha",
                self.lora_alpha.to_string(),
                "must be finite",
            ));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(bad(
                "lora_dropout",
                self.lora_dropout.to_string(),
                "must be in [0, 1)",
            ));
        }
        if let Some((k, v)) = self.rank_pattern.iter().find(|(_, v)| **v == 0) {
            return Err(bad(
                &format!("rank_pattern.{k}"),
                v.to_string(),
                "the rank must be at least 1",
            ));
        }
        if let Some((k, v)) = self.alpha_pattern.iter().find(|(_, v)| !v.is_finite()) {
            return Err(bad(
                &format!("alpha_pattern.{k}"),
                v.to_string(),
                "must be finite",
            ));
        }
        Ok(())
    }

    /// The JSON PEFT writes: keys sorted, indent 2.
    pub fn to_json_string(&self) -> Result<String> {
        // serde_json's Map is a BTreeMap (no preserve_order), so keys come out sorted.
        let value = serde_json::to_value(self).map_err(|e| PeftError::Config {
            path: "adapter_config.json".into(),
            reason: e.to_string(),
        })?;
        serde_json::to_string_pretty(&value).map_err(|e| PeftError::Config {
            path: "adapter_config.json".into(),
            reason: e.to_string(),
        })
    }

    /// Rejects settings that would change the numbers and that lora-rs does not implement
    /// yet, naming the field.
    pub fn check_supported(&self) -> Result<()> {
        let unsupported = |field, value: String, reason: &str| {
            Err(PeftError::Unsupported {
                field,
                value,
                reason: reason.into(),
            })
        };
        if self.peft_type != "LORA" {
            return unsupported(
                "peft_type",
                self.peft_type.clone(),
                "only LORA adapters exist",
            );
        }
        if self.lora_bias {
            return unsupported(
                "lora_bias",
                "true".into(),
                "a bias on lora_B is not implemented",
            );
        }
        if self.bias != "none" {
            return unsupported(
                "bias",
                self.bias.clone(),
                "training biases is not implemented yet; use \"none\"",
            );
        }
        if let InitLoraWeights::Method(m) = &self.init_lora_weights
            && m != "gaussian"
            && crate::InitMethod::from_name(m).is_none()
        {
            return unsupported(
                "init_lora_weights",
                m.clone(),
                "supported: true, false, \"gaussian\", \"pissa\", \"pissa_niter_K\", \"olora\", \"orthogonal\", \"loftq\"",
            );
        }
        if matches!(&self.init_lora_weights, InitLoraWeights::Method(m) if m == "loftq") {
            self.loftq_settings()?;
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return unsupported(
                "modules_to_save",
                format!("{:?}", self.modules_to_save),
                "not implemented yet",
            );
        }
        Ok(())
    }

    /// `(embedding module or suffix, token ids)` of `trainable_token_indices`; a plain list
    /// applies to `input_embedding`. Negative ids are errors naming the field.
    pub fn token_targets(
        &self,
        input_embedding: Option<&str>,
    ) -> Result<Vec<(String, Vec<usize>)>> {
        let Some(spec) = &self.trainable_token_indices else {
            return Ok(Vec::new());
        };
        let ids = |v: &[i64]| -> Result<Vec<usize>> {
            v.iter()
                .map(|&i| {
                    usize::try_from(i).map_err(|_| PeftError::Unsupported {
                        field: "trainable_token_indices",
                        value: i.to_string(),
                        reason: "token ids are not negative".into(),
                    })
                })
                .collect()
        };
        match spec {
            TokenIndices::List(v) => {
                let module = input_embedding.ok_or_else(|| PeftError::Unsupported {
                    field: "trainable_token_indices",
                    value: format!("{v:?}"),
                    reason: "the model has no input embedding to train tokens of".into(),
                })?;
                Ok(vec![(module.to_string(), ids(v)?)])
            }
            TokenIndices::PerModule(m) => m.iter().map(|(k, v)| Ok((k.clone(), ids(v)?))).collect(),
        }
    }

    /// The data-driven initialisation the config asks for (`pissa`, `olora`, `loftq` with
    /// its `loftq_config`, ...), if any.
    pub fn init_method(&self) -> Option<crate::InitMethod> {
        match &self.init_lora_weights {
            InitLoraWeights::Method(m) => match crate::InitMethod::from_name(m)? {
                crate::InitMethod::Loftq { .. } => self.loftq_settings().ok(),
                other => Some(other),
            },
            InitLoraWeights::Bool(_) => None,
        }
    }

    /// `loftq_config` as an init method: `loftq_bits` 4 (NF4) or 8 (int8), `loftq_iter` at
    /// least 1 (PEFT's `LoftQConfig` defaults: 4 and 1); PEFT requires the field to be set.
    fn loftq_settings(&self) -> Result<crate::InitMethod> {
        let bad = |field: &'static str, value: String, reason: &str| PeftError::Unsupported {
            field,
            value,
            reason: reason.into(),
        };
        if self.loftq_config.is_empty() {
            return Err(bad(
                "loftq_config",
                "{}".into(),
                "init_lora_weights \"loftq\" needs loftq_config (loftq_bits, loftq_iter)",
            ));
        }
        let int = |key: &str, default: u64| match self.loftq_config.get(key) {
            None => Some(default),
            Some(v) => v.as_u64(),
        };
        let bits = int("loftq_bits", 4)
            .filter(|b| *b == 4 || *b == 8)
            .ok_or_else(|| {
                bad(
                    "loftq_config",
                    format!("{:?}", self.loftq_config.get("loftq_bits")),
                    "loftq_bits must be 4 (NF4) or 8 (int8)",
                )
            })?;
        let iters = int("loftq_iter", 1).filter(|i| *i >= 1).ok_or_else(|| {
            bad(
                "loftq_config",
                format!("{:?}", self.loftq_config.get("loftq_iter")),
                "loftq_iter must be an integer of at least 1",
            )
        })?;
        Ok(crate::InitMethod::Loftq {
            bits: bits as u8,
            iters: iters as usize,
        })
    }

    /// The adapter spec for one module, after `rank_pattern` / `alpha_pattern`.
    pub fn spec_for(&self, module: &str, seed: u64) -> Result<LoraSpec> {
        let r = match pattern_value(&self.rank_pattern, module, "rank_pattern")? {
            Some(r) => *r,
            None => self.r,
        };
        let alpha = match pattern_value(&self.alpha_pattern, module, "alpha_pattern")? {
            Some(a) => *a,
            None => self.lora_alpha,
        };
        let init = match &self.init_lora_weights {
            InitLoraWeights::Bool(true) => LoraInit::KaimingUniform,
            InitLoraWeights::Bool(false) => LoraInit::Random,
            InitLoraWeights::Method(m) if m == "gaussian" => LoraInit::Gaussian,
            // Set from the base weight after the adapter is made (`init_method`).
            InitLoraWeights::Method(m) if crate::InitMethod::from_name(m).is_some() => {
                LoraInit::KaimingUniform
            }
            InitLoraWeights::Method(m) => {
                return Err(PeftError::Unsupported {
                    field: "init_lora_weights",
                    value: m.clone(),
                    reason: "supported: true, false, \"gaussian\", \"pissa\", \"pissa_niter_K\", \"olora\", \"orthogonal\", \"loftq\"".into(),
                });
            }
        };
        Ok(LoraSpec {
            r,
            alpha: alpha as f32,
            dropout: self.lora_dropout as f32,
            use_rslora: self.use_rslora,
            init,
            seed,
        })
    }
}
