//! PEFT adapter directories: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! Keys are `base_model.model.<module>.lora_A.weight` (`[r, in]`) and `.lora_B.weight`
//! (`[out, r]`); files written by PEFT may carry the adapter name
//! (`.lora_A.default.weight`) and f16/bf16 tensors, and both load here.

use std::collections::BTreeMap;
use std::path::Path;

use lora_core::lora_embedding::{EMBEDDING_A, EMBEDDING_B, TOKENS_DELTA};
use lora_core::{DEFAULT_ADAPTER, HostTensor, LoraOps, Model};
use lora_io::fs::write_atomic;
use lora_io::{read_safetensors, write_safetensors};

use crate::config::LoraConfig;
use crate::error::{PeftError, Result};
use crate::targeting::inject_adapter;

/// The config file's name.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The weights file's name.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Prefix PEFT puts before every module path (`PeftModel.base_model.model`).
pub const KEY_PREFIX: &str = "base_model.model.";

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PeftError + '_ {
    move |source| PeftError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes the adapters of `model` and `config` into `dir` as PEFT does. Each file is
/// written to a temporary name and renamed, so a failure never leaves a partial file.
pub fn save_pretrained<B: LoraOps, M: Model<B> + ?Sized>(
    dir: &Path,
    model: &M,
    backend: &B,
    config: &LoraConfig,
) -> Result<()> {
    save_adapter(dir, model, backend, config, DEFAULT_ADAPTER)
}

/// Writes the adapter named `adapter_name` of every layer into `dir` (the keys carry no
/// adapter name, as PEFT saves them). [`crate::PeftModel::save_pretrained`] puts
/// non-default adapters in `dir/<name>/`.
pub fn save_adapter<B: LoraOps, M: Model<B> + ?Sized>(
    dir: &Path,
    model: &M,
    backend: &B,
    config: &LoraConfig,
    adapter_name: &str,
) -> Result<()> {
    let mut tensors = Vec::new();
    for layer in model.linears() {
        let Some(adapter) = layer.adapter_named(adapter_name) else {
            continue;
        };
        for (name, t) in adapter.tensors() {
            tensors.push((
                tensor_key(layer.name(), name),
                HostTensor::from_backend(backend, t)?,
            ));
        }
    }
    for emb in model.embeddings() {
        let parts = emb.tensors(backend, adapter_name)?;
        // PEFT's `save_embedding_layers="auto"`: a LoRA-targeted embedding whose name the
        // config's target_modules mention (`embed_tokens`, `lm_head`) is saved whole too.
        if parts.iter().any(|(n, _)| *n == EMBEDDING_A) && saves_embedding_layers(config) {
            tensors.push((
                format!("{KEY_PREFIX}{}.{BASE_LAYER_WEIGHT}", emb.name()),
                HostTensor::from_backend(backend, emb.weight())?,
            ));
        }
        for (name, t) in parts {
            tensors.push((
                tensor_key(emb.name(), name),
                HostTensor::from_backend(backend, &t)?,
            ));
        }
    }
    if tensors.is_empty() {
        return Err(PeftError::Format {
            path: dir.display().to_string(),
            reason: format!("the model has no adapter named {adapter_name:?} to save"),
        });
    }
    write_adapter_dir(dir, &tensors, config)
}

/// Writes an adapter directory: `adapter_model.safetensors` with `tensors` (keys as PEFT
/// writes them) and `adapter_config.json`, each to a temporary name renamed into place.
pub(crate) fn write_adapter_dir(
    dir: &Path,
    tensors: &[(String, HostTensor)],
    config: &LoraConfig,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    write_safetensors(&dir.join(WEIGHTS_FILE), tensors)?;
    write_atomic(&dir.join(CONFIG_FILE), config.to_json_string()?.as_bytes())?;
    Ok(())
}

/// Key suffix of a whole embedding table saved with an embedding's LoRA.
pub const BASE_LAYER_WEIGHT: &str = "base_layer.weight";

/// PEFT's `save_embedding_layers="auto"` rule: true when `target_modules` names one of
/// `embed_tokens` / `lm_head` (for a regex, when its text contains one) and no trainable
/// tokens are configured.
fn saves_embedding_layers(config: &LoraConfig) -> bool {
    const EMBEDDING_LAYER_NAMES: [&str; 2] = ["embed_tokens", "lm_head"];
    if config.trainable_token_indices.is_some() {
        return false;
    }
    match &config.target_modules {
        Some(crate::TargetModules::List(l)) => l
            .iter()
            .any(|k| EMBEDDING_LAYER_NAMES.contains(&k.as_str())),
        Some(crate::TargetModules::Pattern(p)) => {
            EMBEDDING_LAYER_NAMES.iter().any(|k| p.contains(k))
        }
        None => false,
    }
}

/// One module's tensors in an adapter file.
#[derive(Clone, Debug)]
pub struct ModuleTensors {
    /// `lora_A`, `[r, in]`.
    pub a: HostTensor,
    /// `lora_B`, `[out, r]`.
    pub b: HostTensor,
    /// DoRA's `lora_magnitude_vector`, `[out]` (`None` for plain LoRA).
    pub magnitude: Option<HostTensor>,
    /// LoRA on an embedding `[vocab, dim]`: `a` is `lora_embedding_B`ᵀ (`[r, dim]`) and `b`
    /// is `lora_embedding_A`ᵀ (`[vocab, r]`), so that `b a` is the table's delta as for a
    /// linear layer's `[out, in]` weight.
    pub embedding: bool,
}

/// Groups an adapter file's LoRA tensors by module: `module -> tensors`. Every key must be
/// an adapter tensor and every module must have both LoRA factors. Trained token rows and
/// whole embedding tables are left to [`token_rows`].
pub fn lora_modules(
    tensors: &BTreeMap<String, HostTensor>,
    path: &Path,
    adapter_name: &str,
) -> Result<BTreeMap<String, ModuleTensors>> {
    #[derive(Default)]
    struct Parts {
        a: Option<HostTensor>,
        b: Option<HostTensor>,
        magnitude: Option<HostTensor>,
        embedding: bool,
    }
    let mut parts: BTreeMap<String, Parts> = BTreeMap::new();
    let format_err = |reason: String| PeftError::Format {
        path: path.display().to_string(),
        reason,
    };
    for (key, t) in tensors {
        let (module, which) = normalise_key(key, adapter_name).ok_or_else(|| {
            format_err(format!(
                "tensor {key} is not an adapter tensor (lora_A / lora_B / lora_magnitude_vector / lora_embedding_A / lora_embedding_B / trainable_tokens_delta) of a module"
            ))
        })?;
        if which == TOKENS_DELTA || which == BASE_LAYER_WEIGHT {
            continue;
        }
        let e = parts.entry(module).or_default();
        match which.as_str() {
            "lora_A" => e.a = Some(t.clone()),
            "lora_B" => e.b = Some(t.clone()),
            EMBEDDING_A => (e.b, e.embedding) = (Some(t.transposed()?), true),
            EMBEDDING_B => (e.a, e.embedding) = (Some(t.transposed()?), true),
            _ => e.magnitude = Some(t.clone()),
        }
    }
    parts
        .into_iter()
        .map(|(m, p)| match (p.a, p.b) {
            (Some(a), Some(b)) => Ok((
                m,
                ModuleTensors {
                    a,
                    b,
                    magnitude: p.magnitude,
                    embedding: p.embedding,
                },
            )),
            (a, b) => {
                let missing = match (p.embedding, a.is_none()) {
                    (false, true) => "lora_A.weight",
                    (false, false) => "lora_B.weight",
                    (true, _) if b.is_none() => EMBEDDING_A,
                    (true, _) => EMBEDDING_B,
                };
                Err(format_err(format!(
                    "missing tensor {KEY_PREFIX}{m}.{missing}"
                )))
            }
        })
        .collect()
}

/// The trained token rows of an adapter file (`<module>.token_adapter.trainable_tokens_delta`,
/// `[n, dim]`) by module.
pub fn token_rows(
    tensors: &BTreeMap<String, HostTensor>,
    adapter_name: &str,
) -> BTreeMap<String, HostTensor> {
    tensors
        .iter()
        .filter_map(|(key, t)| match normalise_key(key, adapter_name)? {
            (module, which) if which == TOKENS_DELTA => Some((module, t.clone())),
            _ => None,
        })
        .collect()
}

/// The config's rank for `module` (`r`, or its `rank_pattern` entry) must be the rank of
/// the module's tensors: PEFT scales by the config's rank, so a mismatch (`"r": 0` over
/// rank-16 tensors) would merge or combine wrongly without a word. The error names the
/// file, the module and both ranks.
pub(crate) fn check_rank(
    config: &LoraConfig,
    module: &str,
    tensors: &ModuleTensors,
    path: &Path,
) -> Result<()> {
    let r = config.spec_for(module, 0)?.r;
    let got = tensors.a.shape.first().copied().unwrap_or(0);
    if r != got {
        return Err(PeftError::Format {
            path: path.display().to_string(),
            reason: format!(
                "module {module}: the config's rank {r} (r / rank_pattern) disagrees with the rank {got} of its tensors"
            ),
        });
    }
    Ok(())
}

/// The key PEFT saves adapter tensor `tensor` of `module` under: `.weight` for the LoRA
/// factors, none for DoRA's magnitude (`base_model.model.X.lora_magnitude_vector`).
pub fn tensor_key(module: &str, tensor: &str) -> String {
    match tensor {
        "lora_magnitude_vector" | EMBEDDING_A | EMBEDDING_B | TOKENS_DELTA => {
            format!("{KEY_PREFIX}{module}.{tensor}")
        }
        _ => format!("{KEY_PREFIX}{module}.{tensor}.weight"),
    }
}

/// `base_model.model.X.lora_A.<adapter>.weight` -> `(X, lora_A)`, with or without the
/// adapter name (`default` or `adapter_name`); likewise DoRA's `lora_magnitude_vector`;
/// `None` for keys that are not adapter tensors.
fn normalise_key(key: &str, adapter_name: &str) -> Option<(String, String)> {
    let rest = key.strip_prefix(KEY_PREFIX).unwrap_or(key);
    // Embedding tables and trained token rows carry two-part tensor names.
    for two_part in [TOKENS_DELTA, BASE_LAYER_WEIGHT] {
        let plain = rest.strip_suffix(&format!(".{two_part}"));
        let named = rest
            .strip_suffix(&format!(".{adapter_name}"))
            .or_else(|| rest.strip_suffix(".default"))
            .and_then(|r| r.strip_suffix(&format!(".{two_part}")));
        if let Some(module) = plain.or(named) {
            return Some((module.to_string(), two_part.to_string()));
        }
    }
    let rest = rest.strip_suffix(".weight").unwrap_or(rest);
    let rest = rest
        .strip_suffix(&format!(".{adapter_name}"))
        .or_else(|| rest.strip_suffix(".default"))
        .unwrap_or(rest);
    let (module, tensor) = rest.rsplit_once('.')?;
    matches!(
        tensor,
        "lora_A" | "lora_B" | "lora_magnitude_vector" | EMBEDDING_A | EMBEDDING_B
    )
    .then(|| (module.to_string(), tensor.to_string()))
}

/// Loads a PEFT adapter directory into `model` as adapter `default`: injects adapters per
/// its `adapter_config.json`, then fills them from `adapter_model.safetensors`. Every
/// adapter tensor must be present with the right shape, and every tensor in the file must
/// belong to an adapted module; errors name the file, the key and the shapes.
pub fn load_pretrained<B: LoraOps, M: Model<B> + ?Sized>(
    dir: &Path,
    model: &mut M,
    backend: &B,
) -> Result<LoraConfig> {
    load_adapter(dir, model, backend, DEFAULT_ADAPTER)
}

/// [`load_pretrained`] under the adapter name `adapter_name`.
pub fn load_adapter<B: LoraOps, M: Model<B> + ?Sized>(
    dir: &Path,
    model: &mut M,
    backend: &B,
    adapter_name: &str,
) -> Result<LoraConfig> {
    let config = LoraConfig::from_file(&dir.join(CONFIG_FILE))?;
    let weights_path = dir.join(WEIGHTS_FILE);
    let file_tensors = read_safetensors(&weights_path)?;
    let mut by_module: BTreeMap<(String, String), (&str, &HostTensor)> = BTreeMap::new();
    for (key, t) in &file_tensors {
        let norm = normalise_key(key, adapter_name).ok_or_else(|| PeftError::Format {
            path: weights_path.display().to_string(),
            reason: format!(
                "tensor {key} is not an adapter tensor (lora_A / lora_B / lora_magnitude_vector) of a module"
            ),
        })?;
        by_module.insert(norm, (key.as_str(), t));
    }
    inject_adapter(model, backend, &config, adapter_name, 0)?;
    for layer in model.linears_mut() {
        let name = layer.name().to_string();
        let Some(adapter) = layer.adapter_named_mut(adapter_name) else {
            continue;
        };
        let wanted: Vec<&'static str> = adapter.tensors().iter().map(|(n, _)| *n).collect();
        for tname in wanted {
            let (key, t) = by_module
                .remove(&(name.clone(), tname.to_string()))
                .ok_or_else(|| PeftError::Format {
                    path: weights_path.display().to_string(),
                    reason: format!("missing tensor {}", tensor_key(&name, tname)),
                })?;
            let value = t.to_backend(backend)?;
            adapter
                .set_tensor(tname, value)
                .map_err(|e| PeftError::Format {
                    path: weights_path.display().to_string(),
                    reason: format!("tensor {key}: {e}"),
                })?;
        }
    }
    for emb in model.embeddings_mut() {
        let name = emb.name().to_string();
        let wanted: Vec<&'static str> = emb
            .tensors(backend, adapter_name)?
            .iter()
            .map(|(n, _)| *n)
            .collect();
        let file_err = |reason: String| PeftError::Format {
            path: weights_path.display().to_string(),
            reason,
        };
        for tname in &wanted {
            let (key, t) = by_module
                .remove(&(name.clone(), tname.to_string()))
                .ok_or_else(|| file_err(format!("missing tensor {}", tensor_key(&name, tname))))?;
            emb.set_tensor(backend, adapter_name, tname, t.to_backend(backend)?)
                .map_err(|e| file_err(format!("tensor {key}: {e}")))?;
        }
        // The whole table PEFT saves beside an embedding's LoRA replaces the base's, as
        // PEFT's loading does (same shape: a resized vocabulary is not supported).
        if !wanted.is_empty()
            && let Some((key, t)) = by_module.remove(&(name.clone(), BASE_LAYER_WEIGHT.to_string()))
        {
            emb.set_weight(t.to_backend(backend)?)
                .map_err(|e| file_err(format!("tensor {key}: {e}")))?;
        }
    }
    if let Some(((module, tensor), (key, _))) = by_module.into_iter().next() {
        return Err(PeftError::Format {
            path: weights_path.display().to_string(),
            reason: format!(
                "tensor {key} is for module {module} ({tensor}), which the config's target_modules did not select or the model does not have"
            ),
        });
    }
    Ok(config)
}
