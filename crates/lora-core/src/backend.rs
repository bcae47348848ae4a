//! The backend contract: device tensors and op-level primitives.
//!
//! A backend implements [`Backend`] (the primitives) and then opts into the layer-level
//! traits [`LoraOps`](crate::ops::LoraOps) and [`OptimOps`](crate::ops::OptimOps) with an
//! empty `impl` to take the default implementations, or overrides single methods with
//! fused kernels. This is burn's `ModuleOps` pattern.

use std::fmt::Debug;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::rng::RngState;
use crate::shape::Shape;

/// A tensor that lives on a backend's device.
pub trait Tensor: Clone + Debug + Send + Sync + 'static {
    /// Its shape.
    fn shape(&self) -> &Shape;
    /// Its storage type.
    fn dtype(&self) -> DType {
        DType::F32
    }
    /// Number of elements.
    fn numel(&self) -> usize {
        self.shape().numel()
    }
    /// Bytes of device memory held.
    fn size_in_bytes(&self) -> usize {
        self.numel() * self.dtype().size_in_bytes()
    }
}

/// Whether a GEMM operand is used as stored or transposed (in its matrix view).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transpose {
    /// Use as stored.
    No,
    /// Use transposed.
    Yes,
}

impl Transpose {
    /// The `(rows, cols)` of the operand after this transpose.
    pub fn apply(self, (rows, cols): (usize, usize)) -> (usize, usize) {
        match self {
            Transpose::No => (rows, cols),
            Transpose::Yes => (cols, rows),
        }
    }
}

/// Elementwise binary operations on two tensors of the same shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    /// `a + b`
    Add,
    /// `a - b`
    Sub,
    /// `a * b`
    Mul,
    /// `a / b`
    Div,
}

/// Elementwise unary operations; the activations also have a backward
/// ([`Backend::unary_backward`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnaryOp {
    /// `max(x, 0)`
    Relu,
    /// GELU, exact (erf) form, as `torch.nn.GELU()` and BERT use.
    Gelu,
    /// `tanh(x)`
    Tanh,
    /// `sqrt(x)`
    Sqrt,
    /// `x * x`
    Square,
}

/// The two factors of a matrix product, each a tensor and whether it enters transposed.
pub type Product<'a, T> = ((&'a T, Transpose), (&'a T, Transpose));

/// Op-level primitives every backend supplies. Everything else (LoRA forward and backward,
/// optimizer steps, losses, layers) is written once over these.
///
/// Conventions shared by all methods:
/// * f32 compute; tensors are dense and row-major.
/// * A GEMM operand is seen through its matrix view [`Shape::as_matrix`]: leading
///   dimensions flattened into rows, like `torch.nn.Linear` does.
/// * Errors name the operation and the shapes; no method panics on bad input.
pub trait Backend: Clone + Debug + Send + Sync + 'static {
    /// The device tensor type.
    type Tensor: Tensor;

    /// Short name: `ndarray`, `tch`, `cuda`.
    fn name(&self) -> &'static str;

    /// Human-readable device, e.g. `cpu (2 threads)`.
    fn device(&self) -> String;

    /// Waits until all queued work is done (a no-op on synchronous backends). Benchmarks
    /// call it before stopping the clock.
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    /// Copies host data into a new device tensor. `data.len()` must equal the shape's
    /// element count.
    // A backend method, not a constructor: the device (self) decides where data goes.
    #[allow(clippy::wrong_self_convention)]
    fn from_host(&self, data: &[f32], shape: &[usize]) -> Result<Self::Tensor>;

    /// Like [`Backend::from_host`], taking the buffer: a backend whose device memory is
    /// host memory (ndarray) keeps it without a copy, so loading a checkpoint does not
    /// hold every weight twice.
    #[allow(clippy::wrong_self_convention)]
    fn from_host_vec(&self, data: Vec<f32>, shape: &[usize]) -> Result<Self::Tensor> {
        self.from_host(&data, shape)
    }

    /// Copies a tensor to the host, row-major.
    fn to_host(&self, t: &Self::Tensor) -> Result<Vec<f32>>;

    /// A tensor of zeros.
    fn zeros(&self, shape: &[usize]) -> Result<Self::Tensor>;

    /// The same elements under a new shape with the same element count.
    fn reshape(&self, t: &Self::Tensor, shape: &[usize]) -> Result<Self::Tensor>;

    /// `c = alpha * op_a(a) op_b(b) + beta * c` on the matrix views. With `beta == 0`
    /// the old contents of `c` are ignored (NaN in `c` does not propagate).
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        alpha: f32,
        a: &Self::Tensor,
        trans_a: Transpose,
        b: &Self::Tensor,
        trans_b: Transpose,
        beta: f32,
        c: &mut Self::Tensor,
    ) -> Result<()>;

    /// A new tensor `alpha * op_a(a) op_b(b)` of shape `shape`, whose matrix view is the
    /// product's `[m, n]` (a linear layer's `[batch, seq, out]`, say). The default
    /// zero-fills and calls [`gemm`](Backend::gemm) with `beta = 0`; a backend may write
    /// the product straight into fresh memory and skip the fill.
    fn matmul(
        &self,
        alpha: f32,
        (a, trans_a): (&Self::Tensor, Transpose),
        (b, trans_b): (&Self::Tensor, Transpose),
        shape: &[usize],
    ) -> Result<Self::Tensor> {
        let mut c = self.zeros(shape)?;
        self.gemm(alpha, a, trans_a, b, trans_b, 0.0, &mut c)?;
        Ok(c)
    }

    /// A new tensor `op(a1) op(b1) [+ scale2 · op(a2) op(b2)] [+ bias]` of shape `shape`:
    /// a linear layer's product with, optionally, a second one of low depth into the same
    /// output (its LoRA term `s·(x Aᵀ) Bᵀ`, or `s·(dy B) A` in the backward) and a bias
    /// added to every row. The default runs the products one after the other (the second
    /// with `beta = 1`) and then adds the bias, each step a pass over the whole output; a
    /// backend may do all of it in one product over the concatenated depth, adding the
    /// bias as it stores the output.
    fn matmul_plus(
        &self,
        (a1, b1): Product<'_, Self::Tensor>,
        second: Option<(f32, Product<'_, Self::Tensor>)>,
        bias: Option<&Self::Tensor>,
        shape: &[usize],
    ) -> Result<Self::Tensor> {
        let mut c = self.matmul(1.0, a1, b1, shape)?;
        if let Some((scale, ((a2, ta2), (b2, tb2)))) = second {
            self.gemm(scale, a2, ta2, b2, tb2, 1.0, &mut c)?;
        }
        if let Some(bias) = bias {
            self.add_row_broadcast(&mut c, bias)?;
        }
        Ok(c)
    }

    /// [`matmul_plus`](Backend::matmul_plus) followed by an activation, returning both
    /// `(pre, act(pre))`: the activation's backward needs its input. The default runs the
    /// two steps (the activation a second pass over the whole output, read back from
    /// memory); a backend may apply it to each block of the output while the block is
    /// still in cache.
    fn matmul_plus_act(
        &self,
        first: Product<'_, Self::Tensor>,
        second: Option<(f32, Product<'_, Self::Tensor>)>,
        bias: Option<&Self::Tensor>,
        act: UnaryOp,
        shape: &[usize],
    ) -> Result<(Self::Tensor, Self::Tensor)> {
        let pre = self.matmul_plus(first, second, bias, shape)?;
        let post = self.unary(act, &pre)?;
        Ok((pre, post))
    }

    /// Whether [`matmul_plus`](Backend::matmul_plus) runs the second product inside the
    /// first (one pass over the output). Only then does a LoRA layer hand its adapter's
    /// term to the base's product; otherwise the adapter keeps the backend's own
    /// `lora_forward` / `lora_backward` (libtorch's `addmm_`, say), which the default
    /// `matmul_plus` would only reproduce more slowly.
    fn fuses_matmul_plus(&self) -> bool {
        false
    }

    /// Batched GEMM over the leading axis of 3-D tensors: for every `i`,
    /// `c[i] = alpha * op_a(a[i]) op_b(b[i]) + beta * c[i]` (attention's `Q Kᵀ` and `P V`).
    #[allow(clippy::too_many_arguments)]
    fn bmm(
        &self,
        alpha: f32,
        a: &Self::Tensor,
        trans_a: Transpose,
        b: &Self::Tensor,
        trans_b: Transpose,
        beta: f32,
        c: &mut Self::Tensor,
    ) -> Result<()>;

    /// A copy of `a` with its axes permuted: axis `i` of the result is axis `perm[i]` of
    /// `a` (splitting and merging attention heads).
    fn permute(&self, a: &Self::Tensor, perm: &[usize]) -> Result<Self::Tensor>;

    /// Softmax over the last axis. `mask_bias`, `[batch, n]` for `x` of shape
    /// `[batch, ..., n]`, is added first, broadcast over the middle axes (an attention
    /// mask: 0 to keep, a large negative number to drop).
    fn softmax(&self, x: &Self::Tensor, mask_bias: Option<&Self::Tensor>) -> Result<Self::Tensor>;

    /// Backward of [`Backend::softmax`] from its output `y`: `y * (dy - Σ dy·y)` per row.
    fn softmax_backward(&self, y: &Self::Tensor, dy: &Self::Tensor) -> Result<Self::Tensor>;

    /// LayerNorm over the last axis: `(x - mean) / sqrt(var + eps) * gamma + beta` with the
    /// biased variance (as `torch.nn.LayerNorm`). Returns the output and a `[rows, 2]`
    /// tensor of per-row `(mean, 1/sqrt(var + eps))` for the backward.
    fn layer_norm(
        &self,
        x: &Self::Tensor,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        eps: f32,
    ) -> Result<(Self::Tensor, Self::Tensor)>;

    /// `layer_norm(x + residual)`, a post-LayerNorm residual block (BERT's): returns the sum
    /// (the backward's input), the output and the statistics. The default adds, then
    /// normalizes; a backend may do both in one pass over each row.
    fn add_layer_norm(
        &self,
        x: &Self::Tensor,
        residual: &Self::Tensor,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        eps: f32,
    ) -> Result<(Self::Tensor, Self::Tensor, Self::Tensor)> {
        let sum = self.binary(BinaryOp::Add, x, residual)?;
        let (out, stats) = self.layer_norm(&sum, gamma, beta, eps)?;
        Ok((sum, out, stats))
    }

    /// `dx` of [`Backend::layer_norm`] (gamma and beta are frozen: no gradient for them).
    fn layer_norm_backward(
        &self,
        x: &Self::Tensor,
        stats: &Self::Tensor,
        gamma: &Self::Tensor,
        dy: &Self::Tensor,
    ) -> Result<Self::Tensor>;

    /// Elementwise `a op b`; shapes must be equal.
    fn binary(&self, op: BinaryOp, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;

    /// Elementwise `op(a)`.
    fn unary(&self, op: UnaryOp, a: &Self::Tensor) -> Result<Self::Tensor>;

    /// Backward of an activation: `dy * op'(x)` where `x` is the activation's input.
    /// Defined for [`UnaryOp::Relu`], [`UnaryOp::Gelu`], [`UnaryOp::Tanh`].
    fn unary_backward(
        &self,
        op: UnaryOp,
        x: &Self::Tensor,
        dy: &Self::Tensor,
    ) -> Result<Self::Tensor>;

    /// In place `y = alpha * x + beta * y`; shapes must be equal.
    fn axpby(&self, alpha: f32, x: &Self::Tensor, beta: f32, y: &mut Self::Tensor) -> Result<()>;

    /// Elementwise `a * mul + add`.
    fn affine(&self, a: &Self::Tensor, mul: f32, add: f32) -> Result<Self::Tensor>;

    /// In place `a[i, :] += row` over the matrix view of `a`; `row` has `cols` elements.
    fn add_row_broadcast(&self, a: &mut Self::Tensor, row: &Self::Tensor) -> Result<()>;

    /// Rows `rows` of the matrix view of `a`, as a `[rows.len(), cols]` tensor (mixed-adapter
    /// batches gather the rows each adapter serves).
    fn gather_rows(&self, a: &Self::Tensor, rows: &[usize]) -> Result<Self::Tensor>;

    /// In place `dst[rows[i], :] += src[i, :]` over matrix views; `rows` must be distinct.
    fn scatter_add_rows(
        &self,
        dst: &mut Self::Tensor,
        rows: &[usize],
        src: &Self::Tensor,
    ) -> Result<()>;

    /// Columns `start..start + len` of the matrix view of `a`, as a `[rows, len]` tensor
    /// (quantized layers work through the weight a block of output features at a time).
    fn slice_cols(&self, a: &Self::Tensor, start: usize, len: usize) -> Result<Self::Tensor>;

    /// In place `dst[:, start..start + cols(src)] = src` over matrix views.
    fn assign_cols(&self, dst: &mut Self::Tensor, start: usize, src: &Self::Tensor) -> Result<()>;

    /// Sum over rows of the matrix view: `[rows, cols] -> [cols]` (e.g. a bias gradient).
    fn sum_rows(&self, a: &Self::Tensor) -> Result<Self::Tensor>;

    /// Sum over columns of the matrix view: `[rows, cols] -> [rows]`.
    fn sum_cols(&self, a: &Self::Tensor) -> Result<Self::Tensor>;

    /// Sum of all elements (accumulated in f64 where the backend can).
    fn sum_all(&self, a: &Self::Tensor) -> Result<f64>;

    /// Largest absolute value (NaN if any element is NaN).
    fn max_abs(&self, a: &Self::Tensor) -> Result<f32>;

    /// Whether every element is finite.
    fn all_finite(&self, a: &Self::Tensor) -> Result<bool>;

    /// A dropout keep-mask (`0` or `1/(1-p)`) drawn from the shared Philox generator at
    /// `rng`. The default draws on the host; device backends override it with a kernel that
    /// must give the same bits ([`crate::rng`] documents the mapping).
    fn dropout_mask(&self, shape: &[usize], p: f32, rng: RngState) -> Result<Self::Tensor> {
        let mut mask = vec![0.0f32; shape.iter().product()];
        crate::rng::dropout_mask(rng, p, &mut mask);
        self.from_host(&mask, shape)
    }
}

/// Checks a column range of [`Backend::slice_cols`] and returns the matrix view `(rows, cols)`.
pub fn check_col_range(op: &str, a: &Shape, start: usize, len: usize) -> Result<(usize, usize)> {
    let (rows, cols) = a.as_matrix();
    if start.checked_add(len).is_none_or(|end| end > cols) {
        return Err(Error::shape(
            format!("{op} columns {start}..{}", start.saturating_add(len)),
            format!("at least {} columns", start.saturating_add(len)),
            a,
        ));
    }
    Ok((rows, cols))
}

/// Checks the operands of [`Backend::assign_cols`] and returns `(rows, dst cols, src cols)`.
pub fn check_assign_cols(dst: &Shape, start: usize, src: &Shape) -> Result<(usize, usize, usize)> {
    let (rows, src_cols) = src.as_matrix();
    let (dst_rows, dst_cols) = check_col_range("assign_cols", dst, start, src_cols)?;
    if dst_rows != rows {
        return Err(Error::shape(
            "assign_cols source",
            format!("[{dst_rows}, {src_cols}]"),
            src,
        ));
    }
    Ok((rows, dst_cols, src_cols))
}

/// Checks the operands of [`Backend::bmm`] and returns `(batch, m, n, k)`.
pub fn check_bmm(
    a: &Shape,
    trans_a: Transpose,
    b: &Shape,
    trans_b: Transpose,
    c: &Shape,
) -> Result<(usize, usize, usize, usize)> {
    let three = |what: &str, s: &Shape| -> Result<(usize, Shape)> {
        match s.dims() {
            [n, r, c] => Ok((*n, Shape::new(&[*r, *c]))),
            _ => Err(Error::shape(
                format!("bmm operand {what}"),
                "[batch, rows, cols]",
                s,
            )),
        }
    };
    let ((na, ma), (nb, mb), (nc, mc)) = (three("a", a)?, three("b", b)?, three("c", c)?);
    if na != nb || na != nc {
        return Err(Error::shape(
            format!("bmm batch (a has {na})"),
            format!("[{na}, ..] for b and c"),
            if na != nb { b } else { c },
        ));
    }
    let (m, n, k) = check_gemm(&ma, trans_a, &mb, trans_b, &mc)?;
    Ok((na, m, n, k))
}

/// Checks a permutation of [`Backend::permute`] and returns the permuted dims.
pub fn check_permute(a: &Shape, perm: &[usize]) -> Result<Vec<usize>> {
    let mut seen = vec![false; perm.len()];
    let valid = perm.len() == a.rank()
        && perm
            .iter()
            .all(|&p| p < perm.len() && !std::mem::replace(&mut seen[p], true));
    if !valid {
        return Err(Error::shape(
            format!("permute {perm:?}"),
            format!("a permutation of 0..{}", a.rank()),
            a,
        ));
    }
    Ok(perm.iter().map(|&p| a.dims()[p]).collect())
}

/// Checks the mask of [`Backend::softmax`] and returns `(batch, rows per batch, n)`.
pub fn check_softmax_mask(x: &Shape, mask: Option<&Shape>) -> Result<(usize, usize, usize)> {
    let n = x.last();
    if x.rank() == 0 || n == 0 {
        return Err(Error::shape("softmax input", "[..., n] with n > 0", x));
    }
    let batch = if x.rank() >= 2 { x.dims()[0] } else { 1 };
    let rows = x.numel() / n;
    if let Some(m) = mask
        && (m.dims() != [batch, n] || x.rank() < 2)
    {
        return Err(Error::shape(
            "softmax mask_bias",
            format!("[{batch}, {n}]"),
            m,
        ));
    }
    Ok((batch, rows / batch.max(1), n))
}

/// Checks the operands of [`Backend::layer_norm`] and returns `(rows, n)`; a last axis of
/// length 0 has no mean to normalize by and is rejected.
pub fn check_layer_norm(x: &Shape, gamma: &Shape, beta: &Shape) -> Result<(usize, usize)> {
    let (rows, n) = x.as_matrix();
    if n == 0 {
        return Err(Error::shape("layer_norm x", "[..., n] with n > 0", x));
    }
    for (what, p) in [("gamma", gamma), ("beta", beta)] {
        if p.dims() != [n] {
            return Err(Error::shape(
                format!("layer_norm {what}"),
                format!("[{n}]"),
                p,
            ));
        }
    }
    Ok((rows, n))
}

/// Checks the operands of [`Backend::layer_norm_backward`] and returns `(rows, n)`.
pub fn check_layer_norm_backward(
    x: &Shape,
    stats: &Shape,
    gamma: &Shape,
    dy: &Shape,
) -> Result<(usize, usize)> {
    let (rows, n) = check_layer_norm(x, gamma, gamma)?;
    check_same_shape("layer_norm backward dy", x, dy)?;
    if stats.dims() != [rows, 2] {
        return Err(Error::shape(
            "layer_norm backward stats",
            format!("[{rows}, 2]"),
            stats,
        ));
    }
    Ok((rows, n))
}

/// Checks the operands of [`Backend::gemm`] and returns `(m, n, k)`: `op(a)` is `[m, k]`,
/// `op(b)` is `[k, n]`, `c` is `[m, n]`. Backends call this so that every backend rejects
/// the same inputs with the same message.
pub fn check_gemm(
    a: &Shape,
    trans_a: Transpose,
    b: &Shape,
    trans_b: Transpose,
    c: &Shape,
) -> Result<(usize, usize, usize)> {
    let (m, k) = trans_a.apply(a.as_matrix());
    let (kb, n) = trans_b.apply(b.as_matrix());
    if k != kb {
        return Err(Error::ShapeMismatch {
            context: format!("gemm (a {a} trans={trans_a:?}, b trans={trans_b:?})"),
            expected: format!("b with inner dimension {k}"),
            got: b.clone(),
        });
    }
    if c.as_matrix() != (m, n) {
        return Err(Error::shape(
            format!("gemm (a {a} trans={trans_a:?}, b {b} trans={trans_b:?})"),
            format!("output c as [{m}, {n}]"),
            c,
        ));
    }
    Ok((m, n, k))
}

/// Checks that two operands of an elementwise op have equal shapes.
pub fn check_same_shape(op: &str, a: &Shape, b: &Shape) -> Result<()> {
    if a != b {
        return Err(Error::shape(
            format!("{op} (first operand {a})"),
            format!("{a}"),
            b,
        ));
    }
    Ok(())
}

/// Checks that `data_len` elements fill `shape`.
pub fn check_host_len(data_len: usize, shape: &[usize]) -> Result<()> {
    let s = Shape::new(shape);
    if s.numel() != data_len {
        return Err(Error::shape(
            "from_host",
            format!("{} elements for the given data", data_len),
            &s,
        ));
    }
    Ok(())
}

/// Checks row indices against a matrix view with `nrows` rows; with `distinct`, also that
/// no row repeats (a scatter-add target).
pub fn check_rows(op: &str, nrows: usize, rows: &[usize], distinct: bool) -> Result<()> {
    if let Some(&bad) = rows.iter().find(|&&r| r >= nrows) {
        return Err(Error::state(
            op,
            format!("row index {bad} out of range for {nrows} rows"),
        ));
    }
    if distinct {
        let mut seen = vec![false; nrows];
        for &r in rows {
            if std::mem::replace(&mut seen[r], true) {
                return Err(Error::state(op, format!("row index {r} repeats")));
            }
        }
    }
    Ok(())
}

/// Checks the operands of [`Backend::scatter_add_rows`]; returns `(rows of dst, cols)`.
pub fn check_scatter_add(dst: &Shape, rows: &[usize], src: &Shape) -> Result<(usize, usize)> {
    let (n, cols) = dst.as_matrix();
    if src.as_matrix() != (rows.len(), cols) {
        return Err(Error::shape(
            format!("scatter_add_rows into {dst}"),
            format!("[{}, {cols}]", rows.len()),
            src,
        ));
    }
    check_rows("scatter_add_rows", n, rows, true)?;
    Ok((n, cols))
}

/// Checks the operands of [`Backend::add_row_broadcast`]; returns the row length.
pub fn check_row_broadcast(a: &Shape, row: &Shape) -> Result<usize> {
    let cols = a.as_matrix().1;
    if row.numel() != cols {
        return Err(Error::shape(
            format!("add_row_broadcast onto {a}"),
            format!("[{cols}]"),
            row,
        ));
    }
    Ok(cols)
}

/// Checks that a tensor of shape `from` can be reshaped to `to`.
pub fn check_reshape(from: &Shape, to: &[usize]) -> Result<()> {
    let to = Shape::new(to);
    if to.numel() != from.numel() {
        return Err(Error::shape(
            format!("reshape to {to}"),
            format!("{} elements", to.numel()),
            from,
        ));
    }
    Ok(())
}
