//! Products with one narrow side (LoRA's rank r, attention's head size) on AVX2+FMA,
//! without packing the wide operand.
//!
//! LoRA adds four such products to each layer's step: `x Aᵀ` and `dy B` (`[tokens, r]`
//! outputs over a wide depth) and `dyᵀ H`, `(dy B)ᵀ x` (reductions over the tokens into
//! `[out, r]` and `[r, in]`). Each multiplies every element of a `[tokens, features]`
//! operand by only `r` values, so the work is reading that operand once: a general kernel
//! that first packs it (the `gemm` crate, at about half the large products' rate here,
//! and with a scratch allocation per call) spends as much on packing as on arithmetic.
//! Two kernels read it in place instead:
//!
//! * [`narrow_output`]: `c[m, n] = alpha · a[m, k] · y[k, n]`, `n < 64`: four rows of `a`
//!   at a time, each element broadcast against the `n`-wide row of `y` (packed once per
//!   call when it is not already `[k, n]` row-major with `n` a multiple of 8).
//! * [`token_reduction`]: `c = alpha · Σ_t s[t, 0..ns]ᵀ ⊗ l[t, 0..nl]` with `ns < 64`, the
//!   `ns x 8` accumulators of an 8-column strip of `l` kept in registers over all tokens.
//!
//! Results differ from the general kernels' only by summation order (all use FMA).
#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::cell::RefCell;

/// How many rows ahead [`token_reduction`] prefetches its strided operand.
const PREFETCH_ROWS: usize = 16;

/// The narrow side must be below this (r = 64 and up go to the general kernels).
pub(crate) const NARROW: usize = 64;

thread_local! {
    /// The narrow operand packed `[k, n rounded up to 8]`, reused across calls.
    static NARROW_PACK: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// An operand: base pointer, row stride and column stride (elements).
pub(crate) type Operand = (*const f32, isize, isize);

/// Runs `c = alpha · a b` (`beta == 0`: `c` is only written) on a skinny kernel when the
/// shape and strides fit one; returns whether it did.
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
    c: *mut f32,
    ldc: usize,
) -> bool {
    let ((pa, a_rs, a_cs), (pb, b_rs, b_cs)) = (a, b);
    // SAFETY (all arms): forwarded to the caller's contract; each kernel reads exactly the
    // elements of the product's operands and writes the m x n output.
    unsafe {
        if n < NARROW && a_cs == 1 && k >= 8 {
            narrow_output((m, n, k), alpha, (pa, a_rs), (pb, b_rs, b_cs), c, ldc);
            return true;
        }
        // a = Uᵀ with U `[k, m]` row-major, b = V `[k, n]` row-major: sums over k.
        if a_rs == 1 && b_cs == 1 && k >= 8 {
            if m < NARROW {
                // c[j, q] = Σ_t U[t, j] V[t, q]: U is the narrow side.
                token_reduction((m, n, k), alpha, (pa, a_cs), (pb, b_rs), (c, ldc, 1));
                return true;
            }
            if n < NARROW {
                // c[q, j] = Σ_t V[t, j] U[t, q]: V is the narrow side, stored transposed.
                token_reduction((n, m, k), alpha, (pb, b_rs), (pa, a_cs), (c, 1, ldc));
                return true;
            }
        }
    }
    false
}

/// `c[m, n] = alpha · a[m, k] · y[k, n]` with `a` row-major (row stride `lda`) and `y` any
/// strides, `n < NARROW`.
///
/// # Safety
/// As [`try_run`].
unsafe fn narrow_output(
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    (a, lda): (*const f32, isize),
    (y, y_rs, y_cs): Operand,
    c: *mut f32,
    ldc: usize,
) {
    let width = n.div_ceil(8) * 8;
    NARROW_PACK.with(|pack| {
        let mut pack = pack.borrow_mut();
        // `y` as it is when already `[k, width]` row-major, else packed with zero columns.
        let (y, ldy) = if y_cs == 1 && y_rs == width as isize {
            (y, width)
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
        // SAFETY: rows i..i+R of a and c lie inside the m x k and m x n extents.
        let at = |i: usize| unsafe { (a.offset(i as isize * lda), c.add(i * ldc)) };
        let whole = m / 4 * 4;
        for i in (0..whole).step_by(4) {
            let (a, c) = at(i);
            // SAFETY: four rows from i, inside the extents (i + 4 <= m).
            unsafe { rows_kernel::<4>((n, k), alpha, (a, lda), (y, ldy), (c, ldc)) };
        }
        for i in whole..m {
            let (a, c) = at(i);
            // SAFETY: row i, inside the extents.
            unsafe { rows_kernel::<1>((n, k), alpha, (a, lda), (y, ldy), (c, ldc)) };
        }
    });
}

/// `R` rows of [`narrow_output`], 16 columns (two vectors) at a time.
///
/// # Safety
/// As [`try_run`]; `y` is `[k, ldy]` row-major with `ldy >= n` a multiple of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_kernel<const R: usize>(
    (n, k): (usize, usize),
    alpha: f32,
    (a, lda): (*const f32, isize),
    (y, ldy): (*const f32, usize),
    (c, ldc): (*mut f32, usize),
) {
    let mut j0 = 0;
    while j0 < n {
        let two = j0 + 8 < n;
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        // SAFETY: p < k and j0 + 16 <= ldy when `two` (else j0 + 8 <= ldy) keep every load
        // inside a's R x k rows and y's k x ldy block.
        unsafe {
            for p in 0..k {
                let yp = y.add(p * ldy + j0);
                let y0 = _mm256_loadu_ps(yp);
                let y1 = if two {
                    _mm256_loadu_ps(yp.add(8))
                } else {
                    _mm256_setzero_ps()
                };
                for (r, acc) in acc.iter_mut().enumerate() {
                    let av = _mm256_broadcast_ss(&*a.offset(r as isize * lda + p as isize));
                    acc[0] = _mm256_fmadd_ps(av, y0, acc[0]);
                    if two {
                        acc[1] = _mm256_fmadd_ps(av, y1, acc[1]);
                    }
                }
            }
        }
        let cols = (n - j0).min(16);
        let va = _mm256_set1_ps(alpha);
        for (r, acc) in acc.iter().enumerate() {
            let mut lanes = [0.0f32; 16];
            // SAFETY: 16 floats of `lanes`; row r, columns j0..j0+cols of c are in range.
            unsafe {
                _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_mul_ps(acc[0], va));
                _mm256_storeu_ps(lanes.as_mut_ptr().add(8), _mm256_mul_ps(acc[1], va));
                std::ptr::copy_nonoverlapping(lanes.as_ptr(), c.add(r * ldc + j0), cols);
            }
        }
        j0 += 16;
    }
}

/// `c(j, q) = alpha · Σ_t s[t, j] l[t, q]` for `j < ns < NARROW`, `q < nl`, over `k`
/// tokens; `s` and `l` row-major (row strides given), `c(j, q)` at `c + j·c_js + q·c_qs`.
///
/// # Safety
/// As [`try_run`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn token_reduction(
    (ns, nl, k): (usize, usize, usize),
    alpha: f32,
    (s, lds): (*const f32, isize),
    (l, ldl): (*const f32, isize),
    (c, c_js, c_qs): (*mut f32, usize, usize),
) {
    let va = _mm256_set1_ps(alpha);
    for q0 in (0..nl).step_by(8) {
        let cols = (nl - q0).min(8);
        for j0 in (0..ns).step_by(8) {
            let rows = (ns - j0).min(8);
            // SAFETY: t < k, q0 + cols <= nl and j0 + rows <= ns keep every read inside
            // s (k x ns) and l (k x nl); a partial strip is read through a copy.
            let acc = unsafe {
                let s = s.add(j0);
                let l = l.add(q0);
                if cols == 8 {
                    strip(k, (s, lds), rows, |t| {
                        // The rows are a stride apart: fetch ahead across page boundaries,
                        // where the hardware prefetcher stops (a prefetch never faults).
                        let ahead = l.wrapping_offset((t + PREFETCH_ROWS) as isize * ldl);
                        _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
                        _mm256_loadu_ps(l.offset(t as isize * ldl))
                    })
                } else {
                    strip(k, (s, lds), rows, |t| {
                        let mut tail = [0.0f32; 8];
                        std::ptr::copy_nonoverlapping(
                            l.offset(t as isize * ldl),
                            tail.as_mut_ptr(),
                            cols,
                        );
                        _mm256_loadu_ps(tail.as_ptr())
                    })
                }
            };
            for (jj, acc) in acc.iter().enumerate().take(rows) {
                let mut lanes = [0.0f32; 8];
                // SAFETY: 8 floats of `lanes`; c(j0 + jj, q0 + q) is in the output.
                unsafe {
                    _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_mul_ps(*acc, va));
                    for (q, &v) in lanes.iter().enumerate().take(cols) {
                        *c.add((j0 + jj) * c_js + (q0 + q) * c_qs) = v;
                    }
                }
            }
        }
    }
}

/// One 8-column strip of [`token_reduction`]: `acc[j] = Σ_t s[t, j] · l_t` for `j < rows`
/// (at most 8), with `load(t)` giving the strip of `l`'s row `t`. The eight accumulators
/// stay in registers (a fixed count; rows past `rows` multiply zeros).
///
/// # Safety
/// `s` addresses `k` rows of at least `rows` values (row stride `lds`); `load` reads
/// inside `l` for every `t < k`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn strip(
    k: usize,
    (s, lds): (*const f32, isize),
    rows: usize,
    load: impl Fn(usize) -> __m256,
) -> [__m256; 8] {
    let mut acc = [_mm256_setzero_ps(); 8];
    // SAFETY: row t of s holds `rows` readable values; lanes past `rows` are not read.
    unsafe {
        for t in 0..k {
            let lv = load(t);
            let st = s.offset(t as isize * lds);
            for (jj, acc) in acc.iter_mut().enumerate() {
                let sv = if jj < rows {
                    _mm256_broadcast_ss(&*st.add(jj))
                } else {
                    _mm256_setzero_ps()
                };
                *acc = _mm256_fmadd_ps(sv, lv, *acc);
            }
        }
    }
    acc
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn rows_kernel<const R: usize>(
    _: (usize, usize),
    _: f32,
    _: (*const f32, isize),
    _: (*const f32, usize),
    _: (*mut f32, usize),
) {
    unreachable!("skinny kernels are only dispatched to on x86-64")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn token_reduction(
    _: (usize, usize, usize),
    _: f32,
    _: (*const f32, isize),
    _: (*const f32, isize),
    _: (*mut f32, usize, usize),
) {
    unreachable!("skinny kernels are only dispatched to on x86-64")
}
