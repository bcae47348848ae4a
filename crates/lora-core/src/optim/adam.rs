//! `torch.optim.Adam` and `torch.optim.AdamW`.

use super::{Optimizer, check_grads, ensure_state};
use crate::adapter::ParamGrad;
use crate::backend::Tensor;
use crate::error::{Error, Result};
use crate::ops::{AdamHyper, OptimOps};

/// Adam (L2 weight decay in the gradient) or AdamW (decoupled decay), per `decoupled`.
#[derive(Debug)]
pub struct Adam<B: OptimOps> {
    hp: AdamHyper,
    step: u64,
    m: Vec<B::Tensor>,
    v: Vec<B::Tensor>,
}

impl<B: OptimOps> Adam<B> {
    /// A new optimizer.
    pub fn new(hp: AdamHyper) -> Result<Self> {
        let betas_ok = (0.0..1.0).contains(&hp.beta1) && (0.0..1.0).contains(&hp.beta2);
        if !betas_ok {
            return Err(Error::config(
                "Adam",
                "betas",
                format!("({}, {})", hp.beta1, hp.beta2),
                "each must be in [0, 1)",
            ));
        }
        let bad = |v: f32| v.is_nan() || v < 0.0;
        if bad(hp.lr) || bad(hp.eps) || bad(hp.weight_decay) {
            return Err(Error::config(
                "Adam",
                "lr/eps/weight_decay",
                format!("{}/{}/{}", hp.lr, hp.eps, hp.weight_decay),
                "must be non-negative",
            ));
        }
        Ok(Adam {
            hp,
            step: 0,
            m: Vec::new(),
            v: Vec::new(),
        })
    }

    /// PyTorch's `Adam(lr)` defaults: betas (0.9, 0.999), eps 1e-8, no decay.
    pub fn plain(lr: f32) -> Result<Self> {
        Self::new(AdamHyper {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled: false,
        })
    }

    /// PyTorch's `AdamW(lr)` defaults: betas (0.9, 0.999), eps 1e-8, weight decay 0.01.
    pub fn adamw(lr: f32) -> Result<Self> {
        Self::new(AdamHyper {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            decoupled: true,
        })
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }
}

impl<B: OptimOps> Optimizer<B> for Adam<B> {
    fn step(&mut self, backend: &B, params: &mut [ParamGrad<'_, B::Tensor>]) -> Result<()> {
        let what = if self.hp.decoupled { "AdamW" } else { "Adam" };
        check_grads(what, params)?;
        ensure_state(backend, what, &mut self.m, params)?;
        ensure_state(backend, what, &mut self.v, params)?;
        self.step += 1;
        let grads: Vec<&B::Tensor> = params.iter().map(|p| p.grad).collect();
        let mut ps: Vec<&mut B::Tensor> = params.iter_mut().map(|p| &mut *p.param).collect();
        backend.adam_step(
            &mut ps,
            &grads,
            &mut self.m,
            &mut self.v,
            &self.hp,
            self.step,
        )
    }

    fn learning_rate(&self) -> f32 {
        self.hp.lr
    }

    fn set_learning_rate(&mut self, lr: f32) {
        self.hp.lr = lr;
    }

    fn state_bytes(&self) -> usize {
        self.m
            .iter()
            .chain(&self.v)
            .map(|t| t.size_in_bytes())
            .sum()
    }
}
