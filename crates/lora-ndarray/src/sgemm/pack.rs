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
    dst: PackDst<'_>,
) {
    // SAFETY: forwarded; `b`'s columns are the vectors, its rows the depth steps.
    unsafe { pack_panels(nr, nc, kc, (b, cs, rs), dst) }
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
    dst: PackDst<'_>,
) {
    // SAFETY: forwarded; `a`'s rows are the vectors, its columns the depth steps.
    unsafe { pack_panels(mr, mc, kc, (a, rs, cs), dst) }
}

/// Packs `count` vectors of `kc` depth steps (vector `i`, step `p` at
/// `src + i·across + p·along`) into panels of `w` vectors, each `kc` groups of `w`
/// contiguous values from depth step `p0` of panels `depth` steps deep; lanes past `count`
/// are zero. `A`'s rows and `B`'s columns are packed alike, so each of the two layouts
/// takes the same path for either operand: vectors contiguous along the depth (row-major
/// `A`, a transposed `B` as in `y = x Wᵀ`) through 8 x 8 transposes, contiguous across it
/// by copies.
///
/// # Safety
/// The block's elements are addressable; `out` holds `depth x count` rounded up to panels.
unsafe fn pack_panels(
    w: usize,
    count: usize,
    kc: usize,
    (src, across, along): Operand,
    (out, depth, p0): PackDst<'_>,
) {
    for (panel, i0) in (0..count).step_by(w).enumerate() {
        let lanes = w.min(count - i0);
        let at = panel * w * depth + p0 * w;
        let dst = &mut out[at..at + w * kc];
        // SAFETY: vectors i0..i0+lanes and steps 0..kc of the block are addressable.
        unsafe {
            let src = src.offset(i0 as isize * across);
            if lanes < w {
                // The last panel of a block that is no multiple of `w` wide (512 columns
                // on the 48-wide AVX-512 tile): zero lanes past the edge, pack the rest.
                dst.fill(0.0);
            }
            if along == 1 {
                pack_transposed((lanes, w), kc, src, across, dst);
            } else if across == 1 {
                // A whole tile's width (or 32: the last panel of 128 attention keys) is a
                // fixed-size copy: through `copy_nonoverlapping` with a run-time length,
                // each 192-byte group of the 48-wide tile was a call to `memmove` (3% of a
                // MiniLM training step).
                match lanes {
                    48 => copy_groups::<48>(src, along, dst, w),
                    32 => copy_groups::<32>(src, along, dst, w),
                    16 => copy_groups::<16>(src, along, dst, w),
                    8 => copy_groups::<8>(src, along, dst, w),
                    6 => copy_groups::<6>(src, along, dst, w),
                    _ => {
                        for (p, group) in dst.chunks_exact_mut(w).enumerate() {
                            let from = src.offset(p as isize * along);
                            std::ptr::copy_nonoverlapping(from, group.as_mut_ptr(), lanes);
                        }
                    }
                }
            } else {
                for (p, group) in dst.chunks_exact_mut(w).enumerate() {
                    for (i, v) in group[..lanes].iter_mut().enumerate() {
                        *v = *src.offset(i as isize * across + p as isize * along);
                    }
                }
            }
        }
    }
}

/// The first `N` values of each `w`-wide group of `dst` from step `p` at `src + p·along`:
/// fixed-size moves the compiler inlines.
///
/// Compiled for AVX2 (which every CPU running our kernels has): in the baseline build
/// LLVM turns a 192-byte move (the 48-wide tile's group) into a `memcpy` call per group,
/// 4.5% of a 512x4096x4096 LoRA layer's fwd+bwd profile; with 32-byte registers it is six
/// loads and stores.
///
/// # Safety
/// Every step's `N` values are addressable and `N <= w`; the CPU has AVX2.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2"))]
unsafe fn copy_groups<const N: usize>(src: *const f32, along: isize, dst: &mut [f32], w: usize) {
    for (p, group) in dst.chunks_exact_mut(w).enumerate() {
        // SAFETY: forwarded to the caller; `group` holds `w >= N` values.
        unsafe {
            let from = src.offset(p as isize * along).cast::<[f32; N]>();
            group
                .as_mut_ptr()
                .cast::<[f32; N]>()
                .write_unaligned(from.read_unaligned());
        }
    }
}

/// Packs `w` vectors that run contiguously along `k` (vector `i` starts at `src + i·stride`:
/// the rows of a row-major `a`, or the columns of a transposed `b`) into `kc` groups of
/// `ld >= w` values, 8 x 8 blocks at a time through registers. Lanes `w..ld` of a group
/// may be written with zeros (the panel's padding, which the caller zero-fills anyway).
///
/// # Safety
/// The `w` vectors of `kc` values are addressable; `out` is exactly `kc x ld`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_transposed(
    (w, ld): (usize, usize),
    kc: usize,
    src: *const f32,
    stride: isize,
    out: &mut [f32],
) {
    debug_assert_eq!(out.len(), kc * ld);
    let full = kc / 8 * 8;
    // SAFETY: every load reads values p..p+8 of one of the w vectors; every store writes
    // group `g` of depth step p+q inside `out` (kc x ld), its first `n` lanes with values
    // and at most its other lanes with zeros, as the comment on the stores says.
    unsafe {
        for p in (0..full).step_by(8) {
            for g in (0..w).step_by(8) {
                let n = (w - g).min(8);
                let rows: [__m256; 8] = std::array::from_fn(|i| match i < n {
                    true => _mm256_loadu_ps(src.offset((g + i) as isize * stride + p as isize)),
                    false => _mm256_setzero_ps(),
                });
                for (q, v) in transpose8(rows).into_iter().enumerate() {
                    let at = (p + q) * ld + g;
                    let dst = out.as_mut_ptr().add(at);
                    // Lanes past `n` hold zeros (from the zero rows). All eight may be
                    // stored where they land on this group's padding (`g + 8 <= ld`), or
                    // on the next depth step's first lanes when the panel is one group
                    // wide (`ld <= 8`, the AVX2 tile's 6 rows): a later store (the next
                    // `q`, the next block of 8, or the scalar tail) writes those, or they
                    // are padding and zero is right. Never past `out`'s last step: there,
                    // only `n` lanes, masked. (A copy of `n` values was a `memmove` call
                    // per depth step, 6.6% of a MiniLM training step on the AVX2 kernels.)
                    if g + 8 <= ld || (ld <= 8 && at + 8 <= kc * ld) {
                        _mm256_storeu_ps(dst, v);
                    } else {
                        _mm256_maskstore_ps(dst, super::first_lanes(n), v);
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
