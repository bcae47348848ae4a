//! `torch.optim.Adam` and `torch.optim.AdamW`.

use super::{Optimizer, check_grads, ensure_state};
use crate::adapter::ParamGrad;
use crate::backend::Tensor;
use crate::error::{Error, Result};
use crate::host_tensor::HostTensor;
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

    /// The optimizer's state on the host (for a training checkpoint): the step count and
    /// both moments of every parameter, in parameter order.
    pub fn state(&self, backend: &B) -> Result<AdamState> {
        let host = |ts: &[B::Tensor]| {
            ts.iter()
                .map(|t| HostTensor::from_backend(backend, t))
                .collect::<Result<Vec<_>>>()
        };
        Ok(AdamState {
            step: self.step,
            m: host(&self.m)?,
            v: host(&self.v)?,
        })
    }

    /// Continues from a saved [`AdamState`]: the next [`Optimizer::step`] is the one an
    /// uninterrupted run would have taken (bit for bit). The parameter list given to it
    /// must match the state (checked there, by count and shape).
    pub fn load_state(&mut self, backend: &B, state: AdamState) -> Result<()> {
        if state.m.len() != state.v.len()
            || state
                .m
                .iter()
                .zip(&state.v)
                .any(|(m, v)| m.shape != v.shape)
        {
            return Err(Error::state(
                "Adam state",
                format!(
                    "{} first moments and {} second moments of different shapes",
                    state.m.len(),
                    state.v.len()
                ),
            ));
        }
        let device = |ts: Vec<HostTensor>| {
            ts.into_iter()
                .map(|t| t.into_backend(backend))
                .collect::<Result<Vec<_>>>()
        };
        self.m = device(state.m)?;
        self.v = device(state.v)?;
        self.step = state.step;
        Ok(())
    }
}

/// What [`Adam`] carries from step to step, on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamState {
    /// Steps taken (the bias correction depends on it).
    pub step: u64,
    /// First moments, one per parameter.
    pub m: Vec<HostTensor>,
    /// Second moments.
    pub v: Vec<HostTensor>,
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
