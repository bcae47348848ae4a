//! `--backend`: which compiled-in backend runs a command.

use clap::ValueEnum;

/// Backends the CLI knows; only those compiled in (cargo features) can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// Pure Rust (ndarray + gemm), the default.
    Ndarray,
    /// libtorch through tch (feature `tch`).
    Tch,
    /// CUDA through cudarc (feature `cuda`).
    Cuda,
}

impl BackendKind {
    /// The feature/backend name.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Ndarray => "ndarray",
            BackendKind::Tch => "tch",
            BackendKind::Cuda => "cuda",
        }
    }

    /// An error for a backend this binary was built without.
    pub fn not_compiled(self) -> anyhow::Error {
        anyhow::anyhow!(
            "backend {} is not compiled into this binary (compiled: {}); rebuild with `--features {}`",
            self.name(),
            lora::compiled_backends().join(", "),
            self.name()
        )
    }
}

/// Runs `$body` with `$b` bound to the chosen backend value (generic code inside).
#[macro_export]
macro_rules! with_backend {
    ($kind:expr, |$b:ident| $body:expr) => {{
        match $kind {
            #[cfg(feature = "ndarray")]
            $crate::backend_choice::BackendKind::Ndarray => {
                let $b = lora::NdArray::new();
                $body
            }
            #[cfg(feature = "tch")]
            $crate::backend_choice::BackendKind::Tch => {
                // The GPU when libtorch sees one, else the CPU.
                let $b = lora::Tch::cuda(0).unwrap_or_else(|_| lora::Tch::cpu());
                $body
            }
            #[cfg(feature = "cuda")]
            $crate::backend_choice::BackendKind::Cuda => match lora::Cuda::new(0) {
                Ok($b) => $body,
                Err(e) => Err(anyhow::anyhow!("{e}")),
            },
            #[allow(unreachable_patterns)]
            other => Err(other.not_compiled()),
        }
    }};
}
