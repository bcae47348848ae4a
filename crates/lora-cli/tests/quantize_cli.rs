//! `lora quantize`, `lora dequantize`, `lora inspect` on checkpoints, `lora merge` into a
//! quantized base and `lora demo --quant`, run as a user runs them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tiny_bert() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/peft_bert")
}

fn lora(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lora"))
        .args(args)
        .output()
        .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn quantize_inspect_merge_dequantize() {
    let tmp = tempfile::tempdir().unwrap();
    let q = tmp.path().join("model").join("model.safetensors");
    let base = tiny_bert().join("base");
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
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("model/config.json")).unwrap())
            .unwrap();
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
        s(&tiny_bert().join("adapters")),
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
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    let base = tiny_bert().join("base");
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
    let out = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_lora"))
        .args([
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
        ])
        .arg(out.path())
        .output()
        .unwrap();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("frozen base     nf4"), "{t}");
    assert!(t.contains("merged into the quantized base"), "{t}");
    assert!(out.path().join("base_model.nf4.safetensors").is_file());
    let number_after = |label: &str| -> f64 {
        let line = t
            .lines()
            .find(|l| l.trim_start().starts_with(label))
            .unwrap();
        line.split_whitespace().nth(2).unwrap().parse().unwrap()
    };
    assert!(
        number_after("loss after") < number_after("loss before") / 20.0,
        "{t}"
    );
}
