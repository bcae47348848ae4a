//! LoRA on `embed_tokens` and trainable tokens against PEFT (issue 15), on the tiny decoder
//! checkpoints (`fixtures/make_embedding_fixtures.py`), plain and with DoRA: the adapters
//! PEFT saved load here
//! and give PEFT's logits, loss and the gradient of every trainable tensor (the tied
//! Qwen2's output head reads the trained rows too); re-saving writes PEFT's file; `lora
//! merge` writes PEFT's merged table; bad `trainable_token_indices` are refused by name.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use lora::models::decoder::DecoderModel;
use lora::peft::{LoraConfig, TargetModules, TokenIndices};
use lora::{Backend, HostTensor, Mode, Model};
use lora_tests::decoder_fixtures::{
    adapter_grads_of, assert_grads_match, assert_logits_close, batch, dir, io, train_backward,
    train_five_steps,
};
use lora_tests::{assert_close_scaled, backend_suite, to64};

/// `(case, checkpoint)` of every fixture.
const CASES: [(&str, &str); 4] = [
    ("embed_lora", "llama"),
    ("embed_dora", "llama"),
    ("tokens", "llama"),
    ("tokens_tied", "qwen2"),
];

fn case_dir(case: &str) -> PathBuf {
    dir("peft_embedding").join(case)
}

fn expected(case: &str) -> BTreeMap<String, HostTensor> {
    lora::io::read_safetensors(&case_dir(case).join("expected.safetensors")).unwrap()
}

fn loaded<B: lora::FullBackend>(b: &B, case: &str, model_dir: &str) -> DecoderModel<B> {
    let mut model = DecoderModel::from_pretrained(b, &dir(model_dir)).unwrap();
    lora::peft::load_pretrained(&case_dir(case).join("adapter"), &mut model, b).unwrap();
    model
}

/// Logits, loss and every gradient equal PEFT's.
fn check_case<B: lora::FullBackend>(b: &B, case: &str, model_dir: &str) {
    let mut model = loaded(b, case, model_dir);
    let io = io(model_dir);
    let want = expected(case);
    let tb = batch(&io, "input_ids", Some("attention_mask"));
    let vocab = model.config().vocab_size;
    let logits = b
        .to_host(&model.logits(b, &tb, Mode::Eval).unwrap())
        .unwrap();
    assert_logits_close(
        &format!("{case} logits"),
        &logits,
        &want["logits"].data,
        &tb.attention_mask,
        vocab,
        1e-4,
    );
    let loss = train_backward(b, &mut model, &tb, &io.ints["labels"].1);
    let want_loss = f64::from(want["loss"].data[0]);
    assert!(
        (loss - want_loss).abs() <= 1e-4 * want_loss,
        "{case} loss {loss} vs {want_loss}"
    );
    let got = adapter_grads_of(b, &mut model);
    assert_grads_match(case, &got, &want);
}

backend_suite! { all:
    fn lora_on_embed_tokens_equals_peft(b) {
        check_case(b, "embed_lora", "llama");
    }

    fn dora_on_embed_tokens_equals_peft(b) {
        check_case(b, "embed_dora", "llama");
    }

    fn trainable_tokens_equal_peft(b) {
        check_case(b, "tokens", "llama");
    }

    fn trainable_tokens_with_tied_embeddings_equal_peft(b) {
        check_case(b, "tokens_tied", "qwen2");
    }
}

/// Loading PEFT's file and saving it again writes the same keys and values (LoRA on an
/// embedding also saves the whole table, as PEFT's `save_embedding_layers="auto"` does).
#[test]
fn resaved_adapters_equal_peft_files() {
    let b = lora::NdArray::new();
    let tmp = tempfile::tempdir().unwrap();
    for (case, model_dir) in CASES {
        let model = loaded(&b, case, model_dir);
        let config =
            LoraConfig::from_file(&case_dir(case).join("adapter/adapter_config.json")).unwrap();
        let out = tmp.path().join(case);
        lora::peft::save_pretrained(&out, &model, &b, &config).unwrap();
        let ours = lora::io::read_safetensors(&out.join("adapter_model.safetensors")).unwrap();
        let peft =
            lora::io::read_safetensors(&case_dir(case).join("adapter/adapter_model.safetensors"))
                .unwrap();
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            peft.keys().collect::<Vec<_>>(),
            "{case}: keys"
        );
        for (k, t) in &peft {
            assert_eq!(ours[k].shape, t.shape, "{case} {k}");
            assert_eq!(ours[k].data, t.data, "{case} {k}");
        }
    }
}

/// `lora merge` folds LoRA on an embedding and trained token rows into the table as
/// PEFT's `merge_and_unload()` does, into a plain checkpoint and into a QLoRA (NF4) one,
/// where the table stays float and the targeted projections are quantized again.
#[test]
fn lora_merge_writes_peft_merged_embedding() {
    let b = lora::NdArray::new();
    let tmp = tempfile::tempdir().unwrap();
    for model_dir in ["llama", "qwen2"] {
        lora::io::quantize_checkpoint(
            &dir(model_dir),
            &tmp.path().join(format!("{model_dir}-nf4.safetensors")),
            &lora::quant::QuantConfig::qlora(),
            &lora::io::QuantTargets::AllLinear,
            &|_, _| {},
        )
        .unwrap();
    }
    for (case, model_dir) in CASES {
        let nf4 = tmp.path().join(format!("{model_dir}-nf4.safetensors"));
        for (base, quantized) in [(dir(model_dir), false), (nf4, true)] {
            let out = tmp.path().join(format!("{case}-{quantized}.safetensors"));
            let report = lora::peft::merge_checkpoint(
                &b,
                &base,
                &case_dir(case).join("adapter"),
                lora::DEFAULT_ADAPTER,
                &out,
                lora::peft::OutDtype::Keep,
                &|_, _| {},
            )
            .unwrap();
            assert_eq!(report.rounding.is_some(), quantized, "{case}");
            let ck = lora::io::Checkpoint::open(&out).unwrap();
            assert_eq!(ck.is_quantized().unwrap(), quantized, "{case}");
            let key = "model.embed_tokens.weight";
            let tensors = ck.tensors().unwrap();
            let table = lora::io::decode_f32(tensors[key].dtype, &tensors[key].data).unwrap();
            assert_close_scaled(
                &format!("{case} merged {key} (quantized base: {quantized})"),
                &table,
                &to64(&expected(case)[&format!("merged.{key}")].data),
                1e-5,
                1e-6,
            );
        }
    }
}

/// Trainable tokens train: a few AdamW steps lower the loss and move only the listed rows
/// (the frozen table is untouched; a saved and reloaded adapter gives the same logits).
#[test]
fn trainable_tokens_train_and_reload() {
    let b = lora::NdArray::new();
    let mut model = DecoderModel::from_pretrained(&b, &dir("qwen2")).unwrap();
    let config = LoraConfig {
        target_modules: Some(TargetModules::List(vec!["q_proj".into()])),
        trainable_token_indices: Some(TokenIndices::List(vec![285, 301, 15])),
        task_type: Some("CAUSAL_LM".into()),
        ..LoraConfig::default()
    };
    lora::peft::inject_adapters(&mut model, &b, &config, 3).unwrap();
    let table = b.to_host(model.embeddings()[0].weight()).unwrap();
    let io = io("qwen2");
    let tb = batch(&io, "input_ids", Some("attention_mask"));
    train_five_steps(
        &b,
        &mut model,
        &tb,
        &io.ints["labels"].1,
        "trainable tokens",
    );
    assert_eq!(b.to_host(model.embeddings()[0].weight()).unwrap(), table);
    let rows = &model.embeddings()[0]
        .tensors(&b, lora::DEFAULT_ADAPTER)
        .unwrap()[0]
        .1;
    let rows = b.to_host(rows).unwrap();
    let h = model.config().hidden_size;
    for (j, id) in [285, 301, 15].into_iter().enumerate() {
        assert_ne!(
            &rows[j * h..(j + 1) * h],
            &table[id * h..(id + 1) * h],
            "row {id} moved"
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    lora::peft::save_pretrained(tmp.path(), &model, &b, &config).unwrap();
    let mut reloaded = DecoderModel::from_pretrained(&b, &dir("qwen2")).unwrap();
    lora::peft::load_pretrained(tmp.path(), &mut reloaded, &b).unwrap();
    let a = b
        .to_host(&model.logits(&b, &tb, Mode::Eval).unwrap())
        .unwrap();
    let r = b
        .to_host(&reloaded.logits(&b, &tb, Mode::Eval).unwrap())
        .unwrap();
    assert_eq!(a, r);
}

/// Trains LoRA and DoRA on `embed_tokens` (Llama) and trainable tokens (the tied Qwen2) for a few
/// AdamW steps, saves the adapters, and writes our logits with them to
/// `<target>/tmp/decoder-embedding-interop/<case>/`, where `cargo xtask test` hands them to
/// `fixtures/check_decoder_in_peft.py`: PEFT must load them and compute the same logits.
#[test]
fn export_embedding_adapters_for_peft() {
    let b = lora::NdArray::new();
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("decoder-embedding-interop");
    let _ = std::fs::remove_dir_all(&root);
    let list = |v: &[&str]| {
        Some(TargetModules::List(
            v.iter().map(|s| s.to_string()).collect(),
        ))
    };
    let cases = [
        (
            "embed_lora",
            "llama",
            LoraConfig {
                r: 4,
                lora_alpha: 8.0,
                target_modules: list(&["embed_tokens", "q_proj"]),
                ..LoraConfig::default()
            },
        ),
        (
            "embed_dora",
            "llama",
            LoraConfig {
                r: 4,
                lora_alpha: 8.0,
                use_dora: true,
                target_modules: list(&["embed_tokens", "q_proj"]),
                ..LoraConfig::default()
            },
        ),
        (
            "tokens_tied",
            "qwen2",
            LoraConfig {
                target_modules: list(&["q_proj"]),
                trainable_token_indices: Some(TokenIndices::List(vec![285, 301, 15, 3])),
                ..LoraConfig::default()
            },
        ),
    ];
    for (case, model_dir, config) in cases {
        let config = LoraConfig {
            task_type: Some("CAUSAL_LM".into()),
            ..config
        };
        let mut model = DecoderModel::from_pretrained(&b, &dir(model_dir)).unwrap();
        lora::peft::inject_adapters(&mut model, &b, &config, 9).unwrap();
        let io = io(model_dir);
        let tb = batch(&io, "input_ids", Some("attention_mask"));
        train_five_steps(&b, &mut model, &tb, &io.ints["labels"].1, case);
        let out = root.join(case);
        lora::peft::save_pretrained(&out.join("adapter"), &model, &b, &config).unwrap();
        let vocab = model.config().vocab_size;
        let logits = b
            .to_host(&model.logits(&b, &tb, Mode::Eval).unwrap())
            .unwrap();
        let t = HostTensor {
            shape: vec![tb.batch, tb.seq_len, vocab],
            data: logits,
        };
        lora::io::write_safetensors(&out.join("ours.safetensors"), &[("logits".to_string(), t)])
            .unwrap();
        std::fs::write(
            out.join("model_dir.txt"),
            dir(model_dir).display().to_string(),
        )
        .unwrap();
    }
}

/// Token ids past the vocabulary, repeated or negative ids, an unknown embedding name, and
/// trainable tokens on an embedding that LoRA also targets are errors naming the field.
#[test]
fn bad_trainable_token_indices_are_refused_by_name() {
    let b = lora::NdArray::new();
    let try_inject = |tokens: TokenIndices, targets: &[&str]| {
        let mut model = DecoderModel::from_pretrained(&b, &dir("llama")).unwrap();
        let config = LoraConfig {
            target_modules: Some(TargetModules::List(
                targets.iter().map(|s| s.to_string()).collect(),
            )),
            trainable_token_indices: Some(tokens),
            ..LoraConfig::default()
        };
        lora::peft::inject_adapters(&mut model, &b, &config, 0)
            .unwrap_err()
            .to_string()
    };
    let e = try_inject(TokenIndices::List(vec![1, 400]), &["q_proj"]);
    assert!(
        e.contains("trainable_token_indices") && e.contains("400"),
        "{e}"
    );
    let e = try_inject(TokenIndices::List(vec![7, 7]), &["q_proj"]);
    assert!(
        e.contains("trainable_token_indices") && e.contains("twice"),
        "{e}"
    );
    let e = try_inject(TokenIndices::List(vec![-1]), &["q_proj"]);
    assert!(
        e.contains("trainable_token_indices") && e.contains("-1"),
        "{e}"
    );
    let e = try_inject(
        TokenIndices::PerModule(BTreeMap::from([("wte".to_string(), vec![1])])),
        &["q_proj"],
    );
    assert!(
        e.contains("trainable_token_indices") && e.contains("wte"),
        "{e}"
    );
    let e = try_inject(TokenIndices::List(vec![1]), &["embed_tokens"]);
    assert!(e.contains("trainable_token_indices"), "{e}");
}

/// Merging in the library (PEFT's `merge` / `unmerge` / `merge_and_unload` on the
/// embedding): the merged table is PEFT's, the logits do not change, unmerging restores
/// the table, and a merged embedding refuses to train.
#[test]
fn merge_and_unmerge_in_the_library_equal_peft() {
    use lora::peft::PeftModel;
    let b = lora::NdArray::new();
    for (case, model_dir) in CASES {
        let io = io(model_dir);
        let tb = batch(&io, "input_ids", Some("attention_mask"));
        let base = DecoderModel::from_pretrained(&b, &dir(model_dir)).unwrap();
        let table = b.to_host(base.embeddings()[0].weight()).unwrap();
        let mut pm = PeftModel::new(base);
        pm.load_adapter(&case_dir(case).join("adapter"), "default", &b)
            .unwrap();
        let before = b
            .to_host(&pm.model_mut().logits(&b, &tb, Mode::Eval).unwrap())
            .unwrap();
        pm.merge(&b, true).unwrap();
        let merged = b.to_host(pm.model().embeddings()[0].weight()).unwrap();
        let want = &expected(case)["merged.model.embed_tokens.weight"];
        assert_close_scaled(
            &format!("{case} merged table"),
            &merged,
            &to64(&want.data),
            1e-5,
            1e-6,
        );
        let after = b
            .to_host(&pm.model_mut().logits(&b, &tb, Mode::Eval).unwrap())
            .unwrap();
        assert_close_scaled(
            &format!("{case} merged logits"),
            &after,
            &to64(&before),
            1e-4,
            1e-5,
        );
        assert!(
            pm.model_mut().logits(&b, &tb, Mode::Train).is_err(),
            "{case}: training while merged"
        );
        pm.unmerge(&b).unwrap();
        let restored = b.to_host(pm.model().embeddings()[0].weight()).unwrap();
        assert_close_scaled(
            &format!("{case} unmerged table"),
            &restored,
            &to64(&table),
            1e-5,
            1e-6,
        );
        let (plain, _) = pm.merge_and_unload(&b, true).unwrap();
        assert!(!plain.embeddings()[0].has_adapters());
    }
}
