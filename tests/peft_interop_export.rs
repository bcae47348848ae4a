//! The lora-rs -> PEFT direction: writes adapters made here, with our outputs and merged
//! weights, to `<target>/tmp/peft-interop/`. `cargo xtask test` then runs
//! `fixtures/check_in_peft.py`, which loads them with real PEFT and compares.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use lora::models::Mlp;
use lora::peft::{self, InitLoraWeights, LoraConfig, OutDtype, PeftModel, TargetModules};
use lora::{Backend, Mode, Model, UnaryOp};
use lora_tests::{LinearBank, backend, rand_vec};
use serde_json::json;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Where the export goes; the checker reads the same path.
fn export_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("peft-interop")
}

fn config(r: usize, alpha: f64, targets: TargetModules) -> LoraConfig {
    LoraConfig {
        r,
        lora_alpha: alpha,
        target_modules: Some(targets),
        init_lora_weights: InitLoraWeights::Bool(false),
        ..LoraConfig::default()
    }
}

fn list(v: &[&str]) -> TargetModules {
    TargetModules::List(v.iter().map(|s| s.to_string()).collect())
}

#[test]
fn export_adapters_outputs_and_merges_for_peft() {
    let b = backend();
    let out = export_dir();
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();

    // MLP: the base PEFT's fixture uses, two adapters made here.
    let mut m = Mlp::new(&b, &[3, 8, 8, 2], UnaryOp::Relu, 0).unwrap();
    m.load_state_dict(
        &b,
        &lora::io::read_safetensors(&fixtures().join("peft_mlp/base_model.safetensors")).unwrap(),
    )
    .unwrap();
    let mut pm =
        PeftModel::with_adapter(m, &b, config(3, 5.0, list(&["layers.0", "layers.2"])), 7).unwrap();
    pm.add_adapter(
        &b,
        "second",
        LoraConfig {
            use_rslora: true,
            ..config(2, 4.0, list(&["layers.4"]))
        },
        8,
    )
    .unwrap();
    // An SVD combination (TIES on the deltas, cut to rank 2) of the first and a third
    // adapter: a plain LoRA adapter PEFT must load like any other.
    pm.add_adapter(
        &b,
        "third",
        config(3, 6.0, list(&["layers.0", "layers.2"])),
        9,
    )
    .unwrap();
    let ties = lora::ops::TaskMerge {
        method: lora::ops::TaskMethod::Ties,
        density: 0.7,
        majority_sign: lora::ops::MajoritySign::Total,
        seed: 0,
    };
    let svd = peft::SvdCombination {
        merge: Some(ties),
        rank: Some(2),
        clamp: None,
    };
    pm.add_weighted_adapter(
        &b,
        &[("default", 0.6), ("third", -0.3)],
        "combo",
        peft::Combination::Svd(svd),
    )
    .unwrap();
    let x = rand_vec(5 * 3, 3, 3);
    let xt = b.from_host(&x, &[5, 3]).unwrap();
    let mut io = json!({"x": x, "x_shape": [5, 3]});
    for name in ["default", "second", "combo"] {
        pm.set_adapter(&[name]).unwrap();
        let y = b
            .to_host(&pm.model_mut().forward(&b, &xt, Mode::Eval).unwrap())
            .unwrap();
        io[format!("y_{name}")] = json!(y);
    }
    pm.set_adapter(&["default"]).unwrap();
    pm.save_pretrained(&out.join("mlp_adapters"), &b).unwrap();
    std::fs::write(out.join("mlp_io.json"), io.to_string()).unwrap();

    // Tiny BERT: adapters with patterns made here, merged here with `merge_checkpoint`.
    let bert = fixtures().join("peft_bert");
    let bank = LinearBank::from_state_dict(
        &lora::io::read_safetensors(&bert.join("base/model.safetensors")).unwrap(),
    );
    let first = LoraConfig {
        rank_pattern: [("output.dense".to_string(), 3usize)].into_iter().collect(),
        alpha_pattern: [("key".to_string(), 2.0f64)].into_iter().collect(),
        ..config(2, 4.0, list(&["key", "output.dense"]))
    };
    let mut pb = PeftModel::with_adapter(bank, &b, first, 11).unwrap();
    pb.add_adapter(
        &b,
        "second",
        config(
            4,
            8.0,
            TargetModules::Pattern(r".*layer\.0\..*dense".into()),
        ),
        12,
    )
    .unwrap();
    pb.save_pretrained(&out.join("bert_adapters"), &b).unwrap();
    for name in ["default", "second"] {
        peft::merge_checkpoint(
            &b,
            &bert.join("base"),
            &out.join("bert_adapters"),
            name,
            &out.join(format!("bert_merged_{name}.safetensors")),
            OutDtype::Keep,
            &|_, _| {},
        )
        .unwrap();
    }
    assert!(
        out.join("bert_adapters/second/adapter_model.safetensors")
            .exists()
    );
    std::fs::write(out.join("READY"), "ok\n").unwrap();
}
