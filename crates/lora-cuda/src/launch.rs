//! Launching our kernels: the compiled kernel table, launch shapes, the `launch!` macro
//! and the device buffers passed to launches.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, LaunchConfig};
use lora_core::Result;

use crate::device::{Cuda, backend_err};

/// The kernels' CUDA C source, compiled with NVRTC at context creation.
const KERNEL_SOURCE: &str = include_str!("kernels/lora_rs.cu");

/// Every kernel of [`KERNEL_SOURCE`], loaded once.
const KERNEL_NAMES: [&str; 22] = [
    "dropout_mask",
    "binary_op",
    "unary_op",
    "unary_backward",
    "axpby",
    "affine",
    "add_row_broadcast",
    "gather_rows",
    "scatter_add_rows",
    "slice_cols",
    "assign_cols",
    "permute",
    "sum_rows",
    "sum_cols",
    "reduce_partial",
    "softmax_rows",
    "softmax_backward",
    "layer_norm",
    "layer_norm_backward",
    "adam_step",
    "dequantize_4bit",
    "dequantize_int8",
];

/// Compiles [`KERNEL_SOURCE`] with NVRTC on `ctx` and loads every kernel of
/// [`KERNEL_NAMES`].
pub(crate) fn load_kernels(
    ctx: &Arc<CudaContext>,
) -> Result<(Arc<CudaModule>, HashMap<&'static str, CudaFunction>)> {
    let ptx = cudarc::nvrtc::compile_ptx(KERNEL_SOURCE)
        .map_err(|e| backend_err(format!("NVRTC compiling src/kernels/lora_rs.cu: {e}")))?;
    let module = ctx
        .load_module(ptx)
        .map_err(|e| backend_err(format!("loading kernels: {e}")))?;
    let mut kernels = HashMap::new();
    for name in KERNEL_NAMES {
        let f = module
            .load_function(name)
            .map_err(|e| backend_err(format!("kernel {name}: {e}")))?;
        kernels.insert(name, f);
    }
    Ok((module, kernels))
}

pub(crate) const THREADS: u32 = 256;

/// Elementwise launches: grid-stride loops, at most 65,535 blocks.
pub(crate) fn elems(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 65_535) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Row launches: one block of 256 threads per row (the kernels' shared arrays are 256).
pub(crate) fn rows_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.clamp(1, 65_535) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Launches kernel `$name` of `$self` with `$cfg` and the arguments in order; a failed
/// launch becomes a backend error naming the kernel.
macro_rules! launch {
    ($self:expr, $name:literal, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let f = $self.kernel($name)?;
        let mut b = $self.inner.stream.launch_builder(f);
        $( b.arg($arg); )+
        // SAFETY: every argument matches the kernel's signature in lora_rs.cu (pointer
        // operands are device buffers whose lengths the caller checked against the sizes
        // passed alongside), and kernels only touch indices below those sizes.
        unsafe { b.launch($cfg) }
            .map_err(|e| $crate::device::backend_err(format!("kernel {}: {e}", $name)))?;
    }};
}
pub(crate) use launch;

impl Cuda {
    pub(crate) fn kernel(&self, name: &'static str) -> Result<&CudaFunction> {
        self.inner
            .kernels
            .get(name)
            .ok_or_else(|| backend_err(format!("kernel {name} is not loaded")))
    }

    pub(crate) fn alloc(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.inner
            .stream
            .alloc_zeros::<f32>(n.max(1))
            .map_err(|e| backend_err(format!("allocating {n} floats: {e}")))
    }

    pub(crate) fn upload<T: cudarc::driver::DeviceRepr>(&self, data: &[T]) -> Result<CudaSlice<T>> {
        self.inner
            .stream
            .clone_htod(data)
            .map_err(|e| backend_err(format!("host to device copy: {e}")))
    }

    pub(crate) fn indices(&self, rows: &[usize]) -> Result<CudaSlice<u64>> {
        let v: Vec<u64> = rows.iter().map(|&r| r as u64).collect();
        self.upload(if v.is_empty() { &[0u64][..] } else { &v })
    }
}
