//! `PeftModel`: a model with named LoRA adapters and their configs, with PEFT's
//! multi-adapter API (add, set active, disable, delete, weighted combination, merge) and
//! directory layout (`default` at the root, other adapters in subfolders).

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::path::Path;

use lora_core::{DEFAULT_ADAPTER, LoraOps, Model, RowAdapter, WeightRounding};

use crate::adapter_file::{load_adapter, save_adapter};
use crate::config::LoraConfig;
use crate::error::{PeftError, Result};
use crate::targeting::inject_adapter;

/// A model plus the configs of its named adapters.
#[derive(Debug)]
pub struct PeftModel<B: LoraOps, M: Model<B>> {
    pub(crate) model: M,
    pub(crate) configs: BTreeMap<String, LoraConfig>,
    _backend: PhantomData<fn() -> B>,
}

pub(crate) fn state(what: impl Into<String>) -> PeftError {
    PeftError::Core(lora_core::Error::state("PeftModel", what))
}

impl<B: LoraOps, M: Model<B>> PeftModel<B, M> {
    /// Wraps a model that has no adapters yet.
    pub fn new(model: M) -> Self {
        PeftModel {
            model,
            configs: BTreeMap::new(),
            _backend: PhantomData,
        }
    }

    /// `get_peft_model`: wraps `model` and injects adapter `default` per `config`.
    pub fn with_adapter(model: M, backend: &B, config: LoraConfig, seed: u64) -> Result<Self> {
        let mut pm = Self::new(model);
        pm.add_adapter(backend, DEFAULT_ADAPTER, config, seed)?;
        Ok(pm)
    }

    /// `PeftModel.from_pretrained`: wraps `model` and loads the adapter in `dir` as
    /// `default`.
    pub fn from_pretrained(model: M, dir: &Path, backend: &B) -> Result<Self> {
        let mut pm = Self::new(model);
        pm.load_adapter(dir, DEFAULT_ADAPTER, backend)?;
        Ok(pm)
    }

    /// The wrapped model.
    pub fn model(&self) -> &M {
        &self.model
    }

    /// The wrapped model, mutably (forward, backward, optimizer steps).
    pub fn model_mut(&mut self) -> &mut M {
        &mut self.model
    }

    /// The config of adapter `name`.
    pub fn config(&self, name: &str) -> Option<&LoraConfig> {
        self.configs.get(name)
    }

    /// Adapter names, sorted.
    pub fn adapter_names(&self) -> Vec<&str> {
        self.configs.keys().map(String::as_str).collect()
    }

    pub(crate) fn known(&self, name: &str) -> Result<()> {
        if self.configs.contains_key(name) {
            return Ok(());
        }
        Err(state(format!(
            "no adapter named {name:?} (adapters: {})",
            self.adapter_names().join(", ")
        )))
    }

    /// Adds a new adapter (inactive unless it is the first, as in PEFT) and returns the
    /// modules it targets.
    pub fn add_adapter(
        &mut self,
        backend: &B,
        name: &str,
        config: LoraConfig,
        seed: u64,
    ) -> Result<Vec<String>> {
        if self.configs.contains_key(name) {
            return Err(state(format!("adapter {name:?} already exists")));
        }
        let injected = inject_adapter(&mut self.model, backend, &config, name, seed)?;
        self.configs.insert(name.to_string(), config);
        Ok(injected)
    }

    /// Loads a PEFT adapter directory as adapter `name`.
    pub fn load_adapter(&mut self, dir: &Path, name: &str, backend: &B) -> Result<()> {
        if self.configs.contains_key(name) {
            return Err(state(format!("adapter {name:?} already exists")));
        }
        let config = load_adapter(dir, &mut self.model, backend, name)?;
        self.configs.insert(name.to_string(), config);
        Ok(())
    }

    /// Makes exactly these adapters active; their outputs add up.
    pub fn set_adapter(&mut self, names: &[&str]) -> Result<()> {
        for n in names {
            self.known(n)?;
        }
        for l in self.model.linears_mut() {
            l.set_active_adapters(names)?;
        }
        Ok(())
    }

    /// The base model alone until [`PeftModel::enable_adapters`].
    pub fn disable_adapters(&mut self) -> Result<()> {
        for l in self.model.linears_mut() {
            l.disable_adapters()?;
        }
        Ok(())
    }

    /// Undoes [`PeftModel::disable_adapters`].
    pub fn enable_adapters(&mut self) {
        for l in self.model.linears_mut() {
            l.enable_adapters();
        }
    }

    /// Removes adapter `name` everywhere.
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        self.known(name)?;
        for l in self.model.linears_mut() {
            if l.adapter_named(name).is_some() {
                l.delete_adapter(name)?;
            }
        }
        self.configs.remove(name);
        Ok(())
    }

    /// Merges the active adapters of every layer into its base weight. Returns the worst
    /// layer's rounding against the exact merge (zero unless bases are quantized).
    pub fn merge(&mut self, backend: &B, safe: bool) -> Result<WeightRounding> {
        let mut rounding = WeightRounding::EXACT;
        for l in self.model.linears_mut() {
            if !l.active_adapters().is_empty() && !l.is_merged() {
                rounding = rounding.max(l.merge(backend, safe)?);
            }
        }
        for e in self.model.embeddings_mut() {
            if !e.is_merged() {
                e.merge(backend)?;
            }
        }
        Ok(rounding)
    }

    /// Unmerges everything merged; returns the worst layer's rounding, as [`Self::merge`].
    pub fn unmerge(&mut self, backend: &B) -> Result<WeightRounding> {
        let mut rounding = WeightRounding::EXACT;
        for l in self.model.linears_mut() {
            if l.is_merged() {
                rounding = rounding.max(l.unmerge(backend)?);
            }
        }
        for e in self.model.embeddings_mut() {
            e.unmerge(backend)?;
        }
        Ok(rounding)
    }

    /// Merges the active adapters and returns the plain model without adapters, with the
    /// worst layer's rounding (as [`Self::merge`]).
    pub fn merge_and_unload(mut self, backend: &B, safe: bool) -> Result<(M, WeightRounding)> {
        let mut rounding = WeightRounding::EXACT;
        for l in self.model.linears_mut() {
            rounding = rounding.max(l.merge_and_unload(backend, safe)?);
        }
        for e in self.model.embeddings_mut() {
            e.merge_and_unload(backend)?;
        }
        Ok((self.model, rounding))
    }

    /// One inference pass where row `i` uses adapter `rows[i]` (or the base).
    pub fn forward_mixed(
        &mut self,
        backend: &B,
        x: &B::Tensor,
        rows: &[RowAdapter],
    ) -> Result<B::Tensor> {
        for r in rows {
            if let RowAdapter::Named(n) = r {
                self.known(n)?;
            }
        }
        Ok(self.model.forward_mixed(backend, x, rows)?)
    }

    /// Writes every adapter: `default` into `dir`, the others into `dir/<name>/`.
    pub fn save_pretrained(&self, dir: &Path, backend: &B) -> Result<()> {
        for (name, config) in &self.configs {
            let target = if name == DEFAULT_ADAPTER {
                dir.to_path_buf()
            } else {
                dir.join(name)
            };
            save_adapter(&target, &self.model, backend, config, name)?;
        }
        Ok(())
    }
}
