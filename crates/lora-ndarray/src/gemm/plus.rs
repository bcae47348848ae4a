//! `Backend::matmul_plus` (and `matmul_plus_act`) on our blocked kernel (`sgemm`): a
//! product, a low-depth one and a bias in one pass over the output, and optionally an
//! activation applied to each finished block while it is in cache.
#![allow(unsafe_code)]

use lora_core::backend::{Product, Transpose, check_gemm, check_row_broadcast};
use lora_core::{Result, Tensor};

use super::{ConstPtr, SendPtr, split_panels, strides};
use crate::pool;
use crate::sgemm;
use crate::tensor::NdTensor;

/// An elementwise kernel `out[i] = f(x[i])` (the second input unused), as
/// `vectorize::gelu`.
pub(crate) type Activation = fn(&[f32], &[f32], &mut [f32]);

/// `op(a1) op(b1) [+ scale2 · op(a2) op(b2)] [+ bias]` into a new tensor of shape
/// `shape`: on CPUs where our kernel runs (AVX2 or AVX-512) and the first product suits
/// it, one product over the concatenated depth (the second product's depth joins the
/// first's last slice) that adds the bias as it stores each tile; else `None` and the
/// caller runs the steps.
pub(crate) fn gemm_plus_new(
    first: Product<'_, NdTensor>,
    second: Option<(f32, Product<'_, NdTensor>)>,
    bias: Option<&NdTensor>,
    shape: &[usize],
) -> Result<Option<NdTensor>> {
    Ok(gemm_plus_act_new(first, second, bias, None, shape)?.map(|(pre, _)| pre))
}

/// [`gemm_plus_new`] with, when `act` is given, a second new tensor `act(output)`
/// computed from each block of the output as the kernel finishes it (in L2 rather than
/// read back from memory in a separate pass).
pub(crate) fn gemm_plus_act_new(
    ((a1, ta1), (b1, tb1)): Product<'_, NdTensor>,
    second: Option<(f32, Product<'_, NdTensor>)>,
    bias: Option<&NdTensor>,
    act: Option<Activation>,
    shape: &[usize],
) -> Result<Option<(NdTensor, Option<NdTensor>)>> {
    let c_shape = lora_core::Shape::new(shape);
    let (m, n, k1) = check_gemm(a1.shape(), ta1, b1.shape(), tb1, &c_shape)?;
    let k2 = match second {
        Some((_, ((a2, ta2), (b2, tb2)))) => {
            check_gemm(a2.shape(), ta2, b2.shape(), tb2, &c_shape)?.2
        }
        None => 0,
    };
    if let Some(bias) = bias {
        check_row_broadcast(&c_shape, bias.shape())?;
    }
    let fused = sgemm::available() && sgemm::suits(m, n, k1) && k2 <= sgemm::MAX_EXTRA_DEPTH;
    if !fused {
        return Ok(None);
    }
    let operand = |t: &NdTensor, tr: Transpose| {
        let (cs, rs) = strides(t.shape().as_matrix().1, tr);
        (ConstPtr(t.as_slice().as_ptr()), rs, cs)
    };
    let (first_a, first_b) = (operand(a1, ta1), operand(b1, tb1));
    let (scale2, second_a, second_b) = match second {
        Some((scale, ((a2, ta2), (b2, tb2)))) => (scale, operand(a2, ta2), operand(b2, tb2)),
        // No second product: depth 0, never read.
        None => (0.0, first_a, first_b),
    };
    let bias = bias.map(|b| ConstPtr(b.as_slice().as_ptr()));
    // Stale values from the pool: the kernel writes every element without reading any.
    let mut data = pool::take_for_overwrite(m * n);
    let dst = SendPtr(data.as_mut_ptr());
    let mut post = act.map(|_| pool::take_for_overwrite(m * n));
    // The activation and where it writes, both present or both absent.
    let finishing = act.zip(post.as_mut().map(|p| SendPtr(p.as_mut_ptr())));
    let post_bad = std::sync::atomic::AtomicBool::new(false);
    // A frozen weight's panels, packed once (from its second use on), beside `A` read in
    // place (row-major).
    let kept_b1 = (ta1 == Transpose::No).then(|| b1.kept_b(tb1)).flatten();
    split_panels((m, n, k1 + k2), ta1 == Transpose::No, |r0, mr, c0, nc| {
        let rows = |(p, rs, cs): (ConstPtr, isize, isize)| {
            // SAFETY (this and `cols`): row r0 and column c0 lie inside the operands, whose
            // extents `check_gemm` matched to the m x n output.
            (unsafe { p.get().offset(r0 as isize * rs) }, rs, cs)
        };
        let cols = |(p, rs, cs): (ConstPtr, isize, isize)| {
            (unsafe { p.get().offset(c0 as isize * cs) }, rs, cs)
        };
        // Row r, columns c..c + len of this panel, finished: its activation into `post`.
        let finish = |r: usize, c: usize, len: usize| {
            if let Some((act, post)) = finishing {
                let at = (r0 + r) * n + c0 + c;
                // SAFETY: the stretch lies in this panel of the m x n output, which the
                // kernel has written (it calls `finish` only then) and no other thread
                // touches; `post` is a second m x n buffer, disjoint from `data`.
                let (x, out) = unsafe {
                    (
                        std::slice::from_raw_parts(dst.get().add(at).cast_const(), len),
                        std::slice::from_raw_parts_mut(post.get().add(at), len),
                    )
                };
                act(x, x, out);
                // In L1 now: the activation's finiteness costs no pass over memory.
                if !crate::vectorize::all_finite(out) {
                    post_bad.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
        };
        // SAFETY: as above for the operands; the bias holds n values (checked), and
        // concurrent calls write disjoint output panels of `data` (and `post`), which
        // outlive the parallel section.
        unsafe {
            sgemm::sgemm_plus(
                (mr, nc),
                (rows(first_a), (cols(first_b), kept_b1.map(|b| (b, c0))), k1),
                scale2,
                (rows(second_a), cols(second_b), k2),
                bias.map(|b| b.get().add(c0)),
                (
                    finishing.map(|_| &finish as &dyn Fn(usize, usize, usize)),
                    None,
                ),
                dst.get().offset(r0 as isize * n as isize + c0 as isize),
                n,
            );
        }
    });
    let post = post.map(|p| NdTensor::from_vec(p, shape)).transpose()?;
    if let Some(p) = &post {
        p.set_finite(!post_bad.into_inner());
    }
    Ok(Some((NdTensor::from_vec(data, shape)?, post)))
}
