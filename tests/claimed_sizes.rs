//! Issue 17, item 2: a length, shape or count read from a file never sizes an allocation or
//! a product before it is checked. Each case writes a file whose claim is absurd (a layer
//! count of 10⁹, dimensions whose product overflows, a quant state for a 2⁶⁴-element
//! weight) next to real tensors; loading must return an error naming the field or tensor,
//! without panicking, aborting on a failed allocation, or writing an output.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use lora::NdArray;
use lora::models::bert::BertModel;
use lora::models::decoder::DecoderModel;
use lora_tests::fixtures_dir;

const HUGE: u64 = 1 << 62;

/// A copy of the model directory `src` (its safetensors and tokenizer files linked, not
/// copied) with `config.json`'s `field` set to `value`.
fn with_claim(tmp: &Path, src: &Path, field: &str, value: u64) -> PathBuf {
    let dir = tmp.join(format!("{field}-{value}"));
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap();
        if p.is_file() && name != "config.json" {
            std::os::unix::fs::symlink(&p, dir.join(name)).unwrap();
        }
    }
    let text = std::fs::read_to_string(src.join("config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
    config[field] = serde_json::json!(value);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    dir
}

#[test]
fn decoder_config_claims_are_checked_before_use() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures_dir().join("decoder/llama");
    let b = NdArray::new();
    for (field, value, expect) in [
        ("num_attention_heads", HUGE, "num_attention_heads"),
        ("head_dim", HUGE, "head_dim"),
        ("num_hidden_layers", 1_000_000_000, "model.layers.2"),
        ("vocab_size", HUGE, "model.embed_tokens.weight"),
        ("intermediate_size", HUGE, "gate_proj"),
        ("hidden_size", HUGE, "hidden_size"),
    ] {
        let dir = with_claim(tmp.path(), &src, field, value);
        let e = match DecoderModel::from_pretrained(&b, &dir) {
            Ok(_) => panic!("{field} = {value} loaded"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(expect), "{field} = {value}: {e}");
    }
}

#[test]
fn bert_config_claims_are_checked_before_use() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures_dir().join("bert_tiny");
    let b = NdArray::new();
    for (field, value, expect) in [
        ("num_hidden_layers", 1_000_000_000, "encoder.layer.2"),
        ("num_hidden_layers", HUGE, "encoder.layer.2"),
        ("vocab_size", HUGE, "word_embeddings"),
        ("max_position_embeddings", HUGE, "position_embeddings"),
        ("intermediate_size", HUGE, "intermediate"),
    ] {
        let dir = with_claim(tmp.path(), &src, field, value);
        let e = match BertModel::from_pretrained(&b, &dir) {
            Ok(_) => panic!("{field} = {value} loaded"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(expect), "{field} = {value}: {e}");
    }
}

/// The NF4 fixture with `layers.0`'s quant state JSON changed by `edit`.
fn with_quant_state(tmp: &Path, name: &str, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let src = fixtures_dir().join("peft_dora_nf4/base_nf4.safetensors");
    let ck = lora::io::Checkpoint::open(&src).unwrap();
    let mut tensors: BTreeMap<String, lora::io::RawTensor<'_>> = ck.tensors().unwrap();
    let key = "layers.0.weight.quant_state.bitsandbytes__nf4";
    let mut state: serde_json::Value = serde_json::from_slice(&tensors[key].data).unwrap();
    edit(&mut state);
    let bytes = state.to_string().into_bytes();
    tensors.insert(
        key.to_string(),
        lora::io::RawTensor {
            dtype: lora::io::SafetensorsDtype::U8,
            shape: vec![bytes.len()],
            data: bytes.into(),
        },
    );
    let out = tmp.join(format!("{name}.safetensors"));
    lora::io::write_raw(&out, &tensors, HashMap::new()).unwrap();
    out
}

#[test]
fn quant_state_claims_are_checked_before_use() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(&str, serde_json::Value, &str); 5] = [
        (
            "shape_overflows",
            serde_json::json!({"shape": [1u64 << 32, 1u64 << 32]}),
            "shape",
        ),
        (
            "shape_huge",
            serde_json::json!({"shape": [HUGE, HUGE]}),
            "shape",
        ),
        (
            "shape_large",
            serde_json::json!({"shape": [1_000_000, 1_000_000]}),
            "500000000000 bytes",
        ),
        ("dtype", serde_json::json!({"dtype": "complex128"}), "dtype"),
        (
            "nested_blocksize",
            serde_json::json!({"nested_blocksize": 0}),
            "nested_blocksize",
        ),
    ];
    for (name, patch, expect) in cases {
        let file = with_quant_state(tmp.path(), name, |s| {
            for (k, v) in patch.as_object().unwrap() {
                s[k] = v.clone();
            }
        });
        let e = lora::io::quant_summary(&file).unwrap_err().to_string();
        assert!(
            e.contains("layers.0.weight") && e.contains(expect),
            "{name}: {e}"
        );
        let out = tmp.path().join(format!("{name}-dequantized.safetensors"));
        let e = lora::io::dequantize_checkpoint(&file, &out).unwrap_err();
        assert!(e.to_string().contains(expect), "{name}: {e}");
        assert!(!out.exists(), "{name}: dequantize left {}", out.display());
    }
}
