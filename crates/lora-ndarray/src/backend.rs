//! The `ndarray` backend: the reference every other backend is checked against.

use lora_core::backend::{
    Product, check_assign_cols, check_col_range, check_host_len, check_permute, check_reshape,
    check_row_broadcast, check_rows, check_same_shape, check_scatter_add, check_softmax_mask,
};
use lora_core::{Backend, BinaryOp, Error, OptimOps, Result, Tensor, Transpose, UnaryOp};
use lora_quant::{QuantOps, QuantizedWeight, check_row_range, dequantize_rows_into};
use ndarray::Axis;
use rayon::prelude::*;

use crate::gemm::{self, bmm_into, gemm_into, gemm_new, gemm_plus_act_new, gemm_plus_new};
use crate::norm;
use crate::pool;
use crate::tensor::NdTensor;
use crate::vectorize;

/// The pure-Rust CPU backend. Cheap to clone; GEMMs use rayon's global pool.
#[derive(Clone, Copy, Debug, Default)]
pub struct NdArray;

impl NdArray {
    /// The backend handle.
    pub fn new() -> Self {
        NdArray
    }
}

/// Elementwise work below this many elements stays on one thread (the fork costs more).
pub(crate) const PAR_MIN_ELEMS: usize = 1 << 15;
/// Elements per parallel task.
pub(crate) const PAR_CHUNK: usize = 1 << 13;

/// `out[i] = f(a[i])`, split across threads for large tensors.
fn map1(a: &NdTensor, f: impl Fn(f32) -> f32 + Sync) -> Result<NdTensor> {
    let src = a.as_slice();
    let mut out = pool::take_for_overwrite(src.len());
    if src.len() < PAR_MIN_ELEMS {
        out.iter_mut().zip(src).for_each(|(o, &x)| *o = f(x));
    } else {
        out.par_chunks_mut(PAR_CHUNK)
            .zip(src.par_chunks(PAR_CHUNK))
            .for_each(|(o, x)| o.iter_mut().zip(x).for_each(|(o, &x)| *o = f(x)));
    }
    NdTensor::from_vec(out, a.shape().dims())
}

/// `out[i] = f(a[i], b[i])` (shapes checked by the caller).
fn map2(a: &NdTensor, b: &NdTensor, f: impl Fn(f32, f32) -> f32 + Sync) -> Result<NdTensor> {
    let (sa, sb) = (a.as_slice(), b.as_slice());
    let mut out = pool::take_for_overwrite(sa.len());
    if sa.len() < PAR_MIN_ELEMS {
        out.iter_mut()
            .zip(sa.iter().zip(sb))
            .for_each(|(o, (&x, &y))| *o = f(x, y));
    } else {
        out.par_chunks_mut(PAR_CHUNK)
            .zip(sa.par_chunks(PAR_CHUNK).zip(sb.par_chunks(PAR_CHUNK)))
            .for_each(|(o, (x, y))| {
                o.iter_mut()
                    .zip(x.iter().zip(y))
                    .for_each(|(o, (&x, &y))| *o = f(x, y))
            });
    }
    NdTensor::from_vec(out, a.shape().dims())
}

/// In place `y[i] = f(y[i], x[i])` (shapes checked by the caller).
fn update2(y: &mut NdTensor, x: &NdTensor, f: impl Fn(f32, f32) -> f32 + Sync) {
    let sx = x.as_slice();
    let sy = y.as_mut_slice();
    if sy.len() < PAR_MIN_ELEMS {
        sy.iter_mut().zip(sx).for_each(|(y, &x)| *y = f(*y, x));
    } else {
        sy.par_chunks_mut(PAR_CHUNK)
            .zip(sx.par_chunks(PAR_CHUNK))
            .for_each(|(y, x)| y.iter_mut().zip(x).for_each(|(y, &x)| *y = f(*y, x)));
    }
}

/// Sum over `axis` of the `[rows, cols]` matrix view.
fn sum_axis(a: &NdTensor, axis: usize) -> Result<NdTensor> {
    let (rows, cols) = a.shape().as_matrix();
    let m = a
        .array()
        .view()
        .into_shape_with_order((rows, cols))
        .map_err(|e| Error::Backend {
            backend: "ndarray",
            reason: e.to_string(),
        })?;
    Ok(NdTensor::from_array(m.sum_axis(Axis(axis)).into_dyn()))
}

impl Backend for NdArray {
    type Tensor = NdTensor;

    fn name(&self) -> &'static str {
        "ndarray"
    }

    fn device(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn from_host(&self, data: &[f32], shape: &[usize]) -> Result<NdTensor> {
        check_host_len(data.len(), shape)?;
        NdTensor::from_vec(pool::copy_of(data), shape)
    }

    #[allow(clippy::wrong_self_convention)]
    fn from_host_vec(&self, data: Vec<f32>, shape: &[usize]) -> Result<NdTensor> {
        NdTensor::from_vec(data, shape)
    }

    fn to_host(&self, t: &NdTensor) -> Result<Vec<f32>> {
        Ok(t.as_slice().to_vec())
    }

    fn zeros(&self, shape: &[usize]) -> Result<NdTensor> {
        NdTensor::from_vec(pool::zeros(shape.iter().product()), shape)
    }

    fn reshape(&self, t: &NdTensor, shape: &[usize]) -> Result<NdTensor> {
        check_reshape(t.shape(), shape)?;
        t.reshaped(shape)
    }

    fn gemm(
        &self,
        alpha: f32,
        a: &NdTensor,
        trans_a: Transpose,
        b: &NdTensor,
        trans_b: Transpose,
        beta: f32,
        c: &mut NdTensor,
    ) -> Result<()> {
        gemm_into(alpha, a, trans_a, b, trans_b, beta, c)
    }

    fn matmul(
        &self,
        alpha: f32,
        a: (&NdTensor, Transpose),
        b: (&NdTensor, Transpose),
        shape: &[usize],
    ) -> Result<NdTensor> {
        gemm_new(alpha, a, b, shape)
    }

    fn matmul_plus(
        &self,
        first: Product<'_, NdTensor>,
        second: Option<(f32, Product<'_, NdTensor>)>,
        bias: Option<&NdTensor>,
        shape: &[usize],
    ) -> Result<NdTensor> {
        if let Some(c) = gemm_plus_new(first, second, bias, shape)? {
            return Ok(c);
        }
        let mut c = gemm_new(1.0, first.0, first.1, shape)?;
        if let Some((scale, ((a2, ta2), (b2, tb2)))) = second {
            gemm_into(scale, a2, ta2, b2, tb2, 1.0, &mut c)?;
        }
        if let Some(bias) = bias {
            self.add_row_broadcast(&mut c, bias)?;
        }
        Ok(c)
    }

    fn matmul_plus_act(
        &self,
        first: Product<'_, NdTensor>,
        second: Option<(f32, Product<'_, NdTensor>)>,
        bias: Option<&NdTensor>,
        act: UnaryOp,
        shape: &[usize],
    ) -> Result<(NdTensor, NdTensor)> {
        // GELU, the one activation with a slice kernel, is applied inside our product.
        if act == UnaryOp::Gelu {
            let kernel: gemm::Activation = vectorize::gelu;
            if let Some((pre, Some(post))) =
                gemm_plus_act_new(first, second, bias, Some(kernel), shape)?
            {
                return Ok((pre, post));
            }
        }
        let pre = self.matmul_plus(first, second, bias, shape)?;
        let post = self.unary(act, &pre)?;
        Ok((pre, post))
    }

    fn fuses_matmul_plus(&self) -> bool {
        // Our kernel (AVX2 or AVX-512) packs the second product into the first's last
        // depth slice.
        crate::sgemm::available()
    }

    fn bmm(
        &self,
        alpha: f32,
        a: &NdTensor,
        trans_a: Transpose,
        b: &NdTensor,
        trans_b: Transpose,
        beta: f32,
        c: &mut NdTensor,
    ) -> Result<()> {
        bmm_into(alpha, a, trans_a, b, trans_b, beta, c)
    }

    fn permute(&self, a: &NdTensor, perm: &[usize]) -> Result<NdTensor> {
        let out_dims = check_permute(a.shape(), perm)?;
        if perm.last().is_some_and(|&l| l + 1 == perm.len()) {
            return crate::permute::permute_rows(a, perm, &out_dims);
        }
        let view = a.array().view().permuted_axes(perm.to_vec());
        Ok(NdTensor::from_array(view.as_standard_layout().into_owned()))
    }

    fn softmax(&self, x: &NdTensor, mask_bias: Option<&NdTensor>) -> Result<NdTensor> {
        let (_, rows_per_batch, n) = check_softmax_mask(x.shape(), mask_bias.map(|m| m.shape()))?;
        let mask = mask_bias.map(NdTensor::as_slice);
        let src = x.as_slice();
        let mut out = pool::take_for_overwrite(src.len());
        let work = |(r, o): (usize, &mut [f32])| {
            let row = &src[r * n..(r + 1) * n];
            let bias = mask.map(|m| &m[(r / rows_per_batch) * n..(r / rows_per_batch + 1) * n]);
            match bias {
                Some(bias) => o
                    .iter_mut()
                    .zip(row.iter().zip(bias))
                    .for_each(|(o, (x, b))| *o = x + b),
                None => o.copy_from_slice(row),
            }
            let max = o.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let inv = (1.0 / crate::vectorize::exp_in_place_sum(o, max)) as f32;
            o.iter_mut().for_each(|v| *v *= inv);
        };
        if src.len() < PAR_MIN_ELEMS {
            out.chunks_mut(n).enumerate().for_each(work);
        } else {
            out.par_chunks_mut(n).enumerate().for_each(work);
        }
        NdTensor::from_vec(out, x.shape().dims())
    }

    fn softmax_backward(&self, y: &NdTensor, dy: &NdTensor) -> Result<NdTensor> {
        check_same_shape("softmax backward", y.shape(), dy.shape())?;
        let n = y.shape().last().max(1);
        let (ys, gs) = (y.as_slice(), dy.as_slice());
        let mut out = pool::take_for_overwrite(ys.len());
        let work = |(r, o): (usize, &mut [f32])| {
            let (yr, gr) = (&ys[r * n..(r + 1) * n], &gs[r * n..(r + 1) * n]);
            let dot: f32 = yr.iter().zip(gr).map(|(y, g)| y * g).sum();
            o.iter_mut()
                .zip(yr.iter().zip(gr))
                .for_each(|(o, (y, g))| *o = y * (g - dot));
        };
        if ys.len() < PAR_MIN_ELEMS {
            out.chunks_mut(n).enumerate().for_each(work);
        } else {
            out.par_chunks_mut(n).enumerate().for_each(work);
        }
        NdTensor::from_vec(out, y.shape().dims())
    }

    fn layer_norm(
        &self,
        x: &NdTensor,
        gamma: &NdTensor,
        beta: &NdTensor,
        eps: f32,
    ) -> Result<(NdTensor, NdTensor)> {
        norm::layer_norm(x, gamma, beta, eps)
    }

    fn add_layer_norm(
        &self,
        x: &NdTensor,
        residual: &NdTensor,
        gamma: &NdTensor,
        beta: &NdTensor,
        eps: f32,
    ) -> Result<(NdTensor, NdTensor, NdTensor)> {
        norm::add_layer_norm(x, residual, (gamma, beta), eps)
    }

    fn layer_norm_backward(
        &self,
        x: &NdTensor,
        stats: &NdTensor,
        gamma: &NdTensor,
        dy: &NdTensor,
    ) -> Result<NdTensor> {
        norm::layer_norm_backward(x, stats, gamma, dy)
    }

    fn binary(&self, op: BinaryOp, a: &NdTensor, b: &NdTensor) -> Result<NdTensor> {
        check_same_shape(&format!("{op:?}"), a.shape(), b.shape())?;
        // One `map2` per operation (not a function pointer): each loop inlines its
        // operation and vectorizes; through a pointer, residual adds cost a call per element.
        match op {
            BinaryOp::Add => map2(a, b, |x, y| x + y),
            BinaryOp::Sub => map2(a, b, |x, y| x - y),
            BinaryOp::Mul => map2(a, b, |x, y| x * y),
            BinaryOp::Div => map2(a, b, |x, y| x / y),
        }
    }

    fn unary(&self, op: UnaryOp, a: &NdTensor) -> Result<NdTensor> {
        match op {
            UnaryOp::Gelu => {
                let x = a.as_slice();
                let y = vectorize::par_kernel(x, x, vectorize::gelu);
                NdTensor::from_vec(y, a.shape().dims())
            }
            UnaryOp::Relu => map1(a, |x| if x > 0.0 { x } else { 0.0 }),
            UnaryOp::Tanh => map1(a, f32::tanh),
            UnaryOp::Sqrt => map1(a, f32::sqrt),
            UnaryOp::Square => map1(a, |x| x * x),
        }
    }

    fn unary_backward(&self, op: UnaryOp, x: &NdTensor, dy: &NdTensor) -> Result<NdTensor> {
        check_same_shape(&format!("{op:?} backward"), x.shape(), dy.shape())?;
        match op {
            UnaryOp::Gelu => {
                let g =
                    vectorize::par_kernel(x.as_slice(), dy.as_slice(), vectorize::gelu_backward);
                NdTensor::from_vec(g, x.shape().dims())
            }
            UnaryOp::Relu => map2(x, dy, |x, g| if x > 0.0 { g } else { 0.0 }),
            UnaryOp::Tanh => map2(x, dy, |x, g| {
                let t = x.tanh();
                g * (1.0 - t * t)
            }),
            UnaryOp::Sqrt | UnaryOp::Square => Err(Error::Backend {
                backend: "ndarray",
                reason: format!("unary_backward is defined for activations only, not {op:?}"),
            }),
        }
    }

    fn axpby(&self, alpha: f32, x: &NdTensor, beta: f32, y: &mut NdTensor) -> Result<()> {
        check_same_shape("axpby", y.shape(), x.shape())?;
        update2(y, x, |yv, xv| alpha * xv + beta * yv);
        Ok(())
    }

    fn affine(&self, a: &NdTensor, mul: f32, add: f32) -> Result<NdTensor> {
        map1(a, |v| v * mul + add)
    }

    fn add_row_broadcast(&self, a: &mut NdTensor, row: &NdTensor) -> Result<()> {
        let cols = check_row_broadcast(a.shape(), row.shape())?;
        if cols == 0 {
            return Ok(());
        }
        let r = row.as_slice();
        for chunk in a.as_mut_slice().chunks_exact_mut(cols) {
            for (v, b) in chunk.iter_mut().zip(r) {
                *v += b;
            }
        }
        Ok(())
    }

    fn gather_rows(&self, a: &NdTensor, rows: &[usize]) -> Result<NdTensor> {
        let (n, cols) = a.shape().as_matrix();
        check_rows("gather_rows", n, rows, false)?;
        let src = a.as_slice();
        let mut out = pool::take_for_overwrite(rows.len() * cols);
        let copy = |(dst, &r): (&mut [f32], &usize)| {
            dst.copy_from_slice(&src[r * cols..(r + 1) * cols]);
        };
        // A model's token embeddings (`[tokens, hidden]` rows of the table) are a few MiB:
        // copied by one thread, they held 0.2% of a MiniLM training step's profile while
        // the other core idled.
        match out.len() < PAR_MIN_ELEMS {
            true => out.chunks_exact_mut(cols.max(1)).zip(rows).for_each(copy),
            false => (out.par_chunks_exact_mut(cols).zip(rows)).for_each(copy),
        }
        NdTensor::from_vec(out, &[rows.len(), cols])
    }

    fn scatter_add_rows(&self, dst: &mut NdTensor, rows: &[usize], src: &NdTensor) -> Result<()> {
        let (_, cols) = check_scatter_add(dst.shape(), rows, src.shape())?;
        let s = src.as_slice();
        let d = dst.as_mut_slice();
        for (i, &r) in rows.iter().enumerate() {
            for (o, v) in d[r * cols..(r + 1) * cols]
                .iter_mut()
                .zip(&s[i * cols..(i + 1) * cols])
            {
                *o += v;
            }
        }
        Ok(())
    }

    fn slice_cols(&self, a: &NdTensor, start: usize, len: usize) -> Result<NdTensor> {
        let (rows, cols) = check_col_range("slice_cols", a.shape(), start, len)?;
        let src = a.as_slice();
        let mut out = pool::take_for_overwrite(rows * len);
        for (r, dst) in out.chunks_exact_mut(len.max(1)).enumerate() {
            dst.copy_from_slice(&src[r * cols + start..r * cols + start + len]);
        }
        NdTensor::from_vec(out, &[rows, len])
    }

    fn assign_cols(&self, dst: &mut NdTensor, start: usize, src: &NdTensor) -> Result<()> {
        let (rows, dst_cols, len) = check_assign_cols(dst.shape(), start, src.shape())?;
        let s = src.as_slice();
        let d = dst.as_mut_slice();
        for r in 0..rows {
            d[r * dst_cols + start..r * dst_cols + start + len]
                .copy_from_slice(&s[r * len..(r + 1) * len]);
        }
        Ok(())
    }

    fn sum_rows(&self, a: &NdTensor) -> Result<NdTensor> {
        sum_axis(a, 0)
    }

    fn sum_cols(&self, a: &NdTensor) -> Result<NdTensor> {
        sum_axis(a, 1)
    }

    fn sum_all(&self, a: &NdTensor) -> Result<f64> {
        Ok(a.as_slice().iter().map(|&v| f64::from(v)).sum())
    }

    fn max_abs(&self, a: &NdTensor) -> Result<f32> {
        Ok(a.as_slice().iter().fold(0.0f32, |m, &v| {
            if v.is_nan() || m.is_nan() {
                f32::NAN
            } else {
                m.max(v.abs())
            }
        }))
    }

    fn all_finite(&self, a: &NdTensor) -> Result<bool> {
        // Known when a kernel wrote it (LayerNorm, the fused GELU, attention) or an earlier
        // check looked (BERT's query, key and value check the same input).
        if let Some(known) = a.known_finite() {
            return Ok(known);
        }
        let s = a.as_slice();
        let finite = if s.len() < PAR_MIN_ELEMS {
            vectorize::all_finite(s)
        } else {
            s.par_chunks(PAR_CHUNK).all(vectorize::all_finite)
        };
        a.set_finite(finite);
        Ok(finite)
    }
}

/// The reference backend uses the default layer-level operations: they *are* the
/// reference semantics that fused kernels elsewhere are checked against.
impl OptimOps for NdArray {}

/// Dequantizes on the host like the default, but hands the buffer to the tensor without
/// the upload copy (host memory is this backend's device memory).
impl QuantOps for NdArray {
    fn dequantize_rows(
        &self,
        weight: &QuantizedWeight,
        row0: usize,
        rows: usize,
    ) -> Result<NdTensor> {
        // Into a pooled buffer: a step dequantizes the same blocks every time. The range
        // is checked before a buffer of that size is taken.
        check_row_range(weight, row0, rows)?;
        let mut buf = pool::take_for_overwrite(rows * weight.dims().1);
        dequantize_rows_into(weight, row0, &mut buf)?;
        NdTensor::from_vec(buf, &[rows, weight.dims().1])
    }
}
