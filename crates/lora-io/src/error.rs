//! The error type of `lora-io`.

/// Errors reading or writing checkpoints. Each names the file, and the tensor or field at
/// fault where there is one.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// From a layer, a quantizer or a backend.
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
    /// A file is malformed or holds unexpected tensors.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong (names the tensor where there is one).
        reason: String,
    },
}

impl Error {
    /// A [`Error::Format`] for `path`.
    pub fn format(path: impl std::fmt::Display, reason: impl Into<String>) -> Self {
        Error::Format {
            path: path.to_string(),
            reason: reason.into(),
        }
    }

    /// A [`Error::Io`] for `path`.
    pub fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
