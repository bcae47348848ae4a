//! The AVX2 register tile: 6 x 16, twelve 8-lane accumulators, two loads of `B` and six
//! broadcasts of `A` per twelve FMAs, so the two FMA pipes never wait on the load ports.
#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::{Epilogue, Kernel, Tile};

/// The kernel for AVX2+FMA CPUs without AVX-512.
pub(super) struct Avx2;

/// Rows of the register tile.
const MR: usize = 6;
/// Columns of the register tile (two 8-lane vectors).
const NR: usize = 16;

impl Kernel for Avx2 {
    const MR: usize = MR;
    const NR: usize = NR;
    /// A 6 x 256 panel of `A` (6 KiB) and a 256 x 16 panel of `B` (16 KiB) stay in the
    /// 32 KiB L1 together.
    const KC: usize = 256;
    /// 120 x 256 floats = 120 KiB, a quarter of Zen 3's 512 KiB L2.
    const MC: usize = 120;

    unsafe fn tile(kc: usize, a_panel: &[f32], b_panel: &[f32], tile: Tile, epilogue: Epilogue) {
        // SAFETY: forwarded to the caller's contract (which includes AVX2 and FMA).
        unsafe { tile_kernel(kc, a_panel, b_panel, tile, epilogue) }
    }
}

/// The 6 x 16 tile: [`Kernel::tile`] with AVX2 and FMA.
///
/// # Safety
/// As [`Kernel::tile`].
#[cfg(target_arch = "x86_64")]
#[inline(never)]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_kernel(
    kc: usize,
    a_panel: &[f32],
    b_panel: &[f32],
    tile: Tile,
    (alpha, beta, bias): Epilogue,
) {
    debug_assert!(a_panel.len() >= kc * MR && b_panel.len() >= kc * NR);
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    let (mut ap, mut bp) = (a_panel.as_ptr(), b_panel.as_ptr());
    tile.prefetch();
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
        depth_loop!(kc, ap, bp, MR, NR, step);
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
unsafe fn tile_kernel(_: usize, _: &[f32], _: &[f32], _: Tile, _: Epilogue) {
    unreachable!("our kernels are only dispatched to on x86-64")
}
