//! Adapters: trainable low-rank additions to a frozen [`Linear`].

use std::fmt::Debug;

use crate::backend::{Backend, BinaryOp, Tensor};
use crate::error::{Error, Result};
use crate::linear::Linear;
use crate::ops::{LoraGrads, LoraOps};
use crate::rng::{self, RngState};
use crate::through_base::{backward_through_base, forward_through_base};

/// Training or inference. Dropout acts only in training, and only training saves
/// activations for the backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Dropout on, activations saved.
    Train,
    /// Dropout off, nothing saved.
    Eval,
}

/// A trainable tensor and its gradient, as handed to an [`Optimizer`](crate::Optimizer).
#[derive(Debug)]
pub struct ParamGrad<'a, T> {
    /// The parameter, updated in place.
    pub param: &'a mut T,
    /// Its gradient from the last backward.
    pub grad: &'a T,
}

/// A trainable addition to a frozen linear layer's output. The frozen layer `base` is
/// handed to every call: LoRA ignores it, DoRA reads its weight (the column norm) and
/// rescales its output.
pub trait Adapter<B: LoraOps>: Debug + Send + Sync {
    /// Adds the adapter's term to `y` (the base output for input `x`).
    fn forward(
        &mut self,
        backend: &B,
        base: &dyn Linear<B>,
        x: &B::Tensor,
        y: &mut B::Tensor,
        mode: Mode,
    ) -> Result<()>;
    /// Computes the parameter gradients from the saved forward and adds the adapter's part
    /// of the input gradient to `dx` (which holds the base layer's).
    fn backward(
        &mut self,
        backend: &B,
        base: &dyn Linear<B>,
        x: &B::Tensor,
        dy: &B::Tensor,
        dx: &mut B::Tensor,
    ) -> Result<()>;
    /// The base output plus this adapter's term in one call, the adapter handing the base
    /// its term as a low-rank product ([`Linear::forward_plus`]: one pass over the output
    /// on a dense base). `None` where the adapter cannot (the layer then runs the base and
    /// [`forward`](Adapter::forward)). Saves what the backward needs, as `forward` does.
    fn forward_fused(
        &mut self,
        backend: &B,
        base: &dyn Linear<B>,
        x: &B::Tensor,
        mode: Mode,
    ) -> Result<Option<B::Tensor>> {
        let _ = (backend, base, x, mode);
        Ok(None)
    }
    /// The base's input gradient plus this adapter's in one call ([`Linear::backward_plus`]),
    /// computing the parameter gradients as [`backward`](Adapter::backward) does. `dy` is
    /// what the base's output takes: the layer's output gradient, or what
    /// [`base_output_grad`](Adapter::base_output_grad) made of it. `None` where the adapter
    /// cannot, with nothing consumed (the layer then runs the base and `backward`).
    fn backward_fused(
        &mut self,
        backend: &B,
        base: &dyn Linear<B>,
        x: &B::Tensor,
        dy: &B::Tensor,
    ) -> Result<Option<B::Tensor>> {
        let _ = (backend, base, x, dy);
        Ok(None)
    }
    /// The parameter gradients alone, for a layer whose input gradient nothing needs
    /// ([`LoraLinear::backward_params`](crate::LoraLinear::backward_params)): `false` where
    /// the adapter cannot, with nothing consumed (the layer then runs the full backward
    /// and drops the input gradient).
    fn backward_params(&mut self, backend: &B, x: &B::Tensor, dy: &B::Tensor) -> Result<bool> {
        let _ = (backend, x, dy);
        Ok(false)
    }
    /// The frozen base layer was replaced or its weight changed (merge, unmerge,
    /// quantization): drop whatever was derived from it.
    fn base_changed(&mut self) {}
    /// After a training forward: the gradient the base layer's output takes when this
    /// adapter rescales it (`None`: the base output passes through unscaled, so the base
    /// sees `dy` itself). DoRA multiplies the base output by `m / ‖W + ΔW‖` and returns
    /// `dy ⊙ m / ‖·‖`, computing its magnitude gradient's reduction in the same pass; the
    /// layer then sends that through the base (one product, not a second one inside the
    /// adapter).
    fn base_output_grad(&mut self, backend: &B, dy: &B::Tensor) -> Result<Option<B::Tensor>> {
        let _ = (backend, dy);
        Ok(None)
    }
    /// The dense `[out, in]` weight update this adapter is equivalent to.
    fn delta_weight(&self, backend: &B) -> Result<B::Tensor>;
    /// What merging adds to the base weight `weight` (`[out, in]`, unmerged): `delta_weight`
    /// for LoRA; DoRA's depends on the weight itself.
    fn merge_delta(&mut self, backend: &B, weight: &B::Tensor) -> Result<B::Tensor> {
        let _ = weight;
        self.delta_weight(backend)
    }
    /// What unmerging adds to the merged base weight `weight` (the negated merge delta for
    /// LoRA).
    fn unmerge_delta(&mut self, backend: &B, weight: &B::Tensor) -> Result<B::Tensor> {
        let _ = weight;
        backend.affine(&self.delta_weight(backend)?, -1.0, 0.0)
    }
    /// Named tensors, with PEFT's names (`lora_A`, `lora_B`).
    fn tensors(&self) -> Vec<(&'static str, &B::Tensor)>;
    /// Replaces a named tensor (loading an adapter file); the shape must match.
    fn set_tensor(&mut self, name: &str, value: B::Tensor) -> Result<()>;
    /// Trainable parameters with their gradients; empty before the first backward.
    fn params_and_grads(&mut self) -> Vec<ParamGrad<'_, B::Tensor>>;
    /// The dropout probability on the adapter's input in training (0 when none): whoever
    /// recomputes a forward (gradient checkpointing) must know whether masks are drawn.
    fn dropout(&self) -> f32 {
        0.0
    }
    /// Number of trainable scalars.
    fn num_parameters(&self) -> usize {
        self.tensors().iter().map(|(_, t)| t.numel()).sum()
    }
}

/// How `lora_A` and `lora_B` start (`init_lora_weights` in PEFT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraInit {
    /// `true`: A Kaiming-uniform (a = √5), B zeros. A fresh adapter is a no-op.
    KaimingUniform,
    /// `"gaussian"`: A ~ N(0, (1/r)²), B zeros.
    Gaussian,
    /// `false`: both random, as `nn.Linear`'s default init; not a no-op (for tests).
    Random,
}

/// The hyper-parameters of one LoRA adapter.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    /// Rank `r`, `1 <= r <= min(in, out)`.
    pub r: usize,
    /// `lora_alpha`.
    pub alpha: f32,
    /// Dropout probability on the LoRA input, in `[0, 1)`.
    pub dropout: f32,
    /// rsLoRA: scaling `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
    /// Initialisation.
    pub init: LoraInit,
    /// Seed of the shared generator for init and dropout.
    pub seed: u64,
}

impl Default for LoraSpec {
    /// PEFT's defaults: `r = 8`, `lora_alpha = 8`, no dropout, Kaiming init.
    fn default() -> Self {
        LoraSpec {
            r: 8,
            alpha: 8.0,
            dropout: 0.0,
            use_rslora: false,
            init: LoraInit::KaimingUniform,
            seed: 0,
        }
    }
}

impl LoraSpec {
    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scaling(&self) -> f32 {
        if self.use_rslora {
            self.alpha / (self.r as f32).sqrt()
        } else {
            self.alpha / self.r as f32
        }
    }

    /// Checks the spec for a layer `[out, in]` named `layer`.
    pub fn validate(&self, layer: &str, in_f: usize, out_f: usize) -> Result<()> {
        let ctx = || format!("LoRA on {layer} [{out_f}, {in_f}]");
        if self.r == 0 {
            return Err(Error::config(ctx(), "r", self.r, "rank must be at least 1"));
        }
        if self.r > in_f.min(out_f) {
            return Err(Error::config(
                ctx(),
                "r",
                self.r,
                format!("rank must not exceed min(in, out) = {}", in_f.min(out_f)),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::config(
                ctx(),
                "lora_dropout",
                self.dropout,
                "must be in [0, 1)",
            ));
        }
        if !self.alpha.is_finite() {
            return Err(Error::config(
                ctx(),
                "lora_alpha",
                self.alpha,
                "must be finite",
            ));
        }
        Ok(())
    }
}

/// Activations kept from the forward for the backward.
#[derive(Debug, Clone)]
struct Saved<T> {
    h: T,
    mask: Option<T>,
}

/// A LoRA adapter: `y += scaling · (dropout(x) Aᵀ) Bᵀ` with `A: [r, in]`, `B: [out, r]`.
#[derive(Debug, Clone)]
pub struct LoraAdapter<B: Backend> {
    layer: String,
    a: B::Tensor,
    b: B::Tensor,
    scaling: f32,
    dropout: f32,
    dropout_rng: RngState,
    saved: Option<Saved<B::Tensor>>,
    grads: Option<LoraGrads<B::Tensor>>,
}

impl<B: LoraOps> LoraAdapter<B> {
    /// A new adapter for the layer named `layer` with shape `[out, in]`, initialised from
    /// the shared generator (streams derived from the layer name and `spec.seed`).
    pub fn new(
        backend: &B,
        layer: &str,
        in_f: usize,
        out_f: usize,
        spec: &LoraSpec,
    ) -> Result<Self> {
        spec.validate(layer, in_f, out_f)?;
        let r = spec.r;
        let mut a = vec![0.0f32; r * in_f];
        let mut b = vec![0.0f32; out_f * r];
        let a_rng = RngState::new(spec.seed, rng::stream_id(layer, "lora_A"));
        let b_rng = RngState::new(spec.seed, rng::stream_id(layer, "lora_B"));
        // Kaiming-uniform with a = sqrt(5): bound = sqrt(6 / ((1 + 5) fan_in)) = 1/sqrt(fan_in).
        let kaiming = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
        match spec.init {
            LoraInit::KaimingUniform => {
                let bound = kaiming(in_f);
                rng::uniform(a_rng, -bound, bound, &mut a);
            }
            LoraInit::Gaussian => rng::normal(a_rng, 0.0, 1.0 / r as f32, &mut a),
            LoraInit::Random => {
                let bound = kaiming(in_f);
                rng::uniform(a_rng, -bound, bound, &mut a);
                let bound = kaiming(r);
                rng::uniform(b_rng, -bound, bound, &mut b);
            }
        }
        Ok(LoraAdapter {
            layer: layer.to_string(),
            a: backend.from_host(&a, &[r, in_f])?,
            b: backend.from_host(&b, &[out_f, r])?,
            scaling: spec.scaling(),
            dropout: spec.dropout,
            dropout_rng: RngState::new(spec.seed, rng::stream_id(layer, "dropout")),
            saved: None,
            grads: None,
        })
    }

    /// An adapter from existing tensors `a: [r, in]`, `b: [out, r]` (combinations of other
    /// adapters, whose rank may exceed `min(in, out)`, as PEFT allows for them).
    pub fn from_tensors(
        layer: &str,
        a: B::Tensor,
        b: B::Tensor,
        scaling: f32,
        dropout: f32,
        seed: u64,
    ) -> Result<Self> {
        let (ad, bd) = (a.shape().dims(), b.shape().dims());
        if ad.len() != 2 || bd.len() != 2 || ad[0] != bd[1] || ad[0] == 0 {
            return Err(Error::shape(
                format!("LoRA on {layer}: lora_B for lora_A {}", a.shape()),
                format!("[out, {}]", ad.first().copied().unwrap_or(0)),
                b.shape(),
            ));
        }
        if !(0.0..1.0).contains(&dropout) {
            return Err(Error::config(
                format!("LoRA on {layer}"),
                "lora_dropout",
                dropout,
                "must be in [0, 1)",
            ));
        }
        Ok(LoraAdapter {
            layer: layer.to_string(),
            a,
            b,
            scaling,
            dropout,
            dropout_rng: RngState::new(seed, rng::stream_id(layer, "dropout")),
            saved: None,
            grads: None,
        })
    }

    /// Rank.
    pub fn rank(&self) -> usize {
        self.a.shape().dims()[0]
    }

    /// The scaling applied to the LoRA term.
    pub fn scaling(&self) -> f32 {
        self.scaling
    }

    /// `lora_A`, `[r, in]`.
    pub fn lora_a(&self) -> &B::Tensor {
        &self.a
    }

    /// `lora_B`, `[out, r]`.
    pub fn lora_b(&self) -> &B::Tensor {
        &self.b
    }

    /// Gradients from the last backward.
    pub fn grads(&self) -> Option<&LoraGrads<B::Tensor>> {
        self.grads.as_ref()
    }

    /// The unfused backward: `dA` and `dB` from what the forward kept, and the adapter's
    /// part of the input gradient added to `dx` when there is one to add to.
    fn backward_into(
        &mut self,
        backend: &B,
        x: &B::Tensor,
        dy: &B::Tensor,
        dx: Option<&mut B::Tensor>,
    ) -> Result<()> {
        let saved = self.take_saved()?;
        let (a, b, s, mask, h) = (
            &self.a,
            &self.b,
            self.scaling,
            saved.mask.as_ref(),
            &saved.h,
        );
        self.grads = Some(match dx {
            Some(dx) => backend.lora_backward(x, a, b, s, mask, h, dy, dx)?,
            None => backend.lora_grads(x, a, b, s, mask, h, dy)?,
        });
        Ok(())
    }

    /// What the last training forward kept, taken for the backward.
    fn take_saved(&mut self) -> Result<Saved<B::Tensor>> {
        self.saved.take().ok_or_else(|| {
            Error::state(
                format!("LoRA on {}", self.layer),
                "backward called without a forward in training mode",
            )
        })
    }

    /// NaN or inf anywhere in a row of x makes that row of H = (x ⊙ M) Aᵀ non-finite
    /// (IEEE: NaN·0 = NaN, inf·0 = NaN), so checking the [n, r] H detects bad input at
    /// 1/(in/r) of the cost of scanning x; x itself is scanned only to word the error.
    fn check_projection(&self, backend: &B, x: &B::Tensor, h: &B::Tensor) -> Result<()> {
        if backend.all_finite(h)? {
            return Ok(());
        }
        let input_bad = !backend.all_finite(x)?;
        Err(Error::NonFinite {
            context: format!("{} forward", self.layer),
            tensor: if input_bad {
                "input x".into()
            } else {
                "LoRA projection x·lora_Aᵀ (overflow)".into()
            },
            shape: if input_bad {
                x.shape().clone()
            } else {
                h.shape().clone()
            },
        })
    }
}

impl<B: LoraOps> Adapter<B> for LoraAdapter<B> {
    fn dropout(&self) -> f32 {
        self.dropout
    }

    fn forward(
        &mut self,
        backend: &B,
        _base: &dyn Linear<B>,
        x: &B::Tensor,
        y: &mut B::Tensor,
        mode: Mode,
    ) -> Result<()> {
        let mask = draw_dropout_mask(backend, &mut self.dropout_rng, self.dropout, x, mode)?;
        let h = backend.lora_forward(x, &self.a, &self.b, self.scaling, mask.as_ref(), y)?;
        self.check_projection(backend, x, &h)?;
        self.saved = match mode {
            Mode::Train => Some(Saved { h, mask }),
            Mode::Eval => None,
        };
        Ok(())
    }

    fn forward_fused(
        &mut self,
        backend: &B,
        base: &dyn Linear<B>,
        x: &B::Tensor,
        mode: Mode,
    ) -> Result<Option<B::Tensor>> {
        let mask = draw_dropout_mask(backend, &mut self.dropout_rng, self.dropout, x, mode)?;
        let dropped = match &mask {
            Some(m) => Some(backend.binary(BinaryOp::Mul, x, m)?),
            None => None,
        };
        let (y, h) = forward_through_base(
            backend,
            base,
            (&self.a, &self.b, self.scaling),
            (x, dropped.as_ref()),
            |h| self.check_projection(backend, x, h),
        )?;
        self.saved = match mode {
            Mode::Train => Some(Saved { h, mask }),
            Mode::Eval => None,
        };
        Ok(Some(y))
    }

    fn backward_fused(
        &mut self,
        backend: &B,
        base: &dyn Linear<B>,
        x: &B::Tensor,
        dy: &B::Tensor,
    ) -> Result<Option<B::Tensor>> {
        // With dropout the adapter's input gradient is masked, so it cannot join the
        // base's product.
        let Some(saved) = self.saved.take_if(|s| s.mask.is_none()) else {
            return Ok(None);
        };
        let (dx, grads) = backward_through_base(
            backend,
            base,
            (&self.a, &self.b, self.scaling),
            x,
            &saved.h,
            dy,
        )?;
        self.grads = Some(grads);
        Ok(Some(dx))
    }

    fn backward(
        &mut self,
        backend: &B,
        _base: &dyn Linear<B>,
        x: &B::Tensor,
        dy: &B::Tensor,
        dx: &mut B::Tensor,
    ) -> Result<()> {
        self.backward_into(backend, x, dy, Some(dx))
    }

    fn backward_params(&mut self, backend: &B, x: &B::Tensor, dy: &B::Tensor) -> Result<bool> {
        self.backward_into(backend, x, dy, None)?;
        Ok(true)
    }

    fn delta_weight(&self, backend: &B) -> Result<B::Tensor> {
        backend.lora_delta_weight(&self.a, &self.b, self.scaling, false)
    }

    fn tensors(&self) -> Vec<(&'static str, &B::Tensor)> {
        vec![("lora_A", &self.a), ("lora_B", &self.b)]
    }

    fn set_tensor(&mut self, name: &str, value: B::Tensor) -> Result<()> {
        let slot = match name {
            "lora_A" => &mut self.a,
            "lora_B" => &mut self.b,
            other => {
                return Err(Error::state(
                    format!("LoRA on {}", self.layer),
                    format!("unknown adapter tensor {other:?} (expected lora_A or lora_B)"),
                ));
            }
        };
        replace_checked(
            slot,
            value,
            &format!("LoRA on {} tensor {name}", self.layer),
        )
    }

    fn params_and_grads(&mut self) -> Vec<ParamGrad<'_, B::Tensor>> {
        match &self.grads {
            Some(g) => vec![
                ParamGrad {
                    param: &mut self.a,
                    grad: &g.d_a,
                },
                ParamGrad {
                    param: &mut self.b,
                    grad: &g.d_b,
                },
            ],
            None => Vec::new(),
        }
    }
}

/// In training with dropout `p > 0`, the next mask for `x` from `rng` (which advances);
/// otherwise `None`.
pub(crate) fn draw_dropout_mask<B: LoraOps>(
    backend: &B,
    rng: &mut RngState,
    p: f32,
    x: &B::Tensor,
    mode: Mode,
) -> Result<Option<B::Tensor>> {
    if mode != Mode::Train || p <= 0.0 {
        return Ok(None);
    }
    let state = rng.advance(x.numel());
    Ok(Some(backend.dropout_mask(x.shape().dims(), p, state)?))
}

/// `*slot = value` when the shapes agree; otherwise an error naming `context`.
pub(crate) fn replace_checked<T: Tensor>(slot: &mut T, value: T, context: &str) -> Result<()> {
    if slot.shape() != value.shape() {
        return Err(Error::shape(
            context,
            format!("{}", slot.shape()),
            value.shape(),
        ));
    }
    *slot = value;
    Ok(())
}
