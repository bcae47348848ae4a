//! The decoder fixtures (`fixtures/make_decoder_fixtures.py`) as the decoder tests read
//! them: model directories, the stored inputs and outputs, cases.json, and a training
//! forward + backward.

use std::collections::BTreeMap;
use std::path::PathBuf;

use lora::Mode;
use lora::io::{Checkpoint, SafetensorsDtype};
use lora::models::TokenBatch;
use lora::models::decoder::{DecoderModel, causal_lm_loss_grad};

use crate::fixtures_dir;

/// The fixture directory of one decoder model (or `tokenizer`).
pub fn dir(name: &str) -> PathBuf {
    fixtures_dir().join("decoder").join(name)
}

/// The fixture tensors of one model: int64 ids/labels/masks and f32 outputs.
#[derive(Debug)]
pub struct Io {
    /// Integer tensors (ids, labels, masks) by name: shape and values.
    pub ints: BTreeMap<String, (Vec<usize>, Vec<i64>)>,
    /// Float tensors (logits, losses) by name: shape and values.
    pub floats: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

/// `io.safetensors` of one model.
pub fn io(model: &str) -> Io {
    io_at(&dir(model).join("io.safetensors"))
}

/// A fixture file of int64 and float tensors.
pub fn io_at(path: &std::path::Path) -> Io {
    let ck = Checkpoint::open(path).unwrap();
    let mut out = Io {
        ints: BTreeMap::new(),
        floats: BTreeMap::new(),
    };
    for (name, t) in ck.tensors().unwrap() {
        match t.dtype {
            SafetensorsDtype::I64 => {
                let v = t
                    .data
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                    .collect();
                out.ints.insert(name, (t.shape.clone(), v));
            }
            _ => {
                let v = lora::io::decode_f32(t.dtype, &t.data).unwrap();
                out.floats.insert(name, (t.shape.clone(), v));
            }
        }
    }
    out
}

/// A token batch from fixture tensors `ids` and (optionally) the attention mask `mask`.
pub fn batch(io: &Io, ids: &str, mask: Option<&str>) -> TokenBatch {
    let (shape, ids) = &io.ints[ids];
    let mask = match mask {
        Some(m) => io.ints[m].1.iter().map(|&v| v as u32).collect(),
        None => vec![1; ids.len()],
    };
    TokenBatch::new(ids.iter().map(|&v| v as u32).collect(), mask, shape[0]).unwrap()
}

/// Logits at the positions the mask keeps, within `tol` of the largest |logit|.
pub fn assert_logits_close(
    what: &str,
    got: &[f32],
    want: &[f32],
    mask: &[u32],
    vocab: usize,
    tol: f32,
) {
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let mut worst = 0.0f32;
    for (p, &m) in mask.iter().enumerate() {
        if m == 0 {
            continue;
        }
        for j in p * vocab..(p + 1) * vocab {
            worst = worst.max((got[j] - want[j]).abs());
        }
    }
    assert!(
        worst <= tol * scale,
        "{what}: max |diff| {worst:e} over {:e} allowed",
        tol * scale
    );
}

/// A training forward, the causal-LM loss on `labels`, and the backward; returns the loss.
pub fn train_backward<B: lora::FullBackend>(
    b: &B,
    model: &mut DecoderModel<B>,
    tb: &TokenBatch,
    labels: &[i64],
) -> f64 {
    let logits = model.logits(b, tb, Mode::Train).unwrap();
    let (loss, _, d) = causal_lm_loss_grad(b, logits, labels, tb.batch, tb.seq_len).unwrap();
    model.backward_logits(b, d).unwrap();
    loss
}

/// Five AdamW steps (lr 1e-2) on the causal-LM loss of `tb`; asserts the loss went down
/// and returns the losses. `what` names the run in the message.
pub fn train_five_steps(
    b: &lora::NdArray,
    model: &mut DecoderModel<lora::NdArray>,
    tb: &TokenBatch,
    labels: &[i64],
    what: &str,
) -> Vec<f64> {
    use lora::{Adam, Optimizer};
    let mut opt = Adam::<lora::NdArray>::adamw(1e-2).unwrap();
    let mut losses = Vec::new();
    for _ in 0..5 {
        losses.push(train_backward(b, model, tb, labels));
        opt.step(b, &mut lora::Model::params_and_grads(model))
            .unwrap();
    }
    assert!(
        losses[4] < losses[0],
        "{what}: training lowers the loss: {losses:?}"
    );
    losses
}

/// The case record of `name` in cases.json.
pub fn case(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures_dir().join("decoder/cases.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no case {name}"))
}

/// A JSON array of token ids.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The gradient of every adapter tensor of any model after a backward (linear layers and
/// embeddings), keyed as PEFT's adapter files key the tensor
/// (`base_model.model.<module>.lora_A.weight`, DoRA's magnitude and embedding tensors
/// without `.weight`).
pub fn adapter_grads_of<B: lora::FullBackend, M: lora::Model<B>>(
    b: &B,
    model: &mut M,
) -> Vec<(String, Vec<f32>)> {
    let mut out: Vec<(String, Vec<f32>)> = adapter_grads(b, model)
        .into_iter()
        .map(|(module, name, g)| (lora::peft::tensor_key(&module, name), g))
        .collect();
    for emb in model.embeddings() {
        for (t, g) in emb.grads(b, lora::DEFAULT_ADAPTER).unwrap() {
            out.push((
                lora::peft::tensor_key(emb.name(), t),
                b.to_host(&g).unwrap(),
            ));
        }
    }
    out
}

/// Every gradient in `got` equals the fixture's `grad.<key>` (1e-4 of the largest), and the
/// fixture has no other gradient: every trainable tensor was checked.
pub fn assert_grads_match(
    case: &str,
    got: &[(String, Vec<f32>)],
    want: &BTreeMap<String, lora::HostTensor>,
) {
    let n_want = want.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(got.len(), n_want, "{case}: every trainable tensor checked");
    for (key, g) in got {
        let w = want
            .get(&format!("grad.{key}"))
            .unwrap_or_else(|| panic!("{case}: the fixture has no gradient of {key}"));
        crate::assert_close_scaled(
            &format!("{case} d {key}"),
            g,
            &crate::to64(&w.data),
            1e-4,
            1e-5,
        );
    }
}

/// The gradient of every adapter tensor after a backward, as `(module, tensor, values)`
/// with PEFT's tensor names (`lora_A`, `lora_B`, ...).
pub fn adapter_grads<B: lora::FullBackend, M: lora::Model<B>>(
    b: &B,
    model: &mut M,
) -> Vec<(String, &'static str, Vec<f32>)> {
    let mut out = Vec::new();
    for layer in model.linears_mut() {
        let module = layer.name().to_string();
        let Some(adapter) = layer.adapter_mut() else {
            continue;
        };
        let names: Vec<&'static str> = adapter.tensors().iter().map(|(n, _)| *n).collect();
        let grads: Vec<Vec<f32>> = adapter
            .params_and_grads()
            .iter()
            .map(|p| b.to_host(p.grad).unwrap())
            .collect();
        for (name, g) in names.into_iter().zip(grads) {
            out.push((module.clone(), name, g));
        }
    }
    out
}
