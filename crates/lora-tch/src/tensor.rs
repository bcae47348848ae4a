//! The tch tensor: a libtorch tensor with value semantics.
#![allow(unsafe_code)]

use std::sync::Arc;

use lora_core::{Error, Result, Shape, Tensor};

/// A libtorch tensor (f32, contiguous) shared copy-on-write: `clone` shares storage, and a
/// write through [`TchTensor::make_mut`] copies it first when shared, so clones behave
/// as values (the optimizer defaults rely on that) while saving activations stays cheap.
#[derive(Debug)]
pub struct TchTensor {
    t: Arc<Shared>,
    shape: Shape,
}

/// A libtorch tensor that may be shared between threads for reading.
#[derive(Debug)]
struct Shared(tch::Tensor);

// SAFETY: libtorch tensors may be read from several threads at once (PyTorch's autograd
// engine and DataParallel do); every mutation here goes through `TchTensor::make_mut`,
// which takes `&mut self` and first ensures this storage is not shared.
unsafe impl Sync for Shared {}

impl Clone for TchTensor {
    fn clone(&self) -> Self {
        TchTensor {
            t: Arc::clone(&self.t),
            shape: self.shape.clone(),
        }
    }
}

pub(crate) fn tch_err(e: tch::TchError) -> Error {
    Error::Backend {
        backend: "tch",
        reason: e.to_string(),
    }
}

impl TchTensor {
    /// Wraps a libtorch tensor (made contiguous).
    pub fn new(t: tch::Tensor) -> Result<Self> {
        let t = t.f_contiguous().map_err(tch_err)?;
        let shape = Shape(t.size().iter().map(|&d| d as usize).collect());
        Ok(TchTensor {
            t: Arc::new(Shared(t)),
            shape,
        })
    }

    /// The libtorch tensor.
    pub fn inner(&self) -> &tch::Tensor {
        &self.t.0
    }

    /// The libtorch tensor for writing; copies the storage first if it is shared.
    pub fn make_mut(&mut self) -> Result<&mut tch::Tensor> {
        if Arc::get_mut(&mut self.t).is_none() {
            let mut copy = self.t.0.f_zeros_like().map_err(tch_err)?;
            copy.f_copy_(&self.t.0).map_err(tch_err)?;
            self.t = Arc::new(Shared(copy));
        }
        Arc::get_mut(&mut self.t)
            .map(|s| &mut s.0)
            .ok_or_else(|| Error::Backend {
                backend: "tch",
                reason: "tensor storage is shared".into(),
            })
    }
}

impl Tensor for TchTensor {
    fn shape(&self) -> &Shape {
        &self.shape
    }
}
