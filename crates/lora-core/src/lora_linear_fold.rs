//! Folding a plain LoRA adapter into the product for one step, a child module of
//! `lora_linear`.
//!
//! Unfolded, a LoRA layer runs six rank-r products per training step beside the frozen
//! ones: `H = x Aᵀ` and `y += s·H Bᵀ` forward, `G = dy B`, `dA`, `dB` and `dx += s·G A`
//! backward; each reads or writes a `[tokens, features]` tensor at a few flops per byte,
//! so their cost is memory traffic more than arithmetic. When the step has many tokens
//! the layer instead forms `W' = W + s·B A` (`[out, in]`, `2·r·out·in` flops) and runs
//! the frozen products with it: `y = x W'ᵀ + b` and `dx = dy W'` carry the LoRA term, and
//! only `H`, `G`, `dA` and `dB` remain. Folding pays when the two products it removes
//! (`tokens·r·(in + out)` flops and two passes over `y` and `dx`) outweigh forming `W'`
//! twice (forward and backward): when `tokens·(in + out) > 2·in·out`, i.e. more tokens
//! than the harmonic mean of the two widths. Only a plain LoRA adapter without dropout
//! (dropout masks the LoRA input alone), alone among the active adapters, over a dense f32
//! base folds; the result equals the unfolded one up to f32 rounding.

use super::LoraLinear;
use crate::adapter::Mode;
use crate::backend::Tensor;
use crate::error::Result;
use crate::linear::{DenseLinear, Linear};
use crate::ops::LoraOps;

impl<B: LoraOps> LoraLinear<B> {
    /// The index of the adapter to fold for `x` in `mode`, when folding pays.
    fn fold_candidate(&self, x: &B::Tensor, mode: Mode) -> Option<usize> {
        if !self.adapters_run() {
            return None;
        }
        let mut active =
            (self.adapters.iter().enumerate()).filter(|(_, (n, _))| self.active.contains(n));
        let (index, (_, adapter)) = active.next()?;
        if active.next().is_some() || adapter.foldable(mode).is_none() {
            return None;
        }
        self.base.dense_weight()?;
        let tokens = x.shape().as_matrix().0;
        let (inp, out) = (self.base.in_features(), self.base.out_features());
        (tokens.saturating_mul(inp + out) > 2 * inp * out).then_some(index)
    }

    /// The base with adapter `index` folded in: `W + s·B A` and the base's bias.
    fn folded_base(&self, backend: &B, index: usize) -> Result<Option<DenseLinear<B>>> {
        let (Some(w), Some((a, b, s))) = (
            self.base.dense_weight(),
            self.adapters[index].1.foldable(Mode::Eval),
        ) else {
            return Ok(None);
        };
        let mut folded = backend.lora_delta_weight(a, b, s, false)?;
        backend.axpby(1.0, w, 1.0, &mut folded)?;
        Ok(Some(DenseLinear::new(folded, self.base.bias().cloned())?))
    }

    /// The forward through the folded weight when folding pays (`None`: run unfolded). In
    /// training, the backward is then folded too.
    pub(super) fn forward_folded(
        &mut self,
        backend: &B,
        x: &B::Tensor,
        mode: Mode,
    ) -> Result<Option<B::Tensor>> {
        let Some(index) = self.fold_candidate(x, mode) else {
            return Ok(None);
        };
        let Some(layer) = self.folded_base(backend, index)? else {
            return Ok(None);
        };
        self.adapters[index].1.forward_folded(backend, x, mode)?;
        let y = layer.forward(backend, x)?;
        self.folded = (mode == Mode::Train).then_some(index);
        Ok(Some(y))
    }

    /// The backward of a folded forward: `dx = dy W'` (the LoRA part included), then the
    /// adapter's `dA`, `dB`.
    pub(super) fn backward_folded(
        &mut self,
        backend: &B,
        index: usize,
        x: &B::Tensor,
        dy: &B::Tensor,
    ) -> Result<B::Tensor> {
        let layer = self.folded_base(backend, index)?.ok_or_else(|| {
            crate::error::Error::state(&self.name, "the folded adapter changed before the backward")
        })?;
        let dx = layer.backward(backend, dy)?;
        self.adapters[index].1.backward_folded(backend, x, dy)?;
        Ok(dx)
    }
}
