//! The ndarray tensor: an owned, contiguous, row-major f32 array.

use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};

use lora_core::backend::Transpose;
use lora_core::{Error, Result, Shape, Tensor};
use ndarray::{ArcArray, ArrayD, IxDyn};

use crate::pool;
use crate::sgemm::{PackSlots, PackedB};

/// A dense f32 tensor in standard (row-major, contiguous) layout.
///
/// The layout invariant lets GEMM and the elementwise kernels treat the data as a flat
/// slice; every constructor establishes it. Storage is reference-counted like a PyTorch
/// tensor: `clone` is O(1) (saving an activation for the backward copies nothing) and a
/// write to shared storage copies it first. When the last tensor sharing a storage is
/// dropped, the buffer goes back to the backend's pool (`pool`) for the next op's output.
///
/// A tensor also remembers whether its elements are all finite once that is known: every
/// `LoraLinear` checks its input, and the kernels that write a layer's input (LayerNorm,
/// the fused GELU, attention) learn it while the values are in cache, so the check costs
/// no pass over memory (3-4% of a MiniLM forward). Any write through
/// [`NdTensor::as_mut_slice`] forgets it.
#[derive(Debug)]
pub struct NdTensor {
    // `ManuallyDrop` so that `Drop` can move the storage out into the pool.
    array: ManuallyDrop<ArcArray<f32, IxDyn>>,
    shape: Shape,
    /// [`UNKNOWN`], [`FINITE`] or [`NOT_FINITE`].
    finite: AtomicU8,
    /// Copies packed for our GEMM's tiles, made where the tensor is a product's `B` more
    /// than once (a frozen weight): `sgemm/prepacked.rs`.
    packs: PackSlots,
}

/// Nobody has looked at every element yet.
const UNKNOWN: u8 = 0;
/// Every element is finite.
const FINITE: u8 = 1;
/// Some element is a NaN or an infinity.
const NOT_FINITE: u8 = 2;

impl Clone for NdTensor {
    fn clone(&self) -> Self {
        // The clone shares the storage, so what is known of it holds for both.
        NdTensor {
            array: self.array.clone(),
            shape: self.shape.clone(),
            finite: AtomicU8::new(self.finite.load(Relaxed)),
            packs: self.packs.clone(),
        }
    }
}

impl PartialEq for NdTensor {
    fn eq(&self, other: &Self) -> bool {
        self.shape == other.shape && *self.array == *other.array
    }
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
            finite: AtomicU8::new(UNKNOWN),
            packs: PackSlots::default(),
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
            finite: AtomicU8::new(UNKNOWN),
            packs: PackSlots::default(),
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
            finite: AtomicU8::new(self.finite.load(Relaxed)),
            // Another matrix view of the same values: packed apart.
            packs: PackSlots::default(),
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
        *self.finite.get_mut() = UNKNOWN;
        // Packed copies of the old values are stale (clones keep theirs, and the values).
        self.packs = PackSlots::default();
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

impl NdTensor {
    /// Whether every element is finite, if a kernel or an earlier check found out.
    pub(crate) fn known_finite(&self) -> Option<bool> {
        match self.finite.load(Relaxed) {
            FINITE => Some(true),
            NOT_FINITE => Some(false),
            _ => None,
        }
    }

    /// This tensor's packed copy as a product's `B` (its matrix view, or that transposed:
    /// `t`), made at a use after the first while the budget has room; see
    /// `sgemm/prepacked.rs`.
    #[allow(unsafe_code)]
    pub(crate) fn kept_b(&self, t: Transpose) -> Option<&PackedB> {
        let (rows, cols) = self.shape.as_matrix();
        let p = self.as_slice().as_ptr();
        let (b, k_n) = match t {
            Transpose::No => ((p, cols as isize, 1), (rows, cols)),
            Transpose::Yes => ((p, 1, cols as isize), (cols, rows)),
        };
        // SAFETY: `b` addresses this tensor's elements as a `k x n` operand, and `packs`
        // were replaced at every write since they were made.
        unsafe { self.packs.for_use(t, b, k_n) }
    }

    /// Records what a look at every element of this tensor found.
    pub(crate) fn set_finite(&self, finite: bool) {
        self.finite
            .store(if finite { FINITE } else { NOT_FINITE }, Relaxed);
    }
}

impl Tensor for NdTensor {
    fn shape(&self) -> &Shape {
        &self.shape
    }
}
