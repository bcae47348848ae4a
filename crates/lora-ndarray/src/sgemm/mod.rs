//! Our own single-threaded f32 GEMM for x86-64 CPUs with AVX2+FMA, with a register tile
//! per instruction set: 6 x 16 on AVX2 (`avx2.rs`), 8 x 48 on AVX-512 (`avx512.rs`).
//!
//! The classic Goto/BLIS structure: the `k` dimension in slices of `KC` (one slice up to
//! `SLICE_MAX` deep: [`slice_depth`]); per slice, a block of `B` packed into column panels
//! of `NR` (kept in L3/L2), then blocks of at most `MC` rows of `A` (kept in L2,
//! [`balanced_block`]), then one register tile per pair of panels. A row-major `A`
//! is read in place; any other is packed into row panels of `MR` ([`APanel`]). A frozen
//! weight's `B` is packed once and kept with its tensor (`prepacked.rs`). The
//! blocking loops and the packing are written once ([`Kernel`] gives each instruction
//! set's tile and block sizes; `tile.rs` what a tile reads and writes).
//!
//! Why not only the `gemm` crate: on the 2-core AMD EPYC (Zen 3) development VM, one thread
//! on 512x2816x1024 ran at a median 64 GFLOP/s with the `gemm` crate and 74 with the AVX2
//! kernel (a core's FMA peak is about 91), and the two-thread `gemm` bench put it at
//! 127-144 GFLOP/s on the large and decoder shapes against the crate's 95-124
//! (docs/performance/early-kernels.md). Our kernel also fuses what the crate cannot: a
//! second low-depth product and a bias in the same pass over the output ([`sgemm_plus`],
//! LoRA's forward).
//!
//! Results differ from the `gemm` crate's only by summation order (both use FMA).
#![allow(unsafe_code)]

use std::cell::RefCell;
use std::sync::OnceLock;

use pack::{At, pack_a, pack_b, scale_packed};
use pack_buffer::PackBuffer;
pub(crate) use prepacked::{PackSlots, PackedB, kept_panel_bytes, set_budget_bytes};
use tile::{APanel, BPanel, DirectRows, Tile};

/// A register tile's depth loop over `$kc` packed steps: `$step!(u)` for the steps
/// `u = 0..4` of each group of four (unrolled), then one at a time, with the panel
/// pointers `$ap` and `$bp` advancing by `$mr` and `$nr` values per step.
macro_rules! depth_loop {
    ($kc:expr, $ap:ident, $bp:ident, $mr:expr, $nr:expr, $step:ident) => {
        depth_loop!($kc, $ap, $bp, $mr, $nr, $step, |_| ())
    };
    // `$each_group(g)` runs before group `g` of four steps (`TileLines::prefetch`).
    ($kc:expr, $ap:ident, $bp:ident, $mr:expr, $nr:expr, $step:ident, $each_group:expr) => {{
        let mut p = 0;
        while p + 4 <= $kc {
            $each_group(p / 4);
            $step!(0);
            $step!(1);
            $step!(2);
            $step!(3);
            $ap = $ap.add(4 * $mr);
            $bp = $bp.add(4 * $nr);
            p += 4;
        }
        while p < $kc {
            $step!(0);
            $ap = $ap.add($mr);
            $bp = $bp.add($nr);
            p += 1;
        }
    }};
}

/// [`depth_loop!`] for `A` read in place ([`DirectRows`]): `$step!(u)` reads step
/// `$p + u` of each row, and `$p` counts the steps.
macro_rules! in_place_depth_loop {
    ($kc:expr, $p:ident, $bp:ident, $nr:expr, $step:ident, $each_group:expr) => {{
        while $p + 4 <= $kc {
            $each_group($p / 4);
            $step!(0);
            $step!(1);
            $step!(2);
            $step!(3);
            $bp = $bp.add(4 * $nr);
            $p += 4;
        }
        while $p < $kc {
            $step!(0);
            $bp = $bp.add($nr);
            $p += 1;
        }
    }};
}

mod avx2;
mod avx512;
mod pack;
mod pack_buffer;
mod prepacked;
mod tile;

/// Columns of `B` packed at once: `KC` x 3072 floats (4.5 MiB on the AVX2 tile, 6 MiB on
/// the AVX-512 one), in the shared L3.
const NC: usize = 3072;

/// A register-tile kernel and the block sizes that keep its operands in cache.
trait Kernel {
    /// Rows of the register tile.
    const MR: usize;
    /// Columns of the register tile.
    const NR: usize;
    /// Depth of one packed slice: a `KC x NR` panel of `B` is reused by every row panel of
    /// `A` streaming past it (from L1 on the AVX2 tile, from L2 on the AVX-512 one).
    const KC: usize;
    /// Rows of `A` packed at once (a whole number of tiles), kept in L2.
    const MC: usize;
    /// The deepest slice [`slice_depth`] may cut instead of `KC` slices with a short last
    /// one (`KC` itself: never).
    const SLICE_MAX: usize;

    /// `tile = alpha · a b + beta · tile [+ bias]` over the depth steps of `a`
    /// (`bias`: the tile's column values, added to every row; with `beta == 0` the tile's
    /// old contents are never read).
    ///
    /// # Safety
    /// The CPU supports the kernel's instruction set; the tile's `rows x cols` elements
    /// are addressable and owned by this thread; `a` is as [`APanel`] says, and `b`
    /// holds as many steps as `a`.
    unsafe fn tile(a: APanel<'_>, b: BPanel<'_>, tile: Tile, epilogue: Epilogue);
}

/// `(alpha, beta, bias)` applied as a tile is stored.
type Epilogue = (f32, f32, Option<*const f32>);

/// Called as `finish(row, col, len)` on every finished stretch of the output: row `row`,
/// columns `col..col + len`, complete (its last depth slice stored) and still in cache.
/// [`sgemm_plus`] applies an activation with it (a BERT feed-forward's GELU).
pub(crate) type Finish<'a> = Option<&'a dyn Fn(usize, usize, usize)>;

/// Called as `hook(row, rows, col, depth)` once per block of `A`: rows `row..row + rows`,
/// depth steps (columns of `A`) `col..col + depth`, before the block's tiles run (right
/// after packing it, where `A` is packed), and for a product over a second segment before
/// that segment's block is packed. Blocks come in depth order for each row block, each once.
/// A fused LoRA backward computes `dy B` and `dyᵀ H` from the blocks of `dy` here, so
/// the second segment (`dy B`) is complete when it is packed.
pub(crate) type BlockHook<'a> = Option<&'a dyn Fn(usize, usize, usize, usize)>;

/// Columns of the output [`Finish`] is called on at once: whole tiles adding up to at
/// least this many (a block of `MC` rows by about 256 columns is in L2).
const FINISH_COLS: usize = 256;

/// The instruction set whose register tile runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// 8-lane FMA (AMD Zen, Intel before Skylake-X).
    Avx2,
    /// 16-lane FMA (Intel Xeon since Skylake-SP, AMD Zen 4).
    Avx512,
}

/// The widest instruction set our kernels use on this CPU: `None` off x86-64 or without
/// AVX2 and FMA (then the `gemm` crate runs every product). `LORA_NDARRAY_ISA=avx2` (or
/// `none`) caps it (`avx512`: no cap; another value is ignored with a message), read once
/// per process: `cargo xtask test` runs the AVX2 kernels' tests that way on AVX-512 CPUs,
/// so either machine checks both sets.
pub(crate) fn isa() -> Option<Isa> {
    static ISA: OnceLock<Option<Isa>> = OnceLock::new();
    *ISA.get_or_init(|| {
        let detected = detect_isa();
        match std::env::var("LORA_NDARRAY_ISA").as_deref() {
            Ok("none") => None,
            Ok("avx2") => detected.map(|_| Isa::Avx2),
            Ok("avx512") | Err(_) => detected,
            Ok(other) => {
                eprintln!(
                    "lora-ndarray: LORA_NDARRAY_ISA={other:?} is not avx512, avx2 or none; ignored"
                );
                detected
            }
        }
    })
}

/// The mask of an 8-lane AVX2 load or store (`maskload`, `maskstore`) that takes the first
/// `min(n, 8)` lanes: the tails of the packing, the skinny kernels and the token
/// reductions.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) fn first_lanes(n: usize) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::{_mm256_cmpgt_epi32, _mm256_set1_epi32, _mm256_setr_epi32};
    _mm256_cmpgt_epi32(
        _mm256_set1_epi32(n.min(8) as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    )
}

/// The widest instruction set of this CPU that our kernels have.
fn detect_isa() -> Option<Isa> {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        // The subsets every AVX-512 Xeon (Skylake-SP on) and AMD Zen 4 have; the
        // elementwise kernels (`vectorize.rs`) are compiled for all four.
        let avx512 = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx512vl");
        match (avx2, avx512) {
            (true, true) => Some(Isa::Avx512),
            (true, false) => Some(Isa::Avx2),
            (false, _) => None,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// Whether our kernels (this one and the skinny ones, which use AVX2 on every such CPU)
/// run here.
pub(crate) fn available() -> bool {
    isa().is_some()
}

/// Whether a product of this shape goes to this kernel: both output sides at least 64 and
/// the depth at least 32. Skinny products (one side the LoRA rank) stay with the `gemm`
/// crate or the skinny kernels: packing costs as much as the few multiply-adds per packed
/// element (2048x16x4096: 76 GFLOP/s with the AVX2 kernel, 85-88 with the `gemm` crate). A
/// depth of 32 (MiniLM's attention heads: `q kᵀ` and `g vᵀ` over 64-query blocks) ran as
/// fast as on the `gemm` crate (medians of 50-60 GFLOP/s either way at 64x128x32, four
/// interleaved runs), without the crate's scratch allocation per call; so did wide
/// products of depth 32-48, a rank-32 merge's `B A` say (4096x4096x32: 88-101 against
/// 75-89 GFLOP/s, 1024x4096x48: 102-116 against 92-97, three alternating runs). These
/// figures are the AVX2 tile's on the AMD VM; the AVX-512 tile uses the same thresholds,
/// not re-measured.
pub(crate) fn suits(m: usize, n: usize, k: usize) -> bool {
    m.min(n) >= 64 && k >= 32
}

/// Whether `threads` panels of an `m x n` product on this kernel should be row panels
/// (else column panels).
///
/// A packed `A` (`a_in_place` false): the split that packs fewer elements per thread. Each
/// thread packs all of `B` under a row split and all of `A` (once per [`NC`] columns) under
/// a column split, so for `n <= NC` it is simply the longer side; the decoder's output head
/// (1024 x 32000) splits by columns. Interleaved on the AMD VM, column panels ran 512 x
/// 4096 x 4096 at 9% more GFLOP/s than row panels (stop 25 in
/// docs/performance/stops-25-28.md).
///
/// `A` read in place ([`APanel`]): a row split still has each thread pack all of `B`,
/// a column split half of it, but then each thread reads all of `A` (from L3 or memory)
/// instead of half. Counting a packed element as two reads, rows win from `m >= 2n`.
/// On the Xeon VM (stop 33, alternating rounds), this rule against the packed count:
/// capped at AVX2, 2048³ 214-219 → 222-225 GFLOP/s and 1024x1024x2816 214-220 → 224-228;
/// on AVX-512 within noise (2048³ 349-367 / 359-365). Forcing columns on every shape
/// made the MiniLM step (`[4096, 384]` outputs, which this rule keeps on rows) 4% slower.
///
/// The fused LoRA products pass `false`: their hooks need row bands, and they fuse
/// where the packed-`A` count prefers rows (`gemm::lora_backward::row_bands`).
pub(crate) fn prefers_row_panels(m: usize, n: usize, threads: usize, a_in_place: bool) -> bool {
    if a_in_place {
        return m >= 2 * n;
    }
    let rows = n + m.div_ceil(threads) * n.div_ceil(NC);
    let cols = n.div_ceil(threads) + m * n.div_ceil(threads).div_ceil(NC);
    rows <= cols
}

thread_local! {
    /// Per-thread packing buffers (`A` block, `B` block), reused across calls so a
    /// training step allocates nothing here after the first product.
    static PACKS: RefCell<(PackBuffer, PackBuffer)> =
        const { RefCell::new((PackBuffer::new(), PackBuffer::new())) };
}

/// An operand: base pointer, row stride and column stride (elements).
pub(crate) type Operand = (*const f32, isize, isize);

/// `c = alpha * a b + beta * c` for an `m x n` output with row stride `ldc` (unit column
/// stride); `a` is `m x k` and `b` is `k x n`, each with arbitrary strides. With
/// `beta == 0` the old contents of `c` are never read (they may be uninitialised or NaN).
/// `kept`: `b` packed once ([`PackedB`], from a column), read instead of packing it where
/// it fits.
///
/// # Safety
/// [`available`] must be true; every element the shapes and strides reach must lie in
/// live allocations; no other thread may touch `c`'s elements during the call; `kept`
/// holds `b`'s current values.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm(
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    a: Operand,
    (b, kept): (Operand, Option<Kept<'_>>),
    beta: f32,
    c: *mut f32,
    ldc: usize,
) {
    let only = [Segment {
        a,
        b,
        k,
        scale: 1.0,
        kept,
    }];
    let epilogue = (alpha, beta, None);
    // SAFETY: forwarded to the caller's contract; `isa` checked the CPU.
    unsafe {
        match isa() {
            Some(Isa::Avx512) => {
                product::<avx512::Avx512>(m, n, &only, epilogue, (None, None), c, ldc)
            }
            _ => product::<avx2::Avx2>(m, n, &only, epilogue, (None, None), c, ldc),
        }
    }
}

/// The most depth [`sgemm_plus`] appends to a product (LoRA ranks up to 64).
pub(crate) const MAX_EXTRA_DEPTH: usize = 64;

/// `c = a1 b1 + scale2 · a2 b2 [+ bias]` into an `m x n` output (row stride `ldc`, old
/// contents never read; `bias`: `n` values added to every row): one product over the
/// concatenated depth `k1 + k2`, with `a2 b2` packed into the last depth slice of `a1 b1`.
/// A LoRA term `s·(x Aᵀ) Bᵀ` on top of the frozen `x Wᵀ` so costs `k2 / k1` more
/// multiply-adds and no second pass over the output (which a separate `beta = 1` product
/// makes: a read and a write of every element of `c`); the bias neither. `finish` sees
/// each stretch of `c` once it is complete (see [`Finish`]); `hook` each packed block of
/// `a1` (see [`BlockHook`]); `kept` as [`sgemm`]'s, for `b1`.
///
/// # Safety
/// As [`sgemm`], for both operand pairs (the second is not read when `k2 == 0`); `k1 > 0`,
/// `k2 <= MAX_EXTRA_DEPTH`, and `bias` addresses `n` values. Where `hook` writes `a2`'s
/// rows, it has written each row block before the kernel packs it (see [`BlockHook`]).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm_plus(
    (m, n): (usize, usize),
    (a1, (b1, kept), k1): (Operand, (Operand, Option<Kept<'_>>), usize),
    scale2: f32,
    (a2, b2, k2): (Operand, Operand, usize),
    bias: Option<*const f32>,
    (finish, hook): (Finish<'_>, BlockHook<'_>),
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
            kept,
        },
        Segment {
            a: a2,
            b: b2,
            k: k2,
            scale: scale2,
            kept: None,
        },
    ];
    let epilogue = (1.0, 0.0, bias);
    // SAFETY: forwarded to the caller's contract; `isa` checked the CPU.
    unsafe {
        match isa() {
            Some(Isa::Avx512) => {
                product::<avx512::Avx512>(m, n, &segs, epilogue, (finish, hook), c, ldc)
            }
            _ => product::<avx2::Avx2>(m, n, &segs, epilogue, (finish, hook), c, ldc),
        }
    }
}

/// One operand pair of a product over a concatenated depth: `a` is `m x k`, `b` is
/// `k x n` (`kept`: packed once), and `a`'s packed values are multiplied by `scale`.
#[derive(Clone, Copy)]
struct Segment<'a> {
    a: Operand,
    b: Operand,
    k: usize,
    scale: f32,
    kept: Option<Kept<'a>>,
}

/// A [`PackedB`] and the column of it where a product's `b` starts.
pub(crate) type Kept<'a> = (&'a PackedB, usize);

/// The product of `segs` (see [`blocked`]) on kernel `K`, with this thread's packing
/// buffers grown to hold its blocks.
///
/// # Safety
/// As [`blocked`], and the CPU runs `K`.
unsafe fn product<K: Kernel>(
    m: usize,
    n: usize,
    segs: &[Segment<'_>],
    epilogue: Epilogue,
    calls: (Finish<'_>, BlockHook<'_>),
    c: *mut f32,
    ldc: usize,
) {
    let extra = segs.get(1).map_or(0, |s| s.k);
    PACKS.with(|packs| {
        let mut packs = packs.borrow_mut();
        let (a_pack, b_pack) = &mut *packs;
        let depth = slice_depth::<K>(segs[0].k) + extra;
        let b_need = depth * NC.min(n.div_ceil(K::NR) * K::NR);
        let a_need = depth * K::MC.min(m.div_ceil(K::MR) * K::MR);
        // A thread's first product sizes its buffers for the largest block any product
        // packs (about 0.5 + 7 MiB on the AVX-512 tile), not for this one: grown to each
        // product's need, a buffer grew again whenever a thread first ran a larger shape,
        // and which thread runs which panel is rayon's choice, so a steady-state training
        // step could still allocate (tests/step_allocations.rs failed 1 run in 10 so).
        let max_depth = K::SLICE_MAX + MAX_EXTRA_DEPTH;
        let b_pack = b_pack.grown(b_need, max_depth * NC);
        let a_pack = a_pack.grown(a_need, max_depth * K::MC);
        // SAFETY: forwarded to the caller's contract; the buffers now hold the blocks.
        unsafe { blocked::<K>(m, n, segs, epilogue, calls, c, ldc, (a_pack, b_pack)) }
    })
}

/// The `A` and `B` packing buffers.
type Packs<'a> = (&'a mut [f32], &'a mut [f32]);

/// The three blocking loops around the register tile, over the depth of `segs[0]` in
/// slices of [`slice_depth`]; the depth of a second segment joins the last slice. The first slice
/// applies `beta` and adds the bias (`n` values, if any) as it stores each tile; the last
/// one calls `finish` on the finished stretches. `hook` sees each packed block of `A`
/// during the first column block (`jc == 0`).
///
/// # Safety
/// As [`sgemm`] for every segment, the CPU runs `K`, and the pack buffers hold
/// `slice_depth + k2` deep blocks of `min(MC, m)` and `min(NC, n)` rounded up to whole
/// tiles.
#[allow(clippy::too_many_arguments)]
unsafe fn blocked<K: Kernel>(
    m: usize,
    n: usize,
    segs: &[Segment<'_>],
    (alpha, beta, bias): Epilogue,
    (finish, hook): (Finish<'_>, BlockHook<'_>),
    c: *mut f32,
    ldc: usize,
    (a_pack, b_pack): Packs<'_>,
) {
    let (mr, nr) = (K::MR, K::NR);
    let (main, extra) = (segs[0], segs.get(1).filter(|s| s.k > 0));
    // A row-major `A` is read in place (see [`APanel`]); only a second segment is packed.
    let (a_base, a_rs, a_cs) = main.a;
    let direct = a_cs == 1 && a_rs > 0;
    // A kept `B` is read in place; it holds its own depth, so a second segment's `B` is
    // packed alone ([`BPanel::then`]). Only beside a direct `A`, whose packed steps (if
    // any) are the second segment's alone.
    let kept = main
        .kept
        .filter(|&(b, col)| direct && b.fits::<K>(main.k, (col, n)));
    let (kc_step, mc_step) = (slice_depth::<K>(main.k), balanced_block(m, K::MC, mr));
    for jc in (0..n).step_by(NC) {
        let nc = NC.min(n - jc);
        for pc in (0..main.k).step_by(kc_step) {
            let kc1 = kc_step.min(main.k - pc);
            let tail = extra.filter(|_| pc + kc1 == main.k);
            let kc = kc1 + tail.map_or(0, |s| s.k);
            // The first slice applies `beta` and the bias; later slices add to what it wrote.
            let (beta, bias) = if pc == 0 { (beta, bias) } else { (1.0, None) };
            // SAFETY (all blocks below): offsets stay within each segment's m x k, k x n
            // and the m x n output, which the caller guarantees are addressable.
            unsafe {
                match kept {
                    None => {
                        pack_b(nr, kc1, nc, main.b.at(pc, jc), (&mut *b_pack, kc, 0));
                        if let Some(s) = tail {
                            pack_b(nr, s.k, nc, s.b.at(0, jc), (&mut *b_pack, kc, kc1));
                        }
                    }
                    Some(_) => {
                        if let Some(s) = tail {
                            pack_b(nr, s.k, nc, s.b.at(0, jc), (&mut *b_pack, s.k, 0));
                        }
                    }
                }
            }
            let kept_block = kept.map(|(b, col)| b.panels(pc, col + jc));
            // Depth steps per packed panel of `A`, and the first one this slice packs.
            let (a_depth, packed_from) = match direct {
                true => (kc - kc1, 0),
                false => (kc, kc1),
            };
            for ic in (0..m).step_by(mc_step) {
                let mc = mc_step.min(m - ic);
                unsafe {
                    if !direct {
                        pack_a(mr, mc, kc1, main.a.at(ic, pc), (&mut *a_pack, kc, 0));
                    }
                    if let Some(hook) = hook.filter(|_| jc == 0) {
                        hook(ic, mc, pc, kc1);
                    }
                    if let Some(s) = tail {
                        let dst = (&mut *a_pack, a_depth, packed_from);
                        pack_a(mr, mc, s.k, s.a.at(ic, 0), dst);
                        scale_packed(mr, a_pack, mc, a_depth, packed_from, s.scale);
                    }
                }
                let finish = finish.filter(|_| pc + kc1 == main.k);
                let mut finished = 0;
                for jr in (0..nc).step_by(nr) {
                    let b = match kept_block {
                        None => BPanel {
                            steps: &b_pack[jr * kc..(jr + nr) * kc],
                            then: None,
                        },
                        Some(block) => BPanel {
                            steps: &block[jr * kc1..(jr + nr) * kc1],
                            then: tail.map(|s| &b_pack[jr * s.k..(jr + nr) * s.k]),
                        },
                    };
                    for ir in (0..mc).step_by(mr) {
                        let a = APanel {
                            direct: direct.then(|| DirectRows {
                                a: unsafe {
                                    a_base.offset((ic + ir) as isize * a_rs + pc as isize)
                                },
                                lda: a_rs as usize,
                                kc: kc1,
                            }),
                            packed: &a_pack[ir * a_depth..(ir + mr) * a_depth],
                            kc_packed: a_depth,
                        };
                        let tile = Tile {
                            c: unsafe { c.add((ic + ir) * ldc + jc + jr) },
                            ldc,
                            rows: mr.min(mc - ir),
                            cols: nr.min(nc - jr),
                        };
                        let bias = bias.map(|b| unsafe { b.add(jc + jr) });
                        unsafe { K::tile(a, b, tile, (alpha, beta, bias)) };
                    }
                    let end = (jr + nr).min(nc);
                    if let Some(finish) =
                        finish.filter(|_| end - finished >= FINISH_COLS || end == nc)
                    {
                        for r in ic..ic + mc {
                            finish(r, jc + finished, end - finished);
                        }
                        finished = end;
                    }
                }
            }
        }
    }
}

/// Rows per block of `A`: `m` in as few blocks of at most `most` rows as it takes, all of
/// one size rounded up to whole tiles of `mr` (`most` is a multiple of `mr`).
///
/// Blocks of exactly `most` leave a short last block, whose few tiles still stream every
/// panel of `B` past them: a thread's 2048 rows of the MiniLM step on the AVX2 tile were 17
/// blocks of 120 and one of 8. Evened out (18 of 114), the AVX2-capped step ran 3.4% faster
/// on the Xeon VM (means of four alternating pairs, 1056 / 1094 ms; stop 35 in
/// docs/performance/stops-32-35.md); the AVX-512 step (8 x 240 + 128 rows) and the GEMM
/// bench were level.
fn balanced_block(m: usize, most: usize, mr: usize) -> usize {
    let blocks = m.div_ceil(most).max(1);
    m.div_ceil(blocks).div_ceil(mr).max(1) * mr
}

/// The depth of each slice of a `k`-deep product on kernel `K`: `k / KC` rounded half
/// down, at least one, slices of equal depth, where that depth is at most `SLICE_MAX`; else
/// slices of `KC`.
///
/// Each slice stores (and after the first reloads) every output tile, so a short last one
/// costs a tile pass for little work: on the AVX2 tile with `KC` 256 a 384-deep product,
/// every MiniLM projection's forward, took 256 + 128. One 384-deep slice instead, capped at
/// AVX2 on the Xeon VM (stop 35, alternating): MiniLM training step 1051 → 1028 ms (means
/// of five pairs, -2.2%), forward 487 → 481 ms (three). Since stop 37 the AVX2 tile's `KC`
/// is 384 for every product (measured on an AMD EPYC, see `avx2.rs`), so there the rule
/// only evens out the slices (4096 deep: eleven of 373, not ten of 384 and one of 256).
fn slice_depth<K: Kernel>(k: usize) -> usize {
    let slices = (2 * k + K::KC - 1) / (2 * K::KC);
    match k.div_ceil(slices.max(1)) {
        depth if depth <= K::SLICE_MAX => depth.max(1),
        _ => K::KC,
    }
}

#[cfg(test)]
mod tests;
