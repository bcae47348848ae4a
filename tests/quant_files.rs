//! `lora quantize` / `dequantize` / merge into quantized bases, on files: the layout,
//! round trips, bad input. Also writes `<target>/tmp/bnb-roundtrip/`, which
//! `cargo xtask test` hands to `fixtures/check_bnb_roundtrip.py`: transformers +
//! bitsandbytes load our files and must dequantize them to our values.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lora::io::{self, Checkpoint, QuantTargets};
use lora::peft::{self, TargetModules};
use lora::quant::{QuantConfig, QuantFormat};

fn tiny_bert() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/peft_bert/base")
}

fn roundtrip_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("bnb-roundtrip")
}

fn none(_: u64, _: u64) {}

fn f32_tensors(path: &Path) -> BTreeMap<String, Vec<f32>> {
    lora::io::read_safetensors(path)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.data))
        .collect()
}

/// Quantizes the tiny BERT three ways into model directories transformers can load, plus
/// our dequantized weights next to each.
#[test]
fn quantize_tiny_bert_for_transformers_and_round_trip() {
    let out = roundtrip_dir();
    let _ = std::fs::remove_dir_all(&out);
    let base = f32_tensors(&tiny_bert().join("model.safetensors"));
    let cases = [
        ("nf4_b64_dq", QuantConfig::qlora()),
        (
            "fp4_b128",
            QuantConfig {
                format: QuantFormat::Fp4,
                blocksize: 128,
                double_quant: false,
            },
        ),
        ("int8", QuantConfig::new(QuantFormat::Int8)),
    ];
    for (name, cfg) in cases {
        let dir = out.join(name);
        let q = dir.join("model.safetensors");
        let report =
            lora::io::quantize_checkpoint(&tiny_bert(), &q, &cfg, &QuantTargets::AllLinear, &none)
                .unwrap();
        // Every encoder linear (and the pooler) is quantized; embeddings are not.
        assert!(
            report
                .quantized
                .iter()
                .any(|m| m.ends_with("attention.self.query"))
        );
        assert!(
            report.quantized.iter().all(|m| !m.contains("embeddings")),
            "{:?}",
            report.quantized
        );
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(
            config["quantization_config"]["quant_method"],
            "bitsandbytes"
        );

        // dequantize -> every weight within the format's rounding of the original; other
        // tensors byte-identical.
        let deq = dir.join("dequantized.safetensors");
        lora::io::dequantize_checkpoint(&q, &deq).unwrap();
        let back = f32_tensors(&deq);
        assert_eq!(
            back.keys().collect::<Vec<_>>(),
            base.keys().collect::<Vec<_>>(),
            "{name}: same tensor names"
        );
        for (k, v) in &base {
            let w = &back[k];
            let scale = v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            let err = v
                .iter()
                .zip(w)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            if report.quantized.iter().any(|m| format!("{m}.weight") == *k) {
                let bound = if cfg.format == QuantFormat::Int8 {
                    0.005
                } else {
                    0.2
                };
                assert!(
                    err <= bound * scale && err > 0.0,
                    "{name}: {k} error {err} (scale {scale})"
                );
            } else {
                assert_eq!(v, w, "{name}: {k} copied unchanged");
            }
        }
        // Our reader reads back exactly what we wrote, and inspect sees the format.
        let summary = lora::io::quant_summary(&q).unwrap();
        assert_eq!(summary.modules.len(), report.quantized.len());
        assert!(summary.modules.iter().all(|m| m.1 == cfg.format.as_str()));
    }
}

/// Merging an adapter into a quantized base re-quantizes and reports the rounding; the
/// result equals quantize(dequantize(base) + delta).
#[test]
fn merge_into_quantized_checkpoint_reports_rounding() {
    let tmp = tempfile::tempdir().unwrap();
    let q = tmp.path().join("q.safetensors");
    lora::io::quantize_checkpoint(
        &tiny_bert(),
        &q,
        &QuantConfig::qlora(),
        &QuantTargets::AllLinear,
        &none,
    )
    .unwrap();
    let adapter = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/peft_bert/adapters");
    let merged = tmp.path().join("merged.safetensors");
    let b = lora::NdArray::new();
    let report = peft::merge_checkpoint(
        &b,
        &q,
        &adapter,
        "default",
        &merged,
        peft::OutDtype::Keep,
        &none,
    )
    .unwrap();
    let r = report
        .rounding
        .expect("a quantized base reports its rounding");
    assert!(r.max_abs > 0.0 && r.max_rel < 0.2, "{r:?}");
    assert!(!report.merged.is_empty());
    // The merged file is still quantized, with the same modules.
    let before = lora::io::quant_summary(&q).unwrap();
    let after = lora::io::quant_summary(&merged).unwrap();
    assert_eq!(before.modules.len(), after.modules.len());
    // A merged module differs from the base, an untouched one is byte-identical.
    let ck_b = Checkpoint::open(&q).unwrap();
    let ck_m = Checkpoint::open(&merged).unwrap();
    let (tb, tm) = (ck_b.tensors().unwrap(), ck_m.tensors().unwrap());
    let touched = report.merged[0].trim_end_matches(".weight").to_string();
    assert_ne!(
        tb[&format!("{touched}.weight")].data,
        tm[&format!("{touched}.weight")].data
    );
    let untouched = before
        .modules
        .iter()
        .map(|m| m.0.clone())
        .find(|m| !report.merged.contains(&format!("{m}.weight")))
        .unwrap();
    assert_eq!(
        tb[&format!("{untouched}.weight")].data,
        tm[&format!("{untouched}.weight")].data
    );
}

fn assert_no_file(path: &Path) {
    assert!(!path.exists(), "{} was left behind", path.display());
    if let Some(dir) = path.parent() {
        for e in std::fs::read_dir(dir).unwrap() {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!n.contains(".tmp."), "temporary file {n} left behind");
        }
    }
}

#[test]
fn bad_quantization_input_is_a_clear_error_and_leaves_no_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");

    // An unsupported blocksize.
    let cfg = QuantConfig {
        blocksize: 48,
        ..QuantConfig::qlora()
    };
    let e =
        lora::io::quantize_checkpoint(&tiny_bert(), &out, &cfg, &QuantTargets::AllLinear, &none)
            .unwrap_err();
    assert!(
        e.to_string().contains("blocksize") && e.to_string().contains("48"),
        "{e}"
    );
    assert_no_file(&out);

    // An unknown format.
    let e = "nf5".parse::<QuantFormat>().unwrap_err();
    assert!(
        e.to_string().contains("format") && e.to_string().contains("nf5"),
        "{e}"
    );

    // A selected tensor that is not 2-D (a LayerNorm weight).
    let rule = peft::quant_targets(TargetModules::List(vec!["LayerNorm".into()]));
    let e = lora::io::quantize_checkpoint(&tiny_bert(), &out, &QuantConfig::qlora(), &rule, &none)
        .unwrap_err();
    assert!(
        e.to_string().contains("LayerNorm.weight") && e.to_string().contains("2-D"),
        "{e}"
    );
    assert_no_file(&out);

    // A missing input.
    let e = lora::io::quantize_checkpoint(
        &tmp.path().join("nope"),
        &out,
        &QuantConfig::qlora(),
        &QuantTargets::AllLinear,
        &none,
    )
    .unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");

    // A corrupt quant_state JSON in an otherwise valid quantized file.
    let q = tmp.path().join("q.safetensors");
    lora::io::quantize_checkpoint(
        &tiny_bert(),
        &q,
        &QuantConfig::qlora(),
        &QuantTargets::AllLinear,
        &none,
    )
    .unwrap();
    let ck = Checkpoint::open(&q).unwrap();
    let mut tensors: BTreeMap<String, io::RawTensor<'static>> = ck
        .tensors()
        .unwrap()
        .into_iter()
        .map(|(k, t)| {
            (
                k,
                io::RawTensor {
                    dtype: t.dtype,
                    shape: t.shape,
                    data: t.data.into_owned().into(),
                },
            )
        })
        .collect();
    let key = tensors
        .keys()
        .find(|k| k.contains("quant_state.bitsandbytes__nf4"))
        .unwrap()
        .clone();
    tensors.insert(
        key.clone(),
        io::RawTensor::u8(
            vec![9],
            b"{\"quant_".to_vec().into_iter().chain([b'x']).collect(),
        ),
    );
    let corrupt = tmp.path().join("corrupt.safetensors");
    let views: Vec<(String, &io::RawTensor<'_>)> =
        tensors.iter().map(|(k, v)| (k.clone(), v)).collect();
    safetensors::serialize_to_file(views, None, &corrupt).unwrap();
    let deq = tmp.path().join("deq.safetensors");
    let e = lora::io::dequantize_checkpoint(&corrupt, &deq).unwrap_err();
    assert!(matches!(e, io::Error::Format { .. }));
    assert!(
        e.to_string().contains(&key) && e.to_string().contains("quant_state JSON"),
        "{e}"
    );
    assert_no_file(&deq);

    // A packed weight whose size disagrees with the shape in its quant state.
    let wkey = key.split(".weight.").next().unwrap().to_string() + ".weight";
    tensors.remove(&key);
    let good = ck.tensors().unwrap();
    tensors.insert(
        key.clone(),
        io::RawTensor {
            dtype: good[&key].dtype,
            shape: good[&key].shape.clone(),
            data: good[&key].data.to_vec().into(),
        },
    );
    tensors.insert(wkey.clone(), io::RawTensor::u8(vec![10, 1], vec![0; 10]));
    let views: Vec<(String, &io::RawTensor<'_>)> =
        tensors.iter().map(|(k, v)| (k.clone(), v)).collect();
    safetensors::serialize_to_file(views, None, &corrupt).unwrap();
    let e = lora::io::dequantize_checkpoint(&corrupt, &deq).unwrap_err();
    assert!(
        e.to_string().contains(&wkey) && e.to_string().contains("bytes"),
        "{e}"
    );
    assert_no_file(&deq);

    // Quantizing an already quantized file.
    let e = lora::io::quantize_checkpoint(
        &q,
        &out,
        &QuantConfig::qlora(),
        &QuantTargets::AllLinear,
        &none,
    )
    .unwrap_err();
    assert!(e.to_string().contains("already quantized"), "{e}");
    assert_no_file(&out);

    // Dequantizing a plain checkpoint.
    let e = lora::io::dequantize_checkpoint(&tiny_bert(), &deq).unwrap_err();
    assert!(e.to_string().contains("no quantized module"), "{e}");
}
