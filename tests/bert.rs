//! The BERT encoder against transformers + PEFT on the real all-MiniLM-L6-v2 checkpoint
//! (`fixtures/make_bert_fixtures.py`) and on the tiny BERT of `fixtures/peft_bert`:
//! tokenization, forward, pooler, sentence embeddings, PEFT adapters, and the gradients of
//! every adapter tensor through the whole encoder against PyTorch autograd.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lora::io::Checkpoint;
use lora::models::ModelError;
use lora::models::bert::{
    BertModel, BertTokenizer, TokenBatch, l2_normalize, mean_pool, mean_pool_backward,
};
use lora::peft;
use lora::{Backend, DenseLinear, Linear, Mode, Model, NdArray, Tensor, cross_entropy_loss};
use lora_tests::{assert_close, assert_close_scaled, backend, host, minilm_dir, to64};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/bert_minilm")
}

fn io() -> BTreeMap<String, (Vec<usize>, Vec<f64>)> {
    let ck = Checkpoint::open(&fixture().join("io.safetensors")).unwrap();
    ck.tensors()
        .unwrap()
        .into_iter()
        .map(|(k, t)| {
            let v: Vec<f64> = match t.dtype {
                lora::io::SafetensorsDtype::I64 => t
                    .data
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
                _ => to64(&lora::io::decode_f32(t.dtype, &t.data).unwrap()),
            };
            (k, (t.shape.clone(), v))
        })
        .collect()
}

fn fixture_batch(io: &BTreeMap<String, (Vec<usize>, Vec<f64>)>) -> TokenBatch {
    let (shape, ids) = &io["input_ids"];
    let mask = &io["attention_mask"].1;
    TokenBatch::new(
        ids.iter().map(|&v| v as u32).collect(),
        mask.iter().map(|&v| v as u32).collect(),
        shape[0],
    )
    .unwrap()
}

fn sentences() -> Vec<String> {
    let ck = lora::io::MappedFile::open(&fixture().join("io.safetensors")).unwrap();
    let meta = ck.metadata().unwrap().unwrap();
    serde_json::from_str(&meta["sentences"]).unwrap()
}

#[test]
fn tokenizer_matches_transformers() {
    let Some(dir) = minilm_dir() else { return };
    let io = io();
    let tok = BertTokenizer::from_file(&dir.join("tokenizer.json"), 256).unwrap();
    let s = sentences();
    let texts: Vec<&str> = s.iter().map(String::as_str).collect();
    let ours = tok.encode_batch(&texts).unwrap();
    let want = fixture_batch(&io);
    assert_eq!(ours.ids, want.ids, "input_ids");
    assert_eq!(ours.attention_mask, want.attention_mask, "attention_mask");
    // Truncation: a long text is cut at max_length tokens, [SEP] kept.
    let long = "word ".repeat(600);
    let t = BertTokenizer::from_file(&dir.join("tokenizer.json"), 512).unwrap();
    let b = t.encode_batch(&[long.as_str(), "short"]).unwrap();
    assert_eq!(b.seq_len, 512);
    assert_eq!(b.ids[511], 102, "[SEP] ends a truncated sequence");
    assert_eq!(
        &b.attention_mask[512..512 + 4],
        &[1, 1, 1, 0],
        "the short text is padded"
    );
}

#[test]
fn forward_matches_transformers_bert_model() {
    let Some(dir) = minilm_dir() else { return };
    let io = io();
    let b = backend();
    let mut model = BertModel::from_pretrained(&b, &dir).unwrap();
    let batch = fixture_batch(&io);
    let hidden = model.forward_batch(&b, &batch, Mode::Eval).unwrap();
    assert_close(
        "last_hidden_state",
        &host(&b, &hidden),
        &io["last_hidden_state"].1,
        1e-4,
        1e-4,
    );
    let pooled = model.pool(&b, &hidden).unwrap();
    assert_close(
        "pooler_output",
        &host(&b, &pooled),
        &io["pooler_output"].1,
        1e-4,
        1e-4,
    );
    let mut emb = host(&b, &mean_pool(&b, &hidden, &batch).unwrap());
    l2_normalize(&mut emb, 384);
    assert_close(
        "sentence embedding",
        &emb,
        &io["sentence_embedding"].1,
        1e-4,
        1e-5,
    );
}

/// The PEFT adapter written by PEFT loads here and gives PEFT's outputs; the gradients of
/// cross-entropy(head(mean_pool(BERT + LoRA))) equal PyTorch autograd's for every adapter
/// tensor and the head.
#[test]
fn peft_adapter_outputs_and_gradients_match_pytorch() {
    let Some(dir) = minilm_dir() else { return };
    let io = io();
    let b = backend();
    let mut model = BertModel::from_pretrained(&b, &dir).unwrap();
    let cfg = peft::load_pretrained(&fixture().join("adapter"), &mut model, &b).unwrap();
    assert_eq!(cfg.r, 2);
    let with_adapter: Vec<&str> = model
        .linears()
        .iter()
        .filter(|l| l.adapter().is_some())
        .map(|l| l.name())
        .collect::<Vec<_>>();
    assert_eq!(
        with_adapter.len(),
        3 * 5,
        "query, value, attention.output.dense, intermediate.dense, output.dense in 3 layers: {with_adapter:?}"
    );
    let batch = fixture_batch(&io);
    let hidden = model.forward_batch(&b, &batch, Mode::Train).unwrap();
    assert_close(
        "last_hidden_state with the PEFT adapter",
        &host(&b, &hidden),
        &io["lora_last_hidden_state"].1,
        1e-4,
        1e-4,
    );

    let f32v = |k: &str| io[k].1.iter().map(|&v| v as f32).collect::<Vec<f32>>();
    let head = DenseLinear::<NdArray>::new(
        b.from_host(&f32v("head.weight"), &[3, 384]).unwrap(),
        Some(b.from_host(&f32v("head.bias"), &[3]).unwrap()),
    )
    .unwrap();
    let pooled = mean_pool(&b, &hidden, &batch).unwrap();
    let logits = head.forward(&b, &pooled).unwrap();
    let labels: Vec<usize> = io["labels"].1.iter().map(|&v| v as usize).collect();
    let (loss, d_logits) = cross_entropy_loss(&b, &logits, &labels).unwrap();
    assert!(
        (loss - io["loss"].1[0]).abs() < 1e-5,
        "loss {loss} vs {}",
        io["loss"].1[0]
    );
    let (d_w, d_b) = head.param_grads(&b, &pooled, &d_logits).unwrap();
    assert_close_scaled(
        "head weight gradient",
        &host(&b, &d_w),
        &io["grad.head.weight"].1,
        1e-4,
        1e-5,
    );
    assert_close_scaled(
        "head bias gradient",
        &host(&b, &d_b.unwrap()),
        &io["grad.head.bias"].1,
        1e-4,
        1e-5,
    );
    let d_pooled = head.backward(&b, &d_logits).unwrap();
    let d_hidden = mean_pool_backward(&b, &d_pooled, &batch).unwrap();
    model.backward_batch(&b, &d_hidden).unwrap();

    let mut checked = 0;
    for layer in model.linears_mut() {
        let name = layer.name().to_string();
        let Some(adapter) = layer.adapter_mut() else {
            continue;
        };
        let grads: Vec<Vec<f32>> = adapter
            .params_and_grads()
            .iter()
            .map(|p| host(&b, p.grad))
            .collect();
        for (tensor, g) in ["lora_A", "lora_B"].iter().zip(&grads) {
            let key = format!("grad.base_model.model.{name}.{tensor}.weight");
            let want = &io
                .get(&key)
                .unwrap_or_else(|| panic!("fixture has no {key}"))
                .1;
            // 1e-4 relative, plus 1e-5 of the tensor's largest gradient for elements
            // near zero (f32 rounding through six layers of attention).
            assert_close_scaled(&format!("{name} {tensor} gradient"), g, want, 1e-4, 1e-5);
            checked += 1;
        }
    }
    assert_eq!(checked, 30, "every adapter tensor was compared");
}

#[test]
fn tiny_bert_with_two_peft_adapters_matches_peft() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/peft_bert");
    let io: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("io.json")).unwrap()).unwrap();
    let b = backend();
    let flat = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .flat_map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
            })
            .collect()
    };
    let batch = TokenBatch::new(flat(&io["input_ids"]), flat(&io["attention_mask"]), 2).unwrap();
    for (name, key) in [
        ("default", "last_hidden_state_default"),
        ("second", "last_hidden_state_second"),
    ] {
        let mut model = BertModel::from_pretrained(&b, &dir.join("base")).unwrap();
        peft::load_adapter(
            &peft::adapter_dir_for(&dir.join("adapters"), name),
            &mut model,
            &b,
            name,
        )
        .unwrap();
        let hidden = model.forward_batch(&b, &batch, Mode::Eval).unwrap();
        let want = lora_tests::json_f32(&io[key]);
        assert_close(
            &format!("tiny BERT + PEFT adapter {name}"),
            &host(&b, &hidden),
            &to64(&want),
            1e-4,
            1e-5,
        );
    }
}

#[test]
fn bad_model_input_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let b = backend();
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/peft_bert/base");
    // A missing directory / file.
    let e = BertModel::<NdArray>::from_pretrained(&b, &tmp.path().join("nope")).unwrap_err();
    assert!(
        matches!(e, ModelError::Io { .. }) && e.to_string().contains("config.json"),
        "{e}"
    );
    // Unsupported architecture and activation.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny.join("config.json")).unwrap()).unwrap();
    for (field, value, expect) in [
        ("model_type", "gpt2", "model_type"),
        ("hidden_act", "gelu_new", "hidden_act"),
        (
            "position_embedding_type",
            "relative_key",
            "position_embedding_type",
        ),
    ] {
        let mut c = config.clone();
        c[field] = serde_json::json!(value);
        let d = tmp.path().join(field);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("config.json"), c.to_string()).unwrap();
        std::fs::copy(tiny.join("model.safetensors"), d.join("model.safetensors")).unwrap();
        let e = BertModel::<NdArray>::from_pretrained(&b, &d).unwrap_err();
        assert!(
            e.to_string().contains(expect) && e.to_string().contains(value),
            "{e}"
        );
    }
    // Tensor shapes that disagree with the config.
    let mut c = config.clone();
    c["intermediate_size"] = serde_json::json!(48);
    let d = tmp.path().join("shapes");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("config.json"), c.to_string()).unwrap();
    std::fs::copy(tiny.join("model.safetensors"), d.join("model.safetensors")).unwrap();
    let e = BertModel::<NdArray>::from_pretrained(&b, &d).unwrap_err();
    assert!(
        e.to_string().contains("intermediate.dense.weight") && e.to_string().contains("[48, 16]"),
        "{e}"
    );
    // A config that is not JSON.
    std::fs::write(d.join("config.json"), "{ not json").unwrap();
    let e = BertModel::<NdArray>::from_pretrained(&b, &d).unwrap_err();
    assert!(e.to_string().contains("config.json"), "{e}");
    // Token ids outside the vocabulary and sequences longer than the position table.
    let mut model = BertModel::<NdArray>::from_pretrained(&b, &tiny).unwrap();
    let e = model
        .forward_batch(
            &b,
            &TokenBatch::new(vec![1, 64], vec![1, 1], 1).unwrap(),
            Mode::Eval,
        )
        .unwrap_err();
    assert!(e.to_string().contains("token id 64"), "{e}");
    let e = model
        .forward_batch(
            &b,
            &TokenBatch::new(vec![1; 40], vec![1; 40], 1).unwrap(),
            Mode::Eval,
        )
        .unwrap_err();
    assert!(e.to_string().contains("max_position_embeddings"), "{e}");
    // Backward before a training forward.
    let g = b.zeros(&[1, 2, 16]).unwrap();
    assert!(model.backward_batch(&b, &g).is_err());
}

#[test]
fn empty_text_and_missing_tokenizer_are_clear_errors() {
    let Some(dir) = minilm_dir() else { return };
    let tok = BertTokenizer::from_file(&dir.join("tokenizer.json"), 256).unwrap();
    let e = tok.encode_batch(&["fine", "  "]).unwrap_err();
    assert!(e.to_string().contains("text 1 is empty"), "{e}");
    let e = BertTokenizer::from_file(&dir.join("nope.json"), 256).unwrap_err();
    assert!(e.to_string().contains("nope.json"), "{e}");
}

/// The lora-rs -> PEFT direction on the real model: an adapter made and saved here, with
/// our outputs, goes to `<target>/tmp/bert-interop/`; `cargo xtask test` runs
/// `fixtures/check_bert_in_peft.py`, which loads it with PEFT on all-MiniLM-L6-v2.
#[test]
fn export_minilm_adapter_for_peft() {
    let Some(dir) = minilm_dir() else { return };
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bert-interop");
    let _ = std::fs::remove_dir_all(&out);
    let b = backend();
    let mut model = BertModel::from_pretrained(&b, &dir).unwrap();
    let cfg = peft::LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: Some(peft::TargetModules::List(
            ["query", "key", "value", "dense"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        )),
        ..peft::LoraConfig::default()
    };
    let injected = peft::inject_adapters(&mut model, &b, &cfg, 7).unwrap();
    assert_eq!(
        injected.len(),
        6 * 6 + 1,
        "every linear of the encoder and the pooler"
    );
    // Non-zero B so that the adapter changes the outputs.
    for (i, l) in model.linears_mut().into_iter().enumerate() {
        let out_f = l.base().out_features();
        let v = lora_tests::rand_vec(out_f * 4, 100 + i as u64, 0)
            .iter()
            .map(|x| x * 0.05)
            .collect::<Vec<_>>();
        l.adapter_mut()
            .unwrap()
            .set_tensor("lora_B", b.from_host(&v, &[out_f, 4]).unwrap())
            .unwrap();
    }
    peft::save_pretrained(&out.join("adapter"), &model, &b, &cfg).unwrap();
    let tok = BertTokenizer::from_file(&dir.join("tokenizer.json"), 256).unwrap();
    let s = sentences();
    let texts: Vec<&str> = s.iter().map(String::as_str).collect();
    let batch = tok.encode_batch(&texts).unwrap();
    let hidden = model.forward_batch(&b, &batch, Mode::Eval).unwrap();
    let mut emb = host(&b, &mean_pool(&b, &hidden, &batch).unwrap());
    l2_normalize(&mut emb, 384);
    let f = |v: &[u32]| lora::HostTensor {
        shape: vec![batch.batch, batch.seq_len],
        data: v.iter().map(|&x| x as f32).collect(),
    };
    lora::io::write_safetensors(
        &out.join("ours.safetensors"),
        &[
            ("input_ids".into(), f(&batch.ids)),
            ("attention_mask".into(), f(&batch.attention_mask)),
            (
                "last_hidden_state".into(),
                lora::HostTensor {
                    shape: hidden.shape().dims().to_vec(),
                    data: host(&b, &hidden),
                },
            ),
            (
                "sentence_embedding".into(),
                lora::HostTensor {
                    shape: vec![batch.batch, 384],
                    data: emb,
                },
            ),
        ],
    )
    .unwrap();
    std::fs::write(out.join("model_dir.txt"), dir.display().to_string()).unwrap();
}
