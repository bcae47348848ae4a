//! PEFT adapter directories: files written by real PEFT load here and give PEFT's outputs;
//! saving and loading is lossless; the config round-trips unknown fields; bad files get
//! errors that name the file, tensor and shapes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lora::models::Mlp;
use lora::peft::{self, LoraConfig, TargetModules};
use lora::{Backend, HostTensor, Mode, Model, NdArray, UnaryOp};
use lora_tests::{assert_close, backend, host, json_f32, rand_tensor, to64};
use serde_json::Value;

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// The fixture's base MLP (3-8-8-2, ReLU) with PyTorch's weights.
fn peft_base(b: &NdArray) -> Mlp<NdArray> {
    let mut m = Mlp::new(b, &[3, 8, 8, 2], UnaryOp::Relu, 0).unwrap();
    let sd = lora::io::read_safetensors(&fixture_dir("peft_mlp").join("base_model.safetensors"))
        .unwrap();
    m.load_state_dict(b, &sd).unwrap();
    m
}

fn io() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture_dir("peft_mlp").join("io.json")).unwrap())
        .unwrap()
}

#[test]
fn adapter_written_by_peft_gives_peft_outputs() {
    let b = backend();
    let io = io();
    let x = b.from_host(&json_f32(&io["x"]), &[4, 3]).unwrap();
    let mut m = peft_base(&b);
    let cfg = peft::load_pretrained(&fixture_dir("peft_mlp"), &mut m, &b).unwrap();
    assert_eq!(cfg.r, 2);
    assert!(
        cfg.extra.contains_key("megatron_core"),
        "unknown PEFT fields are kept"
    );
    let y = host(&b, &m.forward(&b, &x, Mode::Eval).unwrap());
    assert_close(
        "PEFT unmerged output",
        &y,
        &to64(&json_f32(&io["y"])),
        1e-5,
        1e-6,
    );
    for l in m.linears_mut() {
        if l.adapter().is_some() {
            l.merge(&b, true).unwrap();
        }
    }
    let ym = host(&b, &m.forward(&b, &x, Mode::Eval).unwrap());
    assert_close(
        "PEFT merge_and_unload output",
        &ym,
        &to64(&json_f32(&io["y_merged"])),
        1e-5,
        1e-6,
    );
}

#[test]
fn float16_adapter_loads() {
    let b = backend();
    let io = io();
    let x = b.from_host(&json_f32(&io["x"]), &[4, 3]).unwrap();
    let mut m = peft_base(&b);
    peft::load_pretrained(&fixture_dir("peft_mlp_f16"), &mut m, &b).unwrap();
    let y = host(&b, &m.forward(&b, &x, Mode::Eval).unwrap());
    // f16 keeps ~3 decimal digits of each adapter value.
    assert_close(
        "f16 adapter output",
        &y,
        &to64(&json_f32(&io["y"])),
        5e-3,
        5e-3,
    );
}

fn copy_dir_with(src: &Path, dst: &Path, edit: impl Fn(&mut BTreeMap<String, HostTensor>)) {
    std::fs::create_dir_all(dst).unwrap();
    std::fs::copy(src.join(peft::CONFIG_FILE), dst.join(peft::CONFIG_FILE)).unwrap();
    let mut t = lora::io::read_safetensors(&src.join(peft::WEIGHTS_FILE)).unwrap();
    edit(&mut t);
    let list: Vec<(String, HostTensor)> = t.into_iter().collect();
    lora::io::write_safetensors(&dst.join(peft::WEIGHTS_FILE), &list).unwrap();
}

#[test]
fn keys_with_the_default_adapter_name_load() {
    let b = backend();
    let tmp = tempfile::tempdir().unwrap();
    copy_dir_with(&fixture_dir("peft_mlp"), tmp.path(), |t| {
        let old = std::mem::take(t);
        for (k, v) in old {
            t.insert(k.replace(".weight", ".default.weight"), v);
        }
    });
    let io = io();
    let x = b.from_host(&json_f32(&io["x"]), &[4, 3]).unwrap();
    let mut m = peft_base(&b);
    peft::load_pretrained(tmp.path(), &mut m, &b).unwrap();
    let y = host(&b, &m.forward(&b, &x, Mode::Eval).unwrap());
    assert_close(
        "output with .default keys",
        &y,
        &to64(&json_f32(&io["y"])),
        1e-5,
        1e-6,
    );
}

#[test]
fn save_then_load_is_lossless_and_writes_peft_layout() {
    let b = backend();
    let mut m = Mlp::new(&b, &[4, 6, 6, 3], UnaryOp::Gelu, 3).unwrap();
    let cfg = LoraConfig {
        r: 3,
        lora_alpha: 12.0,
        target_modules: Some(TargetModules::Pattern(r"layers\.[24]".into())),
        init_lora_weights: peft::InitLoraWeights::Bool(false),
        ..LoraConfig::default()
    };
    let injected = peft::inject_adapters(&mut m, &b, &cfg, 11).unwrap();
    assert_eq!(injected, vec!["layers.2", "layers.4"]);
    let x = rand_tensor(&[5, 4], 1, 1);
    let y = host(&b, &m.forward(&b, &x, Mode::Eval).unwrap());
    let tmp = tempfile::tempdir().unwrap();
    peft::save_pretrained(tmp.path(), &m, &b, &cfg).unwrap();

    let tensors = lora::io::read_safetensors(&tmp.path().join(peft::WEIGHTS_FILE)).unwrap();
    let keys: Vec<&String> = tensors.keys().collect();
    assert_eq!(
        keys,
        [
            "base_model.model.layers.2.lora_A.weight",
            "base_model.model.layers.2.lora_B.weight",
            "base_model.model.layers.4.lora_A.weight",
            "base_model.model.layers.4.lora_B.weight"
        ]
    );
    assert_eq!(
        tensors["base_model.model.layers.4.lora_A.weight"].shape,
        vec![3, 6]
    );
    assert_eq!(
        tensors["base_model.model.layers.4.lora_B.weight"].shape,
        vec![3, 3]
    );
    let json = std::fs::read_to_string(tmp.path().join(peft::CONFIG_FILE)).unwrap();
    assert!(
        json.starts_with("{\n  \"alpha_pattern\": {},\n"),
        "sorted keys, indent 2: {json}"
    );
    assert!(
        json.contains("\"lora_alpha\": 12,"),
        "integral alpha written as an integer"
    );
    assert!(json.contains("\"peft_type\": \"LORA\""));

    let mut m2 = Mlp::new(&b, &[4, 6, 6, 3], UnaryOp::Gelu, 3).unwrap();
    let cfg2 = peft::load_pretrained(tmp.path(), &mut m2, &b).unwrap();
    assert_eq!(cfg2, cfg);
    assert_eq!(host(&b, &m2.forward(&b, &x, Mode::Eval).unwrap()), y);
}

#[test]
fn unknown_config_fields_survive_a_round_trip() {
    let text = r#"{"r": 4, "lora_alpha": 8, "target_modules": ["q"], "brand_new_field": {"a": [1, 2]}, "peft_type": "LORA"}"#;
    let cfg: LoraConfig = serde_json::from_str(text).unwrap();
    assert_eq!(cfg.extra["brand_new_field"]["a"][1], 2);
    let back: Value = serde_json::from_str(&cfg.to_json_string().unwrap()).unwrap();
    assert_eq!(back["brand_new_field"]["a"][0], 1);
    assert_eq!(back["lora_dropout"], 0.0);
}

fn load_err(
    edit_cfg: impl Fn(&mut Value),
    edit_t: impl Fn(&mut BTreeMap<String, HostTensor>),
) -> String {
    let b = backend();
    let tmp = tempfile::tempdir().unwrap();
    copy_dir_with(&fixture_dir("peft_mlp"), tmp.path(), edit_t);
    let p = tmp.path().join(peft::CONFIG_FILE);
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit_cfg(&mut cfg);
    std::fs::write(&p, serde_json::to_string(&cfg).unwrap()).unwrap();
    let mut m = peft_base(&b);
    match peft::load_pretrained(tmp.path(), &mut m, &b) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_adapter_directories_get_errors_naming_the_problem() {
    let wrong_shape = load_err(
        |_| {},
        |t| {
            t.insert(
                "base_model.model.layers.2.lora_A.weight".into(),
                HostTensor {
                    shape: vec![2, 5],
                    data: vec![0.0; 10],
                },
            );
        },
    );
    assert!(
        wrong_shape.contains("layers.2.lora_A")
            && wrong_shape.contains("[2, 8]")
            && wrong_shape.contains("[2, 5]"),
        "{wrong_shape}"
    );
    let missing = load_err(
        |_| {},
        |t| {
            t.remove("base_model.model.layers.4.lora_B.weight");
        },
    );
    assert!(
        missing.contains("missing tensor base_model.model.layers.4.lora_B.weight"),
        "{missing}"
    );
    let stray = load_err(
        |c| c["target_modules"] = serde_json::json!(["layers.2"]),
        |_| {},
    );
    assert!(
        stray.contains("layers.4") && stray.contains("did not select"),
        "{stray}"
    );
    // A DoRA config over a file without magnitudes names the missing tensor.
    let dora = load_err(|c| c["use_dora"] = true.into(), |_| {});
    assert!(
        dora.contains("missing tensor") && dora.contains("lora_magnitude_vector"),
        "{dora}"
    );
    let loftq = load_err(|c| c["init_lora_weights"] = "loftq".into(), |_| {});
    assert!(
        loftq.contains("init_lora_weights") && loftq.contains("loftq"),
        "{loftq}"
    );
    let nomatch = load_err(
        |c| c["target_modules"] = serde_json::json!(["query"]),
        |_| {},
    );
    assert!(
        nomatch.contains("matched no module") && nomatch.contains("layers.0"),
        "{nomatch}"
    );
    let badtype = load_err(|c| c["r"] = "eight".into(), |_| {});
    assert!(
        badtype.contains("adapter_config.json") && badtype.contains("invalid"),
        "{badtype}"
    );
}

#[test]
fn a_truncated_weights_file_is_a_format_error() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture_dir("peft_mlp").join(peft::WEIGHTS_FILE);
    let bytes = std::fs::read(&src).unwrap();
    let dst = tmp.path().join("cut.safetensors");
    std::fs::write(&dst, &bytes[..bytes.len() / 2]).unwrap();
    let err = lora::io::read_safetensors(&dst).unwrap_err();
    assert!(matches!(err, lora::io::Error::Format { .. }));
    assert!(err.to_string().contains("cut.safetensors"), "{err}");
}
