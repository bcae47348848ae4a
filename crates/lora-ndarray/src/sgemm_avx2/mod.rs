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

use pack::{At, pack_a, pack_b, scale_packed};

mod pack;

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

/// Whether a product of this shape goes to this kernel: both output sides at least 64 and
/// the depth at least 32. Skinny products (one side the LoRA rank) stay with the `gemm`
/// crate or the skinny kernels: packing costs as much as the few multiply-adds per packed
/// element (2048x16x4096: 76 GFLOP/s with this kernel, 85-88 with the `gemm` crate). A
/// depth of 32 (MiniLM's attention heads: `q kᵀ` and `g vᵀ` over 64-query blocks) ran as
/// fast as on the `gemm` crate (medians of 50-60 GFLOP/s either way at 64x128x32, four
/// interleaved runs), without the crate's scratch allocation per call; so did wide
/// products of depth 32-48, a rank-32 merge's `B A` say (4096x4096x32: 88-101 against
/// 75-89 GFLOP/s, 1024x4096x48: 102-116 against 92-97, three alternating runs).
pub(crate) fn suits(m: usize, n: usize, k: usize) -> bool {
    m.min(n) >= 64 && k >= 32
}

/// Whether `threads` panels of an `m x n` product on this kernel should be row panels
/// (else column panels): the split that packs fewer elements per thread. Each thread
/// packs all of `B` under a row split and all of `A` (once per [`NC`] columns) under a
/// column split, so for `n <= NC` it is simply the longer side; the decoder's output head
/// (1024 x 32000) splits by columns. Interleaved on the AMD VM, column panels ran 512 x
/// 4096 x 4096 at 9% more GFLOP/s than row panels (docs/performance.md).
pub(crate) fn prefers_row_panels(m: usize, n: usize, threads: usize) -> bool {
    let rows = n + m.div_ceil(threads) * n.div_ceil(NC);
    let cols = n.div_ceil(threads) + m * n.div_ceil(threads).div_ceil(NC);
    rows <= cols
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
    let only = Segment {
        a,
        b,
        k,
        scale: 1.0,
    };
    // SAFETY: forwarded to the caller's contract.
    unsafe {
        with_packs(m, n, 0, |packs| {
            blocked(m, n, &[only], (alpha, beta, None), c, ldc, packs)
        })
    }
}

/// The most depth [`sgemm_plus`] appends to a product (LoRA ranks up to 64).
pub(crate) const MAX_EXTRA_DEPTH: usize = 64;

/// `c = a1 b1 + scale2 · a2 b2 [+ bias]` into an `m x n` output (row stride `ldc`, old
/// contents never read; `bias`: `n` values added to every row): one product over the
/// concatenated depth `k1 + k2`, with `a2 b2` packed into the last depth slice of `a1 b1`.
/// A LoRA term `s·(x Aᵀ) Bᵀ` on top of the frozen `x Wᵀ` so costs `k2 / k1` more
/// multiply-adds and no second pass over the output (which a separate `beta = 1` product
/// makes: a read and a write of every element of `c`); the bias neither.
///
/// # Safety
/// As [`sgemm`], for both operand pairs (the second is not read when `k2 == 0`); `k1 > 0`,
/// `k2 <= MAX_EXTRA_DEPTH`, and `bias` addresses `n` values.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm_plus(
    (m, n): (usize, usize),
    (a1, b1, k1): (Operand, Operand, usize),
    scale2: f32,
    (a2, b2, k2): (Operand, Operand, usize),
    bias: Option<*const f32>,
    c: *mut f32,
    ldc: usize,
) {
    debug_assert!(k1 > 0 && k2 <= MAX_EXTRA_DEPTH);
    let segs = [
        Segment {
            a: a1,
            b: b1,
            k: k1,
            scale: 1.0,
        },
        Segment {
            a: a2,
            b: b2,
            k: k2,
            scale: scale2,
        },
    ];
    // SAFETY: forwarded to the caller's contract.
    unsafe {
        with_packs(m, n, k2, |packs| {
            blocked(m, n, &segs, (1.0, 0.0, bias), c, ldc, packs)
        })
    }
}

/// One operand pair of a product over a concatenated depth: `a` is `m x k`, `b` is
/// `k x n`, and `a`'s packed values are multiplied by `scale`.
#[derive(Clone, Copy)]
struct Segment {
    a: Operand,
    b: Operand,
    k: usize,
    scale: f32,
}

/// Runs `f` with this thread's packing buffers, grown to hold a block of an `m x n`
/// product whose slices are up to `KC + extra` deep.
fn with_packs<R>(m: usize, n: usize, extra: usize, f: impl FnOnce(Packs<'_>) -> R) -> R {
    PACKS.with(|packs| {
        let mut packs = packs.borrow_mut();
        let (a_pack, b_pack) = &mut *packs;
        let depth = KC + extra;
        let b_need = depth * NC.min(n.div_ceil(NR) * NR);
        let a_need = depth * MC.min(m.div_ceil(MR) * MR);
        if b_pack.len() < b_need {
            b_pack.resize(b_need, 0.0);
        }
        if a_pack.len() < a_need {
            a_pack.resize(a_need, 0.0);
        }
        f((a_pack, b_pack))
    })
}

/// The `A` and `B` packing buffers.
type Packs<'a> = (&'a mut [f32], &'a mut [f32]);

/// The three blocking loops around the register tile, over the depth of `segs[0]` in
/// slices of [`KC`]; the depth of a second segment joins the last slice. The first slice
/// applies `beta` and adds the bias (`n` values, if any) as it stores each tile.
///
/// # Safety
/// As [`sgemm`] for every segment, and the pack buffers hold `KC + k2` deep blocks of
/// `min(MC, m)` and `min(NC, n)` rounded up to whole tiles.
#[allow(clippy::too_many_arguments)]
unsafe fn blocked(
    m: usize,
    n: usize,
    segs: &[Segment],
    (alpha, beta, bias): (f32, f32, Option<*const f32>),
    c: *mut f32,
    ldc: usize,
    (a_pack, b_pack): Packs<'_>,
) {
    let (main, extra) = (segs[0], segs.get(1).filter(|s| s.k > 0));
    for jc in (0..n).step_by(NC) {
        let nc = NC.min(n - jc);
        for pc in (0..main.k).step_by(KC) {
            let kc1 = KC.min(main.k - pc);
            let tail = extra.filter(|_| pc + kc1 == main.k);
            let kc = kc1 + tail.map_or(0, |s| s.k);
            // The first slice applies `beta` and the bias; later slices add to what it wrote.
            let (beta, bias) = if pc == 0 { (beta, bias) } else { (1.0, None) };
            // SAFETY (all blocks below): offsets stay within each segment's m x k, k x n
            // and the m x n output, which the caller guarantees are addressable.
            unsafe {
                pack_b(kc1, nc, main.b.at(pc, jc), (&mut *b_pack, kc, 0));
                if let Some(s) = tail {
                    pack_b(s.k, nc, s.b.at(0, jc), (&mut *b_pack, kc, kc1));
                }
            }
            for ic in (0..m).step_by(MC) {
                let mc = MC.min(m - ic);
                unsafe {
                    pack_a(mc, kc1, main.a.at(ic, pc), (&mut *a_pack, kc, 0));
                    if let Some(s) = tail {
                        pack_a(mc, s.k, s.a.at(ic, 0), (&mut *a_pack, kc, kc1));
                        scale_packed(a_pack, mc, kc, kc1, s.scale);
                    }
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
                        let bias = bias.map(|b| unsafe { b.add(jc + jr) });
                        unsafe { tile_kernel(kc, a_panel, b_panel, tile, (alpha, beta, bias)) };
                    }
                }
            }
        }
    }
}

/// Where one register tile lands: `rows x cols` (at most 6 x 16) at `c`, row stride `ldc`.
struct Tile {
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
}

/// `tile = alpha · a_panel b_panel + beta · tile [+ bias]` over `kc` packed steps (`bias`:
/// the tile's column values, added to every row).
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
    (alpha, beta, bias): (f32, f32, Option<*const f32>),
) {
    debug_assert!(a_panel.len() >= kc * MR && b_panel.len() >= kc * NR);
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    let (mut ap, mut bp) = (a_panel.as_ptr(), b_panel.as_ptr());
    // On large products the tile's rows of `c` are far from this core's caches (a block
    // of `c` outgrows L2): fetching their cache lines while the depth loop runs hides the
    // misses the stores would take at the end. Measured on the AMD VM, interleaved in one
    // process: 8-20% more GFLOP/s on the large products (docs/performance.md).
    for i in 0..tile.rows {
        // SAFETY: a prefetch never faults; the addresses are the tile's own row ends.
        unsafe {
            let row = tile.c.add(i * tile.ldc).cast::<i8>().cast_const();
            _mm_prefetch::<_MM_HINT_T0>(row);
            _mm_prefetch::<_MM_HINT_T0>(row.add(size_of::<f32>() * (tile.cols - 1)));
        }
    }
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
unsafe fn tile_kernel(_: usize, _: &[f32], _: &[f32], _: Tile, _: (f32, f32, Option<*const f32>)) {
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
