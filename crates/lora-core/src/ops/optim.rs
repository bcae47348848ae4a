//! Optimizer updates, written once over the backend primitives with PyTorch's exact
//! update rules (`torch.optim.SGD`, `Adam`, `AdamW`, single-tensor path). A backend may
//! override them with a fused multi-tensor kernel (one launch for all adapter tensors).

use crate::backend::{Backend, BinaryOp, UnaryOp};
use crate::error::{Error, Result};

/// Hyper-parameters of `torch.optim.SGD`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdHyper {
    /// Learning rate.
    pub lr: f32,
    /// Momentum factor (0 disables the buffer).
    pub momentum: f32,
    /// Dampening for momentum.
    pub dampening: f32,
    /// L2 penalty added to the gradient.
    pub weight_decay: f32,
    /// Nesterov momentum.
    pub nesterov: bool,
}

/// Hyper-parameters of `torch.optim.Adam` / `AdamW`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamHyper {
    /// Learning rate.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Added to the denominator after bias correction, as PyTorch does.
    pub eps: f32,
    /// Weight decay: an L2 term in the gradient (Adam) or decoupled decay (AdamW).
    pub weight_decay: f32,
    /// `true` for AdamW (decoupled: `p *= 1 - lr * wd` before the update).
    pub decoupled: bool,
}

fn check_lists(what: &str, params: usize, grads: usize, states: usize) -> Result<()> {
    if params != grads || params != states {
        return Err(Error::state(
            what,
            format!("{params} parameters, {grads} gradients and {states} state tensors must match"),
        ));
    }
    Ok(())
}

/// Optimizer steps over a list of parameters at once, so a backend can fuse them into
/// one launch.
pub trait OptimOps: Backend {
    /// One SGD step for every `(param, grad)`. `momentum_buf[i]` is `None` before the
    /// first step (PyTorch initialises the buffer with the first gradient).
    fn sgd_step(
        &self,
        params: &mut [&mut Self::Tensor],
        grads: &[&Self::Tensor],
        momentum_buf: &mut [Option<Self::Tensor>],
        hp: &SgdHyper,
    ) -> Result<()> {
        check_lists("sgd step", params.len(), grads.len(), momentum_buf.len())?;
        for ((p, g), buf) in params.iter_mut().zip(grads).zip(momentum_buf.iter_mut()) {
            let mut d_p = (*g).clone();
            if hp.weight_decay != 0.0 {
                self.axpby(hp.weight_decay, p, 1.0, &mut d_p)?;
            }
            if hp.momentum != 0.0 {
                let b = match buf.take() {
                    None => d_p.clone(),
                    Some(mut b) => {
                        self.axpby(1.0 - hp.dampening, &d_p, hp.momentum, &mut b)?;
                        b
                    }
                };
                if hp.nesterov {
                    self.axpby(hp.momentum, &b, 1.0, &mut d_p)?;
                } else {
                    d_p = b.clone();
                }
                *buf = Some(b);
            }
            self.axpby(-hp.lr, &d_p, 1.0, p)?;
        }
        Ok(())
    }

    /// One Adam/AdamW step (`step` counts from 1) for every `(param, grad)` with first and
    /// second moments `m`, `v`.
    fn adam_step(
        &self,
        params: &mut [&mut Self::Tensor],
        grads: &[&Self::Tensor],
        m: &mut [Self::Tensor],
        v: &mut [Self::Tensor],
        hp: &AdamHyper,
        step: u64,
    ) -> Result<()> {
        check_lists("adam step", params.len(), grads.len(), m.len())?;
        check_lists("adam step", params.len(), grads.len(), v.len())?;
        if step == 0 {
            return Err(Error::state("adam step", "step counts from 1"));
        }
        let t = step as i32;
        let bias_correction1 = 1.0 - hp.beta1.powi(t);
        let bias_correction2_sqrt = (1.0 - hp.beta2.powi(t)).sqrt();
        let step_size = hp.lr / bias_correction1;
        for (((p, g), m), v) in params
            .iter_mut()
            .zip(grads)
            .zip(m.iter_mut())
            .zip(v.iter_mut())
        {
            let mut grad = (*g).clone();
            if hp.weight_decay != 0.0 {
                if hp.decoupled {
                    **p = self.affine(p, 1.0 - hp.lr * hp.weight_decay, 0.0)?;
                } else {
                    self.axpby(hp.weight_decay, p, 1.0, &mut grad)?;
                }
            }
            self.axpby(1.0 - hp.beta1, &grad, hp.beta1, m)?;
            let g2 = self.unary(UnaryOp::Square, &grad)?;
            self.axpby(1.0 - hp.beta2, &g2, hp.beta2, v)?;
            let denom = self.affine(
                &self.unary(UnaryOp::Sqrt, v)?,
                1.0 / bias_correction2_sqrt,
                hp.eps,
            )?;
            let update = self.binary(BinaryOp::Div, m, &denom)?;
            self.axpby(-step_size, &update, 1.0, p)?;
        }
        Ok(())
    }
}
