//! The AVX-512 register tile: 8 x 48, twenty-four 16-lane accumulators, three loads of `B`
//! and eight broadcast loads of `A` per twenty-four FMAs: 28 of the 32 vector registers,
//! and eleven loads per twelve cycles of a Xeon core's two 512-bit FMA pipes. Eight rows
//! also make `A`'s packing whole 8 x 8 transposes. Measured on the 2-core Xeon VM, one
//! thread, `x·Wᵀ` products, alternating in one process: 12 x 32 ran within noise of it or
//! up to 10% slower, 14 x 32 and 6 x 64 no faster on any shape
//! (docs/performance/stops-25-28.md, stop 26).
//!
//! On AVX-512 CPUs the `gemm` crate runs 16-lane kernels too; ours packs into buffers it
//! keeps (no scratch allocation per call), prefetches the output tile, and fuses a LoRA
//! term and a bias into the store ([`super::sgemm_plus`]).
#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::{APanel, BPanel, Epilogue, Kernel, Tile};

/// The kernel for CPUs with AVX-512F.
pub(super) struct Avx512;

/// Rows of the register tile.
const MR: usize = 8;
/// Vectors per row of the register tile.
const NV: usize = 3;
/// Columns of the register tile (three 16-lane vectors).
const NR: usize = 16 * NV;

impl Kernel for Avx512 {
    const MR: usize = MR;
    const NR: usize = NR;
    /// Measured on the Xeon (one thread, `x·Wᵀ` products): 256, 384 and 512 within a few
    /// percent of each other, 384 and 512 ahead more often. A 512 x 48 panel of `B` is
    /// 96 KiB, so it streams from L2 rather than sitting in the 48 KiB L1.
    const KC: usize = 512;
    /// 240 x 512 floats = 480 KiB of a Xeon core's 2 MiB L2 (120 and 480 measured no
    /// better).
    const MC: usize = 240;
    /// No slice deeper than `KC` (only evened out where that keeps their number, 800 =
    /// 400 + 400): one 384-deep slice instead of 256 + 128 helped the AVX2 tile, but here
    /// `KC` 768 (1536-deep products in two slices) ran the MiniLM step level (stop 35), so
    /// the pack buffers are not made larger for it.
    const SLICE_MAX: usize = 512;

    unsafe fn tile(a: APanel<'_>, b: BPanel<'_>, tile: Tile, epilogue: Epilogue) {
        // SAFETY: forwarded to the caller's contract (which includes AVX-512F).
        unsafe { tile_kernel(a, b, tile, epilogue) }
    }
}

/// The 8 x 48 tile: [`Kernel::tile`] with AVX-512F. Partial tiles store through lane
/// masks, so the edges of a product cost no scalar loop.
///
/// # Safety
/// As [`Kernel::tile`].
#[cfg(target_arch = "x86_64")]
#[inline(never)]
#[target_feature(enable = "avx512f")]
unsafe fn tile_kernel(a: APanel<'_>, b: BPanel<'_>, tile: Tile, (alpha, beta, bias): Epilogue) {
    let kc_direct = a.direct.map_or(0, |d| d.kc);
    debug_assert!(a.packed.len() >= a.kc_packed * MR);
    debug_assert!(b.holds(NR, kc_direct, a.kc_packed));
    debug_assert!(tile.rows <= MR && tile.cols <= NR);
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    let mut bp = b.steps.as_ptr();
    // The output's lines are fetched over the first (longest) depth loop.
    let lines = tile.lines_for_depth(kc_direct.max(a.kc_packed));
    let prefetch = |g| {
        if let Some(lines) = &lines {
            lines.prefetch(g)
        }
    };
    // SAFETY: `bp` advances by NR per step over the panel's steps (checked above); the
    // direct rows hold `kc` steps each and the packed panel `kc_packed` (the caller's
    // contract); the masked loads and stores touch only the tile's `rows x cols` elements
    // and the bias's `cols` values.
    unsafe {
        // One packed depth step: three vectors of `B` against the eight rows' values `$a(i)`.
        macro_rules! fma_step {
            ($u:expr, $a:expr) => {{
                let b: [__m512; NV] =
                    std::array::from_fn(|v| _mm512_loadu_ps(bp.add($u * NR + 16 * v)));
                for (i, row) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps($a(i));
                    for v in 0..NV {
                        row[v] = _mm512_fmadd_ps(av, b[v], row[v]);
                    }
                }
            }};
        }
        // `row += row.add(at + u)[0] · b` for the three vectors of `b`: one broadcast and
        // its three FMAs as one block the compiler keeps whole. Written with intrinsics,
        // LLVM hoisted all eight of a depth step's in-place broadcasts (and the next
        // step's) above their FMAs: 35 live vectors, spilled to the stack, and the MiniLM
        // step 30% slower. The packed loop's broadcasts (one pointer) it leaves in place.
        macro_rules! row_fma {
            ($row:expr, $at:expr, $u:expr, $b:expr, $acc:expr) => {{
                let _scratch: __m512;
                std::arch::asm!(
                    "vbroadcastss {t}, dword ptr [{row} + {at} * 4 + {disp}]",
                    "vfmadd231ps {c0}, {t}, {b0}",
                    "vfmadd231ps {c1}, {t}, {b1}",
                    "vfmadd231ps {c2}, {t}, {b2}",
                    row = in(reg) $row,
                    at = in(reg) $at,
                    disp = const 4 * $u,
                    t = out(zmm_reg) _scratch,
                    b0 = in(zmm_reg) $b[0],
                    b1 = in(zmm_reg) $b[1],
                    b2 = in(zmm_reg) $b[2],
                    c0 = inout(zmm_reg) $acc[0],
                    c1 = inout(zmm_reg) $acc[1],
                    c2 = inout(zmm_reg) $acc[2],
                    options(readonly, nostack, preserves_flags),
                );
            }};
        }
        if let Some(d) = a.direct {
            let (rows, mut p) = (d.row_starts::<MR>(tile.rows), 0);
            macro_rules! step {
                ($u:expr) => {{
                    let b: [__m512; NV] =
                        std::array::from_fn(|v| _mm512_loadu_ps(bp.add($u * NR + 16 * v)));
                    for (i, row) in acc.iter_mut().enumerate() {
                        row_fma!(rows[i], p, $u, b, row);
                    }
                }};
            }
            in_place_depth_loop!(d.kc, p, bp, NR, step, prefetch);
        }
        // Kept panels hold the direct steps only: the packed ones are elsewhere.
        if let Some(then) = b.then {
            bp = then.as_ptr();
        }
        let mut ap = a.packed.as_ptr();
        macro_rules! step {
            ($u:expr) => {
                fma_step!($u, |i: usize| *ap.add($u * MR + i))
            };
        }
        match a.direct {
            None => depth_loop!(a.kc_packed, ap, bp, MR, NR, step, prefetch),
            Some(_) => depth_loop!(a.kc_packed, ap, bp, MR, NR, step),
        }
        // Lane masks of the tile's column vectors (all ones on a full tile).
        let lanes = |from: usize| -> __mmask16 {
            let n = tile.cols.saturating_sub(from).min(16);
            ((1u32 << n) - 1) as __mmask16
        };
        let masks: [__mmask16; NV] = std::array::from_fn(|h| lanes(16 * h));
        let bias_v: [__m512; NV] = std::array::from_fn(|h| match bias {
            Some(b) => _mm512_maskz_loadu_ps(masks[h], b.add(16 * h)),
            None => _mm512_setzero_ps(),
        });
        let (va, vb) = (_mm512_set1_ps(alpha), _mm512_set1_ps(beta));
        for (i, row) in acc.iter().enumerate().take(tile.rows) {
            let dst = tile.c.add(i * tile.ldc);
            for (h, &v) in row.iter().enumerate() {
                let (mask, at) = (masks[h], dst.add(16 * h));
                let scaled = _mm512_fmadd_ps(v, va, bias_v[h]);
                let out = if beta == 0.0 {
                    scaled
                } else {
                    _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(mask, at), scaled)
                };
                _mm512_mask_storeu_ps(at, mask, out);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_kernel(_: APanel<'_>, _: BPanel<'_>, _: Tile, _: Epilogue) {
    unreachable!("our kernels are only dispatched to on x86-64")
}
