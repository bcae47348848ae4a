//! `lora quantize`, `lora dequantize`, `lora inspect` on checkpoints, `lora merge` into a
//! quantized base and `lora demo --quant`, run as a user runs them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{fixture, lora, number_after, read_json, s, tempdir, text};

#[test]
fn quantize_inspect_merge_dequantize() {
    let tmp = tempdir();
    let q = tmp.path().join("model").join("model.safetensors");
    let base = fixture("peft_bert").join("base");
    let o = lora(&[
        "quantize",
        "--in",
        s(&base),
        "--out",
        s(&q),
        "--format",
        "nf4",
        "--double-quant",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("4.127 bits per parameter") || t.contains("bits per parameter"),
        "{t}"
    );
    // A model directory in, model.safetensors out: config.json with quantization_config.
    let cfg = read_json(&tmp.path().join("model/config.json"));
    assert_eq!(cfg["quantization_config"]["bnb_4bit_quant_type"], "nf4");

    let o = lora(&["inspect", s(&q), "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let modules = j["quantized_modules"].as_array().unwrap();
    assert!(!modules.is_empty());
    assert!(
        modules
            .iter()
            .all(|m| m["format"] == "nf4" && m["double_quant"] == true)
    );
    let o = lora(&["inspect", s(&q)]);
    assert!(text(&o).contains("quantized modules"), "{}", text(&o));

    let merged = tmp.path().join("merged.safetensors");
    let o = lora(&[
        "merge",
        "--base",
        s(&q),
        "--adapter",
        s(&fixture("peft_bert").join("adapters")),
        "--out",
        s(&merged),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("re-quantized") && text(&o).contains("max |err|"),
        "{}",
        text(&o)
    );

    let deq = tmp.path().join("deq.safetensors");
    let o = lora(&["dequantize", "--in", s(&merged), "--out", s(&deq)]);
    assert!(o.status.success(), "{}", text(&o));
    let o = lora(&["inspect", s(&deq)]);
    assert!(text(&o).contains("not quantized"), "{}", text(&o));
}

#[test]
fn bad_quantize_arguments_fail_cleanly() {
    let tmp = tempdir();
    let out = tmp.path().join("out.safetensors");
    let base = fixture("peft_bert").join("base");
    for (args, expect) in [
        (vec!["--format", "nf5"], "nf5"),
        (vec!["--format", "nf4", "--blocksize", "100"], "blocksize"),
        (
            vec!["--format", "int8", "--target-modules", "LayerNorm"],
            "2-D",
        ),
    ] {
        let mut a = vec!["quantize", "--in", s(&base), "--out", s(&out)];
        a.extend(args);
        let o = lora(&a);
        assert!(!o.status.success());
        let t = text(&o);
        assert!(t.contains(expect) && !t.contains("panicked"), "{t}");
        assert!(!out.exists());
    }
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "nothing left behind"
    );
}

#[test]
fn qlora_demo_trains_on_a_4bit_base() {
    let out = tempdir();
    let o = lora(&[
        "demo",
        "--steps",
        "150",
        "--pretrain-steps",
        "300",
        "--hidden",
        "64",
        "--quant",
        "nf4",
        "--out",
        s(out.path()),
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("frozen base     nf4"), "{t}");
    assert!(t.contains("merged into the quantized base"), "{t}");
    assert!(out.path().join("base_model.nf4.safetensors").is_file());
    assert!(
        number_after(&t, "loss after") < number_after(&t, "loss before") / 20.0,
        "{t}"
    );
}
