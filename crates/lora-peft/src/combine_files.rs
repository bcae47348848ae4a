//! `lora combine`: PEFT's `add_weighted_adapter` on adapter directories, without a model.
//! The combinations work on the LoRA factors alone (`linear`, `cat` and the task-arithmetic
//! ones), so the sources' `adapter_model.safetensors` files are all that is read; the
//! result is a PEFT adapter directory with PEFT's config for the combination.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use lora_core::{HostTensor, LoraOps};
use lora_io::read_safetensors;

use crate::adapter_file::{
    CONFIG_FILE, KEY_PREFIX, ModuleTensors, WEIGHTS_FILE, check_rank, lora_modules,
    write_adapter_dir,
};
use crate::config::LoraConfig;
use crate::error::{PeftError, Result};
use crate::weighted_adapter::{Combination, Source, combine_module, combined_config};

/// Combines the adapter directories `sources` (each with its weight) into a new adapter
/// directory `out`; returns the new config. DoRA adapters are refused
/// (`combined_config`). Both files are written atomically.
pub fn combine_adapter_dirs<B: LoraOps>(
    backend: &B,
    sources: &[(&Path, f32)],
    combination: Combination,
    out: &Path,
) -> Result<LoraConfig> {
    if sources.is_empty() {
        return Err(PeftError::Core(lora_core::Error::state(
            "lora combine",
            "needs at least one adapter",
        )));
    }
    let combination = if sources.len() == 1 {
        Combination::Linear
    } else {
        combination
    };
    let mut configs = Vec::new();
    let mut modules: Vec<BTreeMap<String, ModuleTensors>> = Vec::new();
    for (dir, _) in sources {
        let config = LoraConfig::from_file(&dir.join(CONFIG_FILE))?;
        config.check_supported()?;
        let weights = dir.join(WEIGHTS_FILE);
        let m = lora_modules(&read_safetensors(&weights)?, &weights, "default")?;
        for (module, t) in &m {
            check_rank(&config, module, t, &weights)?;
        }
        // `use_dora` itself is refused with the config (`combined_config`); a file with
        // magnitudes under a plain LoRA config is inconsistent.
        if !config.use_dora && m.values().any(|t| t.magnitude.is_some()) {
            return Err(PeftError::Format {
                path: weights.display().to_string(),
                reason: "holds lora_magnitude_vector tensors, but the config says use_dora: false"
                    .into(),
            });
        }
        if let Some(name) = m.iter().find_map(|(n, t)| t.embedding.then_some(n)) {
            return Err(PeftError::Unsupported {
                field: "target_modules",
                value: name.clone(),
                reason: format!(
                    "{}: combining LoRA on embeddings is not implemented",
                    weights.display()
                ),
            });
        }
        if config.trainable_token_indices.is_some() {
            return Err(PeftError::Unsupported {
                field: "trainable_token_indices",
                value: format!("{:?}", config.trainable_token_indices),
                reason: format!(
                    "{}: combining trainable tokens is not implemented (PEFT's add_weighted_adapter does not either)",
                    dir.display()
                ),
            });
        }
        configs.push(config);
        modules.push(m);
    }
    let (new_config, _) = combined_config(&configs, combination)?;
    let names: BTreeSet<&String> = modules.iter().flat_map(|m| m.keys()).collect();
    let mut tensors = Vec::new();
    for module in names {
        let mut held = Vec::new();
        for (((_, w), config), m) in sources.iter().zip(&configs).zip(&modules) {
            if let Some(t) = m.get(module) {
                let s = config.spec_for(module, 0)?.scaling();
                let (a, b) = (t.a.to_backend(backend)?, t.b.to_backend(backend)?);
                held.push((a, b, s, *w));
            }
        }
        let parts: Vec<Source<'_, B::Tensor>> =
            held.iter().map(|(a, b, s, w)| (a, b, *s, *w)).collect();
        let (a, b) =
            combine_module(backend, &parts, combination, new_config.r, module).map_err(|e| {
                PeftError::Core(lora_core::Error::state(
                    format!("lora combine, module {module}"),
                    e.to_string(),
                ))
            })?;
        tensors.push((
            format!("{KEY_PREFIX}{module}.lora_A.weight"),
            HostTensor::from_backend(backend, &a)?,
        ));
        tensors.push((
            format!("{KEY_PREFIX}{module}.lora_B.weight"),
            HostTensor::from_backend(backend, &b)?,
        ));
    }
    write_adapter_dir(out, &tensors, &new_config)?;
    Ok(new_config)
}
