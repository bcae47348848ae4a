//! `lora score` and `lora generate` on a tiny random Llama built by transformers
//! (tests/fixtures/decoder): JSON shapes, greedy generation equal to transformers'
//! `generate`, the adapter changing the score, and errors for bad input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::{fixture, lora, s, tempdir, text};

fn decoder_fixture(name: &str) -> PathBuf {
    fixture("decoder").join(name)
}

/// The fixture model with its tokenizer beside it, as a Hugging Face model directory.
fn model_dir(tmp: &Path, name: &str) -> PathBuf {
    let dir = tmp.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(decoder_fixture(name).join(f), dir.join(f)).unwrap();
    }
    std::fs::copy(
        decoder_fixture("tokenizer/tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    dir
}

fn json(o: &std::process::Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", text(o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(o)))
}

#[test]
fn greedy_generate_equals_transformers_and_streams() {
    let tmp = tempdir();
    let model = model_dir(tmp.path(), "llama");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(decoder_fixture("cases.json")).unwrap())
            .unwrap();
    let llama = cases["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "llama")
        .unwrap();
    let g = &llama["generation"];
    let prompt = g["prompt"].as_str().unwrap();
    let n_new = g["new_ids"].as_array().map_or(8, Vec::len);
    let out = json(&lora(&[
        "generate",
        "--model",
        s(&model),
        "--max-new-tokens",
        &n_new.to_string(),
        "--json",
        prompt,
    ]));
    assert_eq!(out["prompt_ids"], g["prompt_ids"]);
    let all: Vec<serde_json::Value> = g["generated_ids"].as_array().unwrap().clone();
    let want = &all[all.len() - n_new..];
    assert_eq!(out["generated_ids"].as_array().unwrap().as_slice(), want);
    // Streaming prints the prompt and then the continuation.
    let streamed = lora(&[
        "generate",
        "--model",
        s(&model),
        "--max-new-tokens",
        "4",
        prompt,
    ]);
    assert!(streamed.status.success(), "{}", text(&streamed));
    assert!(String::from_utf8_lossy(&streamed.stdout).starts_with(prompt));
    // Sampling is seeded: the same seed, the same text.
    let sample = |seed: &str| {
        json(&lora(&[
            "generate",
            "--model",
            s(&model),
            "--temperature",
            "0.8",
            "--top-k",
            "20",
            "--top-p",
            "0.9",
            "--seed",
            seed,
            "--max-new-tokens",
            "6",
            "--json",
            prompt,
        ]))["generated_ids"]
            .clone()
    };
    assert_eq!(sample("3"), sample("3"));
}

#[test]
fn score_reports_nll_and_perplexity_and_the_adapter_changes_them() {
    let tmp = tempdir();
    let model = model_dir(tmp.path(), "llama");
    let base = json(&lora(&[
        "score",
        "--model",
        s(&model),
        "--json",
        "Hello world",
        "The cat sat.",
    ]));
    let results = base["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for r in results {
        let nll = r["mean_nll"].as_f64().unwrap();
        assert!(nll.is_finite() && nll > 0.0);
        assert!((r["perplexity"].as_f64().unwrap() - nll.exp()).abs() < 1e-9 * nll.exp());
    }
    assert_eq!(results[0]["tokens"], 9, "Hello world is 9 tokens with <s>");
    let adapter = decoder_fixture("llama/adapter");
    let adapted = json(&lora(&[
        "score",
        "--model",
        s(&model),
        "--adapter",
        s(&adapter),
        "--json",
        "Hello world",
    ]));
    let (a, b) = (
        adapted["results"][0]["mean_nll"].as_f64().unwrap(),
        results[0]["mean_nll"].as_f64().unwrap(),
    );
    assert!(
        (a - b).abs() > 1e-3,
        "the adapter changes the score: {a} vs {b}"
    );
}

/// `--dtype`: a bf16 checkpoint scored with its weights kept at 2 bytes (`auto` reads
/// `"dtype": "bfloat16"` from its config) gives the f32 run's numbers on the same values;
/// an f32 checkpoint stored as bf16 is rounded, so its score moves, but only slightly.
#[test]
fn score_with_dtype_keeps_a_bf16_checkpoint_exact() {
    let tmp = tempdir();
    let bf16 = model_dir(tmp.path(), "llama_bf16");
    let f32_model = model_dir(tmp.path(), "llama");
    let nll = |model: &Path, dtype: &str| {
        json(&lora(&[
            "score",
            "--model",
            s(model),
            "--dtype",
            dtype,
            "--json",
            "The cat sat on the mat.",
        ]))["results"][0]["mean_nll"]
            .as_f64()
            .unwrap()
    };
    let (auto, stored_f32) = (nll(&bf16, "auto"), nll(&bf16, "f32"));
    assert!(
        (auto - stored_f32).abs() <= 1e-6 * stored_f32,
        "{auto} vs {stored_f32}"
    );
    let (exact, rounded) = (nll(&f32_model, "f32"), nll(&f32_model, "bf16"));
    assert!(
        exact != rounded && (exact - rounded).abs() < 0.05 * exact,
        "{exact} vs {rounded}"
    );
    let bad = lora(&["score", "--model", s(&bf16), "--dtype", "f8", "x y"]);
    assert!(!bad.status.success());
    assert!(text(&bad).contains("f8"), "{}", text(&bad));
}

#[test]
fn bad_input_is_a_clear_error() {
    let tmp = tempdir();
    let model = model_dir(tmp.path(), "llama");
    let no_tok = tmp.path().join("no-tokenizer");
    std::fs::create_dir_all(&no_tok).unwrap();
    std::fs::copy(model.join("config.json"), no_tok.join("config.json")).unwrap();
    let cases: [(Vec<&str>, &str); 4] = [
        (
            vec!["score", "--model", s(&no_tok), "x y"],
            "tokenizer.json",
        ),
        (vec!["score", "--model", s(&model), ""], "empty"),
        (
            vec!["generate", "--model", s(&model), "--top-p", "0", "Hi"],
            "top_p",
        ),
        (
            vec![
                "generate",
                "--model",
                s(&model),
                "--adapter",
                s(tmp.path()),
                "Hi",
            ],
            "adapter",
        ),
    ];
    for (args, needle) in cases {
        let o = lora(&args);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(text(&o).contains(needle), "{args:?}: {}", text(&o));
    }
    // Adapters that do not fit: targets the model lacks, and shapes of another model.
    let bert_adapter = fixture("peft_bert/adapters");
    let o = lora(&[
        "score",
        "--model",
        s(&model),
        "--adapter",
        s(&bert_adapter),
        "Hi there",
    ]);
    assert!(
        !o.status.success() && text(&o).contains("matched no module"),
        "{}",
        text(&o)
    );
    let qwen_adapter = decoder_fixture("qwen2/adapter");
    let o = lora(&[
        "score",
        "--model",
        s(&model),
        "--adapter",
        s(&qwen_adapter),
        "Hi there",
    ]);
    let t = text(&o);
    assert!(
        !o.status.success() && t.contains("q_proj") && t.contains("shape mismatch"),
        "{t}"
    );
    // A prompt longer than max_position_embeddings (128).
    let long = "word ".repeat(200);
    let o = lora(&["generate", "--model", s(&model), &long]);
    assert!(
        !o.status.success() && text(&o).contains("max_position_embeddings"),
        "{}",
        text(&o)
    );
}

#[test]
fn train_causal_lm_writes_a_causal_lm_adapter_and_lowers_the_loss() {
    let tmp = tempdir();
    let model = model_dir(tmp.path(), "llama");
    let data = tmp.path().join("data.jsonl");
    let mut lines = Vec::new();
    for i in 0..12 {
        lines.push(format!(
            "{{\"text\": \"The cat number {i} sat on the mat.\"}}"
        ));
        lines.push(format!(
            "{{\"prompt\": \"Q: what is {i} plus one?\", \"completion\": \" A: {}\"}}",
            i + 1
        ));
    }
    std::fs::write(&data, lines.join("\n")).unwrap();
    let out = tmp.path().join("out");
    let o = lora(&[
        "train",
        "--task",
        "causal-lm",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--steps",
        "6",
        "--batch-size",
        "4",
        "--grad-accum",
        "2",
        "--warmup-steps",
        "1",
        "--lr",
        "0.01",
        "--target-modules",
        "all-linear",
        "--rank",
        "4",
        "--alpha",
        "8",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    let ppl: Vec<f64> = t
        .split("held-out perplexity ")
        .nth(1)
        .unwrap_or_else(|| panic!("{t}"))
        .lines()
        .next()
        .unwrap()
        .split(" -> ")
        .map(|v| v.trim().parse().unwrap())
        .collect();
    assert!(
        ppl[1] < ppl[0],
        "training lowers the held-out perplexity: {t}"
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["task_type"], "CAUSAL_LM");
    assert!(out.join("adapter_model.safetensors").is_file() && out.join("loss.png").is_file());
    // The adapter loads back for scoring.
    let scored = lora(&[
        "score",
        "--model",
        s(&model),
        "--adapter",
        s(&out),
        "--json",
        "The cat sat.",
    ]);
    assert!(scored.status.success(), "{}", text(&scored));

    // QLoRA: the same on an NF4 base.
    let o = lora(&[
        "train",
        "--task",
        "causal-lm",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--out",
        s(&tmp.path().join("q")),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--quant",
        "nf4",
        "--target-modules",
        "q_proj,v_proj",
    ]);
    assert!(
        o.status.success() && text(&o).contains("quantized to nf4"),
        "{}",
        text(&o)
    );
}

/// `--target-modules embed_tokens,...` trains LoRA on the embedding and
/// `--trainable-tokens` trains token rows; both land in the PEFT adapter as PEFT keys them.
#[test]
fn train_causal_lm_on_embeddings_and_token_rows() {
    let tmp = tempdir();
    let model = model_dir(tmp.path(), "llama");
    let data = tmp.path().join("data.txt");
    std::fs::write(&data, "The cat sat on the mat. ".repeat(20)).unwrap();
    for (name, extra, key) in [
        (
            "embed",
            vec!["--target-modules", "embed_tokens,q_proj"],
            "base_model.model.model.embed_tokens.lora_embedding_A",
        ),
        (
            "tokens",
            vec![
                "--target-modules",
                "q_proj",
                "--trainable-tokens",
                "5,7,300",
            ],
            "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta",
        ),
    ] {
        let out = tmp.path().join(name);
        let mut args = vec![
            "train",
            "--task",
            "causal-lm",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--max-length",
            "16",
        ];
        args.extend(extra);
        let o = lora(&args);
        assert!(o.status.success(), "{name}: {}", text(&o));
        let saved = lora::io::read_safetensors(&out.join("adapter_model.safetensors")).unwrap();
        assert!(saved.contains_key(key), "{name}: {:?}", saved.keys());
    }
    let o = lora(&[
        "train",
        "--task",
        "causal-lm",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--out",
        s(&tmp.path().join("bad")),
        "--steps",
        "1",
        "--trainable-tokens",
        "400",
    ]);
    assert!(
        !o.status.success() && text(&o).contains("trainable_token_indices"),
        "{}",
        text(&o)
    );
    assert!(
        !tmp.path()
            .join("bad")
            .join("adapter_model.safetensors")
            .exists()
    );
}

#[test]
fn train_causal_lm_bad_data_names_the_problem() {
    let tmp = tempdir();
    let model = model_dir(tmp.path(), "llama");
    let cases = [
        ("empty.jsonl", "", "empty"),
        ("bad.jsonl", "{\"text\": \"fine\"}\nnot json\n", "line 2"),
        (
            "nofield.jsonl",
            "{\"text\": \"fine\"}\n{\"title\": \"x\"}\n",
            "line 2",
        ),
    ];
    for (name, body, needle) in cases {
        let data = tmp.path().join(name);
        std::fs::write(&data, body).unwrap();
        let out = tmp.path().join(format!("out-{name}"));
        let o = lora(&[
            "train",
            "--task",
            "causal-lm",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--steps",
            "1",
        ]);
        assert!(!o.status.success(), "{name} succeeded");
        assert!(text(&o).contains(needle), "{name}: {}", text(&o));
        assert!(!out.exists(), "{name}: no output directory after a failure");
    }
}

/// Issue 17 item 5 for decoders: checkpoints every 2 steps leave the adapter unchanged, and
/// resuming from step 2 (warm-up, cosine schedule, gradient accumulation and trainable
/// token rows included) ends with the uninterrupted run's adapter, byte for byte.
#[test]
fn causal_lm_training_resumes_bit_for_bit() {
    resumes_bit_for_bit(&[]);
}

/// The same on a QLoRA base: the frozen projections NF4 with double quantization.
#[test]
fn causal_lm_training_on_a_quantized_base_resumes_bit_for_bit() {
    resumes_bit_for_bit(&["--quant", "nf4"]);
}

/// Trains five steps plainly, with checkpoints every two steps, and resumed from step 2;
/// the three adapters must be the same bytes. `base` adds arguments to every run.
fn resumes_bit_for_bit(base: &[&str]) {
    let tmp = tempdir();
    let model = model_dir(tmp.path(), "llama");
    let data = tmp.path().join("data.jsonl");
    let lines: Vec<String> = (0..10)
        .map(|i| format!("{{\"text\": \"The cat number {i} sat on the mat.\"}}"))
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let train = |out: &str, extra: &[&str]| {
        let out = tmp.path().join(out);
        let mut args = vec![
            "train",
            "--task",
            "causal-lm",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--steps",
            "5",
            "--batch-size",
            "3",
            "--grad-accum",
            "2",
            "--warmup-steps",
            "1",
            "--lr",
            "0.01",
            "--target-modules",
            "q_proj,v_proj",
            "--trainable-tokens",
            "5,7",
        ];
        args.extend_from_slice(base);
        args.extend_from_slice(extra);
        let o = lora(&args);
        assert!(o.status.success(), "{}", text(&o));
        std::fs::read(out.join("adapter_model.safetensors")).unwrap()
    };
    let plain = train("plain", &[]);
    assert_eq!(train("saving", &["--save-every", "2"]), plain);
    let ckpt = tmp.path().join("saving").join("checkpoint-2");
    assert!(ckpt.join("optimizer.safetensors").is_file());
    assert_eq!(train("resumed", &["--resume", s(&ckpt)]), plain);
}
