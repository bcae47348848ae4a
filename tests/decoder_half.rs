//! Frozen weights stored in bf16 / f16 (issue 14) against PyTorch + PEFT
//! (`fixtures/make_half_fixtures.py`): a bf16 checkpoint saved by transformers loads with its
//! 2-byte values kept, and gives exactly what PyTorch computes from those values in f32
//! (logits, and adapter gradients for training on the bf16 base); against PyTorch running
//! bf16 end to end it agrees within the format's tolerance (docs/formats.md states the
//! rule); an f32 checkpoint loaded as f16 rounds as PyTorch's conversion does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lora::Mode;
use lora::models::decoder::DecoderModel;
use lora::quant::HalfType;
use lora_tests::decoder_fixtures::{
    adapter_grads, assert_logits_close, batch, dir, io, train_backward,
};
use lora_tests::{assert_close_scaled, backend_suite, to64};

/// Logits with the LoRA adapter of the llama fixture (or without) on `model`.
fn logits<B: lora::FullBackend + lora::quant::QuantOps>(
    b: &B,
    model: &mut DecoderModel<B>,
    with_adapter: bool,
) -> Vec<f32> {
    if with_adapter {
        lora::peft::load_pretrained(&dir("llama").join("adapter"), model, b).unwrap();
    }
    let io = io("llama_bf16");
    let tb = batch(&io, "input_ids", Some("attention_mask"));
    b.to_host(&model.logits(b, &tb, Mode::Eval).unwrap())
        .unwrap()
}

/// The largest |ours - theirs| over the kept positions, relative to the largest |logit|.
fn relative_gap(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let io = io("llama_bf16");
    let mask = &io.ints["attention_mask"].1;
    let vocab = got.len() / mask.len();
    let mut worst = 0.0f32;
    for (p, &m) in mask.iter().enumerate() {
        if m != 0 {
            for j in p * vocab..(p + 1) * vocab {
                worst = worst.max((got[j] - want[j]).abs());
            }
        }
    }
    worst / scale
}

/// The bf16 tolerance of a logit: 2 layers of products and norms each rounding to bf16 in
/// PyTorch's bf16 run, a few roundings of unit roundoff `u` per op, so `16·u` of the
/// largest |logit| (docs/formats.md).
fn bf16_tolerance() -> f32 {
    16.0 * HalfType::Bf16.unit_roundoff() as f32
}

fn check_bf16_checkpoint<B: lora::FullBackend + lora::quant::QuantOps>(b: &B) {
    let want = io("llama_bf16");
    let mask: Vec<u32> = want.ints["attention_mask"]
        .1
        .iter()
        .map(|&m| m as u32)
        .collect();
    for with_adapter in [false, true] {
        let mut model =
            DecoderModel::from_pretrained_as(b, &dir("llama_bf16"), Some(HalfType::Bf16)).unwrap();
        let vocab = model.config().vocab_size;
        // Every projection and lm_head keeps 2 bytes per weight.
        let (resident, params) = lora::Model::linears(&model)
            .iter()
            .map(|l| (l.base().resident_bytes(), l.base().num_parameters()))
            .fold((0, 0), |(r, p), (a, c)| (r + a, p + c));
        assert_eq!(resident, 2 * params);
        let got = logits(b, &mut model, with_adapter);
        let prefix = if with_adapter { "lora_" } else { "" };
        // Exactly PyTorch's f32 computation from the bf16 values.
        assert_logits_close(
            &format!("bf16 storage {prefix}logits vs PyTorch f32 compute"),
            &got,
            &want.floats[&format!("{prefix}logits_f32_compute")].1,
            &mask,
            vocab,
            1e-4,
        );
        // And PyTorch's bf16 run within the format's tolerance.
        let gap = relative_gap(&got, &want.floats[&format!("{prefix}logits_bf16")].1);
        assert!(
            gap <= bf16_tolerance(),
            "{prefix}logits vs PyTorch bf16: relative gap {gap} over {}",
            bf16_tolerance()
        );
    }
}

fn check_f16_rounding<B: lora::FullBackend + lora::quant::QuantOps>(b: &B) {
    let mut model =
        DecoderModel::from_pretrained_as(b, &dir("llama"), Some(HalfType::F16)).unwrap();
    let vocab = model.config().vocab_size;
    let got = logits(b, &mut model, false);
    let want = io("llama_bf16");
    let mask: Vec<u32> = want.ints["attention_mask"]
        .1
        .iter()
        .map(|&m| m as u32)
        .collect();
    assert_logits_close(
        "f32 checkpoint stored as f16 vs PyTorch f16-rounded weights in f32",
        &got,
        &want.floats["f16_logits_f32_compute"].1,
        &mask,
        vocab,
        1e-4,
    );
}

/// LoRA training on the bf16 base: the adapter gradients equal PyTorch autograd's on the
/// same bf16 values in f32.
fn check_bf16_adapter_gradients<B: lora::FullBackend + lora::quant::QuantOps>(b: &B) {
    let mut model =
        DecoderModel::from_pretrained_as(b, &dir("llama_bf16"), Some(HalfType::Bf16)).unwrap();
    lora::peft::load_pretrained(&dir("llama").join("adapter"), &mut model, b).unwrap();
    let io = io("llama_bf16");
    let tb = batch(&io, "input_ids", Some("attention_mask"));
    train_backward(b, &mut model, &tb, &io.ints["labels"].1);
    let grads = adapter_grads(b, &mut model);
    for (module, tensor, g) in &grads {
        let key = format!("lora_grads_f32_compute.{module}.{tensor}.weight");
        assert_close_scaled(&key, g, &to64(&io.floats[&key].1), 1e-4, 1e-5);
    }
    assert_eq!(
        grads.len(),
        28,
        "both factors of all seven projections in two layers"
    );
}

backend_suite! { all:
    fn a_bf16_checkpoint_keeps_its_values_and_equals_pytorch(b) {
        check_bf16_checkpoint(b);
    }

    fn an_f32_checkpoint_stored_as_f16_rounds_as_pytorch_does(b) {
        check_f16_rounding(b);
    }

    fn lora_gradients_on_a_bf16_base_equal_autograd(b) {
        check_bf16_adapter_gradients(b);
    }
}
