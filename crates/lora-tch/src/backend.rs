//! The libtorch backend.
//!
//! libtorch's in-place ops (`f_add_`, `f_addmm_`, ...) return another handle to the tensor
//! they modified; `let _ =` drops that handle.

use lora_core::backend::{
    check_assign_cols, check_bmm, check_col_range, check_gemm, check_host_len, check_layer_norm,
    check_layer_norm_backward, check_permute, check_reshape, check_row_broadcast, check_rows,
    check_same_shape, check_scatter_add, check_softmax_mask,
};
use lora_core::{Backend, BinaryOp, Error, OptimOps, Result, Tensor, Transpose, UnaryOp};
use tch::{Device, Kind};

use crate::tensor::{TchTensor, tch_err};

/// libtorch on one device (CPU, or `Device::Cuda(i)` when libtorch sees a GPU).
#[derive(Clone, Copy, Debug)]
pub struct Tch {
    device: Device,
}

impl Tch {
    /// The CPU.
    pub fn cpu() -> Self {
        Tch {
            device: Device::Cpu,
        }
    }

    /// GPU `index` if libtorch sees it, else an error saying so.
    pub fn cuda(index: usize) -> Result<Self> {
        if !tch::Cuda::is_available() || index >= tch::Cuda::device_count() as usize {
            return Err(Error::Backend {
                backend: "tch",
                reason: format!(
                    "CUDA device {index} not available to libtorch ({} devices)",
                    tch::Cuda::device_count()
                ),
            });
        }
        Ok(Tch {
            device: Device::Cuda(index),
        })
    }

    /// The device.
    pub fn tch_device(&self) -> Device {
        self.device
    }

    fn wrap(&self, t: std::result::Result<tch::Tensor, tch::TchError>) -> Result<TchTensor> {
        TchTensor::new(t.map_err(tch_err)?)
    }

    /// The `[rows, cols]` view of a tensor.
    pub(crate) fn matrix(t: &TchTensor) -> Result<tch::Tensor> {
        let (r, c) = t.shape().as_matrix();
        t.inner().f_reshape([r as i64, c as i64]).map_err(tch_err)
    }

    /// Row indices as an int64 tensor on this device.
    fn row_index(&self, rows: &[usize]) -> Result<tch::Tensor> {
        let idx: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        tch::Tensor::f_from_slice(&idx)
            .and_then(|t| t.f_to_device(self.device))
            .map_err(tch_err)
    }

    fn shape_i64(shape: &[usize]) -> Vec<i64> {
        shape.iter().map(|&d| d as i64).collect()
    }
}

impl Backend for Tch {
    type Tensor = TchTensor;

    fn name(&self) -> &'static str {
        "tch"
    }

    fn device(&self) -> String {
        match self.device {
            Device::Cpu => format!("libtorch cpu ({} threads)", tch::get_num_threads()),
            Device::Cuda(i) => format!("libtorch cuda:{i}"),
            other => format!("libtorch {other:?}"),
        }
    }

    fn synchronize(&self) -> Result<()> {
        if let Device::Cuda(i) = self.device {
            tch::Cuda::synchronize(i as i64);
        }
        Ok(())
    }

    fn from_host(&self, data: &[f32], shape: &[usize]) -> Result<TchTensor> {
        check_host_len(data.len(), shape)?;
        let t = tch::Tensor::f_from_slice(data)
            .and_then(|t| t.f_reshape(Self::shape_i64(shape)))
            .and_then(|t| t.f_to_device(self.device));
        self.wrap(t)
    }

    fn to_host(&self, t: &TchTensor) -> Result<Vec<f32>> {
        let flat = t
            .inner()
            .f_to_device(Device::Cpu)
            .and_then(|t| t.f_reshape([-1]))
            .map_err(tch_err)?;
        Vec::<f32>::try_from(&flat).map_err(tch_err)
    }

    fn zeros(&self, shape: &[usize]) -> Result<TchTensor> {
        self.wrap(tch::Tensor::f_zeros(
            Self::shape_i64(shape),
            (Kind::Float, self.device),
        ))
    }

    fn reshape(&self, t: &TchTensor, shape: &[usize]) -> Result<TchTensor> {
        check_reshape(t.shape(), shape)?;
        self.wrap(t.inner().f_reshape(Self::shape_i64(shape)))
    }

    fn gemm(
        &self,
        alpha: f32,
        a: &TchTensor,
        trans_a: Transpose,
        b: &TchTensor,
        trans_b: Transpose,
        beta: f32,
        c: &mut TchTensor,
    ) -> Result<()> {
        let (m, n, _) = check_gemm(a.shape(), trans_a, b.shape(), trans_b, c.shape())?;
        let op = |t: &TchTensor, tr: Transpose| -> Result<tch::Tensor> {
            let mtx = Self::matrix(t)?;
            match tr {
                Transpose::No => Ok(mtx),
                Transpose::Yes => mtx.f_transpose(0, 1).map_err(tch_err),
            }
        };
        let mut prod = op(a, trans_a)?.f_mm(&op(b, trans_b)?).map_err(tch_err)?;
        if alpha != 1.0 {
            prod = prod.f_mul_scalar(f64::from(alpha)).map_err(tch_err)?;
        }
        let dims = Self::shape_i64(c.shape().dims());
        if beta == 0.0 {
            *c = self.wrap(prod.f_reshape(dims))?;
            return Ok(());
        }
        let out = c.make_mut()?;
        let mut view = out.f_view([m as i64, n as i64]).map_err(tch_err)?;
        if beta != 1.0 {
            let _ = view.f_mul_scalar_(f64::from(beta)).map_err(tch_err)?;
        }
        let _ = view.f_add_(&prod).map_err(tch_err)?;
        Ok(())
    }

    fn bmm(
        &self,
        alpha: f32,
        a: &TchTensor,
        trans_a: Transpose,
        b: &TchTensor,
        trans_b: Transpose,
        beta: f32,
        c: &mut TchTensor,
    ) -> Result<()> {
        check_bmm(a.shape(), trans_a, b.shape(), trans_b, c.shape())?;
        let op = |t: &TchTensor, tr: Transpose| -> Result<tch::Tensor> {
            match tr {
                Transpose::No => Ok(t.inner().shallow_clone()),
                Transpose::Yes => t.inner().f_transpose(1, 2).map_err(tch_err),
            }
        };
        let (x, y) = (op(a, trans_a)?, op(b, trans_b)?);
        if beta == 0.0 {
            let mut prod = x.f_bmm(&y).map_err(tch_err)?;
            if alpha != 1.0 {
                prod = prod.f_mul_scalar(f64::from(alpha)).map_err(tch_err)?;
            }
            *c = self.wrap(Ok(prod))?;
            return Ok(());
        }
        let mut prod = x.f_bmm(&y).map_err(tch_err)?;
        if alpha != 1.0 {
            prod = prod.f_mul_scalar(f64::from(alpha)).map_err(tch_err)?;
        }
        let out = c.make_mut()?;
        if beta != 1.0 {
            let _ = out.f_mul_scalar_(f64::from(beta)).map_err(tch_err)?;
        }
        let _ = out.f_add_(&prod).map_err(tch_err)?;
        Ok(())
    }

    fn permute(&self, a: &TchTensor, perm: &[usize]) -> Result<TchTensor> {
        check_permute(a.shape(), perm)?;
        let p: Vec<i64> = perm.iter().map(|&v| v as i64).collect();
        self.wrap(
            a.inner()
                .f_permute(p.as_slice())
                .and_then(|t| t.f_contiguous()),
        )
    }

    fn softmax(&self, x: &TchTensor, mask_bias: Option<&TchTensor>) -> Result<TchTensor> {
        let (batch, _, n) = check_softmax_mask(x.shape(), mask_bias.map(|m| m.shape()))?;
        let input = match mask_bias {
            None => x.inner().shallow_clone(),
            Some(m) => {
                // [batch, 1, ..., 1, n] broadcasts over the middle axes.
                let mut dims = vec![batch as i64];
                dims.extend(std::iter::repeat_n(1i64, x.shape().rank() - 2));
                dims.push(n as i64);
                let m = m.inner().f_reshape(dims.as_slice()).map_err(tch_err)?;
                x.inner().f_add(&m).map_err(tch_err)?
            }
        };
        self.wrap(input.f_softmax(-1, Kind::Float))
    }

    fn softmax_backward(&self, y: &TchTensor, dy: &TchTensor) -> Result<TchTensor> {
        check_same_shape("softmax backward", y.shape(), dy.shape())?;
        let (y, g) = (y.inner(), dy.inner());
        let dot = g
            .f_mul(y)
            .and_then(|p| p.f_sum_dim_intlist([-1i64].as_slice(), true, Kind::Float))
            .map_err(tch_err)?;
        self.wrap(g.f_sub(&dot).and_then(|d| d.f_mul(y)))
    }

    fn layer_norm(
        &self,
        x: &TchTensor,
        gamma: &TchTensor,
        beta: &TchTensor,
        eps: f32,
    ) -> Result<(TchTensor, TchTensor)> {
        let (rows, n) = check_layer_norm(x.shape(), gamma.shape(), beta.shape())?;
        let m = Self::matrix(x)?;
        let (y, mean, rstd) = m
            .f_native_layer_norm(
                [n as i64].as_slice(),
                Some(gamma.inner()),
                Some(beta.inner()),
                f64::from(eps),
            )
            .map_err(tch_err)?;
        let stats = tch::Tensor::f_cat(
            &[
                mean.f_reshape([rows as i64, 1]).map_err(tch_err)?,
                rstd.f_reshape([rows as i64, 1]).map_err(tch_err)?,
            ],
            1,
        )
        .map_err(tch_err)?;
        Ok((
            self.wrap(y.f_reshape(Self::shape_i64(x.shape().dims())))?,
            self.wrap(Ok(stats))?,
        ))
    }

    fn layer_norm_backward(
        &self,
        x: &TchTensor,
        stats: &TchTensor,
        gamma: &TchTensor,
        dy: &TchTensor,
    ) -> Result<TchTensor> {
        check_layer_norm_backward(x.shape(), stats.shape(), gamma.shape(), dy.shape())?;
        let st = stats.inner();
        let mean = st.f_narrow(1, 0, 1).map_err(tch_err)?;
        let rstd = st.f_narrow(1, 1, 1).map_err(tch_err)?;
        let (m, g) = (Self::matrix(x)?, Self::matrix(dy)?);
        let gd = g.f_mul(gamma.inner()).map_err(tch_err)?;
        let xhat = m
            .f_sub(&mean)
            .and_then(|d| d.f_mul(&rstd))
            .map_err(tch_err)?;
        let m1 = gd
            .f_mean_dim([1i64].as_slice(), true, Kind::Float)
            .map_err(tch_err)?;
        let m2 = gd
            .f_mul(&xhat)
            .and_then(|p| p.f_mean_dim([1i64].as_slice(), true, Kind::Float))
            .map_err(tch_err)?;
        let dx = gd
            .f_sub(&m1)
            .and_then(|d| d.f_sub(&xhat.f_mul(&m2)?))
            .and_then(|d| d.f_mul(&rstd))
            .map_err(tch_err)?;
        self.wrap(dx.f_reshape(Self::shape_i64(x.shape().dims())))
    }

    fn binary(&self, op: BinaryOp, a: &TchTensor, b: &TchTensor) -> Result<TchTensor> {
        check_same_shape(&format!("{op:?}"), a.shape(), b.shape())?;
        let (x, y) = (a.inner(), b.inner());
        self.wrap(match op {
            BinaryOp::Add => x.f_add(y),
            BinaryOp::Sub => x.f_sub(y),
            BinaryOp::Mul => x.f_mul(y),
            BinaryOp::Div => x.f_div(y),
        })
    }

    fn unary(&self, op: UnaryOp, a: &TchTensor) -> Result<TchTensor> {
        let x = a.inner();
        self.wrap(match op {
            UnaryOp::Relu => x.f_relu(),
            UnaryOp::Gelu => x.f_gelu("none"),
            UnaryOp::Tanh => x.f_tanh(),
            UnaryOp::Sqrt => x.f_sqrt(),
            UnaryOp::Square => x.f_square(),
        })
    }

    fn unary_backward(&self, op: UnaryOp, x: &TchTensor, dy: &TchTensor) -> Result<TchTensor> {
        check_same_shape(&format!("{op:?} backward"), x.shape(), dy.shape())?;
        let (x, g) = (x.inner(), dy.inner());
        self.wrap(match op {
            UnaryOp::Relu => x
                .f_gt(0.0)
                .and_then(|m| m.f_to_kind(Kind::Float))
                .and_then(|m| g.f_mul(&m)),
            // tch binds `self` to the input and the argument to the output gradient.
            UnaryOp::Gelu => x.f_gelu_backward(g, "none"),
            UnaryOp::Tanh => x
                .f_tanh()
                .and_then(|t| t.f_square())
                .and_then(|t2| t2.f_mul_scalar(-1.0))
                .and_then(|t| t.f_add_scalar(1.0))
                .and_then(|d| g.f_mul(&d)),
            UnaryOp::Sqrt | UnaryOp::Square => {
                return Err(Error::Backend {
                    backend: "tch",
                    reason: format!("unary_backward is defined for activations only, not {op:?}"),
                });
            }
        })
    }

    fn axpby(&self, alpha: f32, x: &TchTensor, beta: f32, y: &mut TchTensor) -> Result<()> {
        check_same_shape("axpby", y.shape(), x.shape())?;
        let ax = x.inner().f_mul_scalar(f64::from(alpha)).map_err(tch_err)?;
        let yt = y.make_mut()?;
        if beta != 1.0 {
            let _ = yt.f_mul_scalar_(f64::from(beta)).map_err(tch_err)?;
        }
        let _ = yt.f_add_(&ax).map_err(tch_err)?;
        Ok(())
    }

    fn affine(&self, a: &TchTensor, mul: f32, add: f32) -> Result<TchTensor> {
        self.wrap(
            a.inner()
                .f_mul_scalar(f64::from(mul))
                .and_then(|t| t.f_add_scalar(f64::from(add))),
        )
    }

    fn add_row_broadcast(&self, a: &mut TchTensor, row: &TchTensor) -> Result<()> {
        let cols = check_row_broadcast(a.shape(), row.shape())?;
        let r = row.inner().f_reshape([cols as i64]).map_err(tch_err)?;
        let _ = a.make_mut()?.f_add_(&r).map_err(tch_err)?;
        Ok(())
    }

    fn gather_rows(&self, a: &TchTensor, rows: &[usize]) -> Result<TchTensor> {
        let (n, _) = a.shape().as_matrix();
        check_rows("gather_rows", n, rows, false)?;
        let idx = self.row_index(rows)?;
        self.wrap(Self::matrix(a)?.f_index_select(0, &idx))
    }

    fn scatter_add_rows(&self, dst: &mut TchTensor, rows: &[usize], src: &TchTensor) -> Result<()> {
        let (n, cols) = check_scatter_add(dst.shape(), rows, src.shape())?;
        let idx = self.row_index(rows)?;
        let s = Self::matrix(src)?;
        let mut view = dst
            .make_mut()?
            .f_view([n as i64, cols as i64])
            .map_err(tch_err)?;
        let _ = view.f_index_add_(0, &idx, &s).map_err(tch_err)?;
        Ok(())
    }

    fn slice_cols(&self, a: &TchTensor, start: usize, len: usize) -> Result<TchTensor> {
        check_col_range("slice_cols", a.shape(), start, len)?;
        let m = Self::matrix(a)?;
        self.wrap(
            m.f_narrow(1, start as i64, len as i64)
                .and_then(|v| v.f_contiguous()),
        )
    }

    fn assign_cols(&self, dst: &mut TchTensor, start: usize, src: &TchTensor) -> Result<()> {
        let (rows, cols, len) = check_assign_cols(dst.shape(), start, src.shape())?;
        let s = Self::matrix(src)?;
        let view = dst
            .make_mut()?
            .f_view([rows as i64, cols as i64])
            .map_err(tch_err)?;
        let mut part = view
            .f_narrow(1, start as i64, len as i64)
            .map_err(tch_err)?;
        part.f_copy_(&s).map_err(tch_err)?;
        Ok(())
    }

    fn sum_rows(&self, a: &TchTensor) -> Result<TchTensor> {
        self.wrap(Self::matrix(a)?.f_sum_dim_intlist([0i64].as_slice(), false, Kind::Float))
    }

    fn sum_cols(&self, a: &TchTensor) -> Result<TchTensor> {
        self.wrap(Self::matrix(a)?.f_sum_dim_intlist([1i64].as_slice(), false, Kind::Float))
    }

    fn sum_all(&self, a: &TchTensor) -> Result<f64> {
        a.inner()
            .f_sum(Kind::Double)
            .and_then(|s| s.f_double_value(&[]))
            .map_err(tch_err)
    }

    fn max_abs(&self, a: &TchTensor) -> Result<f32> {
        if a.numel() == 0 {
            return Ok(0.0);
        }
        let v = a
            .inner()
            .f_abs()
            .and_then(|t| t.f_max())
            .and_then(|t| t.f_double_value(&[]))
            .map_err(tch_err)?;
        Ok(v as f32)
    }

    fn all_finite(&self, a: &TchTensor) -> Result<bool> {
        let v = a
            .inner()
            .f_isfinite()
            .and_then(|t| t.f_all())
            .and_then(|t| t.f_int64_value(&[]))
            .map_err(tch_err)?;
        Ok(v != 0)
    }
}

/// The LoRA forward and backward as libtorch `mm` / fused `addmm_` calls straight into the
/// output and input-gradient buffers (`y += (s·H) Bᵀ`, `dx += (s·G B) A`).
/// Optimizer steps: the reference defaults (torch's fused Adam would need its own state
/// layout; the adapter tensors are small).
impl OptimOps for Tch {}

/// The host default: libtorch has no kernel for bitsandbytes' packed 4-bit layout.
impl lora_quant::QuantOps for Tch {}

/// Decoder-LLM operations: lora-core's defaults over the libtorch primitives.
impl lora_core::DecoderOps for Tch {}
