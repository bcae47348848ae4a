//! Creating the backend: probe for the driver, create the context, stream and cuBLAS
//! handle, and compile our kernels once per context.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use lora_core::{Error, Result};

use crate::launch::load_kernels;

pub(crate) fn backend_err(reason: impl std::fmt::Display) -> Error {
    Error::Backend {
        backend: "cuda",
        reason: reason.to_string(),
    }
}

/// Why CUDA cannot be used on this machine, or `None` when the driver library loads and
/// reports at least one device. Tests and the CLI print this instead of failing.
pub fn cuda_unavailable_reason() -> Option<String> {
    // SAFETY: only checks whether the shared library can be opened (dlopen); no CUDA call.
    let present = unsafe { cudarc::driver::sys::is_culib_present() };
    if !present {
        return Some("libcuda (the NVIDIA driver library) was not found".into());
    }
    match cudarc::driver::result::init().and_then(|()| cudarc::driver::result::device::get_count())
    {
        Ok(0) => Some("the CUDA driver reports no device".into()),
        Ok(_) => None,
        Err(e) => Some(format!("CUDA initialisation failed: {e}")),
    }
}

/// Context-wide state shared by clones of a [`Cuda`] handle.
pub(crate) struct Inner {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) blas: CudaBlas,
    pub(crate) kernels: HashMap<&'static str, CudaFunction>,
    _module: Arc<CudaModule>,
    pub(crate) device_name: String,
}

/// The CUDA backend: one device, one stream. Cheap to clone.
#[derive(Clone)]
pub struct Cuda {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cuda")
            .field("device", &self.inner.device_name)
            .field("ordinal", &self.inner.ctx.ordinal())
            .finish()
    }
}

impl Cuda {
    /// The backend on device `ordinal`: an error (not a panic) when the driver is missing,
    /// the device does not exist, or the kernels do not compile.
    pub fn new(ordinal: usize) -> Result<Cuda> {
        if let Some(why) = cuda_unavailable_reason() {
            return Err(backend_err(why));
        }
        let ctx =
            CudaContext::new(ordinal).map_err(|e| backend_err(format!("device {ordinal}: {e}")))?;
        let stream = ctx.default_stream();
        let blas =
            CudaBlas::new(stream.clone()).map_err(|e| backend_err(format!("cuBLAS: {e}")))?;
        let (module, kernels) = load_kernels(&ctx)?;
        let device_name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
        Ok(Cuda {
            inner: Arc::new(Inner {
                ctx,
                stream,
                blas,
                kernels,
                _module: module,
                device_name,
            }),
        })
    }
}
