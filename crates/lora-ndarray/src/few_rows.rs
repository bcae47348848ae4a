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

/// The lanes of a 16-lane chunk of the depth with `left` steps left: all sixteen, or the
/// tail's.
#[inline(always)]
fn depth_lanes(left: usize) -> u16 {
    match left >= 16 {
        true => u16::MAX,
        false => (1u16 << left) - 1,
    }
}

/// The 16-lane partial sums of the dot products of `M` rows of `a` with the first `cols`
/// (at most `C`) rows of `W`, over the depth `k` in 16-lane chunks (the tail through lane
/// masks); sums past `cols` stay zero. With `ahead > 0`, each chunk of a row also
/// prefetches the chunk `ahead` elements further on (a later row's, which may lie past
/// `a`: a prefetch never faults).
///
/// Why a whole group apart: with `cols` only known at run time, each depth chunk tested it
/// once per row of `W`, and the chunk's lane mask was computed in the loop. Alone on the
/// Xeon VM (one thread, alternating builds, stop 36 in docs/performance/stops-36.md),
/// `narrow_times_wt`'s rank-8 dots over a 208 x 512 block of `dy` in L2 went from 94-98
/// to 109-116 GFLOP/s, and with every operand in L1 from 100-105 to 120-134 (a core's FMA
/// peak is about 235). Inside the fused LoRA layer, where they are `dy`'s first reader,
/// the layer's time stayed level. Results are bit-identical: the same chunks in the same
/// order.
///
/// # Safety
/// Rows `0..M` of `a` and `0..cols` of `W` hold `k` values each; the CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn dot_accumulators<const M: usize, const C: usize>(
    k: usize,
    cols: usize,
    a: (*const f32, usize),
    w: (*const f32, usize),
    ahead: usize,
) -> [[__m512; C]; M] {
    // SAFETY: forwarded to the caller's contract.
    unsafe {
        match cols == C {
            true => group_dots::<M, C, true>(k, C, a, w, ahead),
            false => group_dots::<M, C, false>(k, cols, a, w, ahead),
        }
    }
}

/// [`dot_accumulators`], with `cols == C` known at compile time where `WHOLE`: whole
/// 16-lane chunks first (no mask), then the depth's tail (masked).
///
/// # Safety
/// As [`dot_accumulators`].
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn group_dots<const M: usize, const C: usize, const WHOLE: bool>(
    k: usize,
    cols: usize,
    (a, lda): (*const f32, usize),
    (w, ldw): (*const f32, usize),
    ahead: usize,
) -> [[__m512; C]; M] {
    let cols = if WHOLE { C } else { cols };
    let mut acc = [[_mm512_setzero_ps(); C]; M];
    // One chunk of the depth at `p` through lane mask `mask`.
    // SAFETY (both loops): every masked load reads elements p..p + 16 (fewer at the tail)
    // of rows i < M of `a` and q < cols of `W`, all inside their k columns.
    let mut chunk = |p: usize, mask: u16| unsafe {
        if ahead > 0 {
            for i in 0..M {
                let line = a.wrapping_add(i * lda + p + ahead).cast::<i8>();
                _mm_prefetch::<_MM_HINT_T0>(line);
            }
        }
        let xv: [__m512; M] =
            std::array::from_fn(|i| _mm512_maskz_loadu_ps(mask, a.add(i * lda + p)));
        for q in 0..cols {
            let wv = _mm512_maskz_loadu_ps(mask, w.add(q * ldw + p));
            for (row, &x) in acc.iter_mut().zip(&xv) {
                row[q] = _mm512_fmadd_ps(x, wv, row[q]);
            }
        }
    };
    let whole = k / 16 * 16;
    for p in (0..whole).step_by(16) {
        chunk(p, u16::MAX);
    }
    if whole < k {
        chunk(whole, depth_lanes(k - whole));
    }
    acc
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
        // SAFETY: forwarded (rows j0..j0 + cols of `W` lie inside its n rows); the stores
        // write (i, j0 + q) of `c`.
        unsafe {
            let w = w.add(j0 * ldw);
            let acc = dot_accumulators::<M, COLS>(k, cols, (a, lda), (w, ldw), 0);
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

/// Rows of `a` per register tile of [`narrow_times_wt`].
const NARROW_ROWS: usize = 3;
/// Rows of `W` read side by side by [`narrow_times_wt`]: a rank-8 adapter's whole `Aᵀ` or
/// `Bᵀ`.
const NARROW_COLS: usize = 8;
/// How many rows of `a` ahead [`narrow_times_wt`] prefetches, as it reads each row. In the
/// fused LoRA backward its rows are `dy`'s, read there first (from L3 or memory) and then
/// by the base product's tiles; past a block's last row, the next block's, which the next
/// call reads. Twelve rows ahead, LoRA fwd+bwd over frozen on the Xeon VM (alternating
/// builds, stop 35): 2048x384x1536 r8 1.133-1.135x -> 1.112-1.117x (three pairs),
/// 2048x384x384 r8 1.106-1.109x -> 1.100x (two); 512x4096x4096 r16 level. 3 to 48 rows
/// all helped, 12-24 most. (The same prefetch in the AVX2 path's `skinny::rows_kernel`
/// and in `token_reduction`'s tiles gained nothing measurable.)
const NARROW_AHEAD: usize = 12;

/// [`few_rows_times_wt`] on AVX-512 for many rows against a narrow `W` (a LoRA slice's
/// `Aᵀ` or `Bᵀ`, `n` the rank): three rows of `a` against eight rows of `W` at a time, so
/// each row of `a` is read once per eight columns (not per four), and eleven loads feed
/// twenty-four FMAs (eight per sixteen in [`dots_avx512`]). The 24 sums of a tile are
/// reduced together by lane shuffles into one 8-wide store per row rather than one
/// `reduce_add` per sum (counted, not timed alone: about eight instructions per sum, so a
/// third as many as the FMAs of a 384-deep slice).
///
/// # Safety
/// As [`few_rows_times_wt`], with AVX-512F.
pub(crate) unsafe fn narrow_times_wt(
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    (a, lda): (*const f32, usize),
    (w, ldw): (*const f32, usize),
    beta: f32,
    (c, ldc): (*mut f32, usize),
) {
    for i0 in (0..m).step_by(NARROW_ROWS) {
        // SAFETY: rows i0.. of a and c lie inside the m x k and m x n extents; the rest is
        // forwarded to the caller's contract.
        unsafe {
            let (a, c) = (a.add(i0 * lda), c.add(i0 * ldc));
            let args = ((n, k), alpha, (a, lda), (w, ldw), beta, (c, ldc));
            match (m - i0).min(NARROW_ROWS) {
                1 => narrow_dots_avx512::<1>(args),
                2 => narrow_dots_avx512::<2>(args),
                _ => narrow_dots_avx512::<3>(args),
            }
        }
    }
}

/// The arguments of one register tile of [`narrow_times_wt`].
type NarrowArgs = (
    (usize, usize),
    f32,
    (*const f32, usize),
    (*const f32, usize),
    f32,
    (*mut f32, usize),
);

/// `M` rows of [`narrow_times_wt`], [`NARROW_COLS`] columns at a time (the columns past
/// `n` neither loaded nor stored).
///
/// # Safety
/// As [`narrow_times_wt`] for rows `0..M`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl")]
unsafe fn narrow_dots_avx512<const M: usize>(
    ((n, k), alpha, (a, lda), (w, ldw), beta, (c, ldc)): NarrowArgs,
) {
    for j0 in (0..n).step_by(NARROW_COLS) {
        let cols = NARROW_COLS.min(n - j0);
        // SAFETY: forwarded (rows j0..j0 + cols of `W` lie inside its n rows); the stores
        // write (i, j0..j0 + cols) of `c`.
        unsafe {
            let w = w.add(j0 * ldw);
            // The next rows' lines once, in the first block of columns (rank 16 takes two).
            let ahead = if j0 == 0 { NARROW_AHEAD * lda } else { 0 };
            let acc = dot_accumulators::<M, NARROW_COLS>(k, cols, (a, lda), (w, ldw), ahead);
            let store_mask = ((1u32 << cols) - 1) as __mmask8;
            let (va, vb) = (_mm256_set1_ps(alpha), _mm256_set1_ps(beta));
            for (i, row) in acc.iter().enumerate() {
                let at = c.add(i * ldc + j0);
                let mut out = _mm256_mul_ps(sums_of_eight(row), va);
                if beta != 0.0 {
                    out = _mm256_fmadd_ps(vb, _mm256_maskz_loadu_ps(store_mask, at), out);
                }
                _mm256_mask_storeu_ps(at, store_mask, out);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn narrow_dots_avx512<const M: usize>(_: NarrowArgs) {
    unreachable!("our kernels are only dispatched to on x86-64")
}

/// The horizontal sums of eight 16-lane vectors, in order: pairs of vectors are
/// interleaved and added, then the four 128-bit lanes folded: 24 shuffles and adds for
/// all eight sums.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
fn sums_of_eight(v: &[__m512; NARROW_COLS]) -> __m256 {
    // Per 128-bit lane, pairwise: [v0 02, v1 02, v0 13, v1 13] (sums of lanes 0+2, 1+3).
    let pair =
        |x: __m512, y: __m512| _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y));
    let (s01, s23, s45, s67) = (
        pair(v[0], v[1]),
        pair(v[2], v[3]),
        pair(v[4], v[5]),
        pair(v[6], v[7]),
    );
    // Per 128-bit lane: [v0, v1, v2, v3] partial sums (and [v4..v7]).
    let quad = |x: __m512, y: __m512| {
        _mm512_add_ps(
            _mm512_shuffle_ps::<0x44>(x, y),
            _mm512_shuffle_ps::<0xEE>(x, y),
        )
    };
    let (t0, t1) = (quad(s01, s23), quad(s45, s67));
    // Lanes [t0.0 + t0.2, t0.1 + t0.3, t1.0 + t1.2, t1.1 + t1.3].
    let u = _mm512_add_ps(
        _mm512_shuffle_f32x4::<0b01_00_01_00>(t0, t1),
        _mm512_shuffle_f32x4::<0b11_10_11_10>(t0, t1),
    );
    // Lane 0: sums of v0..v3; lane 1: sums of v4..v7.
    let w = _mm512_add_ps(
        _mm512_shuffle_f32x4::<0b11_01_10_00>(u, u),
        _mm512_shuffle_f32x4::<0b10_00_11_01>(u, u),
    );
    _mm512_castps512_ps256(w)
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
    /// partial group of four or eight, depths
    /// with and without a partial vector (1, 15, 17, 40, 513), `beta` 0 and not, on each
    /// kernel the CPU has, against f64 sums.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn equal_f64_dot_products_at_every_edge() {
        let has_avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        let has_avx512 =
            is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl");
        // (kernel, present): 0 the AVX2 dots, 1 the AVX-512 ones, 2 `narrow_times_wt`.
        let kernels = [(0, has_avx2), (1, has_avx512), (2, has_avx512)];
        let value = |i: usize, salt: usize| ((i * 37 + salt * 11) % 23) as f32 / 11.0 - 1.0;
        for (kernel, present) in kernels {
            if !present {
                continue;
            }
            for m in 1..=FEW_ROWS + 3 {
                for n in [1, 4, 8, 67] {
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
                                let (a, w) = ((a.as_ptr(), lda), (w.as_ptr(), ldw));
                                let c = (c.as_mut_ptr(), ldc);
                                match kernel {
                                    2 => narrow_times_wt((m, n, k), 1.5, a, w, beta, c),
                                    _ => few_rows_times_wt(
                                        (m, n, k),
                                        1.5,
                                        a,
                                        w,
                                        beta,
                                        c,
                                        kernel == 1,
                                    ),
                                }
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
                                        "kernel {kernel} m {m} n {n} k {k} beta {beta} \
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
