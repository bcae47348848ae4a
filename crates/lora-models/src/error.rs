//! The error type of `lora-models`.

/// Errors from loading models and tokenizers and from running them.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// From a layer, adapter or backend.
    #[error(transparent)]
    Core(#[from] lora_core::Error),
    /// From reading a checkpoint.
    #[error(transparent)]
    Checkpoint(#[from] lora_io::Error),
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is invalid or describes an architecture this code does not compute.
    #[error("{path}: {field}: {reason}")]
    Config {
        /// The file.
        path: String,
        /// The field at fault.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// A checkpoint tensor is missing or its shape disagrees with the config.
    #[error("{path}: tensor {tensor}: {reason}")]
    Weights {
        /// The checkpoint.
        path: String,
        /// The tensor.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// The tokenizer could not be loaded or could not encode the input.
    #[error("tokenizer {path}: {reason}")]
    Tokenizer {
        /// `tokenizer.json`.
        path: String,
        /// What failed.
        reason: String,
    },
    /// Bad model input (an empty text, a token id outside the vocabulary, a too long batch).
    #[error("{0}")]
    Input(String),
}

/// `Result` with [`ModelError`].
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
