//! A frozen linear layer with named LoRA adapters: the unit that models are made of and
//! that adapters are injected into.

use crate::adapter::{Adapter, LoraAdapter, LoraSpec, Mode, ParamGrad};
use crate::backend::{Tensor, UnaryOp};
use crate::error::{Error, Result};
use crate::linear::Linear;
use crate::ops::LoraOps;

#[path = "lora_linear_input_grad.rs"]
mod input_grad;
#[path = "lora_linear_merge.rs"]
mod merge;

/// `(dx, dW, db)` of a full fine-tuning backward.
pub type FullGrads<T> = (T, T, Option<T>);

/// The adapter name PEFT uses when none is given.
pub const DEFAULT_ADAPTER: &str = "default";

/// Which adapter serves one row of a mixed batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RowAdapter {
    /// The base layer alone (PEFT's `"__base__"`).
    Base,
    /// The named adapter.
    Named(String),
}

/// A named frozen [`Linear`] plus any number of named [`Adapter`]s.
///
/// The name is the module's dotted path (`encoder.layer.0.attention.self.query`); it is
/// what PEFT's `target_modules` rules match and what adapter files use as keys. As in
/// PEFT, the outputs of all *active* adapters add up; adapters can be disabled (base
/// only), deleted, merged into the base weight (most recent unmerged first) and used per
/// row in a mixed batch.
#[derive(Debug)]
pub struct LoraLinear<B: LoraOps> {
    name: String,
    base: Box<dyn Linear<B>>,
    /// In insertion order.
    adapters: Vec<(String, Box<dyn Adapter<B>>)>,
    active: Vec<String>,
    disabled: bool,
    /// Merged adapters, in merge order.
    merged: Vec<String>,
    saved_x: Option<B::Tensor>,
}

impl<B: LoraOps> LoraLinear<B> {
    /// Wraps a frozen base layer under a dotted name, with no adapter.
    pub fn new(name: impl Into<String>, base: Box<dyn Linear<B>>) -> Self {
        LoraLinear {
            name: name.into(),
            base,
            adapters: Vec::new(),
            active: Vec::new(),
            disabled: false,
            merged: Vec::new(),
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

    /// The frozen base layer, mutably (merging, full fine-tuning baselines). The adapters
    /// assume the weight may change and drop what they derived from it.
    pub fn base_mut(&mut self) -> &mut dyn Linear<B> {
        self.notify_base_changed();
        self.base.as_mut()
    }

    /// Swaps the frozen base layer (e.g. for its quantized version) and returns the old
    /// one. The new base must have the same shape, and no adapter may be merged into the
    /// old one.
    pub fn replace_base(&mut self, base: Box<dyn Linear<B>>) -> Result<Box<dyn Linear<B>>> {
        if !self.merged.is_empty() {
            return Err(Error::state(
                &self.name,
                "cannot replace the base layer while adapters are merged into it",
            ));
        }
        let (old, new) = (
            (self.base.out_features(), self.base.in_features()),
            (base.out_features(), base.in_features()),
        );
        if old != new {
            return Err(Error::state(
                &self.name,
                format!(
                    "new base layer is [{}, {}], the layer is [{}, {}]",
                    new.0, new.1, old.0, old.1
                ),
            ));
        }
        self.notify_base_changed();
        Ok(std::mem::replace(&mut self.base, base))
    }

    /// The first active adapter (the only one in the common single-adapter case).
    pub fn adapter(&self) -> Option<&dyn Adapter<B>> {
        let name = self.active.first()?;
        self.adapter_named(name)
    }

    /// The first active adapter, mutably.
    pub fn adapter_mut(&mut self) -> Option<&mut (dyn Adapter<B> + 'static)> {
        let name = self.active.first()?.clone();
        self.adapter_named_mut(&name)
    }

    /// The adapter called `name`.
    pub fn adapter_named(&self, name: &str) -> Option<&dyn Adapter<B>> {
        self.adapters
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| a.as_ref())
    }

    /// The adapter called `name`, mutably.
    pub fn adapter_named_mut(&mut self, name: &str) -> Option<&mut (dyn Adapter<B> + 'static)> {
        self.adapters
            .iter_mut()
            .find(|(n, _)| n == name)
            .map(|(_, a)| a.as_mut())
    }

    /// Names of all adapters, in insertion order.
    pub fn adapter_names(&self) -> Vec<&str> {
        self.adapters.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// Names of the active adapters.
    pub fn active_adapters(&self) -> &[String] {
        &self.active
    }

    /// Whether any adapter is merged into the base weight.
    pub fn is_merged(&self) -> bool {
        !self.merged.is_empty()
    }

    /// Names of the merged adapters, in merge order.
    pub fn merged_adapters(&self) -> &[String] {
        &self.merged
    }

    /// Whether adapters are disabled (the base runs alone).
    pub fn is_disabled(&self) -> bool {
        self.disabled
    }

    fn unmerged_required(&self, what: &str) -> Result<()> {
        if self.is_merged() {
            return Err(Error::state(
                &self.name,
                format!(
                    "cannot {what} while adapters are merged ({}); unmerge first",
                    self.merged.join(", ")
                ),
            ));
        }
        Ok(())
    }

    /// Creates a LoRA adapter per `spec` under the name `default`.
    pub fn inject_lora(&mut self, backend: &B, spec: &LoraSpec) -> Result<()> {
        self.add_lora(backend, DEFAULT_ADAPTER, spec)
    }

    /// Creates a LoRA adapter per `spec` under `adapter_name` (random streams are derived
    /// from the layer name, so equal specs give equal adapters on every backend).
    pub fn add_lora(&mut self, backend: &B, adapter_name: &str, spec: &LoraSpec) -> Result<()> {
        let adapter = LoraAdapter::new(
            backend,
            &self.name,
            self.base.in_features(),
            self.base.out_features(),
            spec,
        )?;
        self.add_adapter(adapter_name, Box::new(adapter))
    }

    /// Creates a DoRA adapter per `spec` under `adapter_name`: LoRA's factors plus a
    /// magnitude initialised to the row norms of the current weight (PEFT's `use_dora`).
    pub fn add_dora(&mut self, backend: &B, adapter_name: &str, spec: &LoraSpec) -> Result<()> {
        let adapter = crate::dora::DoraAdapter::new(backend, &self.name, &*self.base, spec)?;
        self.add_adapter(adapter_name, Box::new(adapter))
    }

    /// Attaches an adapter under a new name. The first adapter becomes active; later ones
    /// are inactive until [`LoraLinear::set_active_adapters`] (as PEFT's `add_adapter`).
    pub fn add_adapter(&mut self, adapter_name: &str, adapter: Box<dyn Adapter<B>>) -> Result<()> {
        if self.adapter_named(adapter_name).is_some() {
            return Err(Error::state(
                &self.name,
                format!("already has an adapter named {adapter_name:?}"),
            ));
        }
        self.unmerged_required("add an adapter")?;
        self.adapters.push((adapter_name.to_string(), adapter));
        if self.active.is_empty() {
            self.active.push(adapter_name.to_string());
        }
        Ok(())
    }

    /// Makes exactly these adapters active (their outputs add up). Names this layer does
    /// not have are skipped, so one call can serve a model whose adapters target different
    /// layers; the caller checks that each name exists somewhere.
    pub fn set_active_adapters(&mut self, names: &[&str]) -> Result<()> {
        self.unmerged_required("change the active adapters")?;
        self.active = names
            .iter()
            .filter(|n| self.adapter_named(n).is_some())
            .map(|n| n.to_string())
            .collect();
        Ok(())
    }

    /// Base only until [`LoraLinear::enable_adapters`] (PEFT's `disable_adapter()` context).
    pub fn disable_adapters(&mut self) -> Result<()> {
        self.unmerged_required("disable adapters")?;
        self.disabled = true;
        Ok(())
    }

    /// Undoes [`LoraLinear::disable_adapters`].
    pub fn enable_adapters(&mut self) {
        self.disabled = false;
    }

    /// Swaps the adapter named `adapter_name` for `adapter` in place, keeping whether it
    /// is active (a server's hotswap between requests). Refused while adapters are merged.
    pub fn replace_adapter(
        &mut self,
        adapter_name: &str,
        adapter: Box<dyn Adapter<B>>,
    ) -> Result<Box<dyn Adapter<B>>> {
        self.unmerged_required("replace an adapter")?;
        let slot = self
            .adapters
            .iter_mut()
            .find(|(n, _)| n == adapter_name)
            .ok_or_else(|| {
                Error::state(&self.name, format!("no adapter named {adapter_name:?}"))
            })?;
        Ok(std::mem::replace(&mut slot.1, adapter))
    }

    /// Removes an adapter (it must not be merged). Returns it.
    pub fn delete_adapter(&mut self, adapter_name: &str) -> Result<Box<dyn Adapter<B>>> {
        if self.merged.iter().any(|m| m == adapter_name) {
            return Err(Error::state(
                &self.name,
                format!("adapter {adapter_name:?} is merged; unmerge it first"),
            ));
        }
        let i = self
            .adapters
            .iter()
            .position(|(n, _)| n == adapter_name)
            .ok_or_else(|| {
                Error::state(&self.name, format!("no adapter named {adapter_name:?}"))
            })?;
        self.active.retain(|a| a != adapter_name);
        Ok(self.adapters.remove(i).1)
    }

    fn check_input(&self, x: &B::Tensor, what: &str) -> Result<()> {
        let in_f = self.base.in_features();
        if x.shape().rank() == 0 || x.shape().last() != in_f {
            return Err(Error::shape(
                format!(
                    "{} {what} input x (layer [{}, {in_f}])",
                    self.name,
                    self.base.out_features()
                ),
                format!("[..., {in_f}]"),
                x.shape(),
            ));
        }
        Ok(())
    }

    /// An error naming the layer when `x` holds a NaN or an infinity.
    fn check_finite(&self, backend: &B, x: &B::Tensor) -> Result<()> {
        if backend.all_finite(x)? {
            return Ok(());
        }
        Err(Error::NonFinite {
            context: format!("{} forward", self.name),
            tensor: "input x".into(),
            shape: x.shape().clone(),
        })
    }

    /// Keeps `x` for the backward in training mode (drops an older one otherwise).
    fn keep_input(&mut self, x: &B::Tensor, mode: Mode) {
        self.saved_x = match mode {
            Mode::Train => Some(x.clone()),
            Mode::Eval => None,
        };
    }

    /// Whether the forward runs adapters on top of the base.
    fn adapters_run(&self) -> bool {
        !self.disabled && !self.is_merged() && !self.active.is_empty()
    }

    /// Forward: base output plus every active adapter's term (unless merged or disabled).
    /// In training mode the input is kept for the backward. Non-finite inputs are rejected
    /// with the layer's name.
    pub fn forward(&mut self, backend: &B, x: &B::Tensor, mode: Mode) -> Result<B::Tensor> {
        let y = self.run_forward(backend, x, mode)?;
        self.keep_input(x, mode);
        Ok(y)
    }

    /// [`forward`](Self::forward) followed by the activation `act`, returning both the
    /// output and its activation (whose backward needs the output). With no adapter
    /// running (a frozen BERT feed-forward, say), the base applies `act` inside its product
    /// ([`Linear::forward_act`]) instead of in a second pass over the output.
    pub fn forward_activated(
        &mut self,
        backend: &B,
        x: &B::Tensor,
        mode: Mode,
        act: UnaryOp,
    ) -> Result<(B::Tensor, B::Tensor)> {
        if self.adapters_run() {
            let pre = self.forward(backend, x, mode)?;
            let post = backend.unary(act, &pre)?;
            return Ok((pre, post));
        }
        self.check_input(x, "forward")?;
        self.check_finite(backend, x)?;
        let out = self.base.forward_act(backend, x, act)?;
        self.keep_input(x, mode);
        Ok(out)
    }

    /// A training forward that does not keep `x`, for a caller that rebuilds `x` cheaply in
    /// the backward and hands it to [`backward_with_input`](Self::backward_with_input)
    /// (activation recomputation: the decoder MLP's `down_proj` input `silu(gate)·up` is
    /// recomputed from `gate` and `up`, which the MLP keeps anyway). The adapters still keep
    /// their own rank-sized state.
    pub fn forward_discarding_input(&mut self, backend: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let y = self.run_forward(backend, x, Mode::Train)?;
        self.saved_x = None;
        Ok(y)
    }

    fn run_forward(&mut self, backend: &B, x: &B::Tensor, mode: Mode) -> Result<B::Tensor> {
        self.check_input(x, "forward")?;
        if let Some((adapter, base)) = self.fusable_adapter(backend) {
            // One adapter (the common case): it may hand its term to the base's product.
            if let Some(y) = adapter.forward_fused(backend, base, x, mode)? {
                return Ok(y);
            }
        }
        let mut y = self.base.forward(backend, x)?;
        if self.adapters_run() {
            // Active adapters reject non-finite input themselves, more cheaply (LoraAdapter).
            let (active, base) = (&self.active, &*self.base);
            for (name, adapter) in self.adapters.iter_mut() {
                if active.contains(name) {
                    adapter.forward(backend, base, x, &mut y, mode)?;
                }
            }
        } else {
            self.check_finite(backend, x)?;
        }
        Ok(y)
    }

    /// Inference over a mixed batch: row `i` of the matrix view of `x` goes through the base
    /// plus `rows[i]`'s adapter (or the base alone), in one pass (PEFT's `adapter_names`).
    /// A row naming an adapter this layer does not have gets the base here, as in PEFT (the
    /// model checks that each name exists somewhere). Rejected while merged.
    pub fn forward_mixed(
        &mut self,
        backend: &B,
        x: &B::Tensor,
        rows: &[RowAdapter],
    ) -> Result<B::Tensor> {
        self.check_input(x, "mixed-batch forward")?;
        self.unmerged_required("run a mixed-adapter batch")?;
        let n = x.shape().as_matrix().0;
        if rows.len() != n {
            return Err(Error::state(
                &self.name,
                format!(
                    "mixed batch names an adapter for {} rows, input has {n}",
                    rows.len()
                ),
            ));
        }
        self.check_finite(backend, x)?;
        let mut y = self.base.forward(backend, x)?;
        let out_f = self.base.out_features();
        for (name, adapter) in self.adapters.iter_mut() {
            let idx: Vec<usize> = rows
                .iter()
                .enumerate()
                .filter(|(_, r)| matches!(r, RowAdapter::Named(a) if a == name))
                .map(|(i, _)| i)
                .collect();
            if idx.is_empty() {
                continue;
            }
            let xs = backend.gather_rows(x, &idx)?;
            let mut ys = backend.zeros(&[idx.len(), out_f])?;
            adapter.forward(backend, &*self.base, &xs, &mut ys, Mode::Eval)?;
            backend.scatter_add_rows(&mut y, &idx, &ys)?;
        }
        self.saved_x = None;
        Ok(y)
    }

    /// Backward from `dy`: computes the active adapters' gradients and returns `dx` (base
    /// and adapter parts accumulated in one tensor).
    pub fn backward(&mut self, backend: &B, dy: &B::Tensor) -> Result<B::Tensor> {
        self.trainable_required()?;
        let x = self.take_saved_input()?;
        self.backward_with_input(backend, &x, dy)
    }

    /// The input the last training forward kept, taken for the backward.
    fn take_saved_input(&mut self) -> Result<B::Tensor> {
        self.saved_x.take().ok_or_else(|| {
            Error::state(
                &self.name,
                "backward called without a forward in training mode",
            )
        })
    }

    /// An error naming the layer unless `dy` has the shape of this layer's output for `x`.
    fn check_output_grad(&self, x: &B::Tensor, dy: &B::Tensor) -> Result<()> {
        let expected = x.shape().with_last(self.base.out_features());
        if dy.shape() != &expected {
            return Err(Error::shape(
                format!("{} backward gradient dy", self.name),
                format!("{expected}"),
                dy.shape(),
            ));
        }
        Ok(())
    }

    /// The backward after [`forward_discarding_input`](Self::forward_discarding_input):
    /// `x` must be the input of that forward.
    pub fn backward_with_input(
        &mut self,
        backend: &B,
        x: &B::Tensor,
        dy: &B::Tensor,
    ) -> Result<B::Tensor> {
        self.trainable_required()?;
        self.check_output_grad(x, dy)?;
        let run = self.adapters_run();
        // DoRA rescales the base output: the base then sees `dy ⊙ scale`.
        let mut dy_base: Option<B::Tensor> = None;
        if run {
            let active = (self.adapters.iter())
                .filter(|(n, _)| self.active.contains(n))
                .count();
            for (name, adapter) in self.adapters.iter_mut() {
                if !self.active.contains(name) {
                    continue;
                }
                if let Some(g) = adapter.base_output_grad(backend, dy)? {
                    if active > 1 {
                        // PEFT's DoRA rescales the running output, earlier adapters' terms
                        // included, so the adapters' gradients would chain; PEFT trains one
                        // adapter at a time, and so does this.
                        return Err(Error::state(
                            format!("{} backward", self.name),
                            format!(
                                "adapter {name} (DoRA) is trained with {} other active adapters; activate one adapter to train DoRA",
                                active - 1
                            ),
                        ));
                    }
                    dy_base = Some(g);
                }
            }
        }
        // The base's output gradient (DoRA's `dy ⊙ scale`) is also the fused adapter's.
        if let Some((adapter, base)) = self.fusable_adapter(backend)
            && let Some(dx) =
                adapter.backward_fused(backend, base, x, dy_base.as_ref().unwrap_or(dy))?
        {
            return Ok(dx);
        }
        let mut dx = self
            .base
            .backward(backend, dy_base.as_ref().unwrap_or(dy))?;
        if run {
            let (active, base) = (&self.active, &*self.base);
            for (name, adapter) in self.adapters.iter_mut() {
                if active.contains(name) {
                    adapter.backward(backend, base, x, dy, &mut dx)?;
                }
            }
        }
        Ok(dx)
    }

    /// The adapter that runs, when exactly one does (and the layer is not merged or
    /// disabled) and the backend fuses a low-rank product into the base's, with the base
    /// it runs on.
    #[allow(clippy::type_complexity)]
    fn fusable_adapter(
        &mut self,
        backend: &B,
    ) -> Option<(&mut Box<dyn Adapter<B>>, &dyn Linear<B>)> {
        if !backend.fuses_matmul_plus() || !self.adapters_run() || self.active.len() != 1 {
            return None;
        }
        let active = &self.active;
        let mut running = self.adapters.iter_mut().filter(|(n, _)| active.contains(n));
        match (running.next(), running.next()) {
            (Some((_, adapter)), None) => Some((adapter, &*self.base)),
            _ => None,
        }
    }

    /// Every adapter drops what it derived from the base weight (DoRA's norms).
    fn notify_base_changed(&mut self) {
        for (_, a) in self.adapters.iter_mut() {
            a.base_changed();
        }
    }

    fn trainable_required(&self) -> Result<()> {
        if self.is_merged() && !self.adapters.is_empty() {
            // The adapters' contribution is inside W now and would get no gradient.
            self.unmerged_required("train")?;
        }
        Ok(())
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

    /// The active adapters' parameters with their gradients (empty before a backward).
    pub fn params_and_grads(&mut self) -> Vec<ParamGrad<'_, B::Tensor>> {
        let active = &self.active;
        self.adapters
            .iter_mut()
            .filter(|(n, _)| active.contains(n))
            .flat_map(|(_, a)| a.params_and_grads())
            .collect()
    }

    /// Trainable scalars (all adapters').
    pub fn num_trainable(&self) -> usize {
        self.adapters.iter().map(|(_, a)| a.num_parameters()).sum()
    }
}
