//! Merging a [`LoraLinear`]'s adapters into its base weight and back (PEFT's `merge`,
//! `unmerge`, `merge_and_unload`), a child module of `lora_linear`.

use super::LoraLinear;
use crate::backend::{BinaryOp, Tensor};
use crate::error::{Error, Result};
use crate::linear::WeightRounding;
use crate::ops::LoraOps;

impl<B: LoraOps> LoraLinear<B> {
    /// Merges the active adapters into the base weight (PEFT's `merge()`). Returns how far
    /// the stored weight is from the exact merge (non-zero only for quantized bases).
    pub fn merge(&mut self, backend: &B, safe: bool) -> Result<WeightRounding> {
        let names: Vec<String> = self.active.clone();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        self.merge_adapters(backend, &names, safe)
    }

    /// Adds the named adapters' `delta_W` into the base weight, in order. With `safe`, the
    /// merged weight is computed on a copy first and the merge is refused, leaving the
    /// layer untouched, if any value would be non-finite.
    pub fn merge_adapters(
        &mut self,
        backend: &B,
        names: &[&str],
        safe: bool,
    ) -> Result<WeightRounding> {
        if names.is_empty() {
            return Err(Error::state(&self.name, "no adapter to merge"));
        }
        let mut deltas = Vec::with_capacity(names.len());
        // DoRA's merge depends on the (unmerged) weight.
        let weight = self.base.weight(backend)?;
        for &n in names {
            if self.merged.iter().any(|m| m == n) {
                return Err(Error::state(
                    &self.name,
                    format!("adapter {n:?} is already merged"),
                ));
            }
            let name = self.name.clone();
            let a = self
                .adapter_named_mut(n)
                .ok_or_else(|| Error::state(&name, format!("no adapter named {n:?} to merge")))?;
            deltas.push(a.merge_delta(backend, &weight)?);
        }
        if safe {
            let mut w = self.base.weight(backend)?;
            for d in &deltas {
                w = backend.binary(BinaryOp::Add, &w, d)?;
            }
            if !backend.all_finite(&w)? {
                return Err(Error::NonFinite {
                    context: format!("{} safe_merge (refused, weights unchanged)", self.name),
                    tensor: "merged weight".into(),
                    shape: w.shape().clone(),
                });
            }
        }
        let mut rounding = WeightRounding::EXACT;
        for (d, n) in deltas.iter().zip(names) {
            rounding = rounding.max(self.base.add_to_weight(backend, d, 1.0)?);
            self.merged.push(n.to_string());
        }
        self.notify_base_changed();
        Ok(rounding)
    }

    /// Subtracts every merged adapter's `delta_W` again, most recent first. On a quantized
    /// base this rounds a second time; the result says how much.
    pub fn unmerge(&mut self, backend: &B) -> Result<WeightRounding> {
        if self.merged.is_empty() {
            return Err(Error::state(&self.name, "adapter is not merged"));
        }
        let mut rounding = WeightRounding::EXACT;
        while let Some(n) = self.merged.last().cloned() {
            let weight = self.base.weight(backend)?;
            let name = self.name.clone();
            let a = self
                .adapter_named_mut(&n)
                .ok_or_else(|| Error::state(&name, format!("merged adapter {n:?} is gone")))?;
            let delta = a.unmerge_delta(backend, &weight)?;
            rounding = rounding.max(self.base.add_to_weight(backend, &delta, 1.0)?);
            self.merged.pop();
            self.notify_base_changed();
        }
        Ok(rounding)
    }

    /// Merges the active adapters and drops every adapter: the layer becomes a plain base
    /// layer with the merged weight (PEFT's `merge_and_unload`).
    pub fn merge_and_unload(&mut self, backend: &B, safe: bool) -> Result<WeightRounding> {
        // Disabled or without active adapters, nothing is merged: the base stays as it is.
        let mut rounding = WeightRounding::EXACT;
        if self.adapters_run() {
            rounding = self.merge(backend, safe)?;
        }
        self.adapters.clear();
        self.active.clear();
        self.merged.clear();
        self.disabled = false;
        Ok(rounding)
    }
}
