//! Matrix multiplication on the `gemm` crate.
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

use crate::tensor::NdTensor;

/// Below this many multiply-adds a product runs on one thread.
const PARALLEL_MIN_WORK: usize = 1 << 20;
/// At or above this many multiply-adds, with both output sides large, `gemm`'s own
/// parallel blocking is used; between the two, panels are split across threads.
const LIBRARY_PARALLEL_MIN_WORK: usize = 1 << 24;
/// Output sides at least this large let the library's blocking spread over threads.
const LIBRARY_PARALLEL_MIN_SIDE: usize = 128;

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
    let (a_cs, a_rs) = strides(a.shape().as_matrix().1, trans_a);
    let (b_cs, b_rs) = strides(b.shape().as_matrix().1, trans_b);
    let c_rs = n as isize;
    let lhs = ConstPtr(a.as_slice().as_ptr());
    let rhs = ConstPtr(b.as_slice().as_ptr());
    let dst = SendPtr(c.as_mut_slice().as_mut_ptr());

    // One call of the library kernel on the sub-problem rows [r0, r0+mr) x cols [c0, c0+nc).
    let run = |r0: usize, mr: usize, c0: usize, nc: usize, par: Parallelism| {
        // SAFETY: all pointers address contiguous buffers whose sizes `check_gemm` matched
        // to (m, n, k) and the strides above; the offsets stay inside them, and concurrent
        // calls receive disjoint output panels.
        unsafe {
            gemm::gemm(
                mr,
                nc,
                k,
                dst.get().offset(r0 as isize * c_rs + c0 as isize),
                1,
                c_rs,
                beta != 0.0,
                lhs.get().offset(r0 as isize * a_rs),
                a_cs,
                a_rs,
                rhs.get().offset(c0 as isize * b_cs),
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
    };

    let work = m * n * k;
    let threads = rayon::current_num_threads();
    if threads <= 1 || work < PARALLEL_MIN_WORK {
        run(0, m, 0, n, Parallelism::None);
    } else if work >= LIBRARY_PARALLEL_MIN_WORK && m.min(n) >= LIBRARY_PARALLEL_MIN_SIDE {
        run(0, m, 0, n, Parallelism::Rayon(threads));
    } else if m >= n {
        let panel = m.div_ceil(threads * 2).max(16);
        (0..m.div_ceil(panel)).into_par_iter().for_each(|p| {
            let r0 = p * panel;
            run(r0, panel.min(m - r0), 0, n, Parallelism::None);
        });
    } else {
        let panel = n.div_ceil(threads * 2).max(16);
        (0..n.div_ceil(panel)).into_par_iter().for_each(|p| {
            let c0 = p * panel;
            run(0, m, c0, panel.min(n - c0), Parallelism::None);
        });
    }
    Ok(())
}
