//! Bad input gets an error that names the layer, field or shapes; never a panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lora::{Backend, DenseLinear, Error, LoraInit, LoraLinear, LoraSpec, Mode, NdArray, Transpose};
use lora_tests::{backend, rand_tensor};

fn layer(name: &str, out: usize, inp: usize) -> LoraLinear<NdArray> {
    LoraLinear::new(
        name,
        Box::new(DenseLinear::new(rand_tensor(&[out, inp], 1, 1), None).unwrap()),
    )
}

fn spec(r: usize, dropout: f32) -> LoraSpec {
    LoraSpec {
        r,
        alpha: 8.0,
        dropout,
        use_rslora: false,
        init: LoraInit::KaimingUniform,
        seed: 0,
    }
}

#[test]
fn wrong_input_features_names_layer_and_shapes() {
    let b = backend();
    let mut l = layer("encoder.layer.3.output.dense", 6, 4);
    l.inject_lora(&b, &spec(2, 0.0)).unwrap();
    let x = rand_tensor(&[3, 5], 2, 2);
    let err = l.forward(&b, &x, Mode::Train).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("encoder.layer.3.output.dense")
            && msg.contains("[3, 5]")
            && msg.contains("[..., 4]"),
        "{msg}"
    );
}

#[test]
fn rank_zero_and_rank_above_min_dim_are_rejected() {
    let b = backend();
    let mut l = layer("q", 6, 4);
    let msg = l.inject_lora(&b, &spec(0, 0.0)).unwrap_err().to_string();
    assert!(
        msg.contains("q [6, 4]") && msg.contains("invalid r = 0"),
        "{msg}"
    );
    let msg = l.inject_lora(&b, &spec(5, 0.0)).unwrap_err().to_string();
    assert!(
        msg.contains("invalid r = 5") && msg.contains("min(in, out) = 4"),
        "{msg}"
    );
    assert!(
        l.adapter().is_none(),
        "a failed injection leaves no adapter"
    );
}

#[test]
fn dropout_outside_zero_one_is_rejected() {
    let b = backend();
    for p in [1.0, -0.1, 1.5, f32::NAN] {
        let mut l = layer("v", 4, 4);
        let msg = l.inject_lora(&b, &spec(2, p)).unwrap_err().to_string();
        assert!(
            msg.contains("lora_dropout") && msg.contains("[0, 1)"),
            "p={p}: {msg}"
        );
    }
}

#[test]
fn nan_or_inf_input_is_rejected_with_the_layer_name() {
    let b = backend();
    let mut l = layer("mlp.fc1", 3, 2);
    for with_adapter in [false, true] {
        if with_adapter {
            l.inject_lora(&b, &spec(1, 0.5)).unwrap();
        }
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let x = b.from_host(&[1.0, bad, 0.0, 1.0], &[2, 2]).unwrap();
            for mode in [Mode::Eval, Mode::Train] {
                let err = l.forward(&b, &x, mode).unwrap_err();
                assert!(matches!(err, Error::NonFinite { .. }));
                let msg = err.to_string();
                assert!(
                    msg.contains("mlp.fc1") && msg.contains("input x") && msg.contains("[2, 2]"),
                    "{msg}"
                );
            }
        }
    }
    // Finite input whose LoRA projection overflows is reported as such.
    let big = b.from_host(&[f32::MAX, f32::MAX], &[1, 2]).unwrap();
    l.adapter_mut()
        .unwrap()
        .set_tensor("lora_A", b.from_host(&[4.0, 4.0], &[1, 2]).unwrap())
        .unwrap();
    let msg = l.forward(&b, &big, Mode::Eval).unwrap_err().to_string();
    assert!(msg.contains("overflow"), "{msg}");
    let pred = b.from_host(&[1.0], &[1, 1]).unwrap();
    let target = b.from_host(&[f32::NAN], &[1, 1]).unwrap();
    assert!(
        lora::mse_loss(&b, &pred, &target)
            .unwrap_err()
            .to_string()
            .contains("target")
    );
}

#[test]
fn backward_without_forward_or_with_wrong_gradient_shape_is_an_error() {
    let b = backend();
    let mut l = layer("k", 3, 2);
    l.inject_lora(&b, &spec(1, 0.0)).unwrap();
    let dy = rand_tensor(&[4, 3], 3, 3);
    assert!(
        l.backward(&b, &dy)
            .unwrap_err()
            .to_string()
            .contains("without a forward")
    );
    let x = rand_tensor(&[4, 2], 3, 4);
    l.forward(&b, &x, Mode::Train).unwrap();
    let wrong = rand_tensor(&[4, 5], 3, 5);
    let msg = l.backward(&b, &wrong).unwrap_err().to_string();
    assert!(
        msg.contains("k backward") && msg.contains("[4, 3]") && msg.contains("[4, 5]"),
        "{msg}"
    );
    // Eval mode saves nothing, so a backward after it is refused too.
    l.forward(&b, &x, Mode::Eval).unwrap();
    assert!(l.backward(&b, &dy).is_err());
}

#[test]
fn primitives_reject_mismatched_shapes() {
    let b = backend();
    let a = rand_tensor(&[2, 3], 1, 1);
    let c = rand_tensor(&[3, 2], 1, 2);
    assert!(b.binary(lora::BinaryOp::Add, &a, &c).is_err());
    assert!(b.from_host(&[1.0, 2.0, 3.0], &[2, 2]).is_err());
    let mut out = b.zeros(&[2, 3]).unwrap();
    let msg = b
        .gemm(1.0, &a, Transpose::No, &c, Transpose::No, 0.0, &mut out)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("[2, 2]") && msg.contains("[2, 3]"), "{msg}");
    assert!(DenseLinear::<NdArray>::new(a.clone(), Some(rand_tensor(&[3], 1, 3))).is_err());
    assert!(b.reshape(&a, &[4]).is_err());
}

#[test]
fn merge_states_are_checked() {
    let b = backend();
    let mut l = layer("o", 3, 3);
    assert!(
        l.merge(&b, true)
            .unwrap_err()
            .to_string()
            .contains("no adapter")
    );
    l.inject_lora(&b, &spec(1, 0.0)).unwrap();
    assert!(
        l.unmerge(&b)
            .unwrap_err()
            .to_string()
            .contains("not merged")
    );
    l.merge(&b, false).unwrap();
    assert!(
        l.merge(&b, false)
            .unwrap_err()
            .to_string()
            .contains("already merged")
    );
    assert!(l.inject_lora(&b, &spec(1, 0.0)).is_err());
    let x = rand_tensor(&[2, 3], 4, 4);
    l.forward(&b, &x, Mode::Train).unwrap();
    let dy = rand_tensor(&[2, 3], 4, 5);
    assert!(
        l.backward(&b, &dy)
            .unwrap_err()
            .to_string()
            .contains("unmerge first")
    );
}
