//! The core `Backend` primitives for [`Cuda`]: host transfers, cuBLAS products, elementwise
//! ops, row and column moves, reductions, softmax, LayerNorm and the dropout mask.

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use lora_core::backend::{
    check_assign_cols, check_bmm, check_col_range, check_gemm, check_host_len, check_layer_norm,
    check_layer_norm_backward, check_permute, check_reshape, check_row_broadcast, check_rows,
    check_same_shape, check_scatter_add, check_softmax_mask,
};
use lora_core::{Backend, BinaryOp, Result, Tensor, Transpose, UnaryOp};

use crate::device::{Cuda, backend_err};
use crate::launch::{THREADS, elems, launch, rows_cfg};
use crate::tensor::CudaTensor;

fn op(t: Transpose) -> cublasOperation_t {
    match t {
        Transpose::No => cublasOperation_t::CUBLAS_OP_N,
        Transpose::Yes => cublasOperation_t::CUBLAS_OP_T,
    }
}

impl Cuda {
    /// `c = beta · c` for a product over an empty inner dimension, without cuBLAS: an
    /// operand with no columns has a leading dimension of 0, which cuBLAS refuses
    /// (`CUBLAS_STATUS_INVALID_VALUE`, seen on an H200). `beta == 0` writes zeros, as a
    /// product with `beta == 0` never reads `c`.
    fn scale_empty_product(&self, beta: f32, c: &mut CudaTensor) -> Result<()> {
        *c = if beta == 0.0 {
            self.zeros(c.shape().dims())?
        } else {
            self.affine(c, beta, 0.0)?
        };
        Ok(())
    }

    /// Per-block partials of a reduction (`mode`: 0 sum, 1 max |x|, 2 non-finite count).
    fn reduce(&self, a: &CudaTensor, mode: i32) -> Result<Vec<f64>> {
        let n = a.numel();
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(THREADS as usize).clamp(1, 1024) as u32, 1, 1),
            ..elems(n)
        };
        let mut partial = self
            .inner
            .stream
            .alloc_zeros::<f64>(cfg.grid_dim.0 as usize)
            .map_err(|e| backend_err(e.to_string()))?;
        let n64 = n as u64;
        launch!(
            self,
            "reduce_partial",
            cfg,
            &mode,
            &*a.data,
            &mut partial,
            &n64
        );
        self.inner
            .stream
            .clone_dtoh(&partial)
            .map_err(|e| backend_err(format!("device to host copy: {e}")))
    }
}

impl Backend for Cuda {
    type Tensor = CudaTensor;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn device(&self) -> String {
        format!(
            "{} (CUDA device {})",
            self.inner.device_name,
            self.inner.ctx.ordinal()
        )
    }

    fn synchronize(&self) -> Result<()> {
        self.inner
            .stream
            .synchronize()
            .map_err(|e| backend_err(e.to_string()))
    }

    fn from_host(&self, data: &[f32], shape: &[usize]) -> Result<CudaTensor> {
        check_host_len(data.len(), shape)?;
        let slice = if data.is_empty() {
            self.alloc(0)?
        } else {
            self.upload(data)?
        };
        Ok(CudaTensor::new(slice, shape))
    }

    fn to_host(&self, t: &CudaTensor) -> Result<Vec<f32>> {
        let mut v = self
            .inner
            .stream
            .clone_dtoh(&*t.data)
            .map_err(|e| backend_err(format!("device to host copy: {e}")))?;
        v.truncate(t.numel());
        Ok(v)
    }

    fn zeros(&self, shape: &[usize]) -> Result<CudaTensor> {
        Ok(CudaTensor::new(self.alloc(shape.iter().product())?, shape))
    }

    fn reshape(&self, t: &CudaTensor, shape: &[usize]) -> Result<CudaTensor> {
        check_reshape(t.shape(), shape)?;
        Ok(CudaTensor {
            data: t.data.clone(),
            shape: lora_core::Shape::new(shape),
        })
    }

    fn gemm(
        &self,
        alpha: f32,
        a: &CudaTensor,
        trans_a: Transpose,
        b: &CudaTensor,
        trans_b: Transpose,
        beta: f32,
        c: &mut CudaTensor,
    ) -> Result<()> {
        let (m, n, k) = check_gemm(a.shape(), trans_a, b.shape(), trans_b, c.shape())?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        if k == 0 {
            return self.scale_empty_product(beta, c);
        }
        // Row-major C = op(A) op(B) is column-major Cᵀ = op(B)ᵀ op(A)ᵀ: swap the operands.
        let cfg = GemmConfig {
            transa: op(trans_b),
            transb: op(trans_a),
            m: n as i32,
            n: m as i32,
            k: k as i32,
            alpha,
            lda: b.shape().as_matrix().1 as i32,
            ldb: a.shape().as_matrix().1 as i32,
            beta,
            ldc: n as i32,
        };
        let (a_data, b_data) = (a.data.clone(), b.data.clone());
        // SAFETY: check_gemm matched m, n, k to the buffers; leading dimensions are the
        // stored row lengths; c is exclusively borrowed (copied first if shared).
        unsafe { self.inner.blas.gemm(cfg, &*b_data, &*a_data, c.make_mut()) }
            .map_err(|e| backend_err(format!("cuBLAS sgemm: {e}")))
    }

    fn bmm(
        &self,
        alpha: f32,
        a: &CudaTensor,
        trans_a: Transpose,
        b: &CudaTensor,
        trans_b: Transpose,
        beta: f32,
        c: &mut CudaTensor,
    ) -> Result<()> {
        let (batch, m, n, k) = check_bmm(a.shape(), trans_a, b.shape(), trans_b, c.shape())?;
        if batch == 0 || m == 0 || n == 0 {
            return Ok(());
        }
        if k == 0 {
            return self.scale_empty_product(beta, c);
        }
        let (ad, bd) = (a.shape().dims(), b.shape().dims());
        let cfg = StridedBatchedConfig {
            gemm: GemmConfig {
                transa: op(trans_b),
                transb: op(trans_a),
                m: n as i32,
                n: m as i32,
                k: k as i32,
                alpha,
                lda: bd[2] as i32,
                ldb: ad[2] as i32,
                beta,
                ldc: n as i32,
            },
            batch_size: batch as i32,
            stride_a: (bd[1] * bd[2]) as i64,
            stride_b: (ad[1] * ad[2]) as i64,
            stride_c: (m * n) as i64,
        };
        let (a_data, b_data) = (a.data.clone(), b.data.clone());
        // SAFETY: as in gemm, per batch item, with strides equal to the stored slab sizes.
        unsafe {
            self.inner
                .blas
                .gemm_strided_batched(cfg, &*b_data, &*a_data, c.make_mut())
        }
        .map_err(|e| backend_err(format!("cuBLAS sgemm strided batched: {e}")))
    }

    fn permute(&self, a: &CudaTensor, perm: &[usize]) -> Result<CudaTensor> {
        let out_dims = check_permute(a.shape(), perm)?;
        let rank = perm.len();
        if rank > 6 {
            return Err(backend_err(format!(
                "permute supports rank <= 6, got {rank}"
            )));
        }
        let dims = a.shape().dims();
        let mut strides = vec![1u64; rank];
        for i in (0..rank.saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * dims[i + 1] as u64;
        }
        let mut meta = vec![0u64; 13];
        meta[0] = rank as u64;
        for ax in 0..rank {
            meta[1 + ax] = out_dims[ax] as u64;
            meta[7 + ax] = strides[perm[ax]];
        }
        let meta = self.upload(&meta)?;
        let n = a.numel();
        let mut out = self.alloc(n)?;
        let n64 = n as u64;
        launch!(self, "permute", elems(n), &*a.data, &mut out, &meta, &n64);
        Ok(CudaTensor::new(out, &out_dims))
    }

    fn softmax(&self, x: &CudaTensor, mask_bias: Option<&CudaTensor>) -> Result<CudaTensor> {
        let (_, rows_per_batch, n) = check_softmax_mask(x.shape(), mask_bias.map(|m| m.shape()))?;
        let rows = x.numel() / n;
        let mut out = self.alloc(x.numel())?;
        let (rows64, n64, rpb) = (rows as u64, n as u64, rows_per_batch.max(1) as u64);
        match mask_bias {
            Some(m) => launch!(
                self,
                "softmax_rows",
                rows_cfg(rows),
                &*x.data,
                &*m.data,
                &mut out,
                &rows64,
                &n64,
                &rpb
            ),
            None => {
                let null = 0u64;
                launch!(
                    self,
                    "softmax_rows",
                    rows_cfg(rows),
                    &*x.data,
                    &null,
                    &mut out,
                    &rows64,
                    &n64,
                    &rpb
                )
            }
        }
        Ok(CudaTensor::new(out, x.shape().dims()))
    }

    fn softmax_backward(&self, y: &CudaTensor, dy: &CudaTensor) -> Result<CudaTensor> {
        check_same_shape("softmax backward", y.shape(), dy.shape())?;
        let n = y.shape().last().max(1);
        let rows = y.numel() / n;
        let mut out = self.alloc(y.numel())?;
        let (rows64, n64) = (rows as u64, n as u64);
        launch!(
            self,
            "softmax_backward",
            rows_cfg(rows),
            &*y.data,
            &*dy.data,
            &mut out,
            &rows64,
            &n64
        );
        Ok(CudaTensor::new(out, y.shape().dims()))
    }

    fn layer_norm(
        &self,
        x: &CudaTensor,
        gamma: &CudaTensor,
        beta: &CudaTensor,
        eps: f32,
    ) -> Result<(CudaTensor, CudaTensor)> {
        let (rows, n) = check_layer_norm(x.shape(), gamma.shape(), beta.shape())?;
        let mut out = self.alloc(x.numel())?;
        let mut stats = self.alloc(rows * 2)?;
        let (rows64, n64) = (rows as u64, n as u64);
        launch!(
            self,
            "layer_norm",
            rows_cfg(rows),
            &*x.data,
            &*gamma.data,
            &*beta.data,
            &mut out,
            &mut stats,
            &rows64,
            &n64,
            &eps
        );
        Ok((
            CudaTensor::new(out, x.shape().dims()),
            CudaTensor::new(stats, &[rows, 2]),
        ))
    }

    fn layer_norm_backward(
        &self,
        x: &CudaTensor,
        stats: &CudaTensor,
        gamma: &CudaTensor,
        dy: &CudaTensor,
    ) -> Result<CudaTensor> {
        let (rows, n) =
            check_layer_norm_backward(x.shape(), stats.shape(), gamma.shape(), dy.shape())?;
        let mut out = self.alloc(x.numel())?;
        let (rows64, n64) = (rows as u64, n as u64);
        launch!(
            self,
            "layer_norm_backward",
            rows_cfg(rows),
            &*x.data,
            &*stats.data,
            &*gamma.data,
            &*dy.data,
            &mut out,
            &rows64,
            &n64
        );
        Ok(CudaTensor::new(out, x.shape().dims()))
    }

    fn binary(&self, op: BinaryOp, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        check_same_shape(&format!("{op:?}"), a.shape(), b.shape())?;
        let code: i32 = match op {
            BinaryOp::Add => 0,
            BinaryOp::Sub => 1,
            BinaryOp::Mul => 2,
            BinaryOp::Div => 3,
        };
        let n = a.numel();
        let mut out = self.alloc(n)?;
        let n64 = n as u64;
        launch!(
            self,
            "binary_op",
            elems(n),
            &code,
            &*a.data,
            &*b.data,
            &mut out,
            &n64
        );
        Ok(CudaTensor::new(out, a.shape().dims()))
    }

    fn unary(&self, op: UnaryOp, a: &CudaTensor) -> Result<CudaTensor> {
        let code: i32 = match op {
            UnaryOp::Relu => 0,
            UnaryOp::Gelu => 1,
            UnaryOp::Tanh => 2,
            UnaryOp::Sqrt => 3,
            UnaryOp::Square => 4,
        };
        let n = a.numel();
        let mut out = self.alloc(n)?;
        let n64 = n as u64;
        launch!(self, "unary_op", elems(n), &code, &*a.data, &mut out, &n64);
        Ok(CudaTensor::new(out, a.shape().dims()))
    }

    fn unary_backward(&self, op: UnaryOp, x: &CudaTensor, dy: &CudaTensor) -> Result<CudaTensor> {
        check_same_shape(&format!("{op:?} backward"), x.shape(), dy.shape())?;
        let code: i32 = match op {
            UnaryOp::Relu => 0,
            UnaryOp::Gelu => 1,
            UnaryOp::Tanh => 2,
            UnaryOp::Sqrt | UnaryOp::Square => {
                return Err(backend_err(format!(
                    "unary_backward is defined for activations only, not {op:?}"
                )));
            }
        };
        let n = x.numel();
        let mut out = self.alloc(n)?;
        let n64 = n as u64;
        launch!(
            self,
            "unary_backward",
            elems(n),
            &code,
            &*x.data,
            &*dy.data,
            &mut out,
            &n64
        );
        Ok(CudaTensor::new(out, x.shape().dims()))
    }

    fn axpby(&self, alpha: f32, x: &CudaTensor, beta: f32, y: &mut CudaTensor) -> Result<()> {
        check_same_shape("axpby", x.shape(), y.shape())?;
        let n64 = x.numel() as u64;
        let xd = x.data.clone();
        launch!(
            self,
            "axpby",
            elems(x.numel()),
            &alpha,
            &*xd,
            &beta,
            y.make_mut(),
            &n64
        );
        Ok(())
    }

    fn affine(&self, a: &CudaTensor, mul: f32, add: f32) -> Result<CudaTensor> {
        let n = a.numel();
        let mut out = self.alloc(n)?;
        let n64 = n as u64;
        launch!(
            self,
            "affine",
            elems(n),
            &*a.data,
            &mul,
            &add,
            &mut out,
            &n64
        );
        Ok(CudaTensor::new(out, a.shape().dims()))
    }

    fn add_row_broadcast(&self, a: &mut CudaTensor, row: &CudaTensor) -> Result<()> {
        let cols = check_row_broadcast(a.shape(), row.shape())?;
        let rows = a.numel() / cols.max(1);
        let (r64, c64) = (rows as u64, cols as u64);
        let rd = row.data.clone();
        let cfg = elems(a.numel());
        launch!(
            self,
            "add_row_broadcast",
            cfg,
            a.make_mut(),
            &*rd,
            &r64,
            &c64
        );
        Ok(())
    }

    fn gather_rows(&self, a: &CudaTensor, rows: &[usize]) -> Result<CudaTensor> {
        let (n, cols) = a.shape().as_matrix();
        check_rows("gather_rows", n, rows, false)?;
        let idx = self.indices(rows)?;
        let mut out = self.alloc(rows.len() * cols)?;
        let (n64, c64) = (rows.len() as u64, cols as u64);
        launch!(
            self,
            "gather_rows",
            elems(rows.len() * cols),
            &*a.data,
            &idx,
            &mut out,
            &n64,
            &c64
        );
        Ok(CudaTensor::new(out, &[rows.len(), cols]))
    }

    fn scatter_add_rows(
        &self,
        dst: &mut CudaTensor,
        rows: &[usize],
        src: &CudaTensor,
    ) -> Result<()> {
        let (_, cols) = check_scatter_add(dst.shape(), rows, src.shape())?;
        let idx = self.indices(rows)?;
        let (n64, c64) = (rows.len() as u64, cols as u64);
        let sd = src.data.clone();
        launch!(
            self,
            "scatter_add_rows",
            elems(rows.len() * cols),
            dst.make_mut(),
            &idx,
            &*sd,
            &n64,
            &c64
        );
        Ok(())
    }

    fn slice_cols(&self, a: &CudaTensor, start: usize, len: usize) -> Result<CudaTensor> {
        let (rows, cols) = check_col_range("slice_cols", a.shape(), start, len)?;
        let mut out = self.alloc(rows * len)?;
        let (r, c, s, l) = (rows as u64, cols as u64, start as u64, len as u64);
        launch!(
            self,
            "slice_cols",
            elems(rows * len),
            &*a.data,
            &mut out,
            &r,
            &c,
            &s,
            &l
        );
        Ok(CudaTensor::new(out, &[rows, len]))
    }

    fn assign_cols(&self, dst: &mut CudaTensor, start: usize, src: &CudaTensor) -> Result<()> {
        let (rows, cols, len) = check_assign_cols(dst.shape(), start, src.shape())?;
        let (r, c, s, l) = (rows as u64, cols as u64, start as u64, len as u64);
        let sd = src.data.clone();
        launch!(
            self,
            "assign_cols",
            elems(rows * len),
            dst.make_mut(),
            &*sd,
            &r,
            &c,
            &s,
            &l
        );
        Ok(())
    }

    fn sum_rows(&self, a: &CudaTensor) -> Result<CudaTensor> {
        let (rows, cols) = a.shape().as_matrix();
        let mut out = self.alloc(cols)?;
        let (r, c) = (rows as u64, cols as u64);
        launch!(self, "sum_rows", elems(cols), &*a.data, &mut out, &r, &c);
        Ok(CudaTensor::new(out, &[cols]))
    }

    fn sum_cols(&self, a: &CudaTensor) -> Result<CudaTensor> {
        let (rows, cols) = a.shape().as_matrix();
        let mut out = self.alloc(rows)?;
        let (r, c) = (rows as u64, cols as u64);
        launch!(self, "sum_cols", rows_cfg(rows), &*a.data, &mut out, &r, &c);
        Ok(CudaTensor::new(out, &[rows]))
    }

    fn sum_all(&self, a: &CudaTensor) -> Result<f64> {
        Ok(self.reduce(a, 0)?.iter().sum())
    }

    fn max_abs(&self, a: &CudaTensor) -> Result<f32> {
        let p = self.reduce(a, 1)?;
        Ok(if p.iter().any(|v| v.is_nan()) {
            f32::NAN
        } else {
            p.iter().fold(0.0f64, |m, &v| m.max(v)) as f32
        })
    }

    fn all_finite(&self, a: &CudaTensor) -> Result<bool> {
        Ok(self.reduce(a, 2)?.iter().sum::<f64>() == 0.0)
    }

    fn dropout_mask(
        &self,
        shape: &[usize],
        p: f32,
        rng: lora_core::rng::RngState,
    ) -> Result<CudaTensor> {
        let n = shape.iter().product::<usize>();
        let mut out = self.alloc(n)?;
        let n64 = n as u64;
        launch!(
            self,
            "dropout_mask",
            elems(n),
            &mut out,
            &n64,
            &rng.seed,
            &rng.stream,
            &rng.offset,
            &p
        );
        Ok(CudaTensor::new(out, shape))
    }
}
