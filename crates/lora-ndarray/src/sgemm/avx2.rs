//! The AVX2 register tile: 6 x 16, twelve 8-lane accumulators, two loads of `B` and six
//! broadcasts of `A` per twelve FMAs, so the two FMA pipes never wait on the load ports.
#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::{APanel, BPanel, Epilogue, Kernel, Tile};

/// The kernel for AVX2+FMA CPUs without AVX-512.
pub(super) struct Avx2;

/// Rows of the register tile.
const MR: usize = 6;
/// Columns of the register tile (two 8-lane vectors).
const NR: usize = 16;

impl Kernel for Avx2 {
    const MR: usize = MR;
    const NR: usize = NR;
    /// A 384 x 16 panel of `B` (24 KiB) and the 6 x 384 panels of `A` streaming past it
    /// (9 KiB each) overfill Zen 3's 32 KiB L1, yet `KC` 384 ran the MiniLM training step
    /// 3.5% faster than 256 on a 2-core AMD EPYC (Zen 3; stop 37, seven alternating pairs,
    /// 1.723 → 1.662 s, faster in six) and about 1% faster capped at AVX2 on the Xeon VM
    /// (stop 35); 512 was slower than 384 on the AMD EPYC (1.610 against 1.583 s, nine
    /// pairs). Fewer slices store and reload every output tile fewer times; that what misses
    /// L1 comes from L2 within the tile's FMA latency is inferred, not measured.
    const KC: usize = 384;
    /// 120 x 384 floats = 180 KiB, about a third of Zen 3's 512 KiB L2.
    const MC: usize = 120;
    /// `KC`: no slice deeper than it (see `slice_depth`).
    const SLICE_MAX: usize = 384;

    unsafe fn tile(a: APanel<'_>, b: BPanel<'_>, tile: Tile, epilogue: Epilogue) {
        // SAFETY: forwarded to the caller's contract (which includes AVX2 and FMA).
        unsafe { tile_kernel(a, b, tile, epilogue) }
    }
}

/// The 6 x 16 tile: [`Kernel::tile`] with AVX2 and FMA.
///
/// # Safety
/// As [`Kernel::tile`].
#[cfg(target_arch = "x86_64")]
#[inline(never)]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_kernel(a: APanel<'_>, b: BPanel<'_>, tile: Tile, (alpha, beta, bias): Epilogue) {
    let kc_direct = a.direct.map_or(0, |d| d.kc);
    debug_assert!(a.packed.len() >= a.kc_packed * MR);
    debug_assert!(b.holds(NR, kc_direct, a.kc_packed));
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    let mut bp = b.steps.as_ptr();
    tile.prefetch();
    // SAFETY: `bp` advances by NR per step over the panel's steps (checked above); the
    // direct rows hold `kc` steps each and the packed panel `kc_packed` (the caller's
    // contract); the tile's stores stay in its rows x cols.
    unsafe {
        // One packed depth step: two vectors of `B` against the six rows' values at `$a(i)`.
        macro_rules! fma_step {
            ($u:expr, $a:expr) => {{
                let b0 = _mm256_loadu_ps(bp.add($u * NR));
                let b1 = _mm256_loadu_ps(bp.add($u * NR + 8));
                for (i, row) in acc.iter_mut().enumerate() {
                    let av = _mm256_broadcast_ss(&*$a(i));
                    row[0] = _mm256_fmadd_ps(av, b0, row[0]);
                    row[1] = _mm256_fmadd_ps(av, b1, row[1]);
                }
            }};
        }
        if let Some(d) = a.direct {
            let (rows, mut p) = (d.row_starts::<MR>(tile.rows), 0);
            // As on the AVX-512 tile (see there): each in-place broadcast and its two
            // FMAs in one block, which LLVM cannot hoist past the FMAs before it.
            macro_rules! step {
                ($u:expr) => {{
                    let b = [_mm256_loadu_ps(bp.add($u * NR)), _mm256_loadu_ps(bp.add($u * NR + 8))];
                    for (row, &from) in acc.iter_mut().zip(&rows) {
                        let _scratch: __m256;
                        std::arch::asm!(
                            "vbroadcastss {t}, dword ptr [{row} + {at} * 4 + {disp}]",
                            "vfmadd231ps {c0}, {t}, {b0}",
                            "vfmadd231ps {c1}, {t}, {b1}",
                            row = in(reg) from,
                            at = in(reg) p,
                            disp = const 4 * $u,
                            t = out(ymm_reg) _scratch,
                            b0 = in(ymm_reg) b[0],
                            b1 = in(ymm_reg) b[1],
                            c0 = inout(ymm_reg) row[0],
                            c1 = inout(ymm_reg) row[1],
                            options(readonly, nostack, preserves_flags),
                        );
                    }
                }};
            }
            in_place_depth_loop!(d.kc, p, bp, NR, step, |_| ());
        }
        // Kept panels hold the direct steps only: the packed ones are elsewhere.
        if let Some(then) = b.then {
            bp = then.as_ptr();
        }
        let mut ap = a.packed.as_ptr();
        macro_rules! step {
            ($u:expr) => {
                fma_step!($u, |i: usize| ap.add($u * MR + i))
            };
        }
        depth_loop!(a.kc_packed, ap, bp, MR, NR, step);
        let va = _mm256_set1_ps(alpha);
        let vb = _mm256_set1_ps(beta);
        if tile.rows == MR && tile.cols == NR {
            let bias_v = match bias {
                Some(b) => [_mm256_loadu_ps(b), _mm256_loadu_ps(b.add(8))],
                None => [_mm256_setzero_ps(); 2],
            };
            for (i, row) in acc.iter().enumerate() {
                let dst = tile.c.add(i * tile.ldc);
                for (h, &v) in row.iter().enumerate() {
                    let scaled = _mm256_fmadd_ps(v, va, bias_v[h]);
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
                    let add = bias.map_or(0.0, |b| *b.add(j));
                    let scaled = alpha.mul_add(tmp[i * NR + j], add);
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
unsafe fn tile_kernel(_: APanel<'_>, _: BPanel<'_>, _: Tile, _: Epilogue) {
    unreachable!("our kernels are only dispatched to on x86-64")
}
