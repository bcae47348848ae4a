//! DoRA (`use_dora`, issue 15) against PEFT on every backend (`fixtures/make_dora_fixtures.py`:
//! an MLP with PEFT's DoRA adapter, random factors and moved magnitudes): the output, the
//! gradients of `lora_A`, `lora_B` and `lora_magnitude_vector` (the norm a constant, as in
//! PEFT), merge and unmerge, the adapter file both ways, `lora merge` on files; and the
//! dropout path, whose masks cannot match PyTorch's, against finite differences.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use lora::models::Mlp;
use lora::{Adapter, DoraAdapter, Linear, LoraSpec, Mode, Model, Tensor, UnaryOp};
use lora_tests::{assert_close, backend_suite, fixtures_dir, rand_vec, to64};

fn fixture() -> std::path::PathBuf {
    fixtures_dir().join("peft_dora")
}

fn io() -> BTreeMap<String, lora::HostTensor> {
    lora::io::read_safetensors(&fixture().join("io.safetensors")).unwrap()
}

/// The fixture MLP with PEFT's DoRA adapter loaded.
fn model<B: lora::FullBackend>(b: &B) -> Mlp<B> {
    let mut m = Mlp::new(b, &[6, 16, 16, 3], UnaryOp::Relu, 0).unwrap();
    m.load_state_dict(
        b,
        &lora::io::read_safetensors(&fixture().join("base_model.safetensors")).unwrap(),
    )
    .unwrap();
    lora::peft::load_pretrained(&fixture().join("adapter"), &mut m, b).unwrap();
    m
}

fn check_forward_and_gradients<B: lora::FullBackend>(b: &B) {
    let mut m = model(b);
    lora_tests::peft_mlp_check::check_output_and_gradients(b, &mut m, &io(), "DoRA", 6);
}

fn check_merge<B: lora::FullBackend>(b: &B) {
    let io = io();
    let mut m = model(b);
    let x = io["x"].to_backend(b).unwrap();
    let before = b.to_host(&m.forward(b, &x, Mode::Eval).unwrap()).unwrap();
    let originals: Vec<Vec<f32>> = m
        .linears()
        .iter()
        .map(|l| b.to_host(&l.base().weight(b).unwrap()).unwrap())
        .collect();
    for layer in m.linears_mut() {
        if layer.adapter().is_some() {
            layer.merge(b, true).unwrap();
        }
    }
    for layer in m.linears() {
        let want = &io[&format!("merged.{}.weight", layer.name())];
        let got = b.to_host(&layer.base().weight(b).unwrap()).unwrap();
        assert_close(
            &format!("{} merged", layer.name()),
            &got,
            &to64(&want.data),
            1e-5,
            1e-6,
        );
    }
    let merged = b.to_host(&m.forward(b, &x, Mode::Eval).unwrap()).unwrap();
    assert_close("merged forward", &merged, &to64(&before), 1e-5, 1e-6);
    for layer in m.linears_mut() {
        if layer.is_merged() {
            layer.unmerge(b).unwrap();
        }
    }
    for (layer, orig) in m.linears().iter().zip(&originals) {
        let got = b.to_host(&layer.base().weight(b).unwrap()).unwrap();
        assert_close(
            &format!("{} unmerged", layer.name()),
            &got,
            &to64(orig),
            1e-5,
            1e-6,
        );
    }
}

/// With dropout the base term is recomputed on the dropped input (PEFT's rule); its masks
/// cannot equal PyTorch's, so the magnitude's and the input's gradients are checked against
/// central differences of the loss under the same mask (a clone of the adapter draws the
/// same one).
fn check_dropout_gradients<B: lora::FullBackend>(b: &B) {
    let w = b.from_host(&rand_vec(8 * 5, 3, 1), &[8, 5]).unwrap();
    let base =
        lora::DenseLinear::new(w, Some(b.from_host(&rand_vec(8, 3, 2), &[8]).unwrap())).unwrap();
    let spec = LoraSpec {
        r: 2,
        alpha: 4.0,
        dropout: 0.4,
        init: lora::LoraInit::Random,
        seed: 9,
        ..LoraSpec::default()
    };
    let fresh = DoraAdapter::new(b, "layer", &base, &spec).unwrap();
    let x_host = rand_vec(4 * 5, 3, 3);
    let x = b.from_host(&x_host, &[4, 5]).unwrap();
    let g_host = rand_vec(4 * 8, 3, 4);
    let g = b.from_host(&g_host, &[4, 8]).unwrap();
    // loss = Σ g ⊙ y under the first mask of a clone of `fresh`.
    let loss = |adapter: &DoraAdapter<B>, x: &lora::HostTensor| -> f64 {
        let mut a = adapter.clone();
        let x = x.to_backend(b).unwrap();
        let mut y = base.forward(b, &x).unwrap();
        a.forward(b, &base, &x, &mut y, Mode::Train).unwrap();
        b.to_host(&y)
            .unwrap()
            .iter()
            .zip(&g_host)
            .map(|(y, g)| f64::from(*y) * f64::from(*g))
            .sum()
    };
    let mut a = fresh.clone();
    let mut y = base.forward(b, &x).unwrap();
    a.forward(b, &base, &x, &mut y, Mode::Train).unwrap();
    assert!(
        a.base_output_grad(b, &g).unwrap().is_none(),
        "dropout: the base term is recomputed inside the adapter"
    );
    let mut dx = base.backward(b, &g).unwrap();
    a.backward(b, &base, &x, &g, &mut dx).unwrap();
    let xh = lora::HostTensor {
        shape: vec![4, 5],
        data: x_host.clone(),
    };
    let grads: Vec<Vec<f32>> = a
        .params_and_grads()
        .iter()
        .map(|p| b.to_host(p.grad).unwrap())
        .collect();
    // The LoRA factors' gradients treat the norm (a function of A and B) as a constant,
    // which finite differences of the loss cannot; the dropout-specific terms are the
    // magnitude's (the recomputed base term enters it) and the input's, checked here.
    for ((name, t), got) in fresh.tensors().iter().zip(&grads).skip(2) {
        let host = b.to_host(t).unwrap();
        let shape = t.shape().dims().to_vec();
        let want = differences(&to64(&host), |v| {
            let mut p = fresh.clone();
            let v: Vec<f32> = v.iter().map(|&v| v as f32).collect();
            p.set_tensor(name, b.from_host(&v, &shape).unwrap())
                .unwrap();
            loss(&p, &xh)
        });
        assert_close(&format!("dropout d{name}"), got, &want, 2e-3, 2e-4);
    }
    let want_dx = differences(&to64(&x_host), |v| {
        let v: Vec<f32> = v.iter().map(|&v| v as f32).collect();
        loss(
            &fresh,
            &lora::HostTensor {
                shape: vec![4, 5],
                data: v,
            },
        )
    });
    assert_close("dropout dx", &b.to_host(&dx).unwrap(), &want_dx, 2e-3, 2e-4);
}

/// Central differences with a step of 1e-2: the loss is linear in the magnitude and in the
/// input under a fixed mask, so the step adds no truncation error, and a large one keeps the
/// f32 forward's rounding (relative 1e-7 of values near 1) out of the quotient.
fn differences(x: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    (0..x.len())
        .map(|i| {
            let (mut p, mut m) = (x.to_vec(), x.to_vec());
            p[i] += 1e-2;
            m[i] -= 1e-2;
            (f(&p) - f(&m)) / 2e-2
        })
        .collect()
}

backend_suite! { all:
    fn dora_output_and_gradients_equal_peft(b) {
        check_forward_and_gradients(b);
    }

    fn dora_merge_and_unmerge_equal_peft(b) {
        check_merge(b);
    }

    fn dora_dropout_gradients_equal_finite_differences(b) {
        check_dropout_gradients(b);
    }
}

/// The adapter saved here is PEFT's file again (same keys, same values), and `lora merge`'s
/// streaming merge on files gives PEFT's merged weights.
#[test]
fn dora_files_round_trip_and_merge_on_files() {
    let b = lora::NdArray::new();
    let m = model(&b);
    let tmp = tempfile::tempdir().unwrap();
    let config =
        lora::peft::LoraConfig::from_file(&fixture().join("adapter/adapter_config.json")).unwrap();
    lora::peft::save_pretrained(tmp.path(), &m, &b, &config).unwrap();
    let ours = lora::io::read_safetensors(&tmp.path().join("adapter_model.safetensors")).unwrap();
    let peft =
        lora::io::read_safetensors(&fixture().join("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        peft.keys().collect::<Vec<_>>()
    );
    for (k, t) in &peft {
        assert_eq!(ours[k].data, t.data, "{k}");
    }
    // DoRA magnitudes do not combine: add_weighted_adapter refuses them, as PEFT does.
    let mut base = Mlp::new(&b, &[6, 16, 16, 3], UnaryOp::Relu, 0).unwrap();
    base.load_state_dict(
        &b,
        &lora::io::read_safetensors(&fixture().join("base_model.safetensors")).unwrap(),
    )
    .unwrap();
    let mut pm = lora::peft::PeftModel::new(base);
    for name in ["one", "two"] {
        pm.load_adapter(&fixture().join("adapter"), name, &b)
            .unwrap();
    }
    let e = pm
        .add_weighted_adapter(
            &b,
            &[("one", 0.5), ("two", 0.5)],
            "mix",
            lora::peft::Combination::Cat,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("use_dora"), "{e}");
    let out = tmp.path().join("merged.safetensors");
    lora::peft::merge_checkpoint(
        &b,
        &fixture().join("base_model.safetensors"),
        &fixture().join("adapter"),
        lora::DEFAULT_ADAPTER,
        &out,
        lora::peft::OutDtype::Keep,
        &|_, _| {},
    )
    .unwrap();
    let merged = lora::io::read_safetensors(&out).unwrap();
    let io = io();
    for layer in ["layers.0", "layers.2", "layers.4"] {
        let key = format!("{layer}.weight");
        assert_close(
            &format!("lora merge {key}"),
            &merged[&key].data,
            &to64(&io[&format!("merged.{key}")].data),
            1e-5,
            1e-6,
        );
    }
}

/// DoRA on a quantized base (QLoRA + DoRA): on an NF4 (double-quantized) base the layer
/// computes what it computes on a dense base holding the dequantized weights (the norm is
/// taken from the dequantized weight), forward and gradients.
#[test]
fn dora_on_a_quantized_base_equals_dora_on_its_dequantized_weights() {
    use lora::Backend;
    use lora::quant::{QuantConfig, QuantFormat, QuantLinear};
    let b = lora::NdArray::new();
    let io = io();
    let config = QuantConfig::new(QuantFormat::Nf4);
    let (mut quantized, mut dense) = (model(&b), model(&b));
    for (q, d) in quantized.linears_mut().into_iter().zip(dense.linears_mut()) {
        if q.adapter().is_none() {
            continue;
        }
        let w = q.base().weight(&b).unwrap();
        let shape = w.shape().dims().to_vec();
        let qw = config.quantize(&b.to_host(&w).unwrap(), &shape).unwrap();
        let bias = q.base().bias().cloned();
        let deq = b.from_host(&qw.dequantize(), &shape).unwrap();
        q.replace_base(Box::new(QuantLinear::new(qw, bias.clone()).unwrap()))
            .unwrap();
        d.replace_base(Box::new(lora::DenseLinear::new(deq, bias).unwrap()))
            .unwrap();
    }
    let x = io["x"].to_backend(&b).unwrap();
    let mut outs = Vec::new();
    for m in [&mut quantized, &mut dense] {
        let y = m.forward(&b, &x, Mode::Train).unwrap();
        let (_, dy) = lora::mse_loss(&b, &y, &io["target"].to_backend(&b).unwrap()).unwrap();
        m.backward(&b, &dy).unwrap();
        let mut grads = Vec::new();
        for layer in m.linears_mut() {
            if let Some(a) = layer.adapter_mut() {
                grads.extend(
                    a.params_and_grads()
                        .iter()
                        .map(|p| b.to_host(p.grad).unwrap()),
                );
            }
        }
        outs.push((b.to_host(&y).unwrap(), grads));
    }
    let ((yq, gq), (yd, gd)) = (&outs[0], &outs[1]);
    assert_close("DoRA on NF4: output", yq, &to64(yd), 1e-5, 1e-6);
    assert_eq!(gq.len(), 6);
    for (i, (q, d)) in gq.iter().zip(gd).enumerate() {
        assert_close(
            &format!("DoRA on NF4: gradient {i}"),
            q,
            &to64(d),
            1e-4,
            1e-6,
        );
    }
}

/// PEFT's DoRA rescales the running output (earlier adapters' terms included), so several
/// active adapters' gradients would chain through each other's scales. Training DoRA with
/// another adapter active is refused with the layer's and the adapter's names; the forward
/// (inference with several adapters) stays allowed.
#[test]
fn dora_training_with_another_active_adapter_is_refused() {
    use lora::Backend;
    let b = lora::NdArray::new();
    let w = b.from_host(&rand_vec(8 * 5, 3, 1), &[8, 5]).unwrap();
    let base = lora::DenseLinear::new(w, None).unwrap();
    let mut layer = lora::LoraLinear::new("proj", Box::new(base));
    let spec = LoraSpec {
        r: 2,
        alpha: 4.0,
        init: lora::LoraInit::Random,
        ..LoraSpec::default()
    };
    layer.add_lora(&b, "plain", &spec).unwrap();
    layer.add_dora(&b, "dora", &spec).unwrap();
    layer.set_active_adapters(&["plain", "dora"]).unwrap();
    let x = b.from_host(&rand_vec(4 * 5, 3, 3), &[4, 5]).unwrap();
    let y = layer.forward(&b, &x, Mode::Train).unwrap();
    let e = layer.backward(&b, &y).unwrap_err().to_string();
    assert!(e.contains("proj") && e.contains("dora"), "{e}");
    layer.set_active_adapters(&["dora"]).unwrap();
    let y = layer.forward(&b, &x, Mode::Train).unwrap();
    layer.backward(&b, &y).unwrap();
}
