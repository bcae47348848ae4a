//! PiSSA and OLoRA initialisation (`init_lora_weights`, issue 15) against PEFT
//! (`fixtures/make_init_fixtures.py`): the base weights after the residual is moved out,
//! the adapters' deltas `s·B A` (free of the singular/QR vectors' signs, which differ
//! between LAPACK and faer), and the unchanged output at step 0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lora::models::Mlp;
use lora::{Backend, Mode, Model, NdArray, UnaryOp};
use lora_tests::{assert_close, fixtures_dir, to64};

#[test]
fn pissa_and_olora_equal_peft() {
    let dir = fixtures_dir().join("peft_init");
    let io = lora::io::read_safetensors(&dir.join("init.safetensors")).unwrap();
    let b = NdArray::new();
    for method in ["pissa", "olora"] {
        let mut m = Mlp::new(&b, &[6, 16, 16, 3], UnaryOp::Relu, 0).unwrap();
        m.load_state_dict(
            &b,
            &lora::io::read_safetensors(&dir.join("base_model.safetensors")).unwrap(),
        )
        .unwrap();
        let config =
            lora::peft::LoraConfig::from_file(&dir.join(method).join("adapter_config.json"))
                .unwrap();
        lora::peft::inject_adapters(&mut m, &b, &config, 0).unwrap();
        let mut checked = 0;
        for layer in m.linears() {
            let Some(adapter) = layer.adapter() else {
                continue;
            };
            let module = layer.name();
            let w = b.to_host(&layer.base().weight(&b).unwrap()).unwrap();
            let want = &io[&format!("{method}.{module}.weight")];
            assert_close(
                &format!("{method} {module} base"),
                &w,
                &to64(&want.data),
                1e-5,
                1e-6,
            );
            let delta = b.to_host(&adapter.delta_weight(&b).unwrap()).unwrap();
            let want = &io[&format!("{method}.{module}.delta")];
            assert_close(
                &format!("{method} {module} delta"),
                &delta,
                &to64(&want.data),
                1e-5,
                1e-6,
            );
            checked += 1;
        }
        assert_eq!(checked, 2);
        let x = io["x"].to_backend(&b).unwrap();
        let y = b.to_host(&m.forward(&b, &x, Mode::Eval).unwrap()).unwrap();
        assert_close(
            &format!("{method} output"),
            &y,
            &to64(&io[&format!("{method}.y")].data),
            1e-5,
            1e-6,
        );
        assert_close(
            &format!("{method} output vs base"),
            &y,
            &to64(&io["y_base"].data),
            1e-5,
            1e-6,
        );
    }
}

/// The fixture MLP with `init_lora_weights = method` (r=4, alpha 8 on layers.0/2).
fn initialised(b: &NdArray, method: &str, r: usize) -> lora::Result<Mlp<NdArray>> {
    let dir = fixtures_dir().join("peft_init");
    let mut m = Mlp::new(b, &[6, 16, 16, 3], UnaryOp::Relu, 0)?;
    m.load_state_dict(
        b,
        &lora::io::read_safetensors(&dir.join("base_model.safetensors")).unwrap(),
    )?;
    let config = lora::peft::LoraConfig {
        r,
        lora_alpha: 8.0,
        target_modules: Some(lora::peft::TargetModules::List(vec![
            "layers.0".into(),
            "layers.2".into(),
        ])),
        init_lora_weights: lora::peft::InitLoraWeights::Method(method.into()),
        ..Default::default()
    };
    lora::peft::inject_adapters(&mut m, b, &config, 7)
        .map_err(|e| lora::Error::state("inject", e.to_string()))?;
    Ok(m)
}

/// `pissa_niter_K` (a randomized SVD, as `torch.svd_lowrank`): the residual plus the
/// adapter is the original weight, the output is unchanged, and with enough power
/// iterations the delta is PEFT's exact PiSSA delta.
#[test]
fn randomized_pissa_converges_to_peft_pissa() {
    let dir = fixtures_dir().join("peft_init");
    let io = lora::io::read_safetensors(&dir.join("init.safetensors")).unwrap();
    let base = lora::io::read_safetensors(&dir.join("base_model.safetensors")).unwrap();
    let b = NdArray::new();
    // Relative distance to PEFT's exact delta, per module, for each iteration count.
    let mut errors: Vec<Vec<f32>> = Vec::new();
    for niter in [2, 30] {
        let mut m = initialised(&b, &format!("pissa_niter_{niter}"), 4).unwrap();
        let mut errs = Vec::new();
        for layer in m.linears() {
            let Some(adapter) = layer.adapter() else {
                continue;
            };
            let module = layer.name();
            let w = b.to_host(&layer.base().weight(&b).unwrap()).unwrap();
            let delta = b.to_host(&adapter.delta_weight(&b).unwrap()).unwrap();
            let sum: Vec<f32> = w.iter().zip(&delta).map(|(a, d)| a + d).collect();
            let orig = &base[&format!("{module}.weight")].data;
            assert_close(
                &format!("niter {niter} {module}: W' + s·BA"),
                &sum,
                &to64(orig),
                1e-5,
                1e-6,
            );
            let exact = &io[&format!("pissa.{module}.delta")].data;
            let err: f32 = delta
                .iter()
                .zip(exact)
                .map(|(a, e)| (a - e) * (a - e))
                .sum::<f32>()
                .sqrt();
            let norm: f32 = exact.iter().map(|e| e * e).sum::<f32>().sqrt();
            errs.push(err / norm);
        }
        errors.push(errs);
        let x = io["x"].to_backend(&b).unwrap();
        let y = b.to_host(&m.forward(&b, &x, Mode::Eval).unwrap()).unwrap();
        assert_close(
            &format!("niter {niter} output"),
            &y,
            &to64(&io["y_base"].data),
            1e-5,
            1e-6,
        );
    }
    // The fixture's random weights have a flat spectrum, so power iterations converge
    // slowly: 30 of them bring the delta within 1% of the exact one, far closer than 2.
    for (few, many) in errors[0].iter().zip(&errors[1]) {
        assert!(
            *many < 1e-2 && *many < few / 4.0,
            "relative errors, 2 vs 30 iterations: {errors:?}"
        );
    }
}

/// `orthogonal` (PEFT's `orthogonal_init`): both factors non-zero, their product zero, the
/// base untouched; an odd rank is refused by name.
#[test]
fn orthogonal_init_is_a_non_zero_no_op() {
    let dir = fixtures_dir().join("peft_init");
    let base = lora::io::read_safetensors(&dir.join("base_model.safetensors")).unwrap();
    let b = NdArray::new();
    let m = initialised(&b, "orthogonal", 4).unwrap();
    let mut checked = 0;
    for layer in m.linears() {
        let Some(adapter) = layer.adapter() else {
            continue;
        };
        let module = layer.name();
        let t = adapter.tensors();
        for (name, f) in &t {
            let v = b.to_host(f).unwrap();
            assert!(
                v.iter().any(|x| x.abs() > 1e-3),
                "{module} {name} is non-zero"
            );
        }
        let delta = b.to_host(&adapter.delta_weight(&b).unwrap()).unwrap();
        assert!(delta.iter().all(|d| d.abs() < 1e-6), "{module}: B A = 0");
        let w = b.to_host(&layer.base().weight(&b).unwrap()).unwrap();
        assert_eq!(
            w,
            base[&format!("{module}.weight")].data,
            "{module}: base untouched"
        );
        checked += 1;
    }
    assert_eq!(checked, 2);
    let e = initialised(&b, "orthogonal", 3)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("even") && e.contains("init_lora_weights"), "{e}");
}

/// A trained PiSSA adapter converted to plain LoRA (PEFT's
/// `path_initial_model_for_weight_conversion`) equals PEFT's converted files, and on the
/// original base it computes what the trained adapter computes on the residual base.
#[test]
fn pissa_converts_to_peft_lora() {
    let dir = fixtures_dir().join("peft_init");
    let conv = dir.join("conversion");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("converted");
    let config =
        lora::peft::convert_to_lora(&conv.join("trained"), &conv.join("initial"), &out).unwrap();
    assert_eq!((config.r, config.lora_alpha), (4, 8.0));
    let ours = lora::io::read_safetensors(&out.join("adapter_model.safetensors")).unwrap();
    let peft =
        lora::io::read_safetensors(&conv.join("converted/adapter_model.safetensors")).unwrap();
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        peft.keys().collect::<Vec<_>>()
    );
    for (k, t) in &peft {
        assert_eq!((&ours[k].shape, &ours[k].data), (&t.shape, &t.data), "{k}");
    }
    let theirs =
        lora::peft::LoraConfig::from_file(&conv.join("converted/adapter_config.json")).unwrap();
    assert_eq!(
        (config.r, config.lora_alpha, &config.init_lora_weights),
        (theirs.r, theirs.lora_alpha, &theirs.init_lora_weights)
    );
    let b = NdArray::new();
    let mut m = Mlp::new(&b, &[6, 16, 16, 3], UnaryOp::Relu, 0).unwrap();
    m.load_state_dict(
        &b,
        &lora::io::read_safetensors(&dir.join("base_model.safetensors")).unwrap(),
    )
    .unwrap();
    lora::peft::load_pretrained(&out, &mut m, &b).unwrap();
    let io = lora::io::read_safetensors(&conv.join("io.safetensors")).unwrap();
    let y = b
        .to_host(
            &m.forward(&b, &io["x"].to_backend(&b).unwrap(), Mode::Eval)
                .unwrap(),
        )
        .unwrap();
    assert_close("converted output", &y, &to64(&io["y"].data), 1e-5, 1e-6);
    let e = lora::peft::convert_to_lora(&conv.join("trained"), &dir.join("pissa"), &out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("adapter_model.safetensors"), "{e}");
}

/// LoftQ (`init_lora_weights: "loftq"` with `loftq_config`): the base becomes PEFT's
/// quantized-dequantized weight and the adapter PEFT's delta, for NF4 with one and three
/// alternations and for int8; a missing `loftq_config` or 2 bits are refused by name.
#[test]
fn loftq_equals_peft() {
    let dir = fixtures_dir().join("peft_init");
    let want = lora::io::read_safetensors(&dir.join("loftq.safetensors")).unwrap();
    let b = NdArray::new();
    for (case, bits, iters) in [
        ("nf4_iter1", 4, 1),
        ("nf4_iter3", 4, 3),
        ("int8_iter1", 8, 1),
    ] {
        let mut m = Mlp::new(&b, &[6, 16, 16, 3], UnaryOp::Relu, 0).unwrap();
        m.load_state_dict(
            &b,
            &lora::io::read_safetensors(&dir.join("base_model.safetensors")).unwrap(),
        )
        .unwrap();
        let config = lora::peft::LoraConfig {
            r: 2,
            lora_alpha: 4.0,
            target_modules: Some(lora::peft::TargetModules::List(vec![
                "layers.0".into(),
                "layers.2".into(),
            ])),
            init_lora_weights: lora::peft::InitLoraWeights::Method("loftq".into()),
            loftq_config: [
                ("loftq_bits".to_string(), serde_json::json!(bits)),
                ("loftq_iter".to_string(), serde_json::json!(iters)),
            ]
            .into_iter()
            .collect(),
            ..Default::default()
        };
        lora::peft::inject_adapters(&mut m, &b, &config, 0).unwrap();
        for layer in m.linears() {
            let Some(adapter) = layer.adapter() else {
                continue;
            };
            let module = layer.name();
            let w = b.to_host(&layer.base().weight(&b).unwrap()).unwrap();
            let key = |t: &str| format!("{case}.{module}.{t}");
            assert_close(
                &key("weight"),
                &w,
                &to64(&want[&key("weight")].data),
                1e-5,
                1e-6,
            );
            let delta = b.to_host(&adapter.delta_weight(&b).unwrap()).unwrap();
            assert_close(
                &key("delta"),
                &delta,
                &to64(&want[&key("delta")].data),
                1e-4,
                1e-5,
            );
        }
    }
    for (loftq_config, needle) in [
        (serde_json::json!({}), "loftq_config"),
        (serde_json::json!({"loftq_bits": 2}), "loftq_bits"),
    ] {
        let mut m = Mlp::new(&b, &[6, 16, 16, 3], UnaryOp::Relu, 0).unwrap();
        let config = lora::peft::LoraConfig {
            target_modules: Some(lora::peft::TargetModules::List(vec!["layers.0".into()])),
            r: 2,
            init_lora_weights: lora::peft::InitLoraWeights::Method("loftq".into()),
            loftq_config: serde_json::from_value(loftq_config).unwrap(),
            ..Default::default()
        };
        let e = lora::peft::inject_adapters(&mut m, &b, &config, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{e}");
    }
}
