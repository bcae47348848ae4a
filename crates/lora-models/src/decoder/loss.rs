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
