//! What one register tile reads and writes: the `A` side ([`APanel`]: rows read in place,
//! then a packed panel) and the output ([`Tile`], with its cache lines fetched ahead of
//! the stores). Both tiles (`avx2.rs`, `avx512.rs`) take these from the blocking loops.

/// The `A` side of one register tile: `direct.kc` depth steps read in place from `A`'s
/// rows, then `kc_packed` steps from a packed panel (`MR` values per step).
///
/// Why in place: packing a row-major `A` (every `x` of `x Wᵀ`) is a transpose that waits on
/// `x` coming from L3, 8.7% of the MiniLM training step's samples on AVX-512
/// (docs/performance/stops-32-35.md, stop 32), and each packed value then feeds only `2n`
/// FLOPs (768 for the model's 384-wide outputs). Read in place, the first tile of a block
/// overlaps those loads with its FMAs, and a broadcast costs one load either way: the
/// tile's samples stayed level while packing's went from 8.2% to 2.4% (what is left packs
/// `B`). The MiniLM step and the GEMM bench came out level with stop 32's packed tile,
/// alternated on the Xeon VM (docs/performance/stops-32-35.md, stop 33): this saves a pass
/// and a buffer, not measured time.
pub(super) struct APanel<'a> {
    pub(super) direct: Option<DirectRows>,
    pub(super) packed: &'a [f32],
    pub(super) kc_packed: usize,
}

/// The `B` side of one register tile: `NR` values per depth step, for `A`'s direct steps
/// and then its packed ones. `then` holds the packed steps where they are not right after
/// the direct ones in `steps`: a weight's kept panels (`prepacked.rs`) hold its own depth
/// only, and a LoRA term's steps are packed beside them per call.
#[derive(Clone, Copy)]
pub(super) struct BPanel<'a> {
    pub(super) steps: &'a [f32],
    pub(super) then: Option<&'a [f32]>,
}

impl BPanel<'_> {
    /// Whether the panel holds `direct` steps and then `packed` steps of `nr` values.
    pub(super) fn holds(&self, nr: usize, direct: usize, packed: usize) -> bool {
        match self.then {
            Some(then) => self.steps.len() >= direct * nr && then.len() >= packed * nr,
            None => self.steps.len() >= (direct + packed) * nr,
        }
    }
}

/// `kc` depth steps of the tile's rows of a row-major `A` (unit column stride): row `i`
/// at `a + i·lda`. Rows past the tile's `rows` read row `rows - 1` again (their results
/// are never stored), so a partial tile reads nothing outside `A`.
#[derive(Clone, Copy)]
pub(super) struct DirectRows {
    pub(super) a: *const f32,
    pub(super) lda: usize,
    pub(super) kc: usize,
}

impl DirectRows {
    /// The first values of the `MR` rows a tile of `rows` rows reads (see [`DirectRows`]).
    ///
    /// # Safety
    /// `a`'s first `rows` rows lie in one allocation (the tile's contract).
    pub(super) unsafe fn row_starts<const MR: usize>(&self, rows: usize) -> [*const f32; MR] {
        // SAFETY: row `min(i, rows - 1)` is one of the tile's rows.
        std::array::from_fn(|i| unsafe { self.a.add(i.min(rows - 1) * self.lda) })
    }
}

/// Where one register tile lands: `rows x cols` (at most `MR x NR`) at `c`, row stride
/// `ldc`.
pub(super) struct Tile {
    pub(super) c: *mut f32,
    pub(super) ldc: usize,
    pub(super) rows: usize,
    pub(super) cols: usize,
}

impl Tile {
    /// Prefetches the tile's rows of `c`, which on large products are far from this core's
    /// caches (a block of `c` outgrows L2), so that the stores after the depth loop do not
    /// wait on misses. Measured on the AMD VM, interleaved in one process: 8-20% more
    /// GFLOP/s on the large products (docs/performance/stops-25-28.md, stop 25). The AVX2
    /// tile's twelve lines go at once: spread as the AVX-512 tile's are, its products on
    /// the Xeon VM gained nothing (10 of 12 timings 0.4-3% slower, within noise; AMD not
    /// measured).
    pub(super) fn prefetch(&self) {
        let last = size_of::<f32>() * (self.cols - 1);
        for i in 0..self.rows {
            let row = self.c.wrapping_add(i * self.ldc).cast::<i8>().cast_const();
            // Every cache line of the row: one line per 64 bytes, and the last.
            (0..last).step_by(64).for_each(|at| prefetch_line(row, at));
            prefetch_line(row, last);
        }
    }

    /// [`Tile::prefetch`] spread over the depth loop: one line per group of four depth
    /// steps (`TileLines::prefetch(group)`), or all of them now (then `None`) where the
    /// depth has fewer groups than the tile has lines. Issued together at the tile's start,
    /// the 32 prefetches of an AVX-512 tile held 4.5% of its samples (the misses fill the
    /// core's line-fill buffers); spread, two threads ran 1024x2816x1024 x·Wᵀ at 367-372
    /// GFLOP/s against 343-351 on the Xeon VM (docs/performance/stops-29-31.md, stop 30).
    pub(super) fn lines_for_depth(&self, kc: usize) -> Option<TileLines> {
        let lines = TileLines {
            c: self.c.cast::<i8>().cast_const(),
            row_bytes: size_of::<f32>() * self.ldc,
            last: size_of::<f32>() * (self.cols - 1),
            rows: self.rows,
        };
        debug_assert!(lines.last < (TileLines::PER_ROW - 1) * 64);
        match kc / 4 >= lines.rows * TileLines::PER_ROW {
            true => Some(lines),
            false => {
                self.prefetch();
                None
            }
        }
    }
}

/// The cache lines of a [`Tile`] at most 48 values wide, numbered row by row, four to a
/// row: a row's lines at byte 0, 64 and 128 (or its last value, if before) and the line of
/// its last value (an unaligned 48-wide row spans four lines; narrower rows repeat one).
pub(super) struct TileLines {
    c: *const i8,
    row_bytes: usize,
    last: usize,
    rows: usize,
}

impl TileLines {
    /// Lines per row: a power of two, so numbering them takes shifts, not a division in
    /// the depth loop.
    const PER_ROW: usize = 4;

    /// Prefetches line `g` (nothing past the last).
    #[inline(always)]
    pub(super) fn prefetch(&self, g: usize) {
        if g < self.rows * Self::PER_ROW {
            let (row, line) = (g / Self::PER_ROW, g % Self::PER_ROW);
            prefetch_line(
                self.c.wrapping_add(row * self.row_bytes),
                (line * 64).min(self.last),
            );
        }
    }
}

/// Asks for the cache line `at` bytes past `row` (a prefetch never faults).
#[inline(always)]
fn prefetch_line(row: *const i8, at: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching reads nothing and never faults, whatever the address.
    unsafe {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(at));
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (row, at);
}
