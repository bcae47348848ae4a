//! Products of a few rows against a weight stored `[out, in]`: `c[m, n] = alpha · a[m, k] ·
//! Wᵀ + beta · c`, four rows of `a` at a time, each output a dot product of a row of `a`
//! (in L1) and a row of `W`. Generation runs one token per sequence (at most four rows)
//! through every projection this way, streaming `W` once, so its speed is how fast the
//! weights stream in; on AVX-512 the fused LoRA layer runs its rank-r slices here too
//! (`gemm/lora_backward.rs`, `slice_product`), where `W` is `Aᵀ` or `Bᵀ`, small enough to
//! stay in L1 across the groups of rows.
//!
//! The `gemm` crate ran these through its general path (64% of a decoder's generation in
//! the profile, single-threaded below a million multiply-adds). Here four rows of `W` are
//! read side by side against the `m` rows of `a`, in 16-lane (AVX-512) or 8-lane (AVX2)
//! chunks along the depth; the caller splits the columns between threads
//! (`gemm::split_panels`), since one core does not saturate the memory system.
//!
//! Results differ from the general kernels' only by summation order (all use FMA).
#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Rows of `a` per register tile, and the most rows `skinny::try_run` sends here.
pub(crate) const FEW_ROWS: usize = 4;

/// Rows of `W` (output columns) read side by side.
const COLS: usize = 4;

/// `c = alpha · a Wᵀ + beta · c` for `m` rows, [`FEW_ROWS`] at a time: `a` row-major (row
/// stride `lda`), `W` `[n, k]` row-major (row stride `ldw`), `c` row stride `ldc`;
/// `beta == 0` never reads `c`. Each group of rows reads `W` once more: meant for a few
/// rows (generation), or a narrow `W` that stays in L1 (LoRA's rank-r slices).
///
/// # Safety
/// The CPU has AVX2 and FMA (and AVX-512F where `avx512`); `a`'s `m x k`, `W`'s `n x k`
/// and `c`'s `m x n` elements lie in live allocations, `c`'s touched by no one else.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn few_rows_times_wt(
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    (a, lda): (*const f32, usize),
    (w, ldw): (*const f32, usize),
    beta: f32,
    (c, ldc): (*mut f32, usize),
    avx512: bool,
) {
    for i0 in (0..m).step_by(FEW_ROWS) {
        // SAFETY: rows i0.. of a and c lie inside the m x k and m x n extents.
        let (a, c) = unsafe { (a.add(i0 * lda), c.add(i0 * ldc)) };
        #[cfg(target_arch = "x86_64")]
        macro_rules! rows {
            ($m:literal) => {
                // SAFETY: forwarded to the caller's contract.
                unsafe {
                    match avx512 {
                        true => {
                            dots_avx512::<$m>((n, k), alpha, (a, lda), (w, ldw), beta, (c, ldc))
                        }
                        false => dots_avx2::<$m>((n, k), alpha, (a, lda), (w, ldw), beta, (c, ldc)),
                    }
                }
            };
        }
        #[cfg(not(target_arch = "x86_64"))]
        macro_rules! rows {
            ($m:literal) => {{
                let _ = (n, k, alpha, a, lda, w, ldw, beta, c, ldc, avx512);
                unreachable!("our kernels are only dispatched to on x86-64")
            }};
        }
        match (m - i0).min(FEW_ROWS) {
            1 => rows!(1),
            2 => rows!(2),
            3 => rows!(3),
            _ => rows!(4),
        }
    }
}

/// Stores `alpha · sum + beta · c` at `c` (`c` not read when `beta == 0`).
///
/// # Safety
/// `c` is a live, exclusively owned element.
#[inline(always)]
unsafe fn store(c: *mut f32, alpha: f32, sum: f32, beta: f32) {
    // SAFETY: forwarded to the caller.
    unsafe {
        *c = match beta == 0.0 {
            true => alpha * sum,
            false => alpha.mul_add(sum, beta * *c),
        }
    };
}

/// [`few_rows_times_wt`] for `M` rows on AVX-512F: the depth's tail through lane masks.
///
/// # Safety
/// As [`few_rows_times_wt`], with AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dots_avx512<const M: usize>(
    (n, k): (usize, usize),
    alpha: f32,
    (a, lda): (*const f32, usize),
    (w, ldw): (*const f32, usize),
    beta: f32,
    (c, ldc): (*mut f32, usize),
) {
    for j0 in (0..n).step_by(COLS) {
        let cols = COLS.min(n - j0);
        let mut acc = [[_mm512_setzero_ps(); COLS]; M];
        // SAFETY: every masked load reads elements p..p + 16 (fewer at the tail) of rows
        // i < M of `a` and j0 + q < n of `W`, all inside their k columns; the stores
        // write (i, j0 + q) of `c`.
        unsafe {
            for p in (0..k).step_by(16) {
                let mask = match k - p >= 16 {
                    true => u16::MAX,
                    false => (1u16 << (k - p)) - 1,
                };
                let wv: [__m512; COLS] = std::array::from_fn(|q| match q < cols {
                    true => _mm512_maskz_loadu_ps(mask, w.add((j0 + q) * ldw + p)),
                    false => _mm512_setzero_ps(),
                });
                for (i, row) in acc.iter_mut().enumerate() {
                    let xv = _mm512_maskz_loadu_ps(mask, a.add(i * lda + p));
                    for (q, v) in row.iter_mut().enumerate() {
                        *v = _mm512_fmadd_ps(xv, wv[q], *v);
                    }
                }
            }
            for (i, row) in acc.iter().enumerate() {
                for (q, &v) in row.iter().enumerate().take(cols) {
                    store(
                        c.add(i * ldc + j0 + q),
                        alpha,
                        _mm512_reduce_add_ps(v),
                        beta,
                    );
                }
            }
        }
    }
}

/// [`few_rows_times_wt`] for `M` rows on AVX2: whole 8-lane chunks, then the depth's tail
/// element by element.
///
/// # Safety
/// As [`few_rows_times_wt`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_avx2<const M: usize>(
    (n, k): (usize, usize),
    alpha: f32,
    (a, lda): (*const f32, usize),
    (w, ldw): (*const f32, usize),
    beta: f32,
    (c, ldc): (*mut f32, usize),
) {
    let whole = k / 8 * 8;
    for j0 in (0..n).step_by(COLS) {
        let cols = COLS.min(n - j0);
        let mut acc = [[_mm256_setzero_ps(); COLS]; M];
        // SAFETY: as in `dots_avx512`, with whole chunks below `whole <= k`.
        unsafe {
            for p in (0..whole).step_by(8) {
                let wv: [__m256; COLS] = std::array::from_fn(|q| match q < cols {
                    true => _mm256_loadu_ps(w.add((j0 + q) * ldw + p)),
                    false => _mm256_setzero_ps(),
                });
                for (i, row) in acc.iter_mut().enumerate() {
                    let xv = _mm256_loadu_ps(a.add(i * lda + p));
                    for (q, v) in row.iter_mut().enumerate() {
                        *v = _mm256_fmadd_ps(xv, wv[q], *v);
                    }
                }
            }
            for (i, row) in acc.iter().enumerate() {
                for (q, &v) in row.iter().enumerate().take(cols) {
                    let mut lanes = [0.0f32; 8];
                    _mm256_storeu_ps(lanes.as_mut_ptr(), v);
                    let mut sum = lanes.iter().sum::<f32>();
                    for p in whole..k {
                        sum = (*a.add(i * lda + p)).mul_add(*w.add((j0 + q) * ldw + p), sum);
                    }
                    store(c.add(i * ldc + j0 + q), alpha, sum, beta);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row count (and more than one group of rows), column counts with and without a
    /// partial group of four, depths
    /// with and without a partial vector (1, 15, 17, 40, 513), `beta` 0 and not, on each
    /// kernel the CPU has, against f64 sums.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn equal_f64_dot_products_at_every_edge() {
        let has_avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        let kernels = [
            (false, has_avx2),
            (true, is_x86_feature_detected!("avx512f")),
        ];
        let value = |i: usize, salt: usize| ((i * 37 + salt * 11) % 23) as f32 / 11.0 - 1.0;
        for (avx512, present) in kernels {
            if !present {
                continue;
            }
            for m in 1..=FEW_ROWS + 3 {
                for n in [1, 4, 67] {
                    for k in [1, 15, 17, 40, 513] {
                        let (lda, ldw, ldc) = (k + 3, k + 5, n + 2);
                        let a: Vec<f32> = (0..m * lda).map(|i| value(i, 1)).collect();
                        let w: Vec<f32> = (0..n * ldw).map(|i| value(i, 2)).collect();
                        for beta in [0.0f32, 0.5] {
                            let old: Vec<f32> = (0..m * ldc).map(|i| value(i, 3)).collect();
                            let mut c = old.clone();
                            // SAFETY: the buffers hold the extents given; the CPU has the
                            // kernel's features (checked above).
                            unsafe {
                                few_rows_times_wt(
                                    (m, n, k),
                                    1.5,
                                    (a.as_ptr(), lda),
                                    (w.as_ptr(), ldw),
                                    beta,
                                    (c.as_mut_ptr(), ldc),
                                    avx512,
                                )
                            };
                            for i in 0..m {
                                for j in 0..n {
                                    let dot: f64 = (0..k)
                                        .map(|p| f64::from(a[i * lda + p] * w[j * ldw + p]))
                                        .sum();
                                    let want =
                                        1.5 * dot + f64::from(beta) * f64::from(old[i * ldc + j]);
                                    let got = f64::from(c[i * ldc + j]);
                                    assert!(
                                        (got - want).abs() <= 1e-5 * (1.0 + k as f64),
                                        "avx512 {avx512} m {m} n {n} k {k} beta {beta} \
                                         ({i}, {j}): {got} vs {want}"
                                    );
                                }
                                // Padding between rows of c stays untouched.
                                for j in n..ldc {
                                    assert_eq!(c[i * ldc + j], old[i * ldc + j]);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
