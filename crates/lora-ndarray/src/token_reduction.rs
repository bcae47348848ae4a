//! Token reductions: `c = alpha · Σ_t s[t, 0..ns]ᵀ ⊗ l[t, 0..nl]` with a narrow `s`
//! (`ns < 64`), the shape of LoRA's weight gradients `dB = s·dyᵀ H` and
//! `dA = s·(dy B)ᵀ x`: a sum over thousands of tokens of rank-`ns` outer products.
//!
//! Each element of `l` takes only `ns` multiply-adds, so the kernels read `l` in place, in
//! row order (each token's columns contiguous, which the hardware prefetchers follow):
//!
//! * AVX-512 ([`accumulate_avx512`]): blocks of [`TOKEN_BLOCK`] tokens; per block, stripes
//!   of 48 columns against up to eight ranks in a register tile (twenty-four 16-lane
//!   accumulators loaded and stored once per block and stripe). The block's rows stay in
//!   L1 across the stripes and rank groups.
//! * AVX2: eight tokens at a time into `ns x 256`-or-so accumulators that stay in L1.
//!
//! Results differ from the general kernels' only by summation order (all use FMA).
#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::cell::RefCell;

/// `c(j, q) = alpha · Σ_t s[t, j] l[t, q] + beta · c(j, q)` for `j < ns < 64`, `q < nl`,
/// over `k` tokens; `s` and `l` row-major (row strides given), `c(j, q)` at
/// `c + j·c_js + q·c_qs`; `beta == 0` never reads `c`.
///
/// # Safety
/// The CPU has AVX2 and FMA; the `k` rows of `s` (`ns` values) and `l` (`nl` values) are
/// addressable; every `c(j, q)` is addressable and touched by no one else.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn token_reduction(
    (ns, nl, k): (usize, usize, usize),
    (alpha, beta): (f32, f32),
    s: (*const f32, isize),
    l: (*const f32, isize),
    c: (*mut f32, usize, usize),
) {
    // SAFETY (both arms): forwarded to the caller's contract.
    if crate::sgemm::isa() == Some(crate::sgemm::Isa::Avx512) {
        let ld = nl.div_ceil(16) * 16;
        ACC.with(|acc| {
            let mut acc = acc.borrow_mut();
            // Sized once for the largest reduction a thread runs (no allocation per call).
            if acc.len() < ns * ld {
                acc.resize(ns * ld, 0.0);
            }
            let acc = &mut acc[..ns * ld];
            acc.fill(0.0);
            unsafe {
                accumulate_avx512((ns, nl, k), s, l, (acc.as_mut_ptr(), ld));
                store_block(acc, ld, (ns, nl), (alpha, beta), c);
            }
        });
    } else {
        unsafe { reduce_avx2((ns, nl, k), (alpha, beta), s, l, c) };
    }
}

/// `acc[j, q] += Σ_t s[t, j] l[t, q]` for `j < ns < 64`, `q < nl`, over `k` tokens, on
/// the widest kernel this CPU runs; `acc` is row-major with row stride `ld`, a multiple of
/// 16 at least `nl` (the fused LoRA backward adds each block of `dy` it packs).
///
/// # Safety
/// The CPU has AVX2 and FMA; the `k` rows of `s` (`ns` values) and `l` (`nl` values) are
/// addressable; `acc` holds `ns x ld` values no one else touches.
pub(crate) unsafe fn accumulate(
    shape: (usize, usize, usize),
    s: (*const f32, isize),
    l: (*const f32, isize),
    acc: (*mut f32, usize),
) {
    // SAFETY (both arms): forwarded to the caller's contract.
    unsafe {
        match crate::sgemm::isa() {
            Some(crate::sgemm::Isa::Avx512) => accumulate_avx512(shape, s, l, acc),
            _ => accumulate_avx2(shape, s, l, acc),
        }
    }
}

/// [`accumulate`] on AVX2: eight tokens at a time, every column of `acc` per pass.
///
/// # Safety
/// As [`accumulate`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn accumulate_avx2(
    (ns, nl, k): (usize, usize, usize),
    (s, lds): (*const f32, isize),
    (l, ldl): (*const f32, isize),
    (acc, ld): (*mut f32, usize),
) {
    let block = Block {
        acc,
        ld,
        ns,
        cols: nl,
    };
    let whole = k / 8 * 8;
    // SAFETY: tokens t..t+8 (or t) are below k; `acc` as the caller guarantees.
    unsafe {
        let rows = |t: usize| (s.offset(t as isize * lds), l.offset(t as isize * ldl));
        for t in (0..whole).step_by(8) {
            let (s, l) = rows(t);
            accumulate_tokens::<8>(&block, s, lds, l, ldl);
        }
        for t in whole..k {
            let (s, l) = rows(t);
            accumulate_tokens::<1>(&block, s, lds, l, ldl);
        }
    }
}

/// Tokens per block of [`accumulate_avx512`]: a block's rows of a `[tokens, 1536]` `l`
/// are 384 KiB (in L2); of a 384-wide one 96 KiB.
pub(crate) const TOKEN_BLOCK: usize = 64;

/// `acc[j, q] += Σ_t s[t, j] l[t, q]` for `j < ns`, `q < nl`, over `k` tokens, on
/// AVX-512: per block of [`TOKEN_BLOCK`] tokens, per stripe of 48 columns, per group of
/// up to eight ranks, one register tile ([`reduce_tile`]). `acc` is row-major with row
/// stride `ld >= nl`.
///
/// # Safety
/// The CPU has AVX-512F; the `k` rows of `s` (`ns` values) and `l` (`nl` values) are
/// addressable; `acc` holds `ns x ld` values no one else touches.
unsafe fn accumulate_avx512(
    (ns, nl, k): (usize, usize, usize),
    (s, lds): (*const f32, isize),
    (l, ldl): (*const f32, isize),
    (acc, ld): (*mut f32, usize),
) {
    for t0 in (0..k).step_by(TOKEN_BLOCK) {
        let tokens = TOKEN_BLOCK.min(k - t0);
        // SAFETY: rows t0..t0 + tokens of s and l; columns q0.. and ranks j0.. inside the
        // extents (each tile masks columns past nl and takes only the ranks left).
        unsafe {
            let (s, l) = (s.offset(t0 as isize * lds), l.offset(t0 as isize * ldl));
            for q0 in (0..nl).step_by(STRIPE) {
                let cols = STRIPE.min(nl - q0);
                for j0 in (0..ns).step_by(8) {
                    let s = (s.add(j0), lds);
                    let l = (l.add(q0), ldl);
                    let tile = (acc.add(j0 * ld + q0), ld);
                    match ns - j0 {
                        1 => reduce_tile::<1>(tokens, s, l, cols, tile),
                        2 => reduce_tile::<2>(tokens, s, l, cols, tile),
                        3 => reduce_tile::<3>(tokens, s, l, cols, tile),
                        4 => reduce_tile::<4>(tokens, s, l, cols, tile),
                        5 => reduce_tile::<5>(tokens, s, l, cols, tile),
                        6 => reduce_tile::<6>(tokens, s, l, cols, tile),
                        7 => reduce_tile::<7>(tokens, s, l, cols, tile),
                        _ => reduce_tile::<8>(tokens, s, l, cols, tile),
                    }
                }
            }
        }
    }
}

/// Columns of one [`reduce_tile`]: three 16-lane vectors.
const STRIPE: usize = 48;

/// `acc[j, q] += Σ_{t<k} s[t, j] l[t, q]` for `j < R`, `q < cols <= 48`: `R x 3`
/// accumulators in registers over all `k` tokens (per token three loads of `l`, `R`
/// broadcasts of `s`, `3R` FMAs), columns past `cols` masked off.
///
/// # Safety
/// As [`accumulate_avx512`] for this tile's ranks, columns and tokens.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn reduce_tile<const R: usize>(
    k: usize,
    (s, lds): (*const f32, isize),
    (l, ldl): (*const f32, isize),
    cols: usize,
    (acc, ld): (*mut f32, usize),
) {
    const V: usize = STRIPE / 16;
    let masks: [__mmask16; V] = std::array::from_fn(|v| {
        let lanes = cols.saturating_sub(16 * v).min(16);
        ((1u32 << lanes) - 1) as __mmask16
    });
    // SAFETY: masked loads and stores touch only columns < cols of rows < R of `acc`
    // and of the k rows of `l`; `s` reads R values of each of k rows.
    unsafe {
        let mut sums: [[__m512; V]; R] = std::array::from_fn(|j| {
            std::array::from_fn(|v| _mm512_maskz_loadu_ps(masks[v], acc.add(j * ld + 16 * v)))
        });
        for t in 0..k {
            let lt = l.offset(t as isize * ldl);
            let lv: [__m512; V] =
                std::array::from_fn(|v| _mm512_maskz_loadu_ps(masks[v], lt.add(16 * v)));
            let st = s.offset(t as isize * lds);
            for (j, sums) in sums.iter_mut().enumerate() {
                let sj = _mm512_set1_ps(*st.add(j));
                for (sum, lv) in sums.iter_mut().zip(&lv) {
                    *sum = _mm512_fmadd_ps(sj, *lv, *sum);
                }
            }
        }
        for (j, sums) in sums.iter().enumerate() {
            for (v, sum) in sums.iter().enumerate() {
                _mm512_mask_storeu_ps(acc.add(j * ld + 16 * v), masks[v], *sum);
            }
        }
    }
}

/// [`token_reduction`] on AVX2: streams `l` a row at a time (eight tokens per pass, each
/// row's columns contiguous, so the hardware prefetchers follow) into `ns x qb`
/// accumulators that stay in L1, one block of columns after another. (An 8-column strip
/// per pass over all tokens, the previous design, read one cache line per token and
/// strip: latency-bound once `l` left the L2, 1.4-1.6x slower on the LoRA layer's
/// `[2048, 384]` inputs.)
///
/// # Safety
/// As [`token_reduction`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn reduce_avx2(
    (ns, nl, k): (usize, usize, usize),
    alpha_beta: (f32, f32),
    (s, lds): (*const f32, isize),
    (l, ldl): (*const f32, isize),
    (c, c_js, c_qs): (*mut f32, usize, usize),
) {
    // Columns per block: the ns x qb accumulators fill at most half the 32 KiB L1.
    let qb = (ACC_FLOATS / ns / 8 * 8).clamp(8, nl.div_ceil(8) * 8);
    ACC.with(|acc| {
        let mut acc = acc.borrow_mut();
        if acc.len() < ns * qb {
            acc.resize(ns * qb, 0.0);
        }
        let acc = &mut acc[..ns * qb];
        for q0 in (0..nl).step_by(qb) {
            let w = qb.min(nl - q0);
            acc.fill(0.0);
            // SAFETY: columns q0..q0 + w lie inside l; the accumulators hold ns rows of
            // qb >= w values.
            unsafe {
                accumulate_avx2(
                    (ns, w, k),
                    (s, lds),
                    (l.add(q0), ldl),
                    (acc.as_mut_ptr(), qb),
                )
            };
            // SAFETY: c(j, q0 + q) lies in the output for j < ns, q < w.
            unsafe { store_block(acc, qb, (ns, w), alpha_beta, (c.add(q0 * c_qs), c_js, c_qs)) };
        }
    });
}

/// `c(j, q) = alpha · acc[j, q] + beta · c(j, q)` for `j < ns`, `q < w` (`acc` row stride
/// `ld`), walking `c` in its memory order (`c(j, q)` at `c + j·c_js + q·c_qs`); `beta == 0`
/// never reads `c` (it may hold anything, NaN included).
///
/// # Safety
/// Every `c(j, q)` is addressable and touched by no one else.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn store_block(
    acc: &[f32],
    ld: usize,
    (ns, w): (usize, usize),
    (alpha, beta): (f32, f32),
    (c, c_js, c_qs): (*mut f32, usize, usize),
) {
    let put = |j: usize, q: usize| {
        // SAFETY: forwarded to the caller's contract (j < ns, q < w).
        unsafe {
            let c = c.add(j * c_js + q * c_qs);
            *c = match beta {
                0.0 => alpha * acc[j * ld + q],
                _ => alpha * acc[j * ld + q] + beta * *c,
            };
        }
    };
    if c_qs == 1 {
        (0..ns).for_each(|j| (0..w).for_each(|q| put(j, q)));
    } else {
        (0..w).for_each(|q| (0..ns).for_each(|j| put(j, q)));
    }
}

/// Floats of the AVX2 kernel's accumulator block (16 KiB).
const ACC_FLOATS: usize = 4096;

thread_local! {
    /// [`token_reduction`]'s accumulators, reused across calls.
    static ACC: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// A block of [`token_reduction`]'s accumulators: `ns` rows of `cols` values (row stride
/// `ld`, a multiple of 8 at least `cols` rounded up to 8).
struct Block {
    acc: *mut f32,
    ld: usize,
    ns: usize,
    cols: usize,
}

/// `acc[j, q] += Σ_{i<T} s_i[j] · l_i[q]` for the `T` tokens whose rows of `s` start at
/// `s` (stride `lds`) and of `l` at `l` (stride `ldl`, the block's first column): the `T`
/// row vectors stay in registers while every accumulator row takes `T` FMAs.
///
/// # Safety
/// The `T` rows of `s` hold `ns` values and of `l` `cols` values; `acc` as [`Block`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn accumulate_tokens<const T: usize>(
    block: &Block,
    s: *const f32,
    lds: isize,
    l: *const f32,
    ldl: isize,
) {
    let full = block.cols / 8 * 8;
    // SAFETY: loads stay in the T rows' `cols` values (a masked load for the last partial
    // vector); stores in the accumulators' ns x ld block.
    unsafe {
        // Four accumulator rows at once: their FMA chains (T long each) interleave, so the
        // FMA latency is hidden without relying on the out-of-order window.
        let step = |q: usize, rows: [__m256; T]| {
            let whole = block.ns / 4 * 4;
            for j0 in (0..whole).step_by(4) {
                accumulate_rows::<T, 4>(block, (s, lds), j0, q, &rows);
            }
            for j in whole..block.ns {
                accumulate_rows::<T, 1>(block, (s, lds), j, q, &rows);
            }
        };
        for q in (0..full).step_by(8) {
            step(
                q,
                std::array::from_fn(|i| _mm256_loadu_ps(l.offset(i as isize * ldl).add(q))),
            );
        }
        if full < block.cols {
            let mask = crate::sgemm::first_lanes(block.cols - full);
            step(
                full,
                std::array::from_fn(|i| {
                    _mm256_maskload_ps(l.offset(i as isize * ldl).add(full), mask)
                }),
            );
        }
    }
}

/// Accumulator rows `j0..j0 + J`, columns `q..q + 8`, take `Σ_i s_i[j] · rows[i]`.
///
/// # Safety
/// As [`accumulate_tokens`], with `j0 + J <= ns` and `q + 8 <= ld`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn accumulate_rows<const T: usize, const J: usize>(
    block: &Block,
    (s, lds): (*const f32, isize),
    j0: usize,
    q: usize,
    rows: &[__m256; T],
) {
    // SAFETY: forwarded to the caller's contract.
    unsafe {
        let dst: [*mut f32; J] = std::array::from_fn(|j| block.acc.add((j0 + j) * block.ld + q));
        let mut v: [__m256; J] = std::array::from_fn(|j| _mm256_loadu_ps(dst[j]));
        for (i, row) in rows.iter().enumerate() {
            let si = s.offset(i as isize * lds).add(j0);
            for (j, v) in v.iter_mut().enumerate() {
                *v = _mm256_fmadd_ps(_mm256_broadcast_ss(&*si.add(j)), *row, *v);
            }
        }
        for (j, v) in v.iter().enumerate() {
            _mm256_storeu_ps(dst[j], *v);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn token_reduction(
    _: (usize, usize, usize),
    _: (f32, f32),
    _: (*const f32, isize),
    _: (*const f32, isize),
    _: (*mut f32, usize, usize),
) {
    unreachable!("skinny kernels are only dispatched to on x86-64")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn accumulate_avx2(
    _: (usize, usize, usize),
    _: (*const f32, isize),
    _: (*const f32, isize),
    _: (*mut f32, usize),
) {
    unreachable!("skinny kernels are only dispatched to on x86-64")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn reduce_tile<const R: usize>(
    _: usize,
    _: (*const f32, isize),
    _: (*const f32, isize),
    _: usize,
    _: (*mut f32, usize),
) {
    unreachable!("skinny kernels are only dispatched to on x86-64")
}
