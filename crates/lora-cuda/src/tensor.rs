//! The device tensor: a reference-counted `CudaSlice<f32>` (copy-on-write) and a shape.

use std::sync::Arc;

use cudarc::driver::CudaSlice;
use lora_core::{Shape, Tensor};

/// A dense f32 tensor in device memory, row-major. `clone` is O(1); a write to shared
/// storage copies it first (`make_mut`), as on the other backends.
#[derive(Clone, Debug)]
pub struct CudaTensor {
    pub(crate) data: Arc<CudaSlice<f32>>,
    pub(crate) shape: Shape,
}

impl CudaTensor {
    pub(crate) fn new(data: CudaSlice<f32>, shape: &[usize]) -> Self {
        CudaTensor {
            data: Arc::new(data),
            shape: Shape::new(shape),
        }
    }

    /// The storage, copied first if another tensor shares it.
    pub(crate) fn make_mut(&mut self) -> &mut CudaSlice<f32> {
        Arc::make_mut(&mut self.data)
    }
}

impl Tensor for CudaTensor {
    fn shape(&self) -> &Shape {
        &self.shape
    }
}
