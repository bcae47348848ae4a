//! BERT-family encoders from Hugging Face checkpoints (all-MiniLM-L6-v2 and friends).

mod classifier;
mod config;
mod embeddings;
mod half;
mod model;
mod pooling;
mod tokenizer;

pub use classifier::{classification_step, classify};
pub use config::BertConfig;
pub use model::BertModel;
pub use pooling::{l2_normalize, mean_pool, mean_pool_backward};
pub use tokenizer::{BertTokenizer, TokenBatch};
