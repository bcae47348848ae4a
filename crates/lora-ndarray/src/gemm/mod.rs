//! Matrix multiplication: the threading (output panels per core) around three single-thread
//! engines, picked per product in [`raw_gemm`]: the skinny kernels (`skinny.rs`, one side
//! narrow), our blocked kernel (`sgemm`: a 6 x 16 tile on AVX2 CPUs, 8 x 48 on AVX-512
//! ones) and the `gemm` crate for everything else (off x86-64, shallow products).
//!
//! Why `gemm` and not `matrixmultiply` (ndarray's own): measured on the 2-core AVX2 machine
//! (docs/benchmarks.md), `gemm` with rayon reached 164-166 GFLOP/s on large shapes against
//! 146-159 for `matrixmultiply` with its threading feature, and 125 against 110 on
//! 2048x384x384. On skinny LoRA shapes (k or n = r <= 64) both libraries' own threading
//! *loses* to one thread, so for those we split the output into row (or column) panels
//! ourselves and run single-threaded kernels on each core.
#![allow(unsafe_code)]

use gemm::Parallelism;
use lora_core::backend::{Transpose, check_gemm};
use lora_core::{Result, Tensor};
use rayon::prelude::*;

use crate::pool;

mod lora_backward;
mod lora_forward;
mod plus;
use crate::few_rows::FEW_ROWS;
use crate::skinny::NARROW;
use crate::tensor::NdTensor;
use crate::{sgemm, skinny};
pub(crate) use lora_backward::lora_dense_backward;
pub(crate) use lora_forward::lora_dense_forward;
pub(crate) use plus::{Activation, gemm_plus_act_new, gemm_plus_new};

/// Below this many multiply-adds a product runs on one thread (but for a few rows against
/// a large weight, `FEW_ROWS_PARALLEL_MIN_WEIGHTS`).
const PARALLEL_MIN_WORK: usize = 1 << 20;
/// From this many weights (512 KiB of f32) a product of at most `FEW_ROWS` rows splits its
/// columns between threads (see `few_rows.rs`): a decoder's generation, whose projections
/// are 131-721 thousand weights, ran 337-352 → 291-295 ms in three alternating pairs on the
/// Xeon VM with the `gemm` crate's kernel split that way (docs/performance/stops-29-31.md,
/// stop 30).
const FEW_ROWS_PARALLEL_MIN_WEIGHTS: usize = 1 << 17;
/// At or above this many multiply-adds, with both output sides large, the output is cut
/// into one panel per thread; between the two, into two panels per thread. (`gemm`'s own
/// rayon blocking measured slower than either on 2 cores: median 96 against 113 GFLOP/s
/// at 1024x1024x2816, 107.5 against 111 at 1024³, 12 alternating runs each.)
const WHOLE_PANELS_MIN_WORK: usize = 1 << 24;
/// Output sides at least this large take one panel per thread.
const WHOLE_PANELS_MIN_SIDE: usize = 128;

/// A raw pointer that may cross to a rayon worker. Each worker writes a disjoint panel.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the pointer is only dereferenced by `gemm` on disjoint output panels of a buffer
// that outlives the parallel section (see `gemm_into`).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    // A method (not field access) so closures capture the whole Send wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}

#[derive(Clone, Copy)]
struct ConstPtr(*const f32);
// SAFETY: read-only operands, alive for the whole parallel section.
unsafe impl Send for ConstPtr {}
unsafe impl Sync for ConstPtr {}

impl ConstPtr {
    fn get(self) -> *const f32 {
        self.0
    }
}

/// Column and row strides of a contiguous `[rows, cols]` operand under a transpose.
fn strides(cols: usize, t: Transpose) -> (isize, isize) {
    let cols = cols as isize;
    match t {
        Transpose::No => (1, cols),
        Transpose::Yes => (cols, 1),
    }
}

/// One call of the `gemm` kernel: `c = alpha·a·b + beta·c` for an `m x n` output with
/// row stride `c_rs` (unit column stride) and operands given by column and row strides.
///
/// # Safety
/// Every index the shapes and strides reach must lie inside live allocations, and no other
/// thread may touch the output elements during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn raw_gemm(
    (m, n, k): (usize, usize, usize),
    c: *mut f32,
    c_rs: isize,
    (a, a_cs, a_rs): (*const f32, isize, isize),
    (b, b_cs, b_rs): (*const f32, isize, isize),
    alpha: f32,
    beta: f32,
    par: Parallelism,
    kept: Option<sgemm::Kept<'_>>,
) {
    let serial = matches!(par, Parallelism::None);
    // SAFETY: forwarded to the caller's contract; `available` checked the CPU (AVX2+FMA).
    if serial
        && sgemm::available()
        && unsafe {
            skinny::try_run(
                (m, n, k),
                alpha,
                (a, a_rs, a_cs),
                (b, b_rs, b_cs),
                beta,
                (c, c_rs as usize),
            )
        }
    {
        return;
    }
    if serial && sgemm::available() && sgemm::suits(m, n, k) {
        // SAFETY: forwarded to the caller's contract; `available` checked the CPU.
        unsafe {
            sgemm::sgemm(
                (m, n, k),
                alpha,
                (a, a_rs, a_cs),
                ((b, b_rs, b_cs), kept),
                beta,
                c,
                c_rs as usize,
            )
        };
        return;
    }
    // SAFETY: forwarded to the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            c_rs,
            beta != 0.0,
            a,
            a_cs,
            a_rs,
            b,
            b_cs,
            b_rs,
            beta,
            alpha,
            false,
            false,
            false,
            par,
        );
    }
}

/// `c = alpha * op(a) op(b) + beta * c` on the matrix views (shapes checked here).
pub(crate) fn gemm_into(
    alpha: f32,
    a: &NdTensor,
    trans_a: Transpose,
    b: &NdTensor,
    trans_b: Transpose,
    beta: f32,
    c: &mut NdTensor,
) -> Result<()> {
    let (m, n, k) = check_gemm(a.shape(), trans_a, b.shape(), trans_b, c.shape())?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        // An empty sum: c = beta * c (and beta == 0 means "ignore old c").
        let out = c.as_mut_slice();
        if beta == 0.0 {
            out.fill(0.0);
        } else {
            out.iter_mut().for_each(|v| *v *= beta);
        }
        return Ok(());
    }
    let dst = SendPtr(c.as_mut_slice().as_mut_ptr());
    // SAFETY: `dst` addresses the m x n elements of `c`, which `check_gemm` matched.
    unsafe { gemm_to((m, n, k), alpha, (a, trans_a), (b, trans_b), beta, dst) };
    Ok(())
}

/// A new `alpha * op(a) op(b)` of shape `shape` (its matrix view `[m, n]`), written
/// straight into fresh memory: no zero-fill pass before the product overwrites it.
pub(crate) fn gemm_new(
    alpha: f32,
    (a, trans_a): (&NdTensor, Transpose),
    (b, trans_b): (&NdTensor, Transpose),
    shape: &[usize],
) -> Result<NdTensor> {
    let c_shape = lora_core::Shape::new(shape);
    let (m, n, k) = check_gemm(a.shape(), trans_a, b.shape(), trans_b, &c_shape)?;
    if m == 0 || n == 0 || k == 0 {
        return NdTensor::from_vec(pool::zeros(m * n), shape);
    }
    // Stale values from the pool: with beta = 0 the kernel overwrites every element
    // without reading any (`read_dst` false), so no zero-fill pass is needed.
    let mut data = pool::take_for_overwrite(m * n);
    // SAFETY: the buffer holds m x n initialised elements that only this call touches.
    unsafe {
        gemm_to(
            (m, n, k),
            alpha,
            (a, trans_a),
            (b, trans_b),
            0.0,
            SendPtr(data.as_mut_ptr()),
        );
    }
    NdTensor::from_vec(data, shape)
}

/// The product into `dst` (row-major `m x n`, unit column stride), threaded as the shape
/// warrants; `m`, `n`, `k` are non-zero and match the operands.
///
/// # Safety
/// `dst` must address `m * n` writable elements that nothing else touches during the call
/// (they need not be initialised when `beta == 0`).
unsafe fn gemm_to(
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    (a, trans_a): (&NdTensor, Transpose),
    (b, trans_b): (&NdTensor, Transpose),
    beta: f32,
    dst: SendPtr,
) {
    let (a_cs, a_rs) = strides(a.shape().as_matrix().1, trans_a);
    let (b_cs, b_rs) = strides(b.shape().as_matrix().1, trans_b);
    let c_rs = n as isize;
    let lhs = ConstPtr(a.as_slice().as_ptr());
    let rhs = ConstPtr(b.as_slice().as_ptr());
    // A frozen weight's panels, packed once (from its second use on), where our kernel
    // runs the product with `A` read in place.
    let kept = (trans_a == Transpose::No && sgemm::available() && sgemm::suits(m, n, k))
        .then(|| b.kept_b(trans_b))
        .flatten();

    // One single-thread call on the sub-problem rows [r0, r0+mr) x cols [c0, c0+nc).
    split_panels((m, n, k), trans_a == Transpose::No, |r0, mr, c0, nc| {
        // SAFETY: all pointers address contiguous buffers whose sizes `check_gemm` matched
        // to (m, n, k) and the strides above; the offsets stay inside them, and concurrent
        // calls receive disjoint output panels.
        unsafe {
            raw_gemm(
                (mr, nc, k),
                dst.get().offset(r0 as isize * c_rs + c0 as isize),
                c_rs,
                (lhs.get().offset(r0 as isize * a_rs), a_cs, a_rs),
                (rhs.get().offset(c0 as isize * b_cs), b_cs, b_rs),
                alpha,
                beta,
                Parallelism::None,
                kept.map(|b| (b, c0)),
            );
        }
    });
}

/// Runs `run(r0, rows, c0, cols)` over panels of an `m x n` output of depth `k`, in
/// parallel as the shape warrants; the panels are disjoint and cover the output.
/// `a_row_major`: the row operand has unit column stride (our kernel reads it in place).
fn split_panels(
    (m, n, k): (usize, usize, usize),
    a_row_major: bool,
    run: impl Fn(usize, usize, usize, usize) + Sync,
) {
    let work = m * n * k;
    let threads = rayon::current_num_threads();
    // A few rows against a large weight: bound by streaming the weight, which two cores
    // do faster than one even well below PARALLEL_MIN_WORK.
    let few_rows_wide =
        m <= FEW_ROWS && n * k >= FEW_ROWS_PARALLEL_MIN_WEIGHTS && n >= NARROW * threads;
    if threads <= 1 || (work < PARALLEL_MIN_WORK && !few_rows_wide) {
        run(0, m, 0, n);
    } else if few_rows_wide {
        // One panel per thread, a multiple of 16 columns wide.
        let per = n.div_ceil(threads).div_ceil(16) * 16;
        (0..n.div_ceil(per)).into_par_iter().for_each(|p| {
            let c0 = p * per;
            run(0, m, c0, per.min(n - c0));
        });
    } else if work >= WHOLE_PANELS_MIN_WORK && m.min(n) >= WHOLE_PANELS_MIN_SIDE {
        // One panel per thread, no synchronisation between them. On our kernel, the split
        // that packs less; on the `gemm` crate, row panels unless the rows are too few
        // (there row panels measured at least as fast, and 7% faster at 512x4096x4096).
        let by_rows = match sgemm::available() && sgemm::suits(m, n, k) {
            true => sgemm::prefers_row_panels(m, n, threads, a_row_major),
            false => m >= WHOLE_PANELS_MIN_SIDE * threads || m >= n,
        };
        let side = if by_rows { m } else { n };
        // Wide column panels start on a whole number of both tiles' widths (16, 48),
        // where a weight's kept panels (`sgemm/prepacked.rs`) serve them; rounding moves
        // such a panel by under 1/16 of its width. Narrower ones split evenly.
        let per = match side.div_ceil(threads) {
            even if by_rows || even < 16 * 48 => even,
            even => even.div_ceil(48) * 48,
        };
        (0..side.div_ceil(per)).into_par_iter().for_each(|p| {
            let (s0, len) = (p * per, per.min(side - p * per));
            match by_rows {
                true => run(s0, len, 0, n),
                false => run(0, m, s0, len),
            }
        });
    } else if m >= n {
        let panel = m.div_ceil(threads * 2).max(16);
        (0..m.div_ceil(panel)).into_par_iter().for_each(|p| {
            let r0 = p * panel;
            run(r0, panel.min(m - r0), 0, n);
        });
    } else {
        let panel = n.div_ceil(threads * 2).max(16);
        (0..n.div_ceil(panel)).into_par_iter().for_each(|p| {
            let c0 = p * panel;
            run(0, m, c0, panel.min(n - c0));
        });
    }
}

/// Batched `c[i] = alpha * op(a[i]) op(b[i]) + beta * c[i]`: the batch items run in
/// parallel, each on one thread (attention's products are small).
pub(crate) fn bmm_into(
    alpha: f32,
    a: &NdTensor,
    trans_a: Transpose,
    b: &NdTensor,
    trans_b: Transpose,
    beta: f32,
    c: &mut NdTensor,
) -> Result<()> {
    let (batch, m, n, k) =
        lora_core::backend::check_bmm(a.shape(), trans_a, b.shape(), trans_b, c.shape())?;
    if batch == 0 || m == 0 || n == 0 {
        return Ok(());
    }
    let (a_dims, b_dims) = (a.shape().dims(), b.shape().dims());
    let (a_step, b_step, c_step) = (a_dims[1] * a_dims[2], b_dims[1] * b_dims[2], m * n);
    if k == 0 {
        let out = c.as_mut_slice();
        out.iter_mut().for_each(|v| *v *= beta);
        if beta == 0.0 {
            out.fill(0.0);
        }
        return Ok(());
    }
    let (a_cs, a_rs) = strides(a_dims[2], trans_a);
    let (b_cs, b_rs) = strides(b_dims[2], trans_b);
    let lhs = ConstPtr(a.as_slice().as_ptr());
    let rhs = ConstPtr(b.as_slice().as_ptr());
    let dst = SendPtr(c.as_mut_slice().as_mut_ptr());
    let run = |i: usize| {
        // SAFETY: `check_bmm` matched every operand to (batch, m, n, k); item `i` reads
        // and writes only its own `[rows, cols]` slab, and slabs are disjoint.
        unsafe {
            raw_gemm(
                (m, n, k),
                dst.get().add(i * c_step),
                n as isize,
                (lhs.get().add(i * a_step), a_cs, a_rs),
                (rhs.get().add(i * b_step), b_cs, b_rs),
                alpha,
                beta,
                Parallelism::None,
                None,
            );
        }
    };
    if batch * m * n * k < PARALLEL_MIN_WORK {
        (0..batch).for_each(run);
    } else {
        (0..batch).into_par_iter().for_each(run);
    }
    Ok(())
}

/// A row-major matrix inside a slice: `rows x cols`, `ld` elements between rows, used
/// transposed when `trans` is `Transpose::Yes`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
    pub trans: Transpose,
}

impl View<'_> {
    /// The same matrix, used transposed.
    pub fn t(self) -> Self {
        View {
            trans: Transpose::Yes,
            ..self
        }
    }

    /// `(row stride, column stride)` of `op(self)`, after checking the slice holds it.
    fn strides(&self) -> Result<(isize, isize)> {
        let need = match (self.rows, self.cols) {
            (0, _) | (_, 0) => 0,
            (r, c) => (r - 1) * self.ld + c,
        };
        if self.data.len() < need || (self.rows > 1 && self.cols > self.ld) {
            return Err(lora_core::Error::Backend {
                backend: "ndarray",
                reason: format!(
                    "gemm view of {}x{} (row stride {}) over {} elements",
                    self.rows,
                    self.cols,
                    self.ld,
                    self.data.len()
                ),
            });
        }
        Ok(match self.trans {
            Transpose::No => (self.ld as isize, 1),
            Transpose::Yes => (1, self.ld as isize),
        })
    }
}

/// `c = alpha * op(a) op(b) + beta * c` on one thread, for kernels that already run one
/// task per core (fused attention); `c` is `m x n` with row stride `ldc`.
pub(crate) fn gemm_serial(
    alpha: f32,
    a: View<'_>,
    b: View<'_>,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
) -> Result<()> {
    let (m, k) = a.trans.apply((a.rows, a.cols));
    let (kb, n) = b.trans.apply((b.rows, b.cols));
    let c_need = if m == 0 || n == 0 {
        0
    } else {
        (m - 1) * ldc + n
    };
    if kb != k || c.len() < c_need || (m > 1 && n > ldc) {
        return Err(lora_core::Error::Backend {
            backend: "ndarray",
            reason: format!(
                "gemm_serial: {m}x{k} times {kb}x{n} into {} elements (row stride {ldc})",
                c.len()
            ),
        });
    }
    let ((a_rs, a_cs), (b_rs, b_cs)) = (a.strides()?, b.strides()?);
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        // `beta = 0` never reads `c` (it may hold anything, NaN included), as below.
        for i in 0..m {
            let row = &mut c[i * ldc..i * ldc + n];
            match beta == 0.0 {
                true => row.fill(0.0),
                false => row.iter_mut().for_each(|v| *v *= beta),
            }
        }
        return Ok(());
    }
    // SAFETY: the checks above keep every index of op(a), op(b) (m x k, k x n) and c
    // (m x n, row stride ldc) inside their slices; `c` is borrowed mutably, so no other
    // reference aliases it.
    unsafe {
        raw_gemm(
            (m, n, k),
            c.as_mut_ptr(),
            ldc as isize,
            (a.data.as_ptr(), a_cs, a_rs),
            (b.data.as_ptr(), b_cs, b_rs),
            alpha,
            beta,
            Parallelism::None,
            None,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests;
