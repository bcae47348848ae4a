//! Our own single-threaded f32 GEMM for AVX2+FMA CPUs without AVX-512 (issue 16).
//!
//! The classic Goto/BLIS structure: the `k` dimension in slices of [`KC`]; per slice, a
//! block of `B` packed into column panels of [`NR`] (kept in L3/L2), then blocks of [`MC`]
//! rows of `A` packed into row panels of [`MR`] (kept in L2), then a 6 x 16 register tile
//! per pair of panels: twelve 8-lane accumulators, two loads of `B` and six broadcasts of
//! `A` per twelve FMAs, so the two FMA pipes never wait on the load ports.
//!
//! Why not only the `gemm` crate: on the 2-core AMD EPYC (Zen 3) development VM, one
//! thread on 512x2816x1024 ran at a median 64 GFLOP/s with the `gemm` crate and 74 with
//! this kernel (a core's FMA peak is about 91), and the two-thread `gemm` bench put this
//! kernel at 127-144 GFLOP/s on the large and decoder shapes against the crate's 95-124
//! (docs/performance.md). On AVX-512 CPUs the `gemm` crate's 16-lane kernels are used
//! instead ([`available`] is false there).
//!
//! Results differ from the `gemm` crate's only by summation order (both use FMA).
#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::cell::RefCell;
use std::sync::OnceLock;

/// Rows of the register tile.
const MR: usize = 6;
/// Columns of the register tile (two 8-lane vectors).
const NR: usize = 16;
/// Depth of one packed slice: a 6 x 256 panel of `A` (6 KiB) and a 256 x 16 panel of `B`
/// (16 KiB) stay in the 32 KiB L1 together.
const KC: usize = 256;
/// Rows of `A` packed at once: 120 x 256 floats = 120 KiB, a quarter of the 512 KiB L2.
const MC: usize = 120;
/// Columns of `B` packed at once: 256 x 3072 floats = 3 MiB, in the shared L3.
const NC: usize = 3072;

/// Whether this kernel runs here: x86-64 with AVX2 and FMA, and no AVX-512 (where the
/// `gemm` crate's wider kernels win).
pub(crate) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && !is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether a product of this shape goes to this kernel: both output sides and the depth at
/// least 64. Skinny products (one side the LoRA rank) stay with the `gemm` crate, which ran
/// them faster here (2048x16x4096: 76 GFLOP/s with this kernel, 85-88 with the `gemm`
/// crate under the same panel threading, in separate runs): packing costs as much as the
/// few multiply-adds per packed element.
pub(crate) fn suits(m: usize, n: usize, k: usize) -> bool {
    m.min(n).min(k) >= 64
}

thread_local! {
    /// Per-thread packing buffers (`A` block, `B` block), reused across calls so a
    /// training step allocates nothing here after the first product.
    static PACKS: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// An operand: base pointer, row stride and column stride (elements).
pub(crate) type Operand = (*const f32, isize, isize);

/// `c = alpha * a b + beta * c` for an `m x n` output with row stride `ldc` (unit column
/// stride); `a` is `m x k` and `b` is `k x n`, each with arbitrary strides. With
/// `beta == 0` the old contents of `c` are never read (they may be uninitialised or NaN).
///
/// # Safety
/// [`available`] must be true; every element the shapes and strides reach must lie in
/// live allocations; no other thread may touch `c`'s elements during the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm(
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    a: Operand,
    b: Operand,
    beta: f32,
    c: *mut f32,
    ldc: usize,
) {
    PACKS.with(|packs| {
        let mut packs = packs.borrow_mut();
        let (a_pack, b_pack) = &mut *packs;
        let b_need = KC * NC.min(n.div_ceil(NR) * NR);
        let a_need = KC * MC.min(m.div_ceil(MR) * MR);
        if b_pack.len() < b_need {
            b_pack.resize(b_need, 0.0);
        }
        if a_pack.len() < a_need {
            a_pack.resize(a_need, 0.0);
        }
        // SAFETY: forwarded to the caller's contract; the buffers hold a full block.
        unsafe { blocked(m, n, k, alpha, a, b, beta, c, ldc, a_pack, b_pack) }
    })
}

/// The three blocking loops around the register tile.
///
/// # Safety
/// As [`sgemm`], and the pack buffers hold `KC x min(MC, m)` and `KC x min(NC, n)` panels
/// rounded up to whole tiles.
#[allow(clippy::too_many_arguments)]
unsafe fn blocked(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    (a, a_rs, a_cs): Operand,
    (b, b_rs, b_cs): Operand,
    beta: f32,
    c: *mut f32,
    ldc: usize,
    a_pack: &mut [f32],
    b_pack: &mut [f32],
) {
    for jc in (0..n).step_by(NC) {
        let nc = NC.min(n - jc);
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            // The first slice applies `beta`; later slices add to what it wrote.
            let beta = if pc == 0 { beta } else { 1.0 };
            // SAFETY (all blocks below): offsets stay within the operands' m x k, k x n
            // and m x n extents, which the caller guarantees are addressable.
            unsafe {
                let b_block = b.offset(pc as isize * b_rs + jc as isize * b_cs);
                pack_b(kc, nc, (b_block, b_rs, b_cs), b_pack);
            }
            for ic in (0..m).step_by(MC) {
                let mc = MC.min(m - ic);
                unsafe {
                    let a_block = a.offset(ic as isize * a_rs + pc as isize * a_cs);
                    pack_a(mc, kc, (a_block, a_rs, a_cs), a_pack);
                }
                for jr in (0..nc).step_by(NR) {
                    let b_panel = &b_pack[jr * kc..(jr + NR) * kc];
                    for ir in (0..mc).step_by(MR) {
                        let a_panel = &a_pack[ir * kc..(ir + MR) * kc];
                        let tile = Tile {
                            c: unsafe { c.add((ic + ir) * ldc + jc + jr) },
                            ldc,
                            rows: MR.min(mc - ir),
                            cols: NR.min(nc - jr),
                        };
                        unsafe { tile_kernel(kc, a_panel, b_panel, tile, alpha, beta) };
                    }
                }
            }
        }
    }
}

/// Packs a `kc x nc` block of `b` into panels of [`NR`] columns, each `kc` rows of 16
/// contiguous values; columns past `nc` are zero.
///
/// # Safety
/// The block's elements are addressable; `out` holds `kc x nc` rounded up to panels.
unsafe fn pack_b(kc: usize, nc: usize, (b, rs, cs): Operand, out: &mut [f32]) {
    for (panel, j0) in (0..nc).step_by(NR).enumerate() {
        let cols = NR.min(nc - j0);
        let dst = &mut out[panel * NR * kc..(panel + 1) * NR * kc];
        // SAFETY: columns j0..j0+cols and rows 0..kc of the block are addressable.
        unsafe {
            let src = b.offset(j0 as isize * cs);
            if cols == NR && rs == 1 {
                // `b` is a transposed row-major matrix (y = x Wᵀ): 8x8 transposes.
                pack_transposed::<NR>(kc, src, cs, dst);
            } else if cols == NR && cs == 1 {
                for (p, row) in dst.chunks_exact_mut(NR).enumerate() {
                    std::ptr::copy_nonoverlapping(
                        src.offset(p as isize * rs),
                        row.as_mut_ptr(),
                        NR,
                    );
                }
            } else {
                for (p, row) in dst.chunks_exact_mut(NR).enumerate() {
                    for (j, v) in row.iter_mut().enumerate() {
                        *v = if j < cols {
                            *src.offset(p as isize * rs + j as isize * cs)
                        } else {
                            0.0
                        };
                    }
                }
            }
        }
    }
}

/// Packs an `mc x kc` block of `a` into panels of [`MR`] rows, each `kc` columns of 6
/// values; rows past `mc` are zero.
///
/// # Safety
/// The block's elements are addressable; `out` holds `mc x kc` rounded up to panels.
unsafe fn pack_a(mc: usize, kc: usize, (a, rs, cs): Operand, out: &mut [f32]) {
    for (panel, i0) in (0..mc).step_by(MR).enumerate() {
        let rows = MR.min(mc - i0);
        let dst = &mut out[panel * MR * kc..(panel + 1) * MR * kc];
        // SAFETY: rows i0..i0+rows and columns 0..kc of the block are addressable.
        unsafe {
            let src = a.offset(i0 as isize * rs);
            if rows == MR && rs == 1 {
                for (p, col) in dst.chunks_exact_mut(MR).enumerate() {
                    std::ptr::copy_nonoverlapping(
                        src.offset(p as isize * cs),
                        col.as_mut_ptr(),
                        MR,
                    );
                }
            } else if rows == MR && cs == 1 {
                // Row-major `a` (the common case): 8 x 8 transposes of the six rows.
                pack_transposed::<MR>(kc, src, rs, dst);
            } else {
                for (p, col) in dst.chunks_exact_mut(MR).enumerate() {
                    for (i, v) in col.iter_mut().enumerate() {
                        *v = if i < rows {
                            *src.offset(i as isize * rs + p as isize * cs)
                        } else {
                            0.0
                        };
                    }
                }
            }
        }
    }
}

/// Packs `W` vectors that run contiguously along `k` (vector `i` starts at `src + i·stride`:
/// the rows of a row-major `a`, or the columns of a transposed `b`) into `kc` groups of `W`
/// values, 8 x 8 blocks at a time through registers.
///
/// # Safety
/// The `W` vectors of `kc` values are addressable; `out` holds `kc x W`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_transposed<const W: usize>(
    kc: usize,
    src: *const f32,
    stride: isize,
    out: &mut [f32],
) {
    let full = kc / 8 * 8;
    // SAFETY: every load reads values p..p+8 of one of the W vectors; every store writes
    // the first `n` lanes of group `g` of column p+q inside `out` (kc x W).
    unsafe {
        for p in (0..full).step_by(8) {
            for g in (0..W).step_by(8) {
                let n = (W - g).min(8);
                let rows: [__m256; 8] = std::array::from_fn(|i| match i < n {
                    true => _mm256_loadu_ps(src.offset((g + i) as isize * stride + p as isize)),
                    false => _mm256_setzero_ps(),
                });
                for (q, v) in transpose8(rows).into_iter().enumerate() {
                    let dst = out.as_mut_ptr().add((p + q) * W + g);
                    if n == 8 {
                        _mm256_storeu_ps(dst, v);
                    } else {
                        let mut lanes = [0.0f32; 8];
                        _mm256_storeu_ps(lanes.as_mut_ptr(), v);
                        std::ptr::copy_nonoverlapping(lanes.as_ptr(), dst, n);
                    }
                }
            }
        }
        for p in full..kc {
            for i in 0..W {
                out[p * W + i] = *src.offset(i as isize * stride + p as isize);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn pack_transposed<const W: usize>(_: usize, _: *const f32, _: isize, _: &mut [f32]) {
    unreachable!("sgemm_avx2 is only dispatched to on x86-64")
}

/// The transpose of eight 8-lane rows.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    // SAFETY: register-only shuffles; callers run with AVX enabled.
    unsafe {
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ]
    }
}

/// Where one register tile lands: `rows x cols` (at most 6 x 16) at `c`, row stride `ldc`.
struct Tile {
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
}

/// `tile = alpha · a_panel b_panel + beta · tile` over `kc` packed steps.
///
/// # Safety
/// The tile's `rows x cols` elements are addressable and owned by this thread; the panels
/// hold `kc` steps each.
#[cfg(target_arch = "x86_64")]
#[inline(never)]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_kernel(
    kc: usize,
    a_panel: &[f32],
    b_panel: &[f32],
    tile: Tile,
    alpha: f32,
    beta: f32,
) {
    debug_assert!(a_panel.len() >= kc * MR && b_panel.len() >= kc * NR);
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    let (mut ap, mut bp) = (a_panel.as_ptr(), b_panel.as_ptr());
    // SAFETY: `ap` and `bp` advance by MR and NR per step over `kc` steps, inside the
    // panels (checked above); the tile's stores stay in its rows x cols.
    unsafe {
        macro_rules! step {
            ($u:expr) => {{
                let b0 = _mm256_loadu_ps(bp.add($u * NR));
                let b1 = _mm256_loadu_ps(bp.add($u * NR + 8));
                for (i, row) in acc.iter_mut().enumerate() {
                    let av = _mm256_broadcast_ss(&*ap.add($u * MR + i));
                    row[0] = _mm256_fmadd_ps(av, b0, row[0]);
                    row[1] = _mm256_fmadd_ps(av, b1, row[1]);
                }
            }};
        }
        let mut p = 0;
        while p + 4 <= kc {
            step!(0);
            step!(1);
            step!(2);
            step!(3);
            ap = ap.add(4 * MR);
            bp = bp.add(4 * NR);
            p += 4;
        }
        while p < kc {
            step!(0);
            ap = ap.add(MR);
            bp = bp.add(NR);
            p += 1;
        }
        let va = _mm256_set1_ps(alpha);
        let vb = _mm256_set1_ps(beta);
        if tile.rows == MR && tile.cols == NR {
            for (i, row) in acc.iter().enumerate() {
                let dst = tile.c.add(i * tile.ldc);
                for (h, &v) in row.iter().enumerate() {
                    let scaled = _mm256_mul_ps(v, va);
                    let out = if beta == 0.0 {
                        scaled
                    } else {
                        _mm256_fmadd_ps(vb, _mm256_loadu_ps(dst.add(8 * h)), scaled)
                    };
                    _mm256_storeu_ps(dst.add(8 * h), out);
                }
            }
        } else {
            let mut tmp = [0.0f32; MR * NR];
            for (i, row) in acc.iter().enumerate() {
                _mm256_storeu_ps(tmp.as_mut_ptr().add(i * NR), row[0]);
                _mm256_storeu_ps(tmp.as_mut_ptr().add(i * NR + 8), row[1]);
            }
            for i in 0..tile.rows {
                for j in 0..tile.cols {
                    let dst = tile.c.add(i * tile.ldc + j);
                    let scaled = alpha * tmp[i * NR + j];
                    *dst = if beta == 0.0 {
                        scaled
                    } else {
                        beta.mul_add(*dst, scaled)
                    };
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_kernel(_: usize, _: &[f32], _: &[f32], _: Tile, _: f32, _: f32) {
    unreachable!("sgemm_avx2 is only dispatched to on x86-64")
}

#[cfg(test)]
mod tests {
    use super::*;
    use lora_core::rng::{RngState, uniform};

    fn rand(n: usize, stream: u64) -> Vec<f32> {
        let mut v = vec![0.0; n];
        uniform(RngState::new(3, stream), -1.0, 1.0, &mut v);
        v
    }

    /// Every packing path (plain, transposed, strided, partial panels) and every blocking
    /// edge (m past MC, n past NC, k past KC, tiles cut on both sides) against an f64
    /// triple loop.
    #[test]
    fn blocked_kernel_matches_the_naive_product_across_block_edges() {
        if !available() {
            eprintln!("skipped: this CPU does not run the AVX2 kernel");
            return;
        }
        for &(m, n, k) in &[(6, 16, 32), (131, 3090, 261), (7, 17, 515), (250, 33, 40)] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let (a, b, c0) = (rand(m * k, 1), rand(k * n, 2), rand(m * n, 3));
                // Row-major storage of op(a) (m x k) or of its transpose (k x m).
                let a_op: Operand = match ta {
                    false => (a.as_ptr(), k as isize, 1),
                    true => (a.as_ptr(), 1, m as isize),
                };
                let b_op: Operand = match tb {
                    false => (b.as_ptr(), n as isize, 1),
                    true => (b.as_ptr(), 1, k as isize),
                };
                let at =
                    |i: usize, p: usize| f64::from(if ta { a[p * m + i] } else { a[i * k + p] });
                let bt =
                    |p: usize, j: usize| f64::from(if tb { b[j * k + p] } else { b[p * n + j] });
                for (alpha, beta) in [(1.0f32, 0.0f32), (-0.5, 0.75)] {
                    let mut c = c0.clone();
                    // SAFETY: the operands and `c` hold exactly the shapes described.
                    unsafe { sgemm((m, n, k), alpha, a_op, b_op, beta, c.as_mut_ptr(), n) };
                    for i in 0..m {
                        for j in 0..n {
                            let dot: f64 = (0..k).map(|p| at(i, p) * bt(p, j)).sum();
                            let want = f64::from(alpha) * dot
                                + if beta == 0.0 {
                                    0.0
                                } else {
                                    f64::from(beta) * f64::from(c0[i * n + j])
                                };
                            let got = f64::from(c[i * n + j]);
                            assert!(
                                (got - want).abs() <= 1e-5 * (k as f64).sqrt() * (1.0 + want.abs()),
                                "{m}x{n}x{k} ta={ta} tb={tb} at ({i}, {j}): {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn beta_zero_never_reads_the_output() {
        if !available() {
            eprintln!("skipped: this CPU does not run the AVX2 kernel");
            return;
        }
        let (m, n, k) = (13, 21, 40);
        let (a, b) = (rand(m * k, 4), rand(k * n, 5));
        let mut c = vec![f32::NAN; m * n];
        // SAFETY: the operands and `c` hold exactly the shapes described.
        unsafe {
            sgemm(
                (m, n, k),
                1.0,
                (a.as_ptr(), k as isize, 1),
                (b.as_ptr(), n as isize, 1),
                0.0,
                c.as_mut_ptr(),
                n,
            )
        };
        assert!(c.iter().all(|v| v.is_finite()));
    }
}
