//! Where `cargo xtask fetch-model` / `fetch-data` put downloads, with the same rules as
//! `xtask/src/venv.rs`: `LORA_RS_CACHE`, else `$XDG_CACHE_HOME/lora-rs`, else
//! `~/.cache/lora-rs`.

use std::path::PathBuf;

/// The lora-rs cache folder.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LORA_RS_CACHE") {
        return PathBuf::from(d);
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join("lora-rs")
}

/// all-MiniLM-L6-v2 as `cargo xtask fetch-model minilm` unpacks it (`LORA_RS_MINILM`
/// overrides).
pub fn minilm_dir() -> PathBuf {
    std::env::var_os("LORA_RS_MINILM")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("models/all-MiniLM-L6-v2"))
}

/// The VADER lexicon as `cargo xtask fetch-data vader` unpacks it.
pub fn vader_lexicon_path() -> PathBuf {
    cache_dir().join("data/vader_lexicon.txt")
}
