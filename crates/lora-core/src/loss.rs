//! Losses with their gradients.

use crate::backend::{Backend, BinaryOp, Tensor, check_same_shape};
use crate::error::{Error, Result};

/// Mean squared error (`torch.nn.MSELoss()`, mean reduction): returns the loss and
/// `dL/dpred = 2 (pred - target) / N`.
pub fn mse_loss<B: Backend>(
    backend: &B,
    pred: &B::Tensor,
    target: &B::Tensor,
) -> Result<(f64, B::Tensor)> {
    check_same_shape(
        "mse_loss (prediction vs target)",
        pred.shape(),
        target.shape(),
    )?;
    if !backend.all_finite(target)? {
        return Err(Error::NonFinite {
            context: "mse_loss".into(),
            tensor: "target".into(),
            shape: target.shape().clone(),
        });
    }
    let n = pred.numel().max(1);
    let diff = backend.binary(BinaryOp::Sub, pred, target)?;
    let sq = backend.binary(BinaryOp::Mul, &diff, &diff)?;
    let loss = backend.sum_all(&sq)? / n as f64;
    let grad = backend.affine(&diff, 2.0 / n as f32, 0.0)?;
    Ok((loss, grad))
}
