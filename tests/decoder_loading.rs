//! Loading decoder checkpoints and their tokenizers: both `config.json` styles give the same
//! settings, unsupported fields and wrong shapes are errors that name them, sharded bf16
//! checkpoints load, and the tokenizer gives the Python `tokenizers` ids (fixtures from
//! `fixtures/make_decoder_fixtures.py`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use lora::models::decoder::{DecoderConfig, DecoderModel, DecoderTokenizer, RopeScaling};
use lora::{Backend, Mode};
use lora_tests::decoder_fixtures::{assert_logits_close, batch, dir, ids, io};
use lora_tests::fixtures_dir;

#[test]
fn both_config_styles_give_the_same_settings() {
    let new = DecoderConfig::from_file(&dir("llama").join("config.json")).unwrap();
    let legacy = DecoderConfig::from_file(&dir("llama").join("config_legacy_style.json")).unwrap();
    assert_eq!(new, legacy);
    assert!(matches!(new.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    assert_eq!(
        (
            new.num_attention_heads,
            new.num_key_value_heads,
            new.head_dim
        ),
        (4, 2, 16)
    );
}

#[test]
fn unsupported_configs_name_the_field() {
    let text = std::fs::read_to_string(dir("llama").join("config.json")).unwrap();
    for (field, edited) in [
        ("model_type", text.replace("\"llama\"", "\"gpt2\"")),
        ("hidden_act", text.replace("\"silu\"", "\"gelu\"")),
        (
            "rope_parameters.rope_type",
            text.replace("\"llama3\"", "\"yarn\""),
        ),
        (
            "num_key_value_heads",
            text.replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3"),
        ),
    ] {
        let e = DecoderConfig::from_json(&edited, "x/config.json")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(field) && e.contains("x/config.json"),
            "{field}: {e}"
        );
    }
}

#[test]
fn a_weight_of_the_wrong_shape_names_the_tensor_and_both_shapes() {
    let b = lora::NdArray::new();
    let config = DecoderConfig::from_file(&dir("qwen3").join("config.json")).unwrap();
    let mut tensors = lora::io::read_checkpoint_f32(&dir("qwen3")).unwrap();
    let key = "model.layers.1.self_attn.k_norm.weight";
    tensors.get_mut(key).unwrap().shape = vec![8, 2];
    let e = DecoderModel::from_state_dict(&b, config, tensors, "qwen3")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(key) && e.contains("[8, 2]") && e.contains("[16]"),
        "{e}"
    );
}

#[test]
fn tokenizer_ids_equal_the_python_tokenizers_library() {
    let tok = DecoderTokenizer::from_file(&fixtures_dir().join("decoder/tokenizer/tokenizer.json"))
        .unwrap();
    let text = std::fs::read_to_string(fixtures_dir().join("decoder/tokenizer_ids.json")).unwrap();
    let cases: serde_json::Value = serde_json::from_str(&text).unwrap();
    for c in cases.as_array().unwrap() {
        let t = c["text"].as_str().unwrap();
        let got = tok.encode(t).unwrap();
        assert_eq!(got, ids(&c["ids"]), "{t:?}");
        assert_eq!(tok.decode(&got).unwrap(), t, "decode({t:?})");
    }
    assert!(tok.encode("").is_err());
}

/// A checkpoint stored in bf16 and split into shards with an index loads to the same
/// model as its bf16-rounded weights in f32.
#[test]
fn sharded_bf16_checkpoints_load() {
    use lora::io::{RawTensor, SafetensorsDtype, decode_f32, encode_f32, write_raw};
    use std::borrow::Cow;
    let b = lora::NdArray::new();
    let tensors = lora::io::read_checkpoint_f32(&dir("llama")).unwrap();
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("decoder-bf16-shards");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::copy(dir("llama").join("config.json"), tmp.join("config.json")).unwrap();
    let mut rounded = tensors.clone();
    let mut shards: [BTreeMap<String, RawTensor<'static>>; 2] = [BTreeMap::new(), BTreeMap::new()];
    let mut weight_map = serde_json::Map::new();
    for (i, (name, t)) in tensors.iter().enumerate() {
        let bytes = encode_f32(SafetensorsDtype::BF16, &t.data).unwrap();
        rounded.get_mut(name).unwrap().data = decode_f32(SafetensorsDtype::BF16, &bytes).unwrap();
        let file = format!("model-0000{}-of-00002.safetensors", i % 2 + 1);
        weight_map.insert(name.clone(), serde_json::Value::String(file));
        shards[i % 2].insert(
            name.clone(),
            RawTensor {
                dtype: SafetensorsDtype::BF16,
                shape: t.shape.clone(),
                data: Cow::Owned(bytes),
            },
        );
    }
    for (i, shard) in shards.iter().enumerate() {
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        write_raw(
            &tmp.join(format!("model-0000{}-of-00002.safetensors", i + 1)),
            shard,
            meta,
        )
        .unwrap();
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(tmp.join("model.safetensors.index.json"), index.to_string()).unwrap();

    let io = io("llama");
    let tb = batch(&io, "input_ids", Some("attention_mask"));
    let mut sharded = DecoderModel::from_pretrained(&b, &tmp).unwrap();
    let config = DecoderConfig::from_file(&tmp.join("config.json")).unwrap();
    let mut reference = DecoderModel::from_state_dict(&b, config, rounded, "rounded").unwrap();
    let got = b
        .to_host(&sharded.logits(&b, &tb, Mode::Eval).unwrap())
        .unwrap();
    let want = b
        .to_host(&reference.logits(&b, &tb, Mode::Eval).unwrap())
        .unwrap();
    assert_eq!(got, want, "bf16 shards load exactly as their f32 values");
    // And within bf16's rounding of the f32 model's logits.
    let f32_logits = &io.floats["logits"].1;
    assert_logits_close(
        "bf16 vs f32",
        &got,
        f32_logits,
        &tb.attention_mask,
        sharded.config().vocab_size,
        5e-2,
    );
}
