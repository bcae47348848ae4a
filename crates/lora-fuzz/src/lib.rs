//! The fuzz targets of lora-rs (issue 17): every loader fed arbitrary bytes, as a user's
//! file would reach it. Each target writes the bytes where the loader expects a file (a
//! scratch directory per process) and calls the loader through its public API. An error
//! is the right answer to garbage; a panic, an abort, a hang or an allocation sized by a
//! claim is a bug.
//!
//! `fuzz/` runs these under AFL++ (`cargo xtask fuzz`); `tests/fuzz_corpus.rs` replays the
//! committed corpus and every crash input through [`run`] in the test command.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use lora::models::Mlp;
use lora::models::bert::BertConfig;
use lora::models::decoder::{DecoderConfig, DecoderTokenizer};
use lora::peft::LoraConfig;
use lora::{NdArray, UnaryOp};

/// Every target: `(name, what the bytes are)`.
pub const TARGETS: [(&str, &str); 9] = [
    (
        "safetensors",
        "a safetensors file: header, body, bitsandbytes quant states",
    ),
    (
        "adapter",
        "adapter_model.safetensors of a DoRA adapter directory",
    ),
    (
        "adapter_config",
        "adapter_config.json, then injected into an MLP",
    ),
    (
        "decoder_config",
        "config.json of a Llama/Mistral/Qwen2/Qwen3 checkpoint",
    ),
    ("bert_config", "config.json of a BERT checkpoint"),
    (
        "checkpoint_index",
        "model.safetensors.index.json beside one real shard",
    ),
    ("vader", "the VADER lexicon (lora train --task classify)"),
    (
        "lm_jsonl",
        "causal-LM training data, .jsonl (text or prompt/completion)",
    ),
    (
        "lm_text",
        "causal-LM training data, .txt packed into blocks",
    ),
];

/// Feeds `data` to `target`'s loader. Loader errors are expected and ignored; an unknown
/// target name is the only error returned.
pub fn run(target: &str, data: &[u8]) -> Result<(), String> {
    let dir = scratch();
    match target {
        "safetensors" => safetensors(&write(dir, "model.safetensors", data)),
        "adapter" => adapter(dir, data),
        "adapter_config" => adapter_config(&write(dir, "adapter_config.json", data)),
        "decoder_config" => {
            let _ = DecoderConfig::from_file(&write(dir, "config.json", data));
        }
        "bert_config" => {
            let _ = BertConfig::from_file(&write(dir, "config.json", data));
        }
        "checkpoint_index" => checkpoint_index(dir, data),
        "vader" => {
            let _ = lora_cli::sentiment_data::read_vader(&write(dir, "vader.txt", data), 0.5);
        }
        "lm_jsonl" | "lm_text" => {
            let name = match target {
                "lm_jsonl" => "data.jsonl",
                _ => "data.txt",
            };
            if let Some(tok) = tokenizer() {
                let _ = lora_cli::lm_data::read(&write(dir, name, data), tok, 32, Some(2));
            }
        }
        other => return Err(format!("unknown fuzz target {other:?}")),
    }
    Ok(())
}

/// The repository's test fixtures (the targets that need a real companion file use them).
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// A scratch directory of this process (each AFL instance is its own process).
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("lora-fuzz-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        dir
    })
}

fn write(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let path = dir.join(name);
    let _ = std::fs::write(&path, data);
    path
}

/// Everything a user can do with a checkpoint file short of loading a model: list and
/// read its tensors, decode every quantized module.
fn safetensors(path: &Path) {
    let _ = lora::io::read_safetensors(path);
    if let Ok(ck) = lora::io::Checkpoint::open(path) {
        let _ = ck.tensors();
        let _ = ck.is_quantized();
        let _ = ck.read_f32();
    }
    let _ = lora::io::quant_summary(path);
}

/// A DoRA adapter directory (the fixture's config) whose tensor file is `data`, loaded
/// onto the MLP it was made for.
fn adapter(dir: &Path, data: &[u8]) {
    let adapter = dir.join("adapter");
    let _ = std::fs::create_dir_all(&adapter);
    let config = fixtures().join("peft_dora/adapter/adapter_config.json");
    let _ = std::fs::copy(config, adapter.join("adapter_config.json"));
    write(&adapter, "adapter_model.safetensors", data);
    let b = NdArray::new();
    if let Ok(mut m) = Mlp::new(&b, &[6, 16, 16, 3], UnaryOp::Relu, 0) {
        let _ = lora::peft::load_pretrained(&adapter, &mut m, &b);
    }
}

/// A config read, checked and injected into a small MLP (ranks, patterns, inits).
fn adapter_config(path: &Path) {
    let Ok(config) = LoraConfig::from_file(path) else {
        return;
    };
    if config.check_supported().is_err() {
        return;
    }
    let b = NdArray::new();
    if let Ok(mut m) = Mlp::new(&b, &[6, 16, 16, 3], UnaryOp::Relu, 0) {
        let _ = lora::peft::inject_adapters(&mut m, &b, &config, 0);
    }
}

/// A sharded checkpoint directory: the index is `data`, the one shard a real file.
fn checkpoint_index(dir: &Path, data: &[u8]) {
    let ck = dir.join("sharded");
    let _ = std::fs::create_dir_all(&ck);
    let shard = ck.join("model-00001-of-00001.safetensors");
    if !shard.exists() {
        let _ = std::fs::copy(fixtures().join("peft_dora/base_model.safetensors"), &shard);
    }
    write(&ck, "model.safetensors.index.json", data);
    if let Ok(c) = lora::io::Checkpoint::open(&ck) {
        let _ = c.tensors();
        let _ = c.read_f32();
    }
}

/// The tiny decoder tokenizer of the tests, loaded once per process.
fn tokenizer() -> Option<&'static DecoderTokenizer> {
    static TOK: OnceLock<Option<DecoderTokenizer>> = OnceLock::new();
    TOK.get_or_init(|| {
        DecoderTokenizer::from_file(&fixtures().join("decoder/tokenizer/tokenizer.json")).ok()
    })
    .as_ref()
}
