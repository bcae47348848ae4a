//! Shared helpers for the `lora` CLI tests: running the binary, temporary directories,
//! fixture and model-cache paths, and reading numbers back from output and JSON.
// Each test file uses its own subset of these helpers.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs the real `lora` binary with `args` and waits for it.
pub fn lora(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lora"))
        .args(args)
        .output()
        .unwrap()
}

/// stdout then stderr of a run, as text.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A path as a command-line argument.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A fresh temporary directory, removed when dropped.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// The names of the entries of `dir`.
pub fn file_names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// `tests/fixtures/<name>` at the workspace root.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

/// all-MiniLM-L6-v2 from the model cache; `None` (the test skips) when it was not
/// fetched, unless `LORA_RS_REQUIRE_MODELS` is set (the workspace's
/// `tests/common/mod.rs::minilm_dir` has the same rules).
pub fn minilm() -> Option<PathBuf> {
    let dir = lora::models::cache::minilm_dir();
    if dir.join("model.safetensors").is_file() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("LORA_RS_REQUIRE_MODELS").is_none(),
        "all-MiniLM-L6-v2 missing at {}: run `cargo xtask fetch-model minilm`",
        dir.display()
    );
    eprintln!("skipped: all-MiniLM-L6-v2 not found (run `cargo xtask fetch-model minilm`)");
    None
}

/// The VADER lexicon from the data cache, with the same rules as [`minilm`].
pub fn vader_lexicon() -> Option<PathBuf> {
    let data = lora::models::cache::vader_lexicon_path();
    if !data.is_file() {
        assert!(
            std::env::var_os("LORA_RS_REQUIRE_MODELS").is_none(),
            "vader_lexicon.txt missing: run `cargo xtask fetch-data vader`"
        );
        eprintln!("skipped: vader_lexicon.txt not found (run `cargo xtask fetch-data vader`)");
        return None;
    }
    Some(data)
}

/// A JSON file, parsed.
pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// A JSON array of numbers as f32.
pub fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// The number after a two-word label on the summary line that starts with `label`
/// (`loss before     1.2e-1 ...`).
pub fn number_after(text: &str, label: &str) -> f64 {
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no {label} line in\n{text}"));
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}
