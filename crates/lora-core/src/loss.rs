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

/// Cross-entropy over classes (`torch.nn.functional.cross_entropy`, mean reduction) of
/// `logits` `[batch, classes]` against integer `labels`: returns the loss and
/// `dL/dlogits = (softmax(logits) - onehot(labels)) / batch`. Computed on the host in f64
/// (the logits of a classification head are small).
pub fn cross_entropy_loss<B: Backend>(
    backend: &B,
    logits: &B::Tensor,
    labels: &[usize],
) -> Result<(f64, B::Tensor)> {
    let (n, c) = logits.shape().as_matrix();
    if logits.shape().rank() != 2 || n != labels.len() || n == 0 {
        return Err(Error::shape(
            "cross_entropy_loss logits",
            format!("[{}, classes]", labels.len()),
            logits.shape(),
        ));
    }
    if let Some(&bad) = labels.iter().find(|&&l| l >= c) {
        return Err(Error::InvalidConfig {
            context: "cross_entropy_loss".into(),
            field: "labels",
            value: bad.to_string(),
            reason: format!("a label must be below the number of classes ({c})"),
        });
    }
    let z = backend.to_host(logits)?;
    if z.iter().any(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            context: "cross_entropy_loss".into(),
            tensor: "logits".into(),
            shape: logits.shape().clone(),
        });
    }
    let mut grad = vec![0.0f32; n * c];
    let mut loss = 0.0f64;
    for (i, &label) in labels.iter().enumerate() {
        let row = &z[i * c..(i + 1) * c];
        let max = row
            .iter()
            .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
        let sum: f64 = row.iter().map(|&v| (f64::from(v) - max).exp()).sum();
        let log_z = max + sum.ln();
        loss += log_z - f64::from(row[label]);
        for (j, g) in grad[i * c..(i + 1) * c].iter_mut().enumerate() {
            let p = (f64::from(row[j]) - log_z).exp();
            let onehot = if j == label { 1.0 } else { 0.0 };
            *g = ((p - onehot) / n as f64) as f32;
        }
    }
    Ok((loss / n as f64, backend.from_host(&grad, &[n, c])?))
}
