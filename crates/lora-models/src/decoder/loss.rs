//! The causal-LM loss exactly as transformers computes it with `labels`: logits at
//! position `t` predict the label at `t + 1`, labels equal to `-100` are ignored, and the
//! loss is the mean negative log-likelihood over the counted tokens. The logits stay on
//! the backend ([`DecoderOps::cross_entropy`]); only the scalar loss comes back.

use lora_core::{DecoderOps, Tensor};

use crate::error::{ModelError, Result};

/// The label value transformers ignores.
pub const IGNORE_INDEX: i64 = -100;

/// For each of the `batch * seq` logits rows, the token it must predict: the label one
/// position later in the same sequence, `None` for the last position of each sequence and
/// for ignored labels. Also returns how many rows are counted.
pub fn next_token_targets(
    labels: &[i64],
    batch: usize,
    seq: usize,
    vocab: usize,
) -> Result<(Vec<Option<usize>>, usize)> {
    if labels.len() != batch * seq {
        return Err(ModelError::Input(format!(
            "causal LM loss: {} labels for a batch of [{batch}, {seq}]",
            labels.len()
        )));
    }
    let mut targets = vec![None; batch * seq];
    let mut counted = 0usize;
    for b in 0..batch {
        for t in 0..seq.saturating_sub(1) {
            let label = labels[b * seq + t + 1];
            if label == IGNORE_INDEX {
                continue;
            }
            if label < 0 || label as usize >= vocab {
                return Err(ModelError::Input(format!(
                    "label {label} at [{b}, {}] is outside the vocabulary (vocab_size {vocab})",
                    t + 1
                )));
            }
            targets[b * seq + t] = Some(label as usize);
            counted += 1;
        }
    }
    Ok((targets, counted))
}

/// `[batch * seq, vocab]` view of `[batch, seq, vocab]` logits, checked against the batch.
fn logits_rows<B: DecoderOps>(
    b: &B,
    logits: &B::Tensor,
    batch: usize,
    seq: usize,
) -> Result<(B::Tensor, usize)> {
    let dims = logits.shape().dims();
    match dims {
        [bb, ss, vocab] if *bb == batch && *ss == seq => {
            Ok((b.reshape(logits, &[batch * seq, *vocab])?, *vocab))
        }
        _ => Err(ModelError::Input(format!(
            "causal LM loss: logits of shape {dims:?} for a batch of [{batch}, {seq}]"
        ))),
    }
}

/// Mean next-token negative log-likelihood of `logits` (`[batch, seq, vocab]`) against
/// `labels` (`[batch, seq]`), and the number of tokens counted (NaN when none is).
pub fn causal_lm_loss<B: DecoderOps>(
    b: &B,
    logits: &B::Tensor,
    labels: &[i64],
    batch: usize,
    seq: usize,
) -> Result<(f64, usize)> {
    let (rows, vocab) = logits_rows(b, logits, batch, seq)?;
    let (targets, counted) = next_token_targets(labels, batch, seq, vocab)?;
    if counted == 0 {
        return Ok((f64::NAN, 0));
    }
    let nll = b.cross_entropy(&rows, &targets)?;
    Ok((b.sum_all(&nll)? / counted as f64, counted))
}

/// [`causal_lm_loss`] and its gradient with respect to the logits (same shape):
/// `(softmax(row) - onehot(label)) / counted` at every counted position, zero elsewhere.
/// Takes the logits by value: the backend may write the gradient into their storage.
pub fn causal_lm_loss_grad<B: DecoderOps>(
    b: &B,
    logits: B::Tensor,
    labels: &[i64],
    batch: usize,
    seq: usize,
) -> Result<(f64, usize, B::Tensor)> {
    let (rows, vocab) = logits_rows(b, &logits, batch, seq)?;
    drop(logits);
    let (targets, counted) = next_token_targets(labels, batch, seq, vocab)?;
    if counted == 0 {
        return Ok((f64::NAN, 0, b.zeros(&[batch, seq, vocab])?));
    }
    let (nll, grad) = b.cross_entropy_with_grad(rows, &targets, 1.0 / counted as f32)?;
    let loss = b.sum_all(&nll)? / counted as f64;
    Ok((loss, counted, b.reshape(&grad, &[batch, seq, vocab])?))
}
