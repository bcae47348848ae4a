//! `torch.optim.SGD`.

use super::{Optimizer, check_grads};
use crate::adapter::ParamGrad;
use crate::backend::Tensor;
use crate::error::{Error, Result};
use crate::ops::{OptimOps, SgdHyper};

/// Stochastic gradient descent with optional momentum, dampening, Nesterov and L2 decay.
#[derive(Debug)]
pub struct Sgd<B: OptimOps> {
    hp: SgdHyper,
    momentum_buf: Vec<Option<B::Tensor>>,
}

impl<B: OptimOps> Sgd<B> {
    /// A new SGD optimizer.
    pub fn new(hp: SgdHyper) -> Result<Self> {
        if hp.nesterov && (hp.momentum <= 0.0 || hp.dampening != 0.0) {
            return Err(Error::config(
                "SGD",
                "nesterov",
                true,
                "requires momentum > 0 and dampening = 0 (as torch.optim.SGD)",
            ));
        }
        let bad = |v: f32| v.is_nan() || v < 0.0;
        if bad(hp.lr) || bad(hp.momentum) || bad(hp.weight_decay) {
            return Err(Error::config(
                "SGD",
                "lr/momentum/weight_decay",
                format!("{}/{}/{}", hp.lr, hp.momentum, hp.weight_decay),
                "must be non-negative",
            ));
        }
        Ok(Sgd {
            hp,
            momentum_buf: Vec::new(),
        })
    }
}

impl<B: OptimOps> Optimizer<B> for Sgd<B> {
    fn step(&mut self, backend: &B, params: &mut [ParamGrad<'_, B::Tensor>]) -> Result<()> {
        check_grads("SGD", params)?;
        if self.momentum_buf.is_empty() {
            self.momentum_buf = vec![None; params.len()];
        }
        if self.momentum_buf.len() != params.len() {
            return Err(Error::state(
                "SGD",
                format!(
                    "optimizer was created for {} parameters, got {}",
                    self.momentum_buf.len(),
                    params.len()
                ),
            ));
        }
        let grads: Vec<&B::Tensor> = params.iter().map(|p| p.grad).collect();
        let mut ps: Vec<&mut B::Tensor> = params.iter_mut().map(|p| &mut *p.param).collect();
        backend.sgd_step(&mut ps, &grads, &mut self.momentum_buf, &self.hp)
    }

    fn learning_rate(&self) -> f32 {
        self.hp.lr
    }

    fn set_learning_rate(&mut self, lr: f32) {
        self.hp.lr = lr;
    }

    fn state_bytes(&self) -> usize {
        self.momentum_buf
            .iter()
            .flatten()
            .map(|t| t.size_in_bytes())
            .sum()
    }
}
