//! `PeftModel`: a model with named LoRA adapters and their configs, with PEFT's
//! multi-adapter API (add, set active, disable, delete, weighted combination, merge) and
//! directory layout (`default` at the root, other adapters in subfolders).

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::path::Path;

use lora_core::{DEFAULT_ADAPTER, LoraAdapter, LoraOps, Model, RowAdapter, Tensor, WeightRounding};

use crate::adapter_file::{load_adapter, save_adapter};
use crate::config::{LoraConfig, TargetModules};
use crate::error::{PeftError, Result};
use crate::targeting::inject_adapter;

/// How [`PeftModel::add_weighted_adapter`] combines adapters (PEFT's `combination_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Combination {
    /// Same ranks; `A = Σ sign(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ`, `B = Σ √|wᵢsᵢ|·Bᵢ` (not exact for the
    /// weighted sum of deltas: cross terms remain, as in PEFT).
    Linear,
    /// Ranks add up; `A = [w₁s₁A₁; w₂s₂A₂; ...]`, `B = [B₁ B₂ ...]`: exactly `Σ wᵢ sᵢ Bᵢ Aᵢ`.
    Cat,
}

/// A model plus the configs of its named adapters.
#[derive(Debug)]
pub struct PeftModel<B: LoraOps, M: Model<B>> {
    model: M,
    configs: BTreeMap<String, LoraConfig>,
    _backend: PhantomData<fn() -> B>,
}

fn state(what: impl Into<String>) -> PeftError {
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

    fn known(&self, name: &str) -> Result<()> {
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

    /// Combines existing adapters into a new one, `new_name` (PEFT's
    /// `add_weighted_adapter`): its config is the first adapter's with `r` the new rank,
    /// `lora_alpha = r` (the weights and scalings are folded into A and B), and the union of
    /// the targets. Like PEFT, an rsLoRA source config is kept, so the new adapter's scaling
    /// is then `√r`, not 1.
    pub fn add_weighted_adapter(
        &mut self,
        backend: &B,
        adapters: &[(&str, f32)],
        new_name: &str,
        combination: Combination,
    ) -> Result<()> {
        if adapters.is_empty() {
            return Err(state("add_weighted_adapter needs at least one adapter"));
        }
        if self.configs.contains_key(new_name) {
            return Err(state(format!("adapter {new_name:?} already exists")));
        }
        let mut configs = Vec::new();
        for (n, _) in adapters {
            self.known(n)?;
            configs.push(self.configs[*n].clone());
        }
        let max_rank = |c: &LoraConfig| {
            c.rank_pattern
                .values()
                .copied()
                .chain([c.r])
                .max()
                .unwrap_or(c.r)
        };
        let combination = if adapters.len() == 1 {
            Combination::Linear
        } else {
            combination
        };
        let new_rank = match combination {
            Combination::Linear => {
                let r = max_rank(&configs[0]);
                if configs.iter().any(|c| max_rank(c) != r) {
                    return Err(state(
                        "linear combination needs adapters of the same rank (use cat)",
                    ));
                }
                r
            }
            Combination::Cat => configs.iter().map(max_rank).sum(),
        };
        let targets = match configs
            .iter()
            .map(|c| c.target_modules.clone())
            .collect::<Option<Vec<_>>>()
        {
            Some(ts) if ts.iter().all(|t| matches!(t, TargetModules::List(_))) => {
                let mut all: Vec<String> = ts
                    .into_iter()
                    .flat_map(|t| {
                        if let TargetModules::List(v) = t {
                            v
                        } else {
                            Vec::new()
                        }
                    })
                    .collect();
                all.sort();
                all.dedup();
                TargetModules::List(all)
            }
            Some(ts) if ts.iter().all(|t| matches!(t, TargetModules::Pattern(_))) => {
                TargetModules::Pattern(
                    ts.iter()
                        .map(|t| {
                            if let TargetModules::Pattern(p) = t {
                                format!("({p})")
                            } else {
                                String::new()
                            }
                        })
                        .collect::<Vec<_>>()
                        .join("|"),
                )
            }
            _ => {
                return Err(state(
                    "all adapters' target_modules must be lists, or all regex strings",
                ));
            }
        };
        let new_config = LoraConfig {
            r: new_rank,
            lora_alpha: new_rank as f64,
            target_modules: Some(targets),
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            ..configs[0].clone()
        };
        for layer in self.model.linears_mut() {
            let module = layer.name().to_string();
            // (A, B, weight x scaling) of every source adapter this layer has, on the host.
            let mut parts = Vec::new();
            for ((n, w), cfg) in adapters.iter().zip(&configs) {
                if let Some(a) = layer.adapter_named(n) {
                    let ts = a.tensors();
                    let (at, bt) = (ts[0].1, ts[1].1);
                    let s = cfg.spec_for(&module, 0)?.scaling();
                    parts.push((
                        backend.to_host(at)?,
                        at.shape().dims().to_vec(),
                        backend.to_host(bt)?,
                        *w * s,
                    ));
                }
            }
            if parts.is_empty() {
                continue;
            }
            let (in_f, out_f) = (layer.base().in_features(), layer.base().out_features());
            let mut a_new = vec![0.0f32; new_rank * in_f];
            let mut b_new = vec![0.0f32; out_f * new_rank];
            match combination {
                Combination::Linear => {
                    for (a, shape, b, ws) in &parts {
                        if shape[0] != new_rank {
                            return Err(state(format!(
                                "{module}: rank {} differs from {new_rank}",
                                shape[0]
                            )));
                        }
                        let root = ws.abs().sqrt();
                        let sign = if *ws >= 0.0 { 1.0 } else { -1.0 };
                        a_new
                            .iter_mut()
                            .zip(a)
                            .for_each(|(o, v)| *o += sign * root * v);
                        b_new.iter_mut().zip(b).for_each(|(o, v)| *o += root * v);
                    }
                }
                Combination::Cat => {
                    let mut row = 0;
                    for (a, shape, b, ws) in &parts {
                        let r = shape[0];
                        for (o, v) in a_new[row * in_f..(row + r) * in_f].iter_mut().zip(a) {
                            *o = ws * v;
                        }
                        for o in 0..out_f {
                            b_new[o * new_rank + row..o * new_rank + row + r]
                                .copy_from_slice(&b[o * r..(o + 1) * r]);
                        }
                        row += r;
                    }
                }
            }
            // PEFT keeps use_rslora from the first config: then the scaling is sqrt(r), not 1.
            let scaling = if new_config.use_rslora {
                (new_rank as f32).sqrt()
            } else {
                1.0
            };
            let adapter = LoraAdapter::<B>::from_tensors(
                &module,
                backend.from_host(&a_new, &[new_rank, in_f])?,
                backend.from_host(&b_new, &[out_f, new_rank])?,
                scaling,
                new_config.lora_dropout as f32,
                0,
            )?;
            layer.add_adapter(new_name, Box::new(adapter))?;
        }
        self.configs.insert(new_name.to_string(), new_config);
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
        Ok(rounding)
    }

    /// Merges the active adapters and returns the plain model without adapters, with the
    /// worst layer's rounding (as [`Self::merge`]).
    pub fn merge_and_unload(mut self, backend: &B, safe: bool) -> Result<(M, WeightRounding)> {
        let mut rounding = WeightRounding::EXACT;
        for l in self.model.linears_mut() {
            rounding = rounding.max(l.merge_and_unload(backend, safe)?);
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
