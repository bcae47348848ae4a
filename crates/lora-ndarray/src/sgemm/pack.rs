//! Packing the operands of [`sgemm`](super::sgemm) into the panels a register tile reads:
//! `A` in row panels of `mr` rows, `B` in column panels of `nr` columns (the kernel's tile),
//! each a run of depth steps; a slice may hold two operand pairs' blocks one after another
//! (`sgemm_plus`). The transposes use AVX2, which every CPU running our kernels has.
#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::Operand;

/// Multiplies steps `from..kc` of every packed `A` panel (`mr` rows) of an `mc`-row block
/// by `scale`.
pub(super) fn scale_packed(
    mr: usize,
    a_pack: &mut [f32],
    mc: usize,
    kc: usize,
    from: usize,
    scale: f32,
) {
    if scale == 1.0 {
        return;
    }
    for panel in a_pack[..mc.div_ceil(mr) * mr * kc].chunks_exact_mut(mr * kc) {
        panel[from * mr..].iter_mut().for_each(|v| *v *= scale);
    }
}

/// Where a block's packed panels go: the buffer, the panels' full depth, and the first
/// depth step this block fills (a slice can hold two segments' blocks one after another).
pub(super) type PackDst<'a> = (&'a mut [f32], usize, usize);

pub(super) trait At {
    /// The operand's element `(row, col)` as a new operand origin.
    ///
    /// # Safety
    /// The element must lie inside the operand's allocation.
    unsafe fn at(self, row: usize, col: usize) -> Self;
}

impl At for Operand {
    unsafe fn at(self, row: usize, col: usize) -> Self {
        let (p, rs, cs) = self;
        // SAFETY: the caller keeps (row, col) inside the operand.
        (
            unsafe { p.offset(row as isize * rs + col as isize * cs) },
            rs,
            cs,
        )
    }
}

/// Packs a `kc x nc` block of `b` into panels of `nr` columns, each `kc` rows of `nr`
/// contiguous values from depth step `p0` of panels `depth` steps deep; columns past `nc`
/// are zero.
///
/// # Safety
/// The block's elements are addressable; `out` holds `depth x nc` rounded up to panels.
pub(super) unsafe fn pack_b(
    nr: usize,
    kc: usize,
    nc: usize,
    (b, rs, cs): Operand,
    (out, depth, p0): PackDst<'_>,
) {
    for (panel, j0) in (0..nc).step_by(nr).enumerate() {
        let cols = nr.min(nc - j0);
        let at = panel * nr * depth + p0 * nr;
        let dst = &mut out[at..at + nr * kc];
        // SAFETY: columns j0..j0+cols and rows 0..kc of the block are addressable.
        unsafe {
            let src = b.offset(j0 as isize * cs);
            if cols < nr {
                // The last panel of a width that is no multiple of `nr` (512 on the
                // 48-wide AVX-512 tile): zero columns past the edge, pack the rest below.
                dst.fill(0.0);
            }
            if rs == 1 {
                // `b` is a transposed row-major matrix (y = x Wᵀ): 8x8 transposes.
                pack_transposed((cols, nr), kc, src, cs, dst);
            } else if cs == 1 {
                for (p, row) in dst.chunks_exact_mut(nr).enumerate() {
                    std::ptr::copy_nonoverlapping(
                        src.offset(p as isize * rs),
                        row.as_mut_ptr(),
                        cols,
                    );
                }
            } else {
                for (p, row) in dst.chunks_exact_mut(nr).enumerate() {
                    for (j, v) in row[..cols].iter_mut().enumerate() {
                        *v = *src.offset(p as isize * rs + j as isize * cs);
                    }
                }
            }
        }
    }
}

/// Packs an `mc x kc` block of `a` into panels of `mr` rows, each `kc` columns of `mr`
/// values from depth step `p0` of panels `depth` steps deep; rows past `mc` are zero.
///
/// # Safety
/// The block's elements are addressable; `out` holds `mc x depth` rounded up to panels.
pub(super) unsafe fn pack_a(
    mr: usize,
    mc: usize,
    kc: usize,
    (a, rs, cs): Operand,
    (out, depth, p0): PackDst<'_>,
) {
    for (panel, i0) in (0..mc).step_by(mr).enumerate() {
        let rows = mr.min(mc - i0);
        let at = panel * mr * depth + p0 * mr;
        let dst = &mut out[at..at + mr * kc];
        // SAFETY: rows i0..i0+rows and columns 0..kc of the block are addressable.
        unsafe {
            let src = a.offset(i0 as isize * rs);
            if rows < mr {
                // The last panel of a block whose rows are no multiple of `mr`.
                dst.fill(0.0);
            }
            if rs == 1 {
                for (p, col) in dst.chunks_exact_mut(mr).enumerate() {
                    std::ptr::copy_nonoverlapping(
                        src.offset(p as isize * cs),
                        col.as_mut_ptr(),
                        rows,
                    );
                }
            } else if cs == 1 {
                // Row-major `a` (the common case): 8 x 8 transposes of the panel's rows.
                pack_transposed((rows, mr), kc, src, rs, dst);
            } else {
                for (p, col) in dst.chunks_exact_mut(mr).enumerate() {
                    for (i, v) in col[..rows].iter_mut().enumerate() {
                        *v = *src.offset(i as isize * rs + p as isize * cs);
                    }
                }
            }
        }
    }
}

/// Packs `w` vectors that run contiguously along `k` (vector `i` starts at `src + i·stride`:
/// the rows of a row-major `a`, or the columns of a transposed `b`) into `kc` groups of
/// `ld >= w` values (the first `w` written), 8 x 8 blocks at a time through registers.
///
/// # Safety
/// The `w` vectors of `kc` values are addressable; `out` holds `kc x ld`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_transposed(
    (w, ld): (usize, usize),
    kc: usize,
    src: *const f32,
    stride: isize,
    out: &mut [f32],
) {
    let full = kc / 8 * 8;
    // SAFETY: every load reads values p..p+8 of one of the w vectors; every store writes
    // the first `n` lanes of group `g` of column p+q inside `out` (kc x ld).
    unsafe {
        for p in (0..full).step_by(8) {
            for g in (0..w).step_by(8) {
                let n = (w - g).min(8);
                let rows: [__m256; 8] = std::array::from_fn(|i| match i < n {
                    true => _mm256_loadu_ps(src.offset((g + i) as isize * stride + p as isize)),
                    false => _mm256_setzero_ps(),
                });
                for (q, v) in transpose8(rows).into_iter().enumerate() {
                    let dst = out.as_mut_ptr().add((p + q) * ld + g);
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
            for i in 0..w {
                out[p * ld + i] = *src.offset(i as isize * stride + p as isize);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn pack_transposed(_: (usize, usize), _: usize, _: *const f32, _: isize, _: &mut [f32]) {
    unreachable!("our kernels are only dispatched to on x86-64")
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
