//! Hotswapping (issue 15, PEFT's `hotswap_adapter` / `prepare_model_for_compiled_hotswap`):
//! an adapter's weights replaced in place give exactly what loading the new adapter fresh
//! gives, at its own rank and scaling; padding to a target rank changes no output; a swap
//! that cannot be done (a module the old adapter lacks, incompatible configs, DoRA) is
//! refused by name and leaves the old adapter working.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use lora::models::Mlp;
use lora::peft::{LoraConfig, PeftModel, TargetModules};
use lora::{Backend, Mode, Model, NdArray, UnaryOp};
use lora_tests::{assert_close, fixtures_dir, to64};

fn base(b: &NdArray) -> Mlp<NdArray> {
    let mut m = Mlp::new(b, &[6, 16, 16, 3], UnaryOp::Relu, 0).unwrap();
    let dir = fixtures_dir().join("peft_combine");
    m.load_state_dict(
        b,
        &lora::io::read_safetensors(&dir.join("base_model.safetensors")).unwrap(),
    )
    .unwrap();
    m
}

fn output(b: &NdArray, pm: &mut PeftModel<NdArray, Mlp<NdArray>>) -> Vec<f32> {
    let mut x = vec![0.0; 5 * 6];
    lora::rng::uniform(lora::rng::RngState::new(4, 1), -1.0, 1.0, &mut x);
    let x = b.from_host(&x, &[5, 6]).unwrap();
    b.to_host(&pm.model_mut().forward(b, &x, Mode::Eval).unwrap())
        .unwrap()
}

/// The output with `dir` loaded fresh as the only adapter.
fn fresh(b: &NdArray, dir: &Path) -> Vec<f32> {
    let mut pm = PeftModel::new(base(b));
    pm.load_adapter(dir, "default", b).unwrap();
    output(b, &mut pm)
}

/// A random adapter of rank `r` on `targets`, saved to `dir`.
fn random_adapter(b: &NdArray, dir: &Path, r: usize, alpha: f64, targets: &[&str], seed: u64) {
    let config = LoraConfig {
        r,
        lora_alpha: alpha,
        target_modules: Some(TargetModules::List(
            targets.iter().map(|s| s.to_string()).collect(),
        )),
        init_lora_weights: lora::peft::InitLoraWeights::Bool(false),
        ..LoraConfig::default()
    };
    let pm = PeftModel::with_adapter(base(b), b, config, seed).unwrap();
    pm.save_pretrained(dir, b).unwrap();
}

#[test]
fn hotswapped_adapters_compute_what_fresh_loads_compute() {
    let b = NdArray::new();
    let tmp = tempfile::tempdir().unwrap();
    let combine = fixtures_dir().join("peft_combine");
    let (first, second) = (combine.join("first"), combine.join("second"));
    let small = tmp.path().join("small");
    random_adapter(&b, &small, 2, 8.0, &["layers.0", "layers.2"], 1);
    let big = tmp.path().join("big");
    random_adapter(&b, &big, 6, 4.0, &["layers.0", "layers.2"], 2);
    let only_first_layer = tmp.path().join("only0");
    random_adapter(&b, &only_first_layer, 4, 4.0, &["layers.0"], 3);

    let mut pm = PeftModel::new(base(&b));
    pm.load_adapter(&first, "default", &b).unwrap();
    assert_close(
        "first",
        &output(&b, &mut pm),
        &to64(&fresh(&b, &first)),
        1e-6,
        1e-7,
    );
    // Same rank, another alpha (scaling 1 instead of 2).
    pm.hotswap_adapter(&second, "default", &b).unwrap();
    let want = fresh(&b, &second);
    assert_close(
        "first -> second",
        &output(&b, &mut pm),
        &to64(&want),
        1e-6,
        1e-7,
    );
    // Padding to rank 6 changes no output.
    pm.prepare_for_hotswap(&b, 6).unwrap();
    assert_close("padded", &output(&b, &mut pm), &to64(&want), 1e-6, 1e-7);
    for (label, dir) in [
        ("rank 2", &small),
        ("rank 6", &big),
        ("layers.0 only", &only_first_layer),
        ("back to first", &first),
    ] {
        pm.hotswap_adapter(dir, "default", &b).unwrap();
        let got = output(&b, &mut pm);
        assert_close(label, &got, &to64(&fresh(&b, dir)), 1e-6, 1e-7);
    }
    // Without padding, a smaller rank is padded to the current one.
    let mut unprepared = PeftModel::new(base(&b));
    unprepared.load_adapter(&second, "default", &b).unwrap();
    unprepared.hotswap_adapter(&small, "default", &b).unwrap();
    assert_close(
        "unprepared rank 2",
        &output(&b, &mut unprepared),
        &to64(&fresh(&b, &small)),
        1e-6,
        1e-7,
    );
}

#[test]
fn impossible_swaps_are_refused_and_change_nothing() {
    let b = NdArray::new();
    let tmp = tempfile::tempdir().unwrap();
    let first = fixtures_dir().join("peft_combine/first");
    let mut pm = PeftModel::new(base(&b));
    pm.load_adapter(&first, "default", &b).unwrap();
    let before = output(&b, &mut pm);
    let layer4 = tmp.path().join("layer4");
    random_adapter(&b, &layer4, 2, 4.0, &["layers.0", "layers.4"], 5);
    let e = pm
        .hotswap_adapter(&layer4, "default", &b)
        .unwrap_err()
        .to_string();
    assert!(e.contains("layers.4"), "{e}");
    let dora = fixtures_dir().join("peft_dora/adapter");
    let e = pm
        .hotswap_adapter(&dora, "default", &b)
        .unwrap_err()
        .to_string();
    assert!(e.contains("use_dora"), "{e}");
    let e = pm
        .hotswap_adapter(&first, "other", &b)
        .unwrap_err()
        .to_string();
    assert!(e.contains("other"), "{e}");
    let e = pm.prepare_for_hotswap(&b, 2).unwrap_err().to_string();
    assert!(e.contains("target_rank") && e.contains("layers.0"), "{e}");
    assert_eq!(
        output(&b, &mut pm),
        before,
        "the old adapter still works unchanged"
    );
}
