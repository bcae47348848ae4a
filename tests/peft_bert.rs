//! Adapters written by PEFT for a tiny BERT (`fixtures/peft_bert`, made by
//! `fixtures/make_fixtures.py`): rank and alpha patterns, rsLoRA, layers_to_transform with
//! layers_pattern, a regex target, a second named adapter in a subfolder stored in f16.
//! Loading must select exactly PEFT's modules (a missing or stray tensor fails the load),
//! and merging, in memory and with `merge_checkpoint`, must give PEFT's merged weights.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use lora::peft::{self, OutDtype, PeftModel};
use lora::{Model, Tensor};
use lora_tests::{LinearBank, assert_close, backend, to64};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/peft_bert")
}

fn bank() -> LinearBank {
    LinearBank::from_state_dict(
        &lora::io::read_safetensors(&dir().join("base/model.safetensors")).unwrap(),
    )
}

fn adapter_modules(pm: &PeftModel<lora::NdArray, LinearBank>, name: &str) -> Vec<String> {
    pm.model()
        .linears()
        .iter()
        .filter(|l| l.adapter_named(name).is_some())
        .map(|l| l.name().to_string())
        .collect()
}

#[test]
fn targeting_rules_select_exactly_peft_modules() {
    let b = backend();
    let mut pm = PeftModel::from_pretrained(bank(), &dir().join("adapters"), &b).unwrap();
    pm.load_adapter(&dir().join("adapters/second"), "second", &b)
        .unwrap();
    // layers_to_transform [1] with "dense" excludes layer 0 and the pooler.
    assert_eq!(
        adapter_modules(&pm, "default"),
        [
            "encoder.layer.1.attention.output.dense",
            "encoder.layer.1.attention.self.query",
            "encoder.layer.1.attention.self.value",
            "encoder.layer.1.intermediate.dense",
            "encoder.layer.1.output.dense",
        ]
    );
    assert_eq!(
        adapter_modules(&pm, "second").len(),
        4,
        "query and key of both layers (regex)"
    );
    let l = pm
        .model()
        .linears()
        .into_iter()
        .find(|l| l.name() == "encoder.layer.1.intermediate.dense")
        .unwrap();
    assert_eq!(
        l.adapter_named("default").unwrap().tensors()[0]
            .1
            .shape()
            .dims(),
        [4, 16],
        "rank_pattern r=4"
    );
}

fn compare_weights(
    what: &str,
    got: &std::collections::BTreeMap<String, lora::HostTensor>,
    want_file: &Path,
) {
    let want = lora::io::read_safetensors(want_file).unwrap();
    for (k, w) in &want {
        let Some(g) = got.get(k) else { continue };
        assert_eq!(g.shape, w.shape, "{what} {k}");
        assert_close(&format!("{what} {k}"), &g.data, &to64(&w.data), 1e-5, 1e-6);
    }
}

#[test]
fn in_memory_merge_gives_peft_merged_weights_for_each_adapter() {
    let b = backend();
    for name in ["default", "second"] {
        let mut pm = PeftModel::from_pretrained(bank(), &dir().join("adapters"), &b).unwrap();
        pm.load_adapter(&dir().join("adapters/second"), "second", &b)
            .unwrap();
        pm.set_adapter(&[name]).unwrap();
        pm.merge(&b, true).unwrap();
        let sd: std::collections::BTreeMap<_, _> =
            pm.model().state_dict(&b).unwrap().into_iter().collect();
        compare_weights(
            &format!("merged {name}"),
            &sd,
            &dir().join(format!("merged_{name}.safetensors")),
        );
        // And the weights differ from the base where the adapter acts.
        let base = lora::io::read_safetensors(&dir().join("base/model.safetensors")).unwrap();
        let changed = sd
            .iter()
            .filter(|(k, v)| base.get(*k).is_some_and(|bv| bv.data != v.data))
            .count();
        assert_eq!(changed, if name == "default" { 5 } else { 4 }, "{name}");
    }
}

#[test]
fn checkpoint_merge_gives_peft_merged_weights() {
    let b = backend();
    let tmp = tempfile::tempdir().unwrap();
    for name in ["default", "second"] {
        let out = tmp.path().join(format!("{name}.safetensors"));
        let report = peft::merge_checkpoint(
            &b,
            &dir().join("base"),
            &dir().join("adapters"),
            name,
            &out,
            OutDtype::Keep,
            &|_, _| {},
        )
        .unwrap();
        assert_eq!(report.merged.len(), if name == "default" { 5 } else { 4 });
        compare_weights(
            &format!("lora merge {name}"),
            &lora::io::read_safetensors(&out).unwrap(),
            &dir().join(format!("merged_{name}.safetensors")),
        );
    }
}

#[test]
fn saving_reproduces_peft_files() {
    let b = backend();
    let mut pm = PeftModel::from_pretrained(bank(), &dir().join("adapters"), &b).unwrap();
    pm.load_adapter(&dir().join("adapters/second"), "second", &b)
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    pm.save_pretrained(tmp.path(), &b).unwrap();
    for sub in ["", "second"] {
        let ours =
            lora::io::read_safetensors(&tmp.path().join(sub).join(peft::WEIGHTS_FILE)).unwrap();
        let theirs =
            lora::io::read_safetensors(&dir().join("adapters").join(sub).join(peft::WEIGHTS_FILE))
                .unwrap();
        assert_eq!(ours, theirs, "same keys, shapes and values ({sub:?})");
        let a: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(tmp.path().join(sub).join(peft::CONFIG_FILE)).unwrap(),
        )
        .unwrap();
        let p: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir().join("adapters").join(sub).join(peft::CONFIG_FILE))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            a, p,
            "config round-trips, unknown fields included ({sub:?})"
        );
    }
}
