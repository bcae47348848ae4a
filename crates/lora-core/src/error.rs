//! The one error type of `lora-core`, shared by every backend.

use crate::shape::Shape;

/// Errors raised by tensors, layers, adapters and optimizers.
///
/// Every variant names *what* was wrong (the operation or layer, the shapes, the
/// field) so that a user can act on the message without a debugger.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Two shapes that must agree do not.
    #[error("{context}: shape mismatch, expected {expected}, got {got}")]
    ShapeMismatch {
        /// The operation or layer that checked, e.g. `layers.2 forward (input x)`.
        context: String,
        /// What the operation needed.
        expected: String,
        /// What it was given.
        got: Shape,
    },
    /// A configuration value is out of its allowed range.
    #[error("{context}: invalid {field} = {value}: {reason}")]
    InvalidConfig {
        /// The layer or component being configured.
        context: String,
        /// The offending field, e.g. `r` or `lora_dropout`.
        field: &'static str,
        /// The value as given.
        value: String,
        /// Why it is not allowed.
        reason: String,
    },
    /// A tensor holds NaN or infinity where finite values are required.
    #[error("{context}: tensor {tensor} (shape {shape}) contains non-finite values")]
    NonFinite {
        /// The layer or operation that checked.
        context: String,
        /// Which tensor, e.g. `input x` or `merged weight`.
        tensor: String,
        /// Its shape.
        shape: Shape,
    },
    /// An operation that is not valid in the current state (e.g. unmerge when not merged).
    #[error("{context}: {reason}")]
    InvalidState {
        /// The layer or component.
        context: String,
        /// What is wrong.
        reason: String,
    },
    /// A failure inside a backend (device, driver, library).
    #[error("backend {backend}: {reason}")]
    Backend {
        /// Backend name.
        backend: &'static str,
        /// What failed.
        reason: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Shorthand for [`Error::ShapeMismatch`].
    pub fn shape(context: impl Into<String>, expected: impl Into<String>, got: &Shape) -> Self {
        Error::ShapeMismatch {
            context: context.into(),
            expected: expected.into(),
            got: got.clone(),
        }
    }

    /// Shorthand for [`Error::InvalidConfig`].
    pub fn config(
        context: impl Into<String>,
        field: &'static str,
        value: impl ToString,
        reason: impl Into<String>,
    ) -> Self {
        Error::InvalidConfig {
            context: context.into(),
            field,
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::InvalidState`].
    pub fn state(context: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidState {
            context: context.into(),
            reason: reason.into(),
        }
    }
}
