//! The ndarray tensor: an owned, contiguous, row-major f32 array.

use std::mem::ManuallyDrop;

use lora_core::{Error, Result, Shape, Tensor};
use ndarray::{ArcArray, ArrayD, IxDyn};

use crate::pool;

/// A dense f32 tensor in standard (row-major, contiguous) layout.
///
/// The layout invariant lets GEMM and the elementwise kernels treat the data as a flat
/// slice; every constructor establishes it. Storage is reference-counted like a PyTorch
/// tensor: `clone` is O(1) (saving an activation for the backward copies nothing) and a
/// write to shared storage copies it first. When the last tensor sharing a storage is
/// dropped, the buffer goes back to the backend's pool (`pool`) for the next op's output.
#[derive(Clone, Debug, PartialEq)]
pub struct NdTensor {
    // `ManuallyDrop` so that `Drop` can move the storage out into the pool.
    array: ManuallyDrop<ArcArray<f32, IxDyn>>,
    shape: Shape,
}

#[allow(unsafe_code)]
impl Drop for NdTensor {
    fn drop(&mut self) {
        // SAFETY: `array` is not used again: this is the tensor's drop.
        let array = unsafe { ManuallyDrop::take(&mut self.array) };
        if array.len() < pool::MIN_POOLED_ELEMS {
            return;
        }
        // Shared storage stays with its other owners; the last one returns it.
        if let Ok(owned) = array.try_into_owned_nocopy() {
            pool::give(owned.into_raw_vec_and_offset().0);
        }
    }
}

impl NdTensor {
    /// Wraps an array, copying it into standard layout if it is not already.
    pub fn from_array(array: ArrayD<f32>) -> Self {
        let array = if array.is_standard_layout() {
            array
        } else {
            array.as_standard_layout().into_owned()
        };
        let shape = Shape::new(array.shape());
        NdTensor {
            array: ManuallyDrop::new(array.into_shared()),
            shape,
        }
    }

    /// From a flat row-major vector.
    pub fn from_vec(data: Vec<f32>, shape: &[usize]) -> Result<Self> {
        lora_core::backend::check_host_len(data.len(), shape)?;
        let array = ArrayD::from_shape_vec(IxDyn(shape), data).map_err(|e| Error::Backend {
            backend: "ndarray",
            reason: e.to_string(),
        })?;
        Ok(NdTensor {
            array: ManuallyDrop::new(array.into_shared()),
            shape: Shape::new(shape),
        })
    }

    /// The same elements under another shape of equal size, sharing the storage (O(1), as
    /// `torch.reshape` of a contiguous tensor: a later write copies it first).
    pub fn reshaped(&self, shape: &[usize]) -> Result<Self> {
        let array = ArcArray::clone(&self.array)
            .into_shape_with_order(IxDyn(shape))
            .map_err(|e| Error::Backend {
                backend: "ndarray",
                reason: format!("reshape {} to {shape:?}: {e}", self.shape),
            })?;
        Ok(NdTensor {
            array: ManuallyDrop::new(array),
            shape: Shape::new(shape),
        })
    }

    /// The underlying (shared) array.
    pub fn array(&self) -> &ArcArray<f32, IxDyn> {
        &self.array
    }

    /// The elements as a flat row-major slice.
    pub fn as_slice(&self) -> &[f32] {
        // Standard layout is an invariant of this type, so this never fails.
        self.array.as_slice().unwrap_or(&[])
    }

    /// The elements as a flat mutable slice (copies the storage first if it is shared).
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        if !self.array.is_unique() {
            // Copy into a pooled buffer rather than let ndarray clone into a new one.
            let copy = pool::copy_of(self.as_slice());
            let array = ArrayD::from_shape_vec(IxDyn(self.shape.dims()), copy)
                .unwrap_or_else(|_| unreachable!("the copy has the tensor's length"));
            let shared = std::mem::replace(&mut *self.array, array.into_shared());
            drop(shared);
        }
        self.array.as_slice_mut().unwrap_or(&mut [])
    }
}

impl Tensor for NdTensor {
    fn shape(&self) -> &Shape {
        &self.shape
    }
}
