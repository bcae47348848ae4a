//! `lora embed` and `lora train` on the real all-MiniLM-L6-v2, run as a user runs them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{fixture, lora, minilm, tempdir, text, vader_lexicon};

#[test]
fn embed_prints_sentence_transformers_embeddings_as_json() {
    let Some(model) = minilm() else { return };
    let meta = lora::io::MappedFile::open(&fixture("bert_minilm").join("io.safetensors"))
        .unwrap()
        .metadata()
        .unwrap()
        .unwrap();
    let sentences: Vec<String> = serde_json::from_str(&meta["sentences"]).unwrap();
    let mut args = vec![
        "embed",
        "--model",
        model.to_str().unwrap(),
        "--json",
        "--batch-size",
        "2",
    ];
    args.extend(sentences.iter().map(String::as_str));
    let o = lora(&args);
    assert!(o.status.success(), "{}", text(&o));
    // stdout is the JSON and nothing else.
    let got: Vec<Vec<f32>> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(got.len(), 3);
    let ck = lora::io::Checkpoint::open(&fixture("bert_minilm").join("io.safetensors")).unwrap();
    let t = ck.tensors().unwrap();
    let e = &t["sentence_embedding"];
    let want = lora::io::decode_f32(e.dtype, &e.data).unwrap();
    for (i, (g, w)) in got.iter().flatten().zip(&want).enumerate() {
        assert!((g - w).abs() < 1e-4, "value {i}: {g} vs {w}");
    }
    for v in &got {
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
    }
    // Weights stored in bf16 (2 bytes each, products in f32): sentence-transformers'
    // f32 embeddings within bf16's resolution (every cosine within 16 unit roundoffs of 1).
    let mut half_args = args.clone();
    half_args.extend(["--dtype", "bf16"]);
    let o = lora(&half_args);
    assert!(o.status.success(), "{}", text(&o));
    let half: Vec<Vec<f32>> = serde_json::from_slice(&o.stdout).unwrap();
    assert_ne!(half, got, "bf16 storage rounds the weights");
    for (h, w) in half.iter().zip(want.chunks(384)) {
        let cos: f32 = h.iter().zip(w).map(|(a, b)| a * b).sum();
        assert!(1.0 - cos <= 16.0 * 2f32.powi(-8), "cosine {cos}");
    }
    // With the PEFT adapter the embeddings change.
    let mut args2 = args.clone();
    let adapter = fixture("bert_minilm").join("adapter");
    args2.extend(["--adapter", adapter.to_str().unwrap()]);
    let o2 = lora(&args2);
    assert!(o2.status.success(), "{}", text(&o2));
    let with: Vec<Vec<f32>> = serde_json::from_slice(&o2.stdout).unwrap();
    assert_ne!(with, got);
    // Human-readable output, and an empty text as a clear error.
    let o = lora(&["embed", "--model", model.to_str().unwrap(), "hello"]);
    assert!(text(&o).contains("\"hello\" (384 dims)"), "{}", text(&o));
    let o = lora(&["embed", "--model", model.to_str().unwrap(), "ok", ""]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("text 1 is empty") && !text(&o).contains("panicked"),
        "{}",
        text(&o)
    );
}

#[test]
fn train_fine_tunes_minilm_and_saves_a_peft_adapter() {
    let Some(model) = minilm() else { return };
    let Some(data) = vader_lexicon() else { return };
    let out = tempdir();
    let o = lora(&[
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--steps",
        "30",
        "--eval-every",
        "15",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "head.safetensors",
        "loss.png",
        "accuracy.png",
    ] {
        assert!(out.path().join(f).is_file(), "{f} missing\n{t}");
    }
    let line = t
        .lines()
        .find(|l| l.trim_start().starts_with("accuracy"))
        .unwrap();
    let pct: Vec<f64> = line
        .split_whitespace()
        .filter_map(|w| w.strip_suffix('%'))
        .map(|w| w.parse().unwrap())
        .collect();
    assert!(
        pct[1] > pct[0] + 10.0 && pct[1] > 75.0,
        "training must help: {line}"
    );
    // The saved adapter is a PEFT adapter that `lora inspect` reads.
    let o = lora(&["inspect", out.path().to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", text(&o));
}
