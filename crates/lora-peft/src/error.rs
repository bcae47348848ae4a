//! The error type of `lora-peft`.

/// Errors from configuration, targeting and adapter files. Each names the file, field,
/// module or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    /// From a layer, adapter or backend.
    #[error(transparent)]
    Core(#[from] lora_core::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `adapter_config.json` is not valid JSON or has a field of the wrong type.
    #[error("{path}: invalid adapter config: {reason}")]
    Config {
        /// The file.
        path: String,
        /// What serde reported (it names the field).
        reason: String,
    },
    /// A config field that would change the numbers and that lora-rs does not implement.
    #[error("adapter config field {field} = {value} is not supported: {reason}")]
    Unsupported {
        /// The field.
        field: &'static str,
        /// Its value.
        value: String,
        /// Why, and what to do.
        reason: String,
    },
    /// No module matched `target_modules`.
    #[error(
        "target_modules {targets} matched no module of the model; modules that exist: {available}"
    )]
    NoTargetMatched {
        /// The rule as configured.
        targets: String,
        /// A few existing module names.
        available: String,
    },
    /// A target pattern is not a valid regular expression.
    #[error("{field}: invalid regular expression {pattern:?}: {reason}")]
    Pattern {
        /// Which field held it.
        field: &'static str,
        /// The pattern.
        pattern: String,
        /// The regex error.
        reason: String,
    },
    /// A safetensors file is malformed or holds unexpected tensors.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong (names the tensor where there is one).
        reason: String,
    },
}

impl From<lora_io::Error> for PeftError {
    /// Checkpoint and file errors keep their kind (and message) under lora-peft's enum.
    fn from(e: lora_io::Error) -> Self {
        match e {
            lora_io::Error::Core(e) => PeftError::Core(e),
            lora_io::Error::Io { path, source } => PeftError::Io { path, source },
            lora_io::Error::Format { path, reason } => PeftError::Format { path, reason },
        }
    }
}

/// `Result` with [`PeftError`].
pub type Result<T, E = PeftError> = std::result::Result<T, E>;
