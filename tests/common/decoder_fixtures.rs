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

/// The gradient of every linear adapter tensor of any model after a backward, keyed as
/// PEFT's adapter files key the tensor (`base_model.model.<module>.lora_A.weight`, DoRA's
/// magnitude without `.weight`).
pub fn adapter_grads_of<B: lora::FullBackend, M: lora::Model<B>>(
    b: &B,
    model: &mut M,
) -> Vec<(String, Vec<f32>)> {
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
            out.push((lora::peft::tensor_key(&module, name), g));
        }
    }
    out
}

/// The gradient of every adapter tensor after a backward, as `(module, tensor, values)`
/// with PEFT's tensor names (`lora_A`, `lora_B`, ...).
pub fn adapter_grads<B: lora::FullBackend>(
    b: &B,
    model: &mut DecoderModel<B>,
) -> Vec<(String, &'static str, Vec<f32>)> {
    let mut out = Vec::new();
    for layer in lora::Model::linears_mut(model) {
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
