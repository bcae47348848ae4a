//! Sequence classification on a BERT encoder the sentence-transformers way: mean-pooled
//! embedding, a trainable linear head, cross-entropy; the encoder's adapters and the head
//! train together.

use lora_core::{
    DenseLinear, FullBackend, Linear, Mode, Model, Optimizer, ParamGrad, cross_entropy_loss,
};

use super::model::BertModel;
use super::pooling::{mean_pool, mean_pool_backward};
use super::tokenizer::TokenBatch;
use crate::error::Result;

/// One training step: forward through the encoder (adapters in training mode), mean
/// pooling, `head`, cross-entropy against `labels`, backward through the head and the
/// whole encoder, then one optimizer step over the adapters and the head. Returns the loss.
pub fn classification_step<B: FullBackend, O: Optimizer<B>>(
    b: &B,
    model: &mut BertModel<B>,
    head: &mut DenseLinear<B>,
    opt: &mut O,
    batch: &TokenBatch,
    labels: &[usize],
) -> Result<f64> {
    let hidden = model.forward_batch(b, batch, Mode::Train)?;
    let pooled = mean_pool(b, &hidden, batch)?;
    let logits = head.forward(b, &pooled)?;
    let (loss, d_logits) = cross_entropy_loss(b, &logits, labels)?;
    let (d_w, d_b) = head.param_grads(b, &pooled, &d_logits)?;
    let d_pooled = head.backward(b, &d_logits)?;
    model.backward_batch(b, &mean_pool_backward(b, &d_pooled, batch)?)?;
    let mut params = model.params_and_grads();
    let (w, bias) = head.params_mut();
    params.push(ParamGrad {
        param: w,
        grad: &d_w,
    });
    if let (Some(bias), Some(d_b)) = (bias, d_b.as_ref()) {
        params.push(ParamGrad {
            param: bias,
            grad: d_b,
        });
    }
    opt.step(b, &mut params)?;
    Ok(loss)
}

/// Predicted classes (argmax of the head's logits) for a batch, in inference mode.
pub fn classify<B: FullBackend>(
    b: &B,
    model: &mut BertModel<B>,
    head: &DenseLinear<B>,
    batch: &TokenBatch,
) -> Result<Vec<usize>> {
    let hidden = model.forward_batch(b, batch, Mode::Eval)?;
    let logits = b.to_host(&head.forward(b, &mean_pool(b, &hidden, batch)?)?)?;
    let classes = head.out_features().max(1);
    Ok(logits
        .chunks(classes)
        .map(|row| {
            row.iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                    if v > best.1 { (i, v) } else { best }
                })
                .0
        })
        .collect())
}
