//! PEFT adapter directories: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! Keys are `base_model.model.<module>.lora_A.weight` (`[r, in]`) and `.lora_B.weight`
//! (`[out, r]`); files written by PEFT may carry the adapter name
//! (`.lora_A.default.weight`) and f16/bf16 tensors, and both load here.

use std::collections::BTreeMap;
use std::path::Path;

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
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
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
    if tensors.is_empty() {
        return Err(PeftError::Format {
            path: dir.display().to_string(),
            reason: format!("the model has no adapter named {adapter_name:?} to save"),
        });
    }
    write_safetensors(&dir.join(WEIGHTS_FILE), &tensors)?;
    let json = config.to_json_string()?;
    write_atomic(&dir.join(CONFIG_FILE), json.as_bytes())?;
    Ok(())
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
}

/// Groups an adapter file's tensors by module: `module -> tensors`. Every key must be an
/// adapter tensor and every module must have both LoRA factors.
pub fn lora_modules(
    tensors: &BTreeMap<String, HostTensor>,
    path: &Path,
    adapter_name: &str,
) -> Result<BTreeMap<String, ModuleTensors>> {
    type Parts = (Option<HostTensor>, Option<HostTensor>, Option<HostTensor>);
    let mut parts: BTreeMap<String, Parts> = BTreeMap::new();
    for (key, t) in tensors {
        let (module, which) =
            normalise_key(key, adapter_name).ok_or_else(|| PeftError::Format {
                path: path.display().to_string(),
                reason: format!(
                    "tensor {key} is not an adapter tensor (lora_A / lora_B / lora_magnitude_vector) of a module"
                ),
            })?;
        let e = parts.entry(module).or_default();
        match which.as_str() {
            "lora_A" => e.0 = Some(t.clone()),
            "lora_B" => e.1 = Some(t.clone()),
            _ => e.2 = Some(t.clone()),
        }
    }
    parts
        .into_iter()
        .map(|(m, (a, b, magnitude))| match (a, b) {
            (Some(a), Some(b)) => Ok((m, ModuleTensors { a, b, magnitude })),
            (a, _) => Err(PeftError::Format {
                path: path.display().to_string(),
                reason: format!(
                    "missing tensor {KEY_PREFIX}{m}.{}.weight",
                    if a.is_none() { "lora_A" } else { "lora_B" }
                ),
            }),
        })
        .collect()
}

/// The key PEFT saves adapter tensor `tensor` of `module` under: `.weight` for the LoRA
/// factors, none for DoRA's magnitude (`base_model.model.X.lora_magnitude_vector`).
pub fn tensor_key(module: &str, tensor: &str) -> String {
    match tensor {
        "lora_magnitude_vector" => format!("{KEY_PREFIX}{module}.{tensor}"),
        _ => format!("{KEY_PREFIX}{module}.{tensor}.weight"),
    }
}

/// `base_model.model.X.lora_A.<adapter>.weight` -> `(X, lora_A)`, with or without the
/// adapter name (`default` or `adapter_name`); likewise DoRA's `lora_magnitude_vector`;
/// `None` for keys that are not adapter tensors.
fn normalise_key(key: &str, adapter_name: &str) -> Option<(String, String)> {
    let rest = key.strip_prefix(KEY_PREFIX).unwrap_or(key);
    let rest = rest.strip_suffix(".weight").unwrap_or(rest);
    let rest = rest
        .strip_suffix(&format!(".{adapter_name}"))
        .or_else(|| rest.strip_suffix(".default"))
        .unwrap_or(rest);
    let (module, tensor) = rest.rsplit_once('.')?;
    matches!(tensor, "lora_A" | "lora_B" | "lora_magnitude_vector")
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
