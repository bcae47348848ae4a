//! Tensors on the host, as files hold them.

use crate::backend::{Backend, Tensor};
use crate::error::{Error, Result};
use crate::shape::Shape;

/// A row-major f32 tensor in host memory: what checkpoint files are read into and written
/// from, independent of any backend.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Shape.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// Copies a device tensor to the host.
    pub fn from_backend<B: Backend>(backend: &B, t: &B::Tensor) -> Result<Self> {
        Ok(HostTensor {
            shape: t.shape().dims().to_vec(),
            data: backend.to_host(t)?,
        })
    }

    /// Copies this tensor to a device.
    pub fn to_backend<B: Backend>(&self, backend: &B) -> Result<B::Tensor> {
        backend.from_host(&self.data, &self.shape)
    }

    /// Moves this tensor to a device (without a copy where the device is host memory).
    pub fn into_backend<B: Backend>(self, backend: &B) -> Result<B::Tensor> {
        backend.from_host_vec(self.data, &self.shape)
    }

    /// The transpose of a 2-D tensor.
    pub fn transposed(&self) -> Result<Self> {
        let [rows, cols] = self.shape[..] else {
            return Err(Error::shape(
                "transpose",
                "a 2-D tensor",
                &Shape::new(&self.shape),
            ));
        };
        let mut data = vec![0.0; self.data.len()];
        for (i, row) in self.data.chunks_exact(cols.max(1)).enumerate().take(rows) {
            for (j, &v) in row.iter().enumerate() {
                data[j * rows + i] = v;
            }
        }
        Ok(HostTensor {
            shape: vec![cols, rows],
            data,
        })
    }

    /// Checks the shape, naming `what` in the error.
    pub fn expect_shape(&self, what: &str, expected: &[usize]) -> Result<()> {
        if self.shape != expected {
            return Err(Error::shape(
                what,
                format!("{}", Shape::new(expected)),
                &Shape::new(&self.shape),
            ));
        }
        Ok(())
    }
}
