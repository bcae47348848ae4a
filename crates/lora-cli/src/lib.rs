//! The `lora` command's training-data readers, as a library so that the fuzz targets
//! (`crates/lora-fuzz`) and tests reach them; the command itself is `src/main.rs`.

pub mod lm_data;
pub mod sentiment_data;
