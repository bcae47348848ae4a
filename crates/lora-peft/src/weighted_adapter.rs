//! `PeftModel::add_weighted_adapter`: PEFT's combination of several adapters into a new
//! one. The arithmetic is `LoraOps::lora_combine_*` (lora-core), so a backend's fused
//! override reaches it; this file holds PEFT's rules: the new rank, the new config and
//! which layers take part.

use std::collections::BTreeMap;

use lora_core::ops::TaskMerge;
use lora_core::{LoraAdapter, LoraOps, Model, WeightedFactors};

use crate::config::{LoraConfig, TargetModules};
use crate::error::Result;
use crate::peft_model::{PeftModel, state};
use crate::svd_combination::{SvdCombination, svd_combine_module};

/// How [`PeftModel::add_weighted_adapter`] combines adapters (PEFT's `combination_type`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Combination {
    /// Same ranks; `A = Σ sign(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ`, `B = Σ √|wᵢsᵢ|·Bᵢ` (not exact for the
    /// weighted sum of deltas: cross terms remain, as in PEFT).
    Linear,
    /// Ranks add up; `A = [w₁s₁A₁; w₂s₂A₂; ...]`, `B = [B₁ B₂ ...]`: exactly `Σ wᵢ sᵢ Bᵢ Aᵢ`.
    Cat,
    /// Same ranks; `ties`, `magnitude_prune`, `dare_linear` or `dare_ties` on the A's and
    /// on the B's, weighted as `Linear` (`LoraOps::lora_combine_task`).
    Task(TaskMerge),
    /// `svd`, `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd`: the
    /// deltas combined, then cut to rank `svd_rank` by an SVD (any source ranks).
    Svd(SvdCombination),
}

impl Combination {
    /// PEFT's name (`linear`, `cat`, `ties`, ...).
    pub fn name(&self) -> &'static str {
        use lora_core::ops::TaskMethod;
        let task = |m: &TaskMerge, svd: bool| match (m.method, svd) {
            (TaskMethod::Ties, false) => "ties",
            (TaskMethod::MagnitudePrune, false) => "magnitude_prune",
            (TaskMethod::DareLinear, false) => "dare_linear",
            (TaskMethod::DareTies, false) => "dare_ties",
            (TaskMethod::Ties, true) => "ties_svd",
            (TaskMethod::MagnitudePrune, true) => "magnitude_prune_svd",
            (TaskMethod::DareLinear, true) => "dare_linear_svd",
            (TaskMethod::DareTies, true) => "dare_ties_svd",
        };
        match self {
            Combination::Linear => "linear",
            Combination::Cat => "cat",
            Combination::Task(t) => task(t, false),
            Combination::Svd(SvdCombination { merge: None, .. }) => "svd",
            Combination::Svd(SvdCombination { merge: Some(t), .. }) => task(t, true),
        }
    }
}

/// One source adapter of a module: `lora_A`, `lora_B`, its scaling and the user's weight.
pub(crate) type Source<'a, T> = (&'a T, &'a T, f32, f32);

/// The combined `(lora_A, lora_B)` of one module from its sources; `rank` is the new rank
/// ([`combined_rank`]).
pub(crate) fn combine_module<B: LoraOps>(
    backend: &B,
    sources: &[Source<'_, B::Tensor>],
    combination: Combination,
    rank: usize,
    module: &str,
) -> lora_core::Result<(B::Tensor, B::Tensor)> {
    if let Combination::Svd(svd) = combination {
        return svd_combine_module(backend, sources, &svd, rank, module);
    }
    // The factor combinations fold each scaling into the weight.
    let parts: Vec<WeightedFactors<'_, B::Tensor>> = sources
        .iter()
        .map(|&(a, b, s, w)| WeightedFactors {
            a,
            b,
            weight: w * s,
        })
        .collect();
    match combination {
        Combination::Linear => backend.lora_combine_linear(&parts),
        Combination::Cat => backend.lora_combine_cat(&parts),
        Combination::Task(m) => backend.lora_combine_task(&parts, &m, module),
        Combination::Svd(_) => unreachable!("handled above"),
    }
}

/// The largest rank a config gives any module.
fn max_rank(c: &LoraConfig) -> usize {
    c.rank_pattern
        .values()
        .copied()
        .chain([c.r])
        .max()
        .unwrap_or(c.r)
}

/// The combined adapter's rank, as PEFT chooses it.
pub(crate) fn combined_rank(configs: &[LoraConfig], combination: Combination) -> Result<usize> {
    match combination {
        Combination::Linear | Combination::Task(_) => {
            let r = max_rank(&configs[0]);
            if configs.iter().any(|c| max_rank(c) != r) {
                return Err(state(format!(
                    "{} combination needs adapters of the same rank (use cat)",
                    combination.name()
                )));
            }
            Ok(r)
        }
        Combination::Cat => Ok(configs.iter().map(max_rank).sum()),
        Combination::Svd(svd) => Ok(svd
            .rank
            .filter(|&r| r > 0)
            .unwrap_or_else(|| configs.iter().map(max_rank).max().unwrap_or(0))),
    }
}

/// The union of the sources' `target_modules`: a sorted list when all are lists, an
/// alternation of the regexes when all are regexes.
pub(crate) fn combined_targets(configs: &[LoraConfig]) -> Result<TargetModules> {
    let all: Option<Vec<&TargetModules>> =
        configs.iter().map(|c| c.target_modules.as_ref()).collect();
    let Some(all) = all else {
        return Err(state(
            "all adapters' target_modules must be lists, or all regex strings",
        ));
    };
    let lists: Option<Vec<&Vec<String>>> = all
        .iter()
        .map(|t| match t {
            TargetModules::List(v) => Some(v),
            _ => None,
        })
        .collect();
    if let Some(lists) = lists {
        let mut names: Vec<String> = lists.into_iter().flatten().cloned().collect();
        names.sort();
        names.dedup();
        return Ok(TargetModules::List(names));
    }
    let patterns: Option<Vec<String>> = all
        .iter()
        .map(|t| match t {
            TargetModules::Pattern(p) => Some(format!("({p})")),
            _ => None,
        })
        .collect();
    match patterns {
        Some(p) => Ok(TargetModules::Pattern(p.join("|"))),
        None => Err(state(
            "all adapters' target_modules must be lists, or all regex strings",
        )),
    }
}

/// The combined adapter's config and scaling, as PEFT's `add_weighted_adapter` makes them:
/// the first source's config with `r` the new rank, `lora_alpha = r` (weights and scalings
/// are folded into A and B) and the union of the targets; PEFT keeps an rsLoRA source's
/// `use_rslora`, so the scaling is then `√r`, not 1.
pub(crate) fn combined_config(
    configs: &[LoraConfig],
    combination: Combination,
) -> Result<(LoraConfig, f32)> {
    match combination {
        Combination::Task(m) => m.validate()?,
        Combination::Svd(svd) => svd.validate()?,
        Combination::Linear | Combination::Cat => {}
    }
    // A DoRA magnitude does not combine with the factors: PEFT refuses them too.
    if configs.iter().any(|c| c.use_dora) {
        return Err(crate::PeftError::Unsupported {
            field: "use_dora",
            value: "true".into(),
            reason: "DoRA adapters cannot be combined (PEFT refuses them too)".into(),
        });
    }
    let new_rank = combined_rank(configs, combination)?;
    let new_config = LoraConfig {
        r: new_rank,
        lora_alpha: new_rank as f64,
        target_modules: Some(combined_targets(configs)?),
        rank_pattern: BTreeMap::new(),
        alpha_pattern: BTreeMap::new(),
        ..configs[0].clone()
    };
    let scaling = if new_config.use_rslora {
        (new_rank as f32).sqrt()
    } else {
        1.0
    };
    Ok((new_config, scaling))
}

impl<B: LoraOps, M: Model<B>> PeftModel<B, M> {
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
        let combination = if adapters.len() == 1 {
            Combination::Linear
        } else {
            combination
        };
        let (new_config, scaling) = combined_config(&configs, combination)?;
        if let Some(e) = self
            .model
            .embeddings()
            .into_iter()
            .find(|e| adapters.iter().any(|(n, _)| e.adapter_names().contains(n)))
        {
            return Err(crate::PeftError::Unsupported {
                field: "target_modules",
                value: e.name().to_string(),
                reason:
                    "combining adapters on embeddings (LoRA or trainable tokens) is not implemented"
                        .into(),
            });
        }
        for layer in self.model.linears_mut() {
            let module = layer.name().to_string();
            // (A, B, scaling, weight) of every source adapter this layer has.
            let mut sources = Vec::new();
            for ((n, w), cfg) in adapters.iter().zip(&configs) {
                if let Some(a) = layer.adapter_named(n) {
                    let ts = a.tensors();
                    let s = cfg.spec_for(&module, 0)?.scaling();
                    sources.push((ts[0].1, ts[1].1, s, *w));
                }
            }
            if sources.is_empty() {
                continue;
            }
            let (a_new, b_new) =
                combine_module(backend, &sources, combination, new_config.r, &module)?;
            let adapter = LoraAdapter::<B>::from_tensors(
                &module,
                a_new,
                b_new,
                scaling,
                new_config.lora_dropout as f32,
                0,
            )?;
            layer.add_adapter(new_name, Box::new(adapter))?;
        }
        self.configs.insert(new_name.to_string(), new_config);
        Ok(())
    }
}
