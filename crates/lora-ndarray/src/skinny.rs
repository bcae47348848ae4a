//! Products with one narrow side (LoRA's rank r, attention's head size) on AVX2+FMA and
//! AVX-512, without packing the wide operand.
//!
//! LoRA adds four such products to each layer's step: `x Aᵀ` and `dy B` (`[tokens, r]`
//! outputs over a wide depth) and `dyᵀ H`, `(dy B)ᵀ x` (reductions over the tokens into
//! `[out, r]` and `[r, in]`). Each multiplies every element of a `[tokens, features]`
//! operand by only `r` values, so the work is reading that operand once: a general kernel
//! that first packs it (the `gemm` crate, at about half the large products' rate here,
//! and with a scratch allocation per call) spends as much on packing as on arithmetic.
//! Two kernels read it in place instead:
//!
//! * [`narrow_output`]: `c[m, n] = alpha · a[m, k] · y[k, n]`, `n < 64`: eight rows of `a`
//!   at a time when `n <= 8` (four otherwise), each element broadcast against the `n`-wide
//!   row of `y` (read in place when its rows are contiguous and `n` is a multiple of 8, at
//!   any row stride; else packed once per call).
//! * [`token_reduction`]: `c = alpha · Σ_t s[t, 0..ns]ᵀ ⊗ l[t, 0..nl] + beta · c`, `ns < 64`
//!   (`token_reduction.rs`).
//! * [`wide_output`] (AVX-512 CPUs, `8 < n < 64`): twelve rows of one or two 16-lane
//!   vectors, `a` with any strides, `y` unpacked, with `beta`; attention's narrow products
//!   at head size 32 and rank-16 outputs.
//!
//! [`try_run`] also sends products of at most four rows against a weight stored
//! `[out, in]` (generation's one token per sequence) to the dot-product kernel of
//! `few_rows.rs`, whatever their width.
//!
//! Results differ from the general kernels' only by summation order (all use FMA).
#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::cell::RefCell;

/// The narrow side must be below this (r = 64 and up go to the general kernels).
pub(crate) const NARROW: usize = 64;

thread_local! {
    /// The narrow operand packed `[k, n rounded up to 8]`, reused across calls.
    static NARROW_PACK: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

use crate::few_rows::{FEW_ROWS, few_rows_times_wt};
use crate::sgemm::Operand;
use crate::token_reduction::token_reduction;

/// Runs `c = alpha · a b + beta · c` on a skinny kernel when the shape and strides fit
/// one; returns whether it did.
///
/// # Safety
/// The CPU has AVX2 and FMA; every element the shapes and strides reach lies in live
/// allocations; `c` (`m x n`, row stride `ldc`, unit column stride) is touched by no one
/// else during the call.
pub(crate) unsafe fn try_run(
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    a: Operand,
    b: Operand,
    beta: f32,
    (c, ldc): (*mut f32, usize),
) -> bool {
    let ((pa, a_rs, a_cs), (pb, b_rs, b_cs)) = (a, b);
    let avx512 = crate::sgemm::isa() == Some(crate::sgemm::Isa::Avx512);
    // SAFETY (all arms): forwarded to the caller's contract; each kernel reads exactly the
    // elements of the product's operands and writes the m x n output.
    unsafe {
        // A few rows against a weight stored `[out, in]` (generation's one token per
        // sequence, LoRA's `x Aᵀ` included): dot products along the depth, nothing packed.
        if (1..=FEW_ROWS).contains(&m) && a_cs == 1 && a_rs >= 0 && b_rs == 1 && b_cs > 0 {
            few_rows_times_wt(
                (m, n, k),
                alpha,
                (pa, a_rs as usize),
                (pb, b_cs as usize),
                beta,
                (c, ldc),
                avx512,
            );
            return true;
        }
        // `a` row-major, or small enough to stay in L2 when read across its rows (attention's
        // `pᵀ·g`): a LoRA reduction over thousands of tokens read that way takes a cache
        // line per token and row block (LoRA layer fwd+bwd 97 -> 101 ms at 512x4096x4096
        // r16), which `token_reduction` streams instead.
        let a_fits = a_cs == 1 || m * k <= 1 << 16;
        if avx512 && a_fits && n > 8 && n < NARROW && b_cs == 1 && k >= 8 {
            wide_output(
                (m, n, k),
                alpha,
                (pa, a_rs, a_cs),
                (pb, b_rs),
                beta,
                (c, ldc),
            );
            return true;
        }
        // `a` transposed and small (attention's `pᵀ·g`, `dsᵀ·q` on AVX2 CPUs) too: six
        // rows broadcast from one row of `p` per depth step. The token reductions below
        // ran these 6-7% slower (a MiniLM layer's attention backward, stop 34).
        if n < NARROW && (a_cs == 1 || (a_fits && n > 8)) && k >= 8 {
            narrow_output(
                (m, n, k),
                alpha,
                (pa, a_rs, a_cs),
                (pb, b_rs, b_cs),
                beta,
                (c, ldc),
            );
            return true;
        }
        // a = Uᵀ with U `[k, m]` row-major, b = V `[k, n]` row-major: sums over k.
        if a_rs == 1 && b_cs == 1 && k >= 8 {
            if m < NARROW {
                // c[j, q] = Σ_t U[t, j] V[t, q]: U is the narrow side.
                token_reduction(
                    (m, n, k),
                    (alpha, beta),
                    (pa, a_cs),
                    (pb, b_rs),
                    (c, ldc, 1),
                );
                return true;
            }
            if n < NARROW {
                // c[q, j] = Σ_t V[t, j] U[t, q]: V is the narrow side, stored transposed.
                token_reduction(
                    (n, m, k),
                    (alpha, beta),
                    (pb, b_rs),
                    (pa, a_cs),
                    (c, 1, ldc),
                );
                return true;
            }
        }
    }
    false
}

/// `c[m, n] = alpha · a[m, k] · y[k, n] + beta · c` with `a` of row stride `lda` and
/// column stride `a_cs` (row-major, or a small transposed one) and `y` any strides,
/// `n < NARROW`; `beta == 0` never reads `c`.
///
/// # Safety
/// As [`try_run`].
unsafe fn narrow_output(
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    (a, lda, a_cs): Operand,
    (y, y_rs, y_cs): Operand,
    beta: f32,
    (c, ldc): (*mut f32, usize),
) {
    let width = n.div_ceil(8) * 8;
    NARROW_PACK.with(|pack| {
        let mut pack = pack.borrow_mut();
        // `y` in place when its rows are contiguous and whole vectors wide (attention's
        // values at a head size of 32, a row stride of the hidden size), else packed
        // `[k, width]` with zero columns.
        let (y, ldy) = if y_cs == 1 && y_rs >= 0 && n == width {
            (y, y_rs as usize)
        } else {
            pack.clear();
            pack.resize(k * width, 0.0);
            for (p, row) in pack.chunks_exact_mut(width).enumerate() {
                for (j, v) in row[..n].iter_mut().enumerate() {
                    // SAFETY: (p, j) lies inside y's k x n extent.
                    *v = unsafe { *y.offset(p as isize * y_rs + j as isize * y_cs) };
                }
            }
            (pack.as_ptr(), width)
        };
        // On AVX-512 CPUs an output wider than 8 (rank 16 through a strided `y`) goes to
        // `wide_output` with `y` packed (or in place: unreached from `try_run`, which sends
        // a contiguous `y` there first).
        if width > 8 && crate::sgemm::isa() == Some(crate::sgemm::Isa::Avx512) {
            // SAFETY: forwarded to the caller's contract; `y` is now `[k, ldy]` row-major and
            // the CPU has AVX-512F.
            unsafe {
                wide_output(
                    (m, n, k),
                    alpha,
                    (a, lda, a_cs),
                    (y, ldy as isize),
                    beta,
                    (c, ldc),
                )
            };
            return;
        }
        // SAFETY: rows i..i+R of a and c lie inside the m x k and m x n extents.
        let at = |i: usize| unsafe { (a.offset(i as isize * lda), c.add(i * ldc)) };
        // Eight or more independent accumulators keep both FMA pipes busy through the FMA
        // latency: eight rows of one vector when the output is at most 8 wide (rank 8),
        // else six rows of two vectors (twelve accumulators, eight loads per twelve FMAs:
        // a MiniLM layer's attention 6% faster on AVX2 than four rows, stop 34), then
        // four, then one.
        let mut i = 0;
        // Groups of `R` rows of `V` vectors from row `i` while `R` rows are left.
        macro_rules! groups {
            ($r:literal, $v:literal) => {
                while m - i >= $r {
                    let (a, c) = at(i);
                    // SAFETY: rows i..i + R lie inside the extents (i + R <= m).
                    unsafe {
                        rows_kernel::<$r, $v>(
                            (n, k),
                            (alpha, beta),
                            (a, lda, a_cs),
                            (y, ldy),
                            (c, ldc),
                        )
                    };
                    i += $r;
                }
            };
        }
        match width {
            8 => groups!(8, 1),
            _ => groups!(6, 2),
        }
        groups!(4, 2);
        groups!(1, 2);
    });
}

/// `R` rows of [`narrow_output`], `8·V` columns (`V` vectors, one or two) at a time.
///
/// # Safety
/// As [`try_run`]; `y` is row-major with row stride `ldy`, each row readable up to `n`
/// rounded up to a multiple of 8 (zero past `n`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_kernel<const R: usize, const V: usize>(
    (n, k): (usize, usize),
    (alpha, beta): (f32, f32),
    (a, lda, a_cs): Operand,
    (y, ldy): (*const f32, usize),
    (c, ldc): (*mut f32, usize),
) {
    let width = n.div_ceil(8) * 8;
    let mut j0 = 0;
    while j0 < n {
        // Vectors of this column block inside the padded width (the last may have one).
        let vecs = (width - j0).div_ceil(8).min(V);
        let mut acc = [[_mm256_setzero_ps(); V]; R];
        // SAFETY: p < k and j0 + 8·vecs <= width keep every load inside a's R x k rows and
        // y's k rows of `width` readable values.
        unsafe {
            for p in 0..k {
                let yp = y.add(p * ldy + j0);
                let yv: [__m256; V] = std::array::from_fn(|v| match v < vecs {
                    true => _mm256_loadu_ps(yp.add(8 * v)),
                    false => _mm256_setzero_ps(),
                });
                for (r, acc) in acc.iter_mut().enumerate() {
                    let av = _mm256_broadcast_ss(&*a.offset(r as isize * lda + p as isize * a_cs));
                    for (acc, yv) in acc.iter_mut().zip(&yv).take(vecs) {
                        *acc = _mm256_fmadd_ps(av, *yv, *acc);
                    }
                }
            }
        }
        let cols = (n - j0).min(8 * V);
        let (va, vb) = (_mm256_set1_ps(alpha), _mm256_set1_ps(beta));
        for (r, acc) in acc.iter().enumerate() {
            // SAFETY: row r, columns j0..j0 + cols of c are in range; each vector's store
            // (and load, with beta) is masked to the columns below `cols`. A copy of `cols`
            // values per row was a `memmove` call.
            unsafe {
                let row = c.add(r * ldc + j0);
                for (v, acc) in acc.iter().enumerate().take(vecs) {
                    let (at, left) = (row.add(8 * v), cols - 8 * v);
                    let scaled = _mm256_mul_ps(*acc, va);
                    // Whole vectors unmasked (a masked store is slow on some AMD cores).
                    if left >= 8 {
                        let out = match beta {
                            0.0 => scaled,
                            _ => _mm256_fmadd_ps(vb, _mm256_loadu_ps(at), scaled),
                        };
                        _mm256_storeu_ps(at, out);
                    } else {
                        let mask = crate::sgemm::first_lanes(left);
                        let out = match beta {
                            0.0 => scaled,
                            _ => _mm256_fmadd_ps(vb, _mm256_maskload_ps(at, mask), scaled),
                        };
                        _mm256_maskstore_ps(at, mask, out);
                    }
                }
            }
        }
        j0 += 8 * V;
    }
}

/// `c[m, n] = alpha · a[m, k] · y[k, n] + beta · c` on AVX-512 for `8 < n < NARROW`: `a`
/// with any strides (attention's `pᵀ·g` reads `p` transposed), `y` row-major with row
/// stride `ldy`, neither packed. Twelve rows of one or two 16-lane vectors at a time
/// ([`wide_rows`]): twice the lanes per FMA of the AVX2 kernels, one pass over `a` for 32
/// columns instead of two, masked edges instead of a copy per row (a MiniLM attention's
/// `p·v`, `ds·k`, `pᵀ·g` and `dsᵀ·q`; the last two went to the `gemm` crate, which packs).
///
/// # Safety
/// As [`try_run`], and the CPU has AVX-512F.
unsafe fn wide_output(
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    a: Operand,
    y: (*const f32, isize),
    beta: f32,
    (c, ldc): (*mut f32, usize),
) {
    let (pa, a_rs, a_cs) = a;
    // SAFETY (every call): rows i.. of a and c lie inside the m x k and m x n extents.
    let at = |i: usize| unsafe { ((pa.offset(i as isize * a_rs), a_rs, a_cs), c.add(i * ldc)) };
    let whole = m / 12 * 12;
    unsafe {
        for i in (0..whole).step_by(12) {
            let (a, c) = at(i);
            match n > 16 {
                true => wide_rows::<12, 2>((n, k), alpha, a, y, beta, (c, ldc)),
                false => wide_rows::<12, 1>((n, k), alpha, a, y, beta, (c, ldc)),
            }
        }
        // The rest four rows at a time (eight accumulators in flight), then one: 128 keys
        // leave eight, which one row at a time ran at a quarter of the speed.
        let fours = whole + (m - whole) / 4 * 4;
        for i in (whole..fours).step_by(4) {
            let (a, c) = at(i);
            wide_rows::<4, 2>((n, k), alpha, a, y, beta, (c, ldc));
        }
        for i in fours..m {
            let (a, c) = at(i);
            wide_rows::<1, 2>((n, k), alpha, a, y, beta, (c, ldc));
        }
    }
}

/// `R` rows of [`wide_output`], `16·V` columns at a time, the columns past `n` masked off
/// in the loads and stores; `beta == 0` never reads `c`.
///
/// # Safety
/// As [`wide_output`] for rows `0..R`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn wide_rows<const R: usize, const V: usize>(
    (n, k): (usize, usize),
    alpha: f32,
    (a, a_rs, a_cs): Operand,
    (y, ldy): (*const f32, isize),
    beta: f32,
    (c, ldc): (*mut f32, usize),
) {
    let mut j0 = 0;
    while j0 < n {
        let cols = (n - j0).min(16 * V);
        let masks: [__mmask16; V] = std::array::from_fn(|v| {
            let lanes = cols.saturating_sub(16 * v).min(16);
            ((1u32 << lanes) - 1) as __mmask16
        });
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        // SAFETY: p < k, and the masked loads touch only columns j0..j0 + cols of y's
        // k rows (masked-off lanes are never read); a's R x k elements are in range.
        unsafe {
            for p in 0..k {
                let yp = y.offset(p as isize * ldy + j0 as isize);
                let yv: [__m512; V] =
                    std::array::from_fn(|v| _mm512_maskz_loadu_ps(masks[v], yp.add(16 * v)));
                let ap = a.offset(p as isize * a_cs);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*ap.offset(r as isize * a_rs));
                    for (acc, yv) in acc.iter_mut().zip(&yv) {
                        *acc = _mm512_fmadd_ps(av, *yv, *acc);
                    }
                }
            }
            let (va, vb) = (_mm512_set1_ps(alpha), _mm512_set1_ps(beta));
            for (r, acc) in acc.iter().enumerate() {
                for (v, acc) in acc.iter().enumerate() {
                    let at = c.add(r * ldc + j0 + 16 * v);
                    let mut out = _mm512_mul_ps(*acc, va);
                    if beta != 0.0 {
                        out = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(masks[v], at), out);
                    }
                    _mm512_mask_storeu_ps(at, masks[v], out);
                }
            }
        }
        j0 += 16 * V;
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn wide_rows<const R: usize, const V: usize>(
    _: (usize, usize),
    _: f32,
    _: Operand,
    _: (*const f32, isize),
    _: f32,
    _: (*mut f32, usize),
) {
    unreachable!("skinny kernels are only dispatched to on x86-64")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn rows_kernel<const R: usize, const V: usize>(
    _: (usize, usize),
    _: (f32, f32),
    _: Operand,
    _: (*const f32, usize),
    _: (*mut f32, usize),
) {
    unreachable!("skinny kernels are only dispatched to on x86-64")
}
