//! A frozen linear layer with an optional LoRA adapter: the unit that models are made of
//! and that adapters are injected into.

use crate::adapter::{Adapter, LoraAdapter, LoraSpec, Mode, ParamGrad};
use crate::backend::{BinaryOp, Tensor};
use crate::error::{Error, Result};
use crate::linear::Linear;
use crate::ops::LoraOps;

/// `(dx, dW, db)` of a full fine-tuning backward.
pub type FullGrads<T> = (T, T, Option<T>);

/// A named frozen [`Linear`] plus, once injected, an [`Adapter`].
///
/// The name is the module's dotted path (`encoder.layer.0.attention.self.query`); it is
/// what PEFT's `target_modules` rules match and what adapter files use as keys.
#[derive(Debug)]
pub struct LoraLinear<B: LoraOps> {
    name: String,
    base: Box<dyn Linear<B>>,
    adapter: Option<Box<dyn Adapter<B>>>,
    merged: bool,
    saved_x: Option<B::Tensor>,
}

impl<B: LoraOps> LoraLinear<B> {
    /// Wraps a frozen base layer under a dotted name, with no adapter.
    pub fn new(name: impl Into<String>, base: Box<dyn Linear<B>>) -> Self {
        LoraLinear {
            name: name.into(),
            base,
            adapter: None,
            merged: false,
            saved_x: None,
        }
    }

    /// The dotted module name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The frozen base layer.
    pub fn base(&self) -> &dyn Linear<B> {
        self.base.as_ref()
    }

    /// The frozen base layer, mutably (merging, full fine-tuning baselines).
    pub fn base_mut(&mut self) -> &mut dyn Linear<B> {
        self.base.as_mut()
    }

    /// The adapter, if one was injected.
    pub fn adapter(&self) -> Option<&dyn Adapter<B>> {
        self.adapter.as_deref()
    }

    /// The adapter, mutably.
    pub fn adapter_mut(&mut self) -> Option<&mut (dyn Adapter<B> + 'static)> {
        self.adapter.as_deref_mut()
    }

    /// Whether the adapter is currently merged into the base weight.
    pub fn is_merged(&self) -> bool {
        self.merged
    }

    /// Creates and attaches a LoRA adapter per `spec`; replaces none: a layer that already
    /// has one is an error.
    pub fn inject_lora(&mut self, backend: &B, spec: &LoraSpec) -> Result<()> {
        if self.adapter.is_some() {
            return Err(Error::state(&self.name, "already has an adapter"));
        }
        let adapter = LoraAdapter::new(
            backend,
            &self.name,
            self.base.in_features(),
            self.base.out_features(),
            spec,
        )?;
        self.adapter = Some(Box::new(adapter));
        Ok(())
    }

    /// Attaches any adapter.
    pub fn set_adapter(&mut self, adapter: Box<dyn Adapter<B>>) -> Result<()> {
        if self.merged {
            return Err(Error::state(
                &self.name,
                "cannot replace an adapter while merged",
            ));
        }
        self.adapter = Some(adapter);
        Ok(())
    }

    /// Forward: base output plus the adapter's term (unless merged). In training mode the
    /// input is kept for the backward. Non-finite inputs are rejected with the layer's name.
    pub fn forward(&mut self, backend: &B, x: &B::Tensor, mode: Mode) -> Result<B::Tensor> {
        let in_f = self.base.in_features();
        if x.shape().rank() == 0 || x.shape().last() != in_f {
            return Err(Error::shape(
                format!(
                    "{} forward input x (layer [{}, {in_f}])",
                    self.name,
                    self.base.out_features()
                ),
                format!("[..., {in_f}]"),
                x.shape(),
            ));
        }
        let mut y = self.base.forward(backend, x)?;
        match (self.adapter.as_mut(), self.merged) {
            // The adapter rejects non-finite input itself, more cheaply (see LoraAdapter).
            (Some(adapter), false) => adapter.forward(backend, x, &mut y, mode)?,
            _ => {
                if !backend.all_finite(x)? {
                    return Err(Error::NonFinite {
                        context: format!("{} forward", self.name),
                        tensor: "input x".into(),
                        shape: x.shape().clone(),
                    });
                }
            }
        }
        self.saved_x = match mode {
            Mode::Train => Some(x.clone()),
            Mode::Eval => None,
        };
        Ok(y)
    }

    /// Backward from `dy`: computes the adapter's gradients and returns `dx` (base and
    /// adapter parts accumulated in one tensor).
    pub fn backward(&mut self, backend: &B, dy: &B::Tensor) -> Result<B::Tensor> {
        if self.merged && self.adapter.is_some() {
            // The adapter's contribution is inside W now and would get no gradient.
            return Err(Error::state(
                &self.name,
                "cannot train while the adapter is merged; unmerge first",
            ));
        }
        let x = self.saved_x.take().ok_or_else(|| {
            Error::state(
                &self.name,
                "backward called without a forward in training mode",
            )
        })?;
        let expected = x.shape().with_last(self.base.out_features());
        if dy.shape() != &expected {
            return Err(Error::shape(
                format!("{} backward gradient dy", self.name),
                format!("{expected}"),
                dy.shape(),
            ));
        }
        let mut dx = self.base.backward(backend, dy)?;
        if let (Some(adapter), false) = (self.adapter.as_mut(), self.merged) {
            adapter.backward(backend, &x, dy, &mut dx)?;
        }
        Ok(dx)
    }

    /// Full fine-tuning gradients of the base (`dW`, `db`) from the last training forward,
    /// for baselines and pretraining. Also returns `dx`.
    pub fn backward_full(&mut self, backend: &B, dy: &B::Tensor) -> Result<FullGrads<B::Tensor>> {
        let x = self.saved_x.clone().ok_or_else(|| {
            Error::state(
                &self.name,
                "backward called without a forward in training mode",
            )
        })?;
        let dx = self.backward(backend, dy)?;
        let dense = self.base.as_dense_mut().ok_or_else(|| {
            Error::state(
                &self.name,
                "full fine-tuning needs a dense (unquantized) base",
            )
        })?;
        let (d_w, d_b) = dense.param_grads(backend, &x, dy)?;
        Ok((dx, d_w, d_b))
    }

    /// Adds the adapter's `delta_W` into the base weight. With `safe`, the merged weight is
    /// computed on a copy first and the merge is refused, leaving the layer untouched, if
    /// any value would be non-finite.
    pub fn merge(&mut self, backend: &B, safe: bool) -> Result<()> {
        if self.merged {
            return Err(Error::state(&self.name, "adapter is already merged"));
        }
        let adapter = self
            .adapter
            .as_ref()
            .ok_or_else(|| Error::state(&self.name, "no adapter to merge"))?;
        let delta = adapter.delta_weight(backend)?;
        if safe {
            let merged = backend.binary(BinaryOp::Add, &self.base.weight(backend)?, &delta)?;
            if !backend.all_finite(&merged)? {
                return Err(Error::NonFinite {
                    context: format!("{} safe_merge (refused, weights unchanged)", self.name),
                    tensor: "merged weight".into(),
                    shape: merged.shape().clone(),
                });
            }
        }
        self.base.add_to_weight(backend, &delta, 1.0)?;
        self.merged = true;
        Ok(())
    }

    /// Subtracts the merged `delta_W` again.
    pub fn unmerge(&mut self, backend: &B) -> Result<()> {
        if !self.merged {
            return Err(Error::state(&self.name, "adapter is not merged"));
        }
        let adapter = self
            .adapter
            .as_ref()
            .ok_or_else(|| Error::state(&self.name, "no adapter to unmerge"))?;
        let delta = adapter.delta_weight(backend)?;
        self.base.add_to_weight(backend, &delta, -1.0)?;
        self.merged = false;
        Ok(())
    }

    /// The adapter's parameters with their gradients (empty without adapter or backward).
    pub fn params_and_grads(&mut self) -> Vec<ParamGrad<'_, B::Tensor>> {
        match self.adapter.as_mut() {
            Some(a) => a.params_and_grads(),
            None => Vec::new(),
        }
    }

    /// Trainable scalars (the adapter's).
    pub fn num_trainable(&self) -> usize {
        self.adapter.as_ref().map_or(0, |a| a.num_parameters())
    }
}
