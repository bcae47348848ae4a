//! Optimizers with PyTorch's update rules; state only for the parameters they are given
//! (the adapters), never for frozen weights.

mod adam;
mod sgd;

pub use adam::{Adam, AdamState};
pub use sgd::Sgd;

use std::fmt::Debug;

use crate::adapter::ParamGrad;
use crate::backend::{Backend, Tensor};
use crate::error::{Error, Result};
use crate::ops::OptimOps;

/// Updates trainable parameters from their gradients.
pub trait Optimizer<B: OptimOps>: Debug {
    /// One update of every parameter. The list must be the same (count and shapes) at
    /// every step: state is matched by position.
    fn step(&mut self, backend: &B, params: &mut [ParamGrad<'_, B::Tensor>]) -> Result<()>;
    /// Current learning rate.
    fn learning_rate(&self) -> f32;
    /// Sets the learning rate (schedules).
    fn set_learning_rate(&mut self, lr: f32);
    /// Bytes of optimizer state held.
    fn state_bytes(&self) -> usize;
}

/// Creates zero state like `params` on the first step, or checks that the parameter list
/// still matches the state.
fn ensure_state<B: Backend>(
    backend: &B,
    what: &str,
    state: &mut Vec<B::Tensor>,
    params: &[ParamGrad<'_, B::Tensor>],
) -> Result<()> {
    if state.is_empty() {
        for p in params {
            state.push(backend.zeros(p.param.shape().dims())?);
        }
        return Ok(());
    }
    if state.len() != params.len() {
        return Err(Error::state(
            what,
            format!(
                "optimizer was created for {} parameters, got {}",
                state.len(),
                params.len()
            ),
        ));
    }
    for (i, (s, p)) in state.iter().zip(params).enumerate() {
        if s.shape() != p.param.shape() {
            return Err(Error::shape(
                format!("{what} parameter #{i}"),
                format!("{}", s.shape()),
                p.param.shape(),
            ));
        }
    }
    Ok(())
}

fn check_grads<T: Tensor>(what: &str, params: &[ParamGrad<'_, T>]) -> Result<()> {
    for (i, p) in params.iter().enumerate() {
        if p.param.shape() != p.grad.shape() {
            return Err(Error::shape(
                format!("{what} gradient of parameter #{i}"),
                format!("{}", p.param.shape()),
                p.grad.shape(),
            ));
        }
    }
    Ok(())
}
