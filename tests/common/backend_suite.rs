//! One test, every backend: [`backend_suite!`](macro@crate::backend_suite) (in the spirit of
//! candle's `test_device!`) expands each test body once per backend, so a backend joins
//! every suite that uses it with one line here.
//!
//! * ndarray, the reference, always;
//! * tch with the `tch` feature (libtorch on the CPU);
//! * cuda with the `cuda` feature; without a driver or a device each test prints
//!   `skipped: CUDA backend unavailable: <reason>` on stdout (which `cargo xtask test`
//!   reads to report the suite as skipped) and returns.

/// The CUDA backend on device 0, or `None` after printing why it is unavailable.
#[cfg(feature = "cuda")]
pub fn cuda_or_skip() -> Option<lora::Cuda> {
    match lora::Cuda::new(0) {
        Ok(b) => Some(b),
        Err(e) => {
            // stdout, so that `cargo xtask test` sees the reason (it reads stdout).
            println!("skipped: CUDA backend unavailable: {e}");
            None
        }
    }
}

/// Expands each `fn name(b) { body }` into a `#[test]` per backend module (`ndarray`,
/// `tch`, `cuda`), with `b` bound to `&Backend`.
///
/// * `backend_suite!(all: ...)`: every backend, the reference included (properties
///   checked against an f64 host reference);
/// * `backend_suite!(against_reference: ...)`: every backend but ndarray (suites that
///   compare a backend with the ndarray reference).
#[macro_export]
macro_rules! backend_suite {
    (all: $($tests:tt)*) => {
        $crate::backend_suite!(@ndarray $($tests)*);
        $crate::backend_suite!(against_reference: $($tests)*);
    };
    (against_reference: $($tests:tt)*) => {
        $crate::backend_suite!(@tch $($tests)*);
        $crate::backend_suite!(@cuda $($tests)*);
    };
    (@ndarray $($(#[$meta:meta])* fn $name:ident($b:ident) $body:block)*) => {
        mod ndarray {
            #[allow(unused_imports)]
            use super::*;
            $(
                $(#[$meta])*
                #[test]
                fn $name() {
                    let $b = &lora::NdArray::new();
                    $body
                }
            )*
        }
    };
    (@tch $($(#[$meta:meta])* fn $name:ident($b:ident) $body:block)*) => {
        #[cfg(feature = "tch")]
        mod tch {
            #[allow(unused_imports)]
            use super::*;
            $(
                $(#[$meta])*
                #[test]
                fn $name() {
                    let $b = &lora::Tch::cpu();
                    $body
                }
            )*
        }
    };
    (@cuda $($(#[$meta:meta])* fn $name:ident($b:ident) $body:block)*) => {
        #[cfg(feature = "cuda")]
        mod cuda {
            #[allow(unused_imports)]
            use super::*;
            $(
                $(#[$meta])*
                #[test]
                fn $name() {
                    let Some(backend) = $crate::backend_suite::cuda_or_skip() else {
                        return;
                    };
                    let $b = &backend;
                    $body
                }
            )*
        }
    };
}
