//! Hotswapping (PEFT's `utils/hotswap.py`): a loaded adapter's weights replaced in place by
//! another adapter file's, without injecting new layers, as a server does between
//! requests. `prepare_for_hotswap` first pads every adapter to one rank with zeros (extra
//! rows of `lora_A`, extra columns of `lora_B`: the output does not change), so adapters of
//! any smaller rank swap in without changing a tensor's shape.
//!
//! Everything is checked before anything changes: a failed swap leaves the old adapter.
//! Unlike PEFT (whose pattern lookup misses the `.weight` suffix), each module's scaling
//! follows the new config's `rank_pattern` / `alpha_pattern`.

use std::collections::BTreeMap;
use std::path::Path;

use lora_core::{HostTensor, LoraAdapter, LoraOps, Model, Tensor};

use crate::adapter_file::{CONFIG_FILE, ModuleTensors, WEIGHTS_FILE, check_rank, lora_modules};
use crate::config::LoraConfig;
use crate::error::{PeftError, Result};
use crate::peft_model::{PeftModel, state};

/// `[rows, cols]` zero-padded to `[rows_to, cols_to]` (the original in the top-left).
fn padded(t: &HostTensor, rows_to: usize, cols_to: usize) -> HostTensor {
    let (rows, cols) = (t.shape[0], t.shape[1]);
    let mut data = vec![0.0; rows_to * cols_to];
    for (i, row) in t.data.chunks_exact(cols).enumerate() {
        data[i * cols_to..i * cols_to + cols].copy_from_slice(row);
    }
    debug_assert!(rows <= rows_to && cols <= cols_to);
    HostTensor {
        shape: vec![rows_to, cols_to],
        data,
    }
}

/// The config fields that must agree for a swap (PEFT's `CONFIG_KEYS_TO_CHECK`).
fn check_compatible(old: &LoraConfig, new: &LoraConfig) -> Result<()> {
    let differ = |field: &'static str, a: String, b: String| {
        Err(PeftError::Unsupported {
            field,
            value: b.clone(),
            reason: format!("configs are incompatible for a hotswap: {field} {a} != {b}"),
        })
    };
    if old.use_rslora != new.use_rslora {
        return differ(
            "use_rslora",
            old.use_rslora.to_string(),
            new.use_rslora.to_string(),
        );
    }
    if old.lora_dropout != new.lora_dropout {
        return differ(
            "lora_dropout",
            old.lora_dropout.to_string(),
            new.lora_dropout.to_string(),
        );
    }
    if old.alpha_pattern != new.alpha_pattern {
        return differ(
            "alpha_pattern",
            format!("{:?}", old.alpha_pattern),
            format!("{:?}", new.alpha_pattern),
        );
    }
    if old.use_dora || new.use_dora {
        return differ(
            "use_dora",
            old.use_dora.to_string(),
            new.use_dora.to_string(),
        );
    }
    Ok(())
}

impl<B: LoraOps, M: Model<B>> PeftModel<B, M> {
    /// PEFT's `prepare_model_for_compiled_hotswap(target_rank=..)`: pads every LoRA
    /// adapter to rank `target_rank` with zeros, so adapters up to that rank can be
    /// swapped in without changing shapes. Outputs do not change; an adapter of a larger
    /// rank is an error naming the module.
    pub fn prepare_for_hotswap(&mut self, backend: &B, target_rank: usize) -> Result<()> {
        let mut plans = Vec::new();
        for layer in self.model.linears() {
            for name in layer.adapter_names() {
                let a = layer
                    .adapter_named(name)
                    .ok_or_else(|| state("adapter vanished"))?;
                let ts = a.tensors();
                if ts.len() != 2 {
                    return Err(state(format!(
                        "{}: hotswap of a DoRA adapter is not implemented",
                        layer.name()
                    )));
                }
                let r = ts[0].1.shape().dims()[0];
                if r > target_rank {
                    return Err(PeftError::Unsupported {
                        field: "target_rank",
                        value: target_rank.to_string(),
                        reason: format!(
                            "adapter {name:?} on {} has the larger rank {r}",
                            layer.name()
                        ),
                    });
                }
                plans.push((layer.name().to_string(), name.to_string()));
            }
        }
        for layer in self.model.linears_mut() {
            let module = layer.name().to_string();
            for (_, name) in plans.iter().filter(|(m, _)| *m == module) {
                let old = layer
                    .adapter_named(name)
                    .ok_or_else(|| state("adapter vanished"))?;
                let ts = old.tensors();
                let (a, b) = (
                    HostTensor::from_backend(backend, ts[0].1)?,
                    HostTensor::from_backend(backend, ts[1].1)?,
                );
                let cfg = &self.configs[name.as_str()];
                let spec = cfg.spec_for(&module, 0)?;
                // The padded adapter keeps the original's scaling (alpha / r of the config).
                let adapter = LoraAdapter::<B>::from_tensors(
                    &module,
                    padded(&a, target_rank, a.shape[1]).into_backend(backend)?,
                    padded(&b, b.shape[0], target_rank).into_backend(backend)?,
                    spec.scaling(),
                    spec.dropout,
                    0,
                )?;
                layer.replace_adapter(name, Box::new(adapter))?;
            }
        }
        Ok(())
    }

    /// PEFT's `hotswap_adapter`: the weights of adapter `name` replaced in place by those of
    /// the PEFT adapter directory `dir`. The new adapter may target only modules `name`
    /// already adapts (modules it lacks get zero factors); a smaller rank is zero-padded to
    /// the current one; the scaling becomes the new config's. Checked completely first: on
    /// any error the old adapter stays.
    pub fn hotswap_adapter(&mut self, dir: &Path, name: &str, backend: &B) -> Result<()> {
        self.known(name)?;
        let new_config = LoraConfig::from_file(&dir.join(CONFIG_FILE))?;
        new_config.check_supported()?;
        check_compatible(&self.configs[name], &new_config)?;
        let weights_path = dir.join(WEIGHTS_FILE);
        let mut modules = lora_modules(
            &lora_io::read_safetensors(&weights_path)?,
            &weights_path,
            "default",
        )?;
        for (module, t) in &modules {
            check_rank(&new_config, module, t, &weights_path)?;
        }
        let file_err = |reason: String| PeftError::Format {
            path: weights_path.display().to_string(),
            reason,
        };
        // Per module: the new factors and scaling (`None`: the old scaling, for modules the
        // new adapter leaves out, whose factors become zero).
        let mut planned: BTreeMap<String, (HostTensor, HostTensor, Option<f32>)> = BTreeMap::new();
        for layer in self.model.linears() {
            let Some(old) = layer.adapter_named(name) else {
                continue;
            };
            let module = layer.name().to_string();
            let ts = old.tensors();
            if ts.len() != 2 {
                return Err(state(format!(
                    "{module}: hotswap of a DoRA adapter is not implemented"
                )));
            }
            let (r_old, in_f, out_f) = (
                ts[0].1.shape().dims()[0],
                layer.base().in_features(),
                layer.base().out_features(),
            );
            let Some(ModuleTensors {
                a, b, embedding, ..
            }) = modules.remove(&module)
            else {
                // Not in the new adapter: zero factors, the shapes and scaling kept.
                let zeros = |rows, cols| HostTensor {
                    shape: vec![rows, cols],
                    data: vec![0.0; rows * cols],
                };
                planned.insert(module, (zeros(r_old, in_f), zeros(out_f, r_old), None));
                continue;
            };
            let r_new = a.shape[0];
            if embedding || a.shape != [r_new, in_f] || b.shape != [out_f, r_new] {
                return Err(file_err(format!(
                    "module {module}: lora_A {:?} and lora_B {:?} do not fit the layer [{out_f}, {in_f}]",
                    a.shape, b.shape
                )));
            }
            let rank = r_new.max(r_old);
            let scaling = new_config.spec_for(&module, 0)?.scaling();
            planned.insert(
                module,
                (
                    padded(&a, rank, in_f),
                    padded(&b, out_f, rank),
                    Some(scaling),
                ),
            );
        }
        if let Some(module) = modules.keys().next() {
            return Err(file_err(format!(
                "targets module {module}, which adapter {name:?} does not adapt: hotswapping cannot inject new layers"
            )));
        }
        let dropout = new_config.lora_dropout as f32;
        for layer in self.model.linears_mut() {
            let module = layer.name().to_string();
            let Some((a, b, scaling)) = planned.remove(&module) else {
                continue;
            };
            let scaling = match scaling {
                Some(s) => s,
                None => self.configs[name].spec_for(&module, 0)?.scaling(),
            };
            let adapter = LoraAdapter::<B>::from_tensors(
                &module,
                a.into_backend(backend)?,
                b.into_backend(backend)?,
                scaling,
                dropout,
                0,
            )?;
            layer.replace_adapter(name, Box::new(adapter))?;
        }
        self.configs.insert(name.to_string(), new_config);
        Ok(())
    }
}
