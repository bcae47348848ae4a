//! DoRA on a bitsandbytes NF4 base (QLoRA + DoRA, issue 15) against PEFT's own
//! `lora.bnb.Linear4bit` (`fixtures/make_dora_nf4_fixtures.py`: an MLP whose two targeted
//! layers are `bnb.nn.Linear4bit`, PEFT's DoRA adapter with random factors and moved
//! magnitudes): the output and every gradient on every backend, the merge in the library,
//! and `lora merge` into the quantized checkpoint file (dequantize, DoRA merge, quantize
//! again), equal to PEFT's `merge_and_unload()`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use lora::models::Mlp;
use lora::quant::{QuantBackend, QuantLinear};
use lora::{Mode, Model, UnaryOp};
use lora_tests::{assert_close, backend_suite, fixtures_dir, to64};

const QUANTIZED: [&str; 2] = ["layers.0", "layers.2"];

fn fixture() -> PathBuf {
    fixtures_dir().join("peft_dora_nf4")
}

fn io() -> BTreeMap<String, lora::HostTensor> {
    lora::io::read_safetensors(&fixture().join("io.safetensors")).unwrap()
}

/// The fixture MLP with its two targeted layers read from the NF4 checkpoint (packed as
/// transformers saves them) and PEFT's DoRA adapter loaded over them.
fn model<B: QuantBackend>(b: &B, nf4: &std::path::Path) -> Mlp<B> {
    let mut m = Mlp::new(b, &[6, 16, 16, 3], UnaryOp::Relu, 0).unwrap();
    m.load_state_dict(
        b,
        &lora::io::read_safetensors(&fixture().join("base_model.safetensors")).unwrap(),
    )
    .unwrap();
    let ck = lora::io::Checkpoint::open(nf4).unwrap();
    let tensors = ck.tensors().unwrap();
    for layer in m.linears_mut() {
        if !QUANTIZED.contains(&layer.name()) {
            continue;
        }
        let q = lora::io::bnb_format::decode(layer.name(), &tensors, "base_nf4").unwrap();
        let bias = layer.base().bias().cloned();
        layer
            .replace_base(Box::new(QuantLinear::new(q, bias).unwrap()))
            .unwrap();
    }
    lora::peft::load_pretrained(&fixture().join("adapter"), &mut m, b).unwrap();
    m
}

fn check_forward_and_gradients<B: QuantBackend>(b: &B) {
    let mut m = model(b, &fixture().join("base_nf4.safetensors"));
    lora_tests::peft_mlp_check::check_output_and_gradients(b, &mut m, &io(), "DoRA on NF4", 6);
}

/// PEFT's merged weight is quantized again; ours must dequantize to PEFT's. The f32 merges
/// differ in rounding (PEFT's norm in f32, ours in f64), which could move a value across a
/// code boundary: allow that for at most one value in a hundred, each within one NF4 step
/// of the block's absmax.
fn assert_same_requantized(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let absmax = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let off: Vec<usize> = (0..got.len())
        .filter(|&i| (got[i] - want[i]).abs() > 1e-5 * (1.0 + want[i].abs()))
        .collect();
    assert!(
        off.len() * 100 <= got.len(),
        "{what}: {} of {} values differ, e.g. index {:?}",
        off.len(),
        got.len(),
        off.first().map(|&i| (i, got[i], want[i]))
    );
    for &i in &off {
        assert!(
            (got[i] - want[i]).abs() <= 0.35 * absmax,
            "{what}[{i}]: {} against PEFT's {}",
            got[i],
            want[i]
        );
    }
}

/// `lora merge` of the DoRA adapter into the NF4 checkpoint file: still NF4 with the same
/// settings, weights equal to PEFT's `merge_and_unload()`, and the merged model computes
/// PEFT's merged output.
fn check_lora_merge_into_nf4_file<B: QuantBackend>(b: &B) {
    let io = io();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged.safetensors");
    let report = lora::peft::merge_checkpoint(
        b,
        &fixture().join("base_nf4.safetensors"),
        &fixture().join("adapter"),
        lora::DEFAULT_ADAPTER,
        &out,
        lora::peft::OutDtype::Keep,
        &|_, _| {},
    )
    .unwrap();
    assert_eq!(report.merged, ["layers.0.weight", "layers.2.weight"]);
    assert!(report.rounding.is_some_and(|r| r.max_abs > 0.0));
    let ck = lora::io::Checkpoint::open(&out).unwrap();
    let tensors = ck.tensors().unwrap();
    for module in QUANTIZED {
        let q = lora::io::bnb_format::decode(module, &tensors, "merged").unwrap();
        let c = q.config();
        assert_eq!(
            (c.format.as_str(), c.blocksize, c.double_quant),
            ("nf4", 64, true),
            "{module} keeps its quantization"
        );
        assert_same_requantized(
            &format!("lora merge {module}"),
            &q.dequantize(),
            &io[&format!("merged_dequant.{module}")].data,
        );
    }
    let mut m = Mlp::new(b, &[6, 16, 16, 3], UnaryOp::Relu, 0).unwrap();
    m.load_state_dict(
        b,
        &lora::io::read_safetensors(&fixture().join("base_model.safetensors")).unwrap(),
    )
    .unwrap();
    for layer in m.linears_mut() {
        if QUANTIZED.contains(&layer.name()) {
            let q = lora::io::bnb_format::decode(layer.name(), &tensors, "merged").unwrap();
            let bias = layer.base().bias().cloned();
            layer
                .replace_base(Box::new(QuantLinear::new(q, bias).unwrap()))
                .unwrap();
        }
    }
    let x = io["x"].to_backend(b).unwrap();
    let y = b.to_host(&m.forward(b, &x, Mode::Eval).unwrap()).unwrap();
    assert_close(
        "merged NF4 model output",
        &y,
        &to64(&io["y_merged"].data),
        1e-5,
        1e-6,
    );
}

/// Merging in the library onto the NF4 layers (dequantize, DoRA merge, quantize again)
/// gives PEFT's re-quantized weights too.
fn check_library_merge<B: QuantBackend>(b: &B) {
    let io = io();
    let mut m = model(b, &fixture().join("base_nf4.safetensors"));
    for layer in m.linears_mut() {
        if layer.adapter().is_some() {
            layer.merge(b, true).unwrap();
            let got = b.to_host(&layer.base().weight(b).unwrap()).unwrap();
            assert_same_requantized(
                &format!("LoraLinear::merge {}", layer.name()),
                &got,
                &io[&format!("merged_dequant.{}", layer.name())].data,
            );
        }
    }
}

backend_suite! { all:
    fn dora_on_nf4_output_and_gradients_equal_peft(b) {
        check_forward_and_gradients(b);
    }

    fn lora_merge_of_dora_into_an_nf4_file_equals_peft(b) {
        check_lora_merge_into_nf4_file(b);
    }

    fn library_merge_of_dora_on_nf4_equals_peft(b) {
        check_library_merge(b);
    }
}
