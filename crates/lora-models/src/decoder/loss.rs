//! The causal-LM loss exactly as transformers computes it with `labels`: logits at
//! position `t` predict the label at `t + 1`, labels equal to `-100` are ignored, and the
//! loss is the mean negative log-likelihood over the counted tokens.

use crate::error::{ModelError, Result};

/// The label value transformers ignores.
pub const IGNORE_INDEX: i64 = -100;

/// Mean next-token negative log-likelihood of `logits` (`[batch, seq, vocab]`, row-major
/// on the host) against `labels` (`[batch, seq]`), and the number of tokens counted.
pub fn causal_lm_loss(
    logits: &[f32],
    labels: &[i64],
    batch: usize,
    seq: usize,
    vocab: usize,
) -> Result<(f64, usize)> {
    if logits.len() != batch * seq * vocab || labels.len() != batch * seq {
        return Err(ModelError::Input(format!(
            "causal LM loss: {} logits and {} labels for [{batch}, {seq}] x vocab {vocab}",
            logits.len(),
            labels.len()
        )));
    }
    let (mut sum, mut count) = (0.0f64, 0usize);
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
            let row = &logits[(b * seq + t) * vocab..(b * seq + t + 1) * vocab];
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            let lse = max
                + row
                    .iter()
                    .map(|&v| (v as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            sum += lse - row[label as usize] as f64;
            count += 1;
        }
    }
    let mean = if count == 0 {
        f64::NAN
    } else {
        sum / count as f64
    };
    Ok((mean, count))
}

/// [`causal_lm_loss`] and its gradient with respect to the logits (same layout):
/// `(softmax(row) - onehot(label)) / counted` at every counted position, zero elsewhere.
pub fn causal_lm_loss_grad(
    logits: &[f32],
    labels: &[i64],
    batch: usize,
    seq: usize,
    vocab: usize,
) -> Result<(f64, usize, Vec<f32>)> {
    let (loss, count) = causal_lm_loss(logits, labels, batch, seq, vocab)?;
    let mut grad = vec![0.0f32; logits.len()];
    if count == 0 {
        return Ok((loss, count, grad));
    }
    for b in 0..batch {
        for t in 0..seq.saturating_sub(1) {
            let label = labels[b * seq + t + 1];
            if label == IGNORE_INDEX {
                continue;
            }
            let at = (b * seq + t) * vocab;
            let row = &logits[at..at + vocab];
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            for (j, g) in grad[at..at + vocab].iter_mut().enumerate() {
                let p = (row[j] as f64 - max).exp() / sum;
                let onehot = if j as i64 == label { 1.0 } else { 0.0 };
                *g = ((p - onehot) / count as f64) as f32;
            }
        }
    }
    Ok((loss, count, grad))
}
