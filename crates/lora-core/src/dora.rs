//! DoRA (weight-decomposed low-rank adaptation, PEFT's `use_dora`): the adapted weight
//! `W + s·BA` is split into a direction and a trainable magnitude `m` (`[out]`,
//! `lora_magnitude_vector`), so the layer computes
//!
//! `y = bias + (m / ‖W + s·BA‖) ⊙ (x Wᵀ + s·x Aᵀ Bᵀ)`
//!
//! with the row norm `‖·‖` (over the input features) treated as a constant in the backward,
//! as the paper (section 4.3) and PEFT do. With dropout, PEFT applies it to the LoRA input
//! and recomputes the base term on the dropped input; so does this.
//!
//! The norm is computed without forming `W + s·BA`:
//! `‖W_j + s·(BA)_j‖² = ‖W_j‖² + 2s·Σ_k B_jk (W Aᵀ)_jk + s²·B_j (A Aᵀ) B_jᵀ`, one
//! `[out, in] x [in, r]` product and `r x r` work, instead of an `[out, in]` temporary. In
//! inference it is computed once and kept until the adapter or the base changes.

use crate::adapter::{
    Adapter, LoraAdapter, LoraSpec, Mode, ParamGrad, draw_dropout_mask, replace_checked,
};
use crate::backend::{BinaryOp, Tensor, Transpose, UnaryOp};
use crate::error::{Error, Result};
use crate::linear::Linear;
use crate::ops::LoraOps;
use crate::rng::{self, RngState};
use crate::through_base::{backward_through_base, forward_through_base};

/// `t ⊙ v` with `v` (`[rows]`) broadcast along the rows of `t` (`[rows, cols]`).
fn scale_rows<B: LoraOps>(b: &B, t: &B::Tensor, v: &B::Tensor) -> Result<B::Tensor> {
    let (rows, cols) = t.shape().as_matrix();
    let ones = b.affine(&b.zeros(&[1, cols])?, 0.0, 1.0)?;
    let spread = b.matmul(
        1.0,
        (&b.reshape(v, &[rows, 1])?, Transpose::No),
        (&ones, Transpose::No),
        &[rows, cols],
    )?;
    b.binary(BinaryOp::Mul, t, &spread)
}

/// What a training forward keeps for the backward.
#[derive(Debug, Clone)]
struct Saved<T> {
    /// `m / ‖W + s·BA‖` and the norm, `[out]`.
    scale: T,
    norm: T,
    /// `Σ_rows dy ⊙ u`, when the layer's backward had it computed with the base output's
    /// gradient ([`Adapter::base_output_grad`], no dropout only).
    numer: Option<T>,
    /// The direction term `x Wᵀ + s·x Aᵀ Bᵀ` (dropped input for both under dropout).
    u: T,
    /// `(x ⊙ mask) Aᵀ` and the mask.
    h: T,
    mask: Option<T>,
}

/// Gradients of the last backward.
#[derive(Debug, Clone)]
struct Grads<T> {
    d_a: T,
    d_b: T,
    d_m: T,
}

/// A DoRA adapter: LoRA's `A: [r, in]`, `B: [out, r]` and the magnitude `m: [out]`.
#[derive(Debug, Clone)]
pub struct DoraAdapter<B: LoraOps> {
    layer: String,
    a: B::Tensor,
    b: B::Tensor,
    m: B::Tensor,
    scaling: f32,
    dropout: f32,
    dropout_rng: RngState,
    /// The norm for inference, valid until the adapter or the base weight changes.
    eval_norm: Option<B::Tensor>,
    /// `‖W_j‖²` of the frozen base, valid until the base changes (merge, unmerge,
    /// [`Adapter::base_changed`]).
    w_sq: Option<B::Tensor>,
    /// The norm at merge time (PEFT caches it the same way): unmerging needs the norm of
    /// the unmerged weight, which the merged weight no longer gives.
    merged_norm: Option<B::Tensor>,
    saved: Option<Saved<B::Tensor>>,
    grads: Option<Grads<B::Tensor>>,
}

impl<B: LoraOps> DoraAdapter<B> {
    /// A new adapter on `base` (named `layer`), A and B initialised as LoRA's and the
    /// magnitude set to `‖W + s·BA‖` so that the adapter starts as the identity (PEFT).
    pub fn new(backend: &B, layer: &str, base: &dyn Linear<B>, spec: &LoraSpec) -> Result<Self> {
        let lora = LoraAdapter::new(
            backend,
            layer,
            base.in_features(),
            base.out_features(),
            spec,
        )?;
        let (a, b) = (lora.lora_a().clone(), lora.lora_b().clone());
        let m = backend.zeros(&[base.out_features()])?;
        let mut d = Self::from_tensors(layer, a, b, m, spec.scaling(), spec.dropout, spec.seed)?;
        d.m = d.norm(backend, &base.weight(backend)?)?;
        Ok(d)
    }

    /// An adapter from existing tensors (a PEFT file's `lora_A`, `lora_B` and
    /// `lora_magnitude_vector`).
    pub fn from_tensors(
        layer: &str,
        a: B::Tensor,
        b: B::Tensor,
        m: B::Tensor,
        scaling: f32,
        dropout: f32,
        seed: u64,
    ) -> Result<Self> {
        let lora = LoraAdapter::<B>::from_tensors(layer, a, b, scaling, dropout, seed)?;
        let out = lora.lora_b().shape().dims()[0];
        if m.shape().dims() != [out] {
            return Err(Error::shape(
                format!("DoRA on {layer}: lora_magnitude_vector"),
                format!("[{out}]"),
                m.shape(),
            ));
        }
        Ok(DoraAdapter {
            layer: layer.to_string(),
            a: lora.lora_a().clone(),
            b: lora.lora_b().clone(),
            m,
            scaling,
            dropout,
            dropout_rng: RngState::new(seed, rng::stream_id(layer, "dropout")),
            eval_norm: None,
            w_sq: None,
            merged_norm: None,
            saved: None,
            grads: None,
        })
    }

    /// `‖W_j + s·(BA)_j‖` per output feature `j` (see the module docs), `[out]`.
    fn norm(&mut self, b: &B, w: &B::Tensor) -> Result<B::Tensor> {
        let (out, r) = self.b.shape().as_matrix();
        let s = self.scaling;
        let w_sq = match &self.w_sq {
            Some(w_sq) => w_sq.clone(),
            None => {
                let w_sq = b.sum_cols(&b.unary(UnaryOp::Square, w)?)?;
                self.w_sq = Some(w_sq.clone());
                w_sq
            }
        };
        let wa = b.matmul(
            1.0,
            (w, Transpose::No),
            (&self.a, Transpose::Yes),
            &[out, r],
        )?;
        let cross = b.sum_cols(&b.binary(BinaryOp::Mul, &self.b, &wa)?)?;
        let g = b.matmul(
            1.0,
            (&self.a, Transpose::No),
            (&self.a, Transpose::Yes),
            &[r, r],
        )?;
        let bg = b.matmul(
            1.0,
            (&self.b, Transpose::No),
            (&g, Transpose::No),
            &[out, r],
        )?;
        let quad = b.sum_cols(&b.binary(BinaryOp::Mul, &self.b, &bg)?)?;
        let mut sq = w_sq;
        b.axpby(2.0 * s, &cross, 1.0, &mut sq)?;
        b.axpby(s * s, &quad, 1.0, &mut sq)?;
        // Rounding can take an exactly-zero norm a hair below zero.
        b.unary(UnaryOp::Sqrt, &b.unary(UnaryOp::Relu, &sq)?)
    }

    /// The magnitude, `[out]`.
    pub fn magnitude(&self) -> &B::Tensor {
        &self.m
    }

    /// `base(x)` without its bias.
    fn unbiased(b: &B, base: &dyn Linear<B>, y: &B::Tensor) -> Result<B::Tensor> {
        let mut z = y.clone();
        if let Some(bias) = base.bias() {
            b.add_row_broadcast(&mut z, &b.affine(bias, -1.0, 0.0)?)?;
        }
        Ok(z)
    }

    /// The norm `‖W + s·BA‖` (kept from the last inference forward in eval) and
    /// `m / ‖·‖`.
    fn norm_and_scale(
        &mut self,
        backend: &B,
        base: &dyn Linear<B>,
        mode: Mode,
    ) -> Result<(B::Tensor, B::Tensor)> {
        let norm = match (&self.eval_norm, mode) {
            (Some(n), Mode::Eval) => n.clone(),
            _ => self.norm(backend, &base.weight(backend)?)?,
        };
        let scale = backend.binary(BinaryOp::Div, &self.m, &norm)?;
        Ok((norm, scale))
    }

    /// `x Aᵀ` must be finite (a non-finite input, or an overflow).
    fn check_projection(&self, backend: &B, h: &B::Tensor) -> Result<()> {
        if backend.all_finite(h)? {
            return Ok(());
        }
        Err(Error::NonFinite {
            context: format!("{} DoRA forward", self.layer),
            tensor: "input x or x·lora_Aᵀ".into(),
            shape: h.shape().clone(),
        })
    }

    /// Keeps what the backward needs (training: the scale and norm, the direction term
    /// `u`, `h` and the mask), or the norm for the next inference.
    fn save(
        &mut self,
        mode: Mode,
        (scale, norm): (B::Tensor, B::Tensor),
        (u, h, mask): (B::Tensor, B::Tensor, Option<B::Tensor>),
    ) {
        match mode {
            Mode::Train => {
                self.eval_norm = None;
                self.saved = Some(Saved {
                    scale,
                    norm,
                    numer: None,
                    u,
                    h,
                    mask,
                });
            }
            Mode::Eval => {
                self.saved = None;
                self.eval_norm = Some(norm);
            }
        }
    }
}

impl<B: LoraOps> Adapter<B> for DoraAdapter<B> {
    fn dropout(&self) -> f32 {
        self.dropout
    }

    fn forward(
        &mut self,
        backend: &B,
        base: &dyn Linear<B>,
        x: &B::Tensor,
        y: &mut B::Tensor,
        mode: Mode,
    ) -> Result<()> {
        let (norm, scale) = self.norm_and_scale(backend, base, mode)?;
        let mask = draw_dropout_mask(backend, &mut self.dropout_rng, self.dropout, x, mode)?;
        // The LoRA term goes straight into `y`, which then holds base + LoRA.
        let mut z = None;
        if let Some(m) = &mask {
            // Under dropout the base term is recomputed on the dropped input (PEFT): keep
            // it apart, `y = base(x) + lo` still.
            let dropped = backend.binary(BinaryOp::Mul, x, m)?;
            z = Some(Self::unbiased(
                backend,
                base,
                &base.forward(backend, &dropped)?,
            )?);
        }
        let y_base = z.as_ref().map(|_| y.clone());
        let h = backend.lora_forward(x, &self.a, &self.b, self.scaling, mask.as_ref(), y)?;
        self.check_projection(backend, &h)?;
        // u = z + lo. Without dropout z = y_base - bias, so u = y - bias and the output
        // is bias + scale ⊙ u; with it, y_base - z + scale ⊙ u.
        let u = match (&z, &y_base) {
            (Some(z), Some(y_base)) => {
                let lo = backend.binary(BinaryOp::Sub, y, y_base)?;
                let u = backend.binary(BinaryOp::Add, z, &lo)?;
                let rest = backend.binary(BinaryOp::Sub, y_base, z)?;
                *y = backend.binary(BinaryOp::Add, &rest, &backend.scale_features(&u, &scale)?)?;
                u
            }
            _ => backend.dora_output(y, base.bias(), &scale)?,
        };
        self.save(mode, (scale, norm), (u, h, mask));
        Ok(())
    }

    /// Without dropout, the LoRA term joins the base's product ([`Linear::forward_plus`]),
    /// and the output is then rescaled as in [`forward`](Adapter::forward).
    fn forward_fused(
        &mut self,
        backend: &B,
        base: &dyn Linear<B>,
        x: &B::Tensor,
        mode: Mode,
    ) -> Result<Option<B::Tensor>> {
        if mode == Mode::Train && self.dropout > 0.0 {
            // The base term is recomputed on the dropped input: not one product.
            return Ok(None);
        }
        let (norm, scale) = self.norm_and_scale(backend, base, mode)?;
        let (mut y, h) = forward_through_base(
            backend,
            base,
            (&self.a, &self.b, self.scaling),
            (x, None),
            |h| self.check_projection(backend, h),
        )?;
        let u = backend.dora_output(&mut y, base.bias(), &scale)?;
        self.save(mode, (scale, norm), (u, h, None));
        Ok(Some(y))
    }

    fn base_changed(&mut self) {
        self.w_sq = None;
        self.eval_norm = None;
    }

    /// Without dropout the base output is rescaled too: the base takes `dy ⊙ scale`, and
    /// the same pass over `dy` reduces the magnitude gradient's numerator. (Under dropout
    /// the base term is recomputed inside the adapter, which backpropagates it itself.)
    fn base_output_grad(&mut self, backend: &B, dy: &B::Tensor) -> Result<Option<B::Tensor>> {
        let Some(saved) = self.saved.as_mut().filter(|s| s.mask.is_none()) else {
            return Ok(None);
        };
        let (numer, dy_base) = backend.dora_backward_terms(dy, &saved.u, &saved.scale)?;
        saved.numer = Some(numer);
        Ok(Some(dy_base))
    }

    /// Without dropout, after [`base_output_grad`](Adapter::base_output_grad): `dy` is
    /// `dy ⊙ scale`, the gradient of both the base term and the LoRA term, so LoRA's fused
    /// backward on it gives `dx`, `dA` and `dB` (the unfused path's `scale ⊙ B` and
    /// `scale ⊙ dB` are the same products), and the magnitude's gradient is already
    /// reduced.
    fn backward_fused(
        &mut self,
        backend: &B,
        base: &dyn Linear<B>,
        x: &B::Tensor,
        dy: &B::Tensor,
    ) -> Result<Option<B::Tensor>> {
        let Some(Saved {
            numer: Some(numer),
            norm,
            h,
            ..
        }) = self
            .saved
            .take_if(|s| s.mask.is_none() && s.numer.is_some())
        else {
            return Ok(None);
        };
        let d_m = backend.binary(BinaryOp::Div, &numer, &norm)?;
        let (dx, lora) =
            backward_through_base(backend, base, (&self.a, &self.b, self.scaling), x, &h, dy)?;
        self.grads = Some(Grads {
            d_a: lora.d_a,
            d_b: lora.d_b,
            d_m,
        });
        Ok(Some(dx))
    }

    fn backward(
        &mut self,
        backend: &B,
        base: &dyn Linear<B>,
        x: &B::Tensor,
        dy: &B::Tensor,
        dx: &mut B::Tensor,
    ) -> Result<()> {
        let saved = self.saved.take().ok_or_else(|| {
            Error::state(
                format!("DoRA on {}", self.layer),
                "backward called without a forward in training mode",
            )
        })?;
        // dm = Σ_rows dy ⊙ u / ‖·‖ (the norm is a constant).
        let numer = match saved.numer {
            Some(n) => n,
            None => backend.dora_magnitude_numerator(dy, &saved.u)?,
        };
        let d_m = backend.binary(BinaryOp::Div, &numer, &saved.norm)?;
        // The LoRA term's gradient is `dy ⊙ scale` ([tokens, out]). It is never formed: the
        // scale goes into B instead, `(dy ⊙ scale) B = dy (scale ⊙ B)` by rows, and
        // `dB = scale ⊙ (s·dyᵀ H)`, both `[out, r]`.
        let b_scaled = scale_rows(backend, &self.b, &saved.scale)?;
        let lora = backend.lora_backward(
            x,
            &self.a,
            &b_scaled,
            self.scaling,
            saved.mask.as_ref(),
            &saved.h,
            dy,
            dx,
        )?;
        // Under dropout the base term was recomputed on the dropped input: its gradient
        // goes back through W and the mask here (without dropout, `base_output_gain`).
        if let Some(mask) = &saved.mask {
            let g = backend.scale_features(dy, &backend.affine(&saved.scale, 1.0, -1.0)?)?;
            let through = backend.binary(BinaryOp::Mul, &base.backward(backend, &g)?, mask)?;
            backend.axpby(1.0, &through, 1.0, dx)?;
        }
        self.grads = Some(Grads {
            d_a: lora.d_a,
            d_b: scale_rows(backend, &lora.d_b, &saved.scale)?,
            d_m,
        });
        Ok(())
    }

    /// LoRA's `s·BA`: the direction's update (what `lora merge` of the LoRA part adds).
    fn delta_weight(&self, backend: &B) -> Result<B::Tensor> {
        backend.lora_delta_weight(&self.a, &self.b, self.scaling, false)
    }

    /// `(m / ‖W + s·BA‖) ⊙ (W + s·BA) - W`.
    fn merge_delta(&mut self, backend: &B, weight: &B::Tensor) -> Result<B::Tensor> {
        let norm = self.norm(backend, weight)?;
        let factor = backend.binary(BinaryOp::Div, &self.m, &norm)?;
        let adapted = backend.binary(BinaryOp::Add, weight, &self.delta_weight(backend)?)?;
        let merged = scale_rows(backend, &adapted, &factor)?;
        self.merged_norm = Some(norm);
        self.base_changed();
        backend.binary(BinaryOp::Sub, &merged, weight)
    }

    /// `W_merged · ‖·‖ / m - s·BA - W_merged`, with the norm kept from the merge.
    fn unmerge_delta(&mut self, backend: &B, weight: &B::Tensor) -> Result<B::Tensor> {
        let norm = self.merged_norm.take().ok_or_else(|| {
            Error::state(
                format!("DoRA on {}", self.layer),
                "unmerge without a merge (the weight norm of the merge is gone)",
            )
        })?;
        let factor = backend.binary(BinaryOp::Div, &norm, &self.m)?;
        let restored = backend.binary(
            BinaryOp::Sub,
            &scale_rows(backend, weight, &factor)?,
            &self.delta_weight(backend)?,
        )?;
        self.base_changed();
        backend.binary(BinaryOp::Sub, &restored, weight)
    }

    fn tensors(&self) -> Vec<(&'static str, &B::Tensor)> {
        vec![
            ("lora_A", &self.a),
            ("lora_B", &self.b),
            ("lora_magnitude_vector", &self.m),
        ]
    }

    fn set_tensor(&mut self, name: &str, value: B::Tensor) -> Result<()> {
        let slot = match name {
            "lora_A" => &mut self.a,
            "lora_B" => &mut self.b,
            "lora_magnitude_vector" => &mut self.m,
            other => {
                return Err(Error::state(
                    format!("DoRA on {}", self.layer),
                    format!(
                        "unknown adapter tensor {other:?} (expected lora_A, lora_B or lora_magnitude_vector)"
                    ),
                ));
            }
        };
        replace_checked(
            slot,
            value,
            &format!("DoRA on {} tensor {name}", self.layer),
        )?;
        self.eval_norm = None;
        Ok(())
    }

    fn params_and_grads(&mut self) -> Vec<ParamGrad<'_, B::Tensor>> {
        // Any update moves the norm.
        self.eval_norm = None;
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
                ParamGrad {
                    param: &mut self.m,
                    grad: &g.d_m,
                },
            ],
            None => Vec::new(),
        }
    }
}
