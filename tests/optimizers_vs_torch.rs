//! Our optimizers against `torch.optim` (SGD, Adam, AdamW; single-tensor path) on the
//! fixed problem in `fixtures/optimizers.json` (made by `fixtures/make_fixtures.py`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lora::{Adam, AdamHyper, Backend, NdArray, NdTensor, Optimizer, ParamGrad, Sgd, SgdHyper};
use lora_tests::{assert_close, backend, host, json_f32, to64};
use serde_json::Value;

fn fixture() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/optimizers.json"
    ))
    .expect("fixtures/optimizers.json (run tests/fixtures/make_fixtures.py)");
    serde_json::from_str(&text).unwrap()
}

fn f(kw: &Value, key: &str, default: f32) -> f32 {
    kw.get(key)
        .and_then(Value::as_f64)
        .map_or(default, |v| v as f32)
}

fn make_optimizer(class: &str, kw: &Value) -> Box<dyn Optimizer<NdArray>> {
    match class {
        "SGD" => Box::new(
            Sgd::new(SgdHyper {
                lr: f(kw, "lr", 0.0),
                momentum: f(kw, "momentum", 0.0),
                dampening: f(kw, "dampening", 0.0),
                weight_decay: f(kw, "weight_decay", 0.0),
                nesterov: kw.get("nesterov").and_then(Value::as_bool).unwrap_or(false),
            })
            .unwrap(),
        ),
        "Adam" | "AdamW" => {
            let betas = kw
                .get("betas")
                .map(json_f32)
                .unwrap_or_else(|| vec![0.9, 0.999]);
            Box::new(
                Adam::new(AdamHyper {
                    lr: f(kw, "lr", 1e-3),
                    beta1: betas[0],
                    beta2: betas[1],
                    eps: f(kw, "eps", 1e-8),
                    // torch's AdamW default decay is 0.01, Adam's is 0.
                    weight_decay: f(
                        kw,
                        "weight_decay",
                        if class == "AdamW" { 0.01 } else { 0.0 },
                    ),
                    decoupled: class == "AdamW",
                })
                .unwrap(),
            )
        }
        other => panic!("unknown optimizer {other}"),
    }
}

#[test]
fn every_optimizer_follows_torch_for_six_steps() {
    let fx = fixture();
    let b = backend();
    let shapes: Vec<Vec<usize>> = fx["shapes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            s.as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect()
        })
        .collect();
    let cases = fx["cases"].as_object().unwrap();
    assert_eq!(cases.len(), 6);
    for (name, case) in cases {
        let mut opt = make_optimizer(case["class"].as_str().unwrap(), &case["kwargs"]);
        let mut params: Vec<NdTensor> = fx["params0"]
            .as_array()
            .unwrap()
            .iter()
            .zip(&shapes)
            .map(|(p, s)| b.from_host(&json_f32(p), s).unwrap())
            .collect();
        for (step, (grads, want)) in fx["grads"]
            .as_array()
            .unwrap()
            .iter()
            .zip(case["trajectory"].as_array().unwrap())
            .enumerate()
        {
            let grads: Vec<NdTensor> = grads
                .as_array()
                .unwrap()
                .iter()
                .zip(&shapes)
                .map(|(g, s)| b.from_host(&json_f32(g), s).unwrap())
                .collect();
            let mut pg: Vec<ParamGrad<'_, NdTensor>> = params
                .iter_mut()
                .zip(&grads)
                .map(|(param, grad)| ParamGrad { param, grad })
                .collect();
            opt.step(&b, &mut pg).unwrap();
            for (i, (p, w)) in params.iter().zip(want.as_array().unwrap()).enumerate() {
                let want: Vec<f64> = to64(&json_f32(w));
                assert_close(
                    &format!("{name} step {} param {i}", step + 1),
                    &host(&b, p),
                    &want,
                    2e-6,
                    2e-7,
                );
            }
        }
        assert!(
            opt.state_bytes() > 0 || name == "sgd_plain",
            "{name} keeps state"
        );
    }
}

#[test]
fn optimizer_rejects_a_changed_parameter_list() {
    let b = backend();
    let mut opt = Adam::<NdArray>::plain(1e-3).unwrap();
    let mut p = b.zeros(&[2, 2]).unwrap();
    let g = b.zeros(&[2, 2]).unwrap();
    opt.step(
        &b,
        &mut [ParamGrad {
            param: &mut p,
            grad: &g,
        }],
    )
    .unwrap();
    let mut q = b.zeros(&[3]).unwrap();
    let gq = b.zeros(&[3]).unwrap();
    let err = opt
        .step(
            &b,
            &mut [ParamGrad {
                param: &mut q,
                grad: &gq,
            }],
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("[2, 2]") && err.contains("[3]"), "{err}");
    let bad = b.zeros(&[4]).unwrap();
    let err = opt
        .step(
            &b,
            &mut [ParamGrad {
                param: &mut p,
                grad: &bad,
            }],
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("gradient"), "{err}");
}
