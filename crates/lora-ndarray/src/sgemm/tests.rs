//! Both register tiles against an f64 triple loop, each on every CPU that runs it (the
//! AVX2 tile on AVX-512 CPUs too).
use super::*;
use lora_core::rng::{RngState, uniform};

fn rand(n: usize, stream: u64) -> Vec<f32> {
    let mut v = vec![0.0; n];
    uniform(RngState::new(3, stream), -1.0, 1.0, &mut v);
    v
}

/// The kernels this CPU runs.
fn kernels_here() -> Vec<Isa> {
    match isa() {
        Some(Isa::Avx512) => vec![Isa::Avx2, Isa::Avx512],
        Some(Isa::Avx2) => vec![Isa::Avx2],
        None => {
            eprintln!("skipped: this CPU runs none of our kernels (no AVX2+FMA)");
            vec![]
        }
    }
}

/// [`product`] on the kernel of `isa`.
///
/// # Safety
/// As [`product`]; `isa` is one of [`kernels_here`].
unsafe fn product_on(
    isa: Isa,
    (m, n): (usize, usize),
    segs: &[Segment<'_>],
    epilogue: Epilogue,
    calls: (Finish<'_>, BlockHook<'_>),
    c: *mut f32,
    ldc: usize,
) {
    // SAFETY: forwarded to the caller's contract.
    unsafe {
        match isa {
            Isa::Avx512 => product::<avx512::Avx512>(m, n, segs, epilogue, calls, c, ldc),
            Isa::Avx2 => product::<avx2::Avx2>(m, n, segs, epilogue, calls, c, ldc),
        }
    }
}

/// `segs`' product (`alpha = 1`, `beta = 0`) on the kernel of `isa`, into a new `m x n`
/// output filled with NaN first (so an element the kernel skips shows).
///
/// # Safety
/// As [`product`] for `segs`; `isa` is one of [`kernels_here`].
unsafe fn into_nan(isa: Isa, (m, n): (usize, usize), segs: &[Segment<'_>]) -> Vec<f32> {
    let mut c = vec![f32::NAN; m * n];
    // SAFETY: forwarded to the caller's contract; `c` holds the m x n output.
    unsafe {
        product_on(
            isa,
            (m, n),
            segs,
            (1.0, 0.0, None),
            (None, None),
            c.as_mut_ptr(),
            n,
        )
    };
    c
}

/// A random `m x k` operand stored row-major, or transposed (`k x m` row-major).
struct Mat {
    data: Vec<f32>,
    rows: usize,
    cols: usize,
    trans: bool,
}

impl Mat {
    fn new(rows: usize, cols: usize, trans: bool, stream: u64) -> Self {
        Mat {
            data: rand(rows * cols, stream),
            rows,
            cols,
            trans,
        }
    }

    fn operand(&self) -> Operand {
        match self.trans {
            false => (self.data.as_ptr(), self.cols as isize, 1),
            true => (self.data.as_ptr(), 1, self.rows as isize),
        }
    }

    fn at(&self, i: usize, j: usize) -> f64 {
        f64::from(match self.trans {
            false => self.data[i * self.cols + j],
            true => self.data[j * self.rows + i],
        })
    }
}

fn assert_close(got: f32, want: f64, k: usize, what: &str) {
    let got = f64::from(got);
    assert!(
        (got - want).abs() <= 1e-5 * (k as f64).sqrt() * (1.0 + want.abs()),
        "{what}: {got} vs {want}"
    );
}

/// Every packing path (plain, transposed, strided, partial panels) and every blocking
/// edge (m past MC, n past NC, k past KC, tiles cut on both sides).
#[test]
fn blocked_kernels_match_the_naive_product_across_block_edges() {
    let shapes = [
        (6, 16, 32),
        (12, 32, 33),
        (131, 3090, 261),
        (7, 17, 515),
        (250, 33, 40),
        (25, 65, 17),
    ];
    for isa in kernels_here() {
        for &(m, n, k) in &shapes {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let (a, b) = (Mat::new(m, k, ta, 1), Mat::new(k, n, tb, 2));
                let c0 = rand(m * n, 3);
                let seg = [Segment {
                    a: a.operand(),
                    b: b.operand(),
                    k,
                    scale: 1.0,
                    kept: None,
                }];
                for (alpha, beta) in [(1.0f32, 0.0f32), (-0.5, 0.75)] {
                    let mut c = c0.clone();
                    // SAFETY: the operands and `c` hold exactly the shapes described.
                    unsafe {
                        product_on(
                            isa,
                            (m, n),
                            &seg,
                            (alpha, beta, None),
                            (None, None),
                            c.as_mut_ptr(),
                            n,
                        )
                    };
                    for i in 0..m {
                        for j in 0..n {
                            let dot: f64 = (0..k).map(|p| a.at(i, p) * b.at(p, j)).sum();
                            let old = if beta == 0.0 {
                                0.0
                            } else {
                                f64::from(c0[i * n + j])
                            };
                            let want = f64::from(alpha) * dot + f64::from(beta) * old;
                            let what = format!("{isa:?} {m}x{n}x{k} ta={ta} tb={tb} ({i}, {j})");
                            assert_close(c[i * n + j], want, k, &what);
                        }
                    }
                }
            }
        }
    }
}

/// `a1 b1 + s · a2 b2 + bias` in one product (LoRA's fused forward), with the second
/// depth joining a first that spans one slice or several; `finish` sees every element
/// once, complete. `a2` starts as NaN and the block hook writes each row block of it
/// when it sees that block's last depth slice of `a1` (as the fused LoRA backward writes
/// `dy B`): the hook sees every block of `a1` once, in depth order, before the kernel
/// packs `a2`'s rows.
#[test]
fn fused_second_product_and_bias_match_the_naive_sum() {
    for isa in kernels_here() {
        for &(m, n, k1, k2) in &[(70, 100, 40, 8), (250, 700, 300, 16), (13, 3100, 520, 64)] {
            let (a1, b1) = (Mat::new(m, k1, false, 4), Mat::new(k1, n, true, 5));
            let (a2, b2) = (Mat::new(m, k2, false, 6), Mat::new(k2, n, true, 7));
            let mut a2_live = Mat {
                data: vec![f32::NAN; m * k2],
                ..Mat::new(m, k2, false, 6)
            };
            let a2_rows = a2_live.data.as_mut_ptr();
            // Depth steps of `a1` the hook has seen, per row.
            let seen = std::cell::RefCell::new(vec![0usize; m]);
            let hook = |row: usize, rows: usize, col: usize, depth: usize| {
                let mut seen = seen.borrow_mut();
                for r in row..row + rows {
                    assert_eq!(
                        seen[r], col,
                        "{isa:?} {m}x{n}: row {r}'s blocks out of order"
                    );
                    seen[r] = col + depth;
                    if col + depth == k1 {
                        for p in 0..k2 {
                            // SAFETY: (r, p) lies in a2's m x k2 buffer, which the kernel
                            // has not read yet (the point of the test).
                            unsafe { *a2_rows.add(r * k2 + p) = a2.data[r * k2 + p] };
                        }
                    }
                }
            };
            let bias = rand(n, 8);
            let segs = [
                Segment {
                    a: a1.operand(),
                    b: b1.operand(),
                    k: k1,
                    scale: 1.0,
                    kept: None,
                },
                Segment {
                    a: a2_live.operand(),
                    b: b2.operand(),
                    k: k2,
                    scale: 0.25,
                    kept: None,
                },
            ];
            let mut c = vec![f32::NAN; m * n];
            // `finish` doubles each finished stretch into `done`; each element once.
            let done = std::cell::RefCell::new(vec![f32::NAN; m * n]);
            let out = c.as_mut_ptr();
            let finish = |r: usize, col: usize, len: usize| {
                for j in col..col + len {
                    let mut done = done.borrow_mut();
                    assert!(done[r * n + j].is_nan(), "({r}, {j}) finished twice");
                    // SAFETY: (r, j) lies in the m x n output, which the product wrote.
                    done[r * n + j] = 2.0 * unsafe { *out.add(r * n + j) };
                }
            };
            let epilogue = (1.0, 0.0, Some(bias.as_ptr()));
            // SAFETY: the operands, the bias and `c` hold exactly the shapes described.
            unsafe {
                product_on(
                    isa,
                    (m, n),
                    &segs,
                    epilogue,
                    (Some(&finish), Some(&hook)),
                    out,
                    n,
                )
            };
            assert!(
                seen.into_inner().iter().all(|&d| d == k1),
                "{isa:?}: unseen blocks"
            );
            let done = done.into_inner();
            for (i, (d, v)) in done.iter().zip(&c).enumerate() {
                assert_eq!(
                    *d,
                    2.0 * v,
                    "{isa:?} {m}x{n}: element {i} finished before its end"
                );
            }
            for i in 0..m {
                for j in 0..n {
                    let first: f64 = (0..k1).map(|p| a1.at(i, p) * b1.at(p, j)).sum();
                    let second: f64 = (0..k2).map(|p| a2.at(i, p) * b2.at(p, j)).sum();
                    let want = first + 0.25 * second + f64::from(bias[j]);
                    let what = format!("{isa:?} {m}x{n}x{k1}+{k2} ({i}, {j})");
                    assert_close(c[i * n + j], want, k1 + k2, &what);
                }
            }
        }
    }
}

#[test]
fn beta_zero_never_reads_the_output() {
    for isa in kernels_here() {
        let (m, n, k) = (13, 21, 40);
        let (a, b) = (Mat::new(m, k, false, 4), Mat::new(k, n, false, 5));
        let seg = [Segment {
            a: a.operand(),
            b: b.operand(),
            k,
            scale: 1.0,
            kept: None,
        }];
        // SAFETY: the operands hold exactly the shapes described.
        let c = unsafe { into_nan(isa, (m, n), &seg) };
        assert!(c.iter().all(|v| v.is_finite()), "{isa:?}");
    }
}

/// A row-major `A` is read in place (no packing); a partial tile's missing rows must not
/// read past `A`'s last row. Here `A` ends where an inaccessible page begins, so a read
/// past it faults and the test process dies.
#[test]
fn in_place_rows_never_read_past_the_last_row_of_a() -> rustix::io::Result<()> {
    use rustix::mm::{MapFlags, MprotectFlags, ProtFlags, mmap_anonymous, mprotect, munmap};
    let page = rustix::param::page_size();
    for isa in kernels_here() {
        // 11 rows: a partial last tile on both kernels (6 and 8 rows).
        let (m, n, k) = (11, 64, 40);
        let values = rand(m * k, 6);
        let b = Mat::new(k, n, false, 7);
        // SAFETY: a fresh private mapping of two pages; the second is made inaccessible,
        // `A` fills the end of the first, and both are unmapped below.
        unsafe {
            let map = mmap_anonymous(
                std::ptr::null_mut(),
                2 * page,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
            )?;
            mprotect(map.byte_add(page), page, MprotectFlags::empty())?;
            let a = map.byte_add(page).cast::<f32>().sub(m * k);
            a.copy_from_nonoverlapping(values.as_ptr(), m * k);
            let seg = [Segment {
                a: (a.cast_const(), k as isize, 1),
                b: b.operand(),
                k,
                scale: 1.0,
                kept: None,
            }];
            let mut c = vec![0.0; m * n];
            let epilogue = (1.0, 0.0, None);
            product_on(isa, (m, n), &seg, epilogue, (None, None), c.as_mut_ptr(), n);
            for i in 0..m {
                for j in 0..n {
                    let dot: f64 = (0..k)
                        .map(|p| f64::from(values[i * k + p]) * b.at(p, j))
                        .sum();
                    assert_close(c[i * n + j], dot, k, &format!("{isa:?} ({i}, {j})"));
                }
            }
            munmap(map, 2 * page)?;
        }
    }
    Ok(())
}

/// [`PackedB::for_kernel`] on the kernel of `isa`.
///
/// # Safety
/// As [`PackedB::for_kernel`].
unsafe fn kept_on(isa: Isa, b: Operand, k: usize, n: usize) -> Option<PackedB> {
    // SAFETY: forwarded to the caller's contract.
    unsafe {
        match isa {
            Isa::Avx512 => PackedB::for_kernel::<avx512::Avx512>(b, k, n),
            Isa::Avx2 => PackedB::for_kernel::<avx2::Avx2>(b, k, n),
        }
    }
}

/// A product reading kept panels gives, bit for bit, the product that packs them, across
/// depth slices, column blocks, partial panels, a column offset and a LoRA tail. The
/// panels are kept from a second matrix `b_kept` while the operand still points at `b`:
/// the result is `b_kept`'s product, so the tiles read the panels, not `b`.
#[test]
fn kept_panels_give_the_product_that_packs_them() {
    // (m, columns of B, k1, k2, first column of the product, its width)
    let cases = [
        (37, 3090, 515, 0, 0, 3090),
        (25, 200, 40, 5, 48, 100),
        (9, 96, 33, 16, 0, 96),
        (70, 144, 300, 8, 96, 48),
    ];
    // Kept panels are off by default.
    set_budget_bytes(1 << 30);
    for isa in kernels_here() {
        for &(m, nb, k1, k2, col, n) in &cases {
            for tb in [false, true] {
                let (a1, b) = (Mat::new(m, k1, false, 11), Mat::new(k1, nb, tb, 12));
                let b_kept = Mat::new(k1, nb, tb, 13);
                let (a2, b2) = (Mat::new(m, k2, false, 14), Mat::new(k2, nb, false, 15));
                // SAFETY: `b_kept` holds k1 x nb values.
                let kept = unsafe { kept_on(isa, b_kept.operand(), k1, nb) };
                let Some(kept) = kept else {
                    panic!("{isa:?}: no room for {k1}x{nb} panels under the budget");
                };
                let from = |mat: &Mat| {
                    // SAFETY: column `col` lies in the matrix.
                    unsafe { mat.operand().at(0, col) }
                };
                let run = |b1: Operand, kept: Option<Kept<'_>>| {
                    let segs = [
                        Segment {
                            a: a1.operand(),
                            b: b1,
                            k: k1,
                            scale: 1.0,
                            kept,
                        },
                        Segment {
                            a: a2.operand(),
                            b: from(&b2),
                            k: k2,
                            scale: 0.5,
                            kept: None,
                        },
                    ];
                    // SAFETY: the operands hold exactly the shapes described.
                    unsafe { into_nan(isa, (m, n), &segs[..1 + usize::from(k2 > 0)]) }
                };
                let packed = run(from(&b_kept), None);
                let read = run(from(&b), Some((&kept, col)));
                let what = format!("{isa:?} {m}x{n}x{k1}+{k2} from column {col} of {nb}, tb {tb}");
                assert!(packed.iter().all(|v| v.is_finite()), "{what}");
                assert!(
                    packed == read,
                    "{what}: kept panels differ from packing them"
                );
            }
        }
    }
}

/// Blocks of `A` are whole tiles, never over the kernel's `MC`, and the last one is within
/// one tile per block of the others (no 8-row block after seventeen of 120).
#[test]
fn row_blocks_are_whole_tiles_of_nearly_equal_size() {
    for (most, mr) in [(120, 6), (240, 8)] {
        for m in 1..3000 {
            let step = balanced_block(m, most, mr);
            let blocks = m.div_ceil(step);
            let last = m - (blocks - 1) * step;
            assert!(
                step.is_multiple_of(mr) && step <= most,
                "m = {m}: blocks of {step}"
            );
            assert_eq!(blocks, m.div_ceil(most), "m = {m}: blocks of {step}");
            assert!(last + blocks * mr >= step, "m = {m}: {step} then {last}");
        }
    }
}

/// Depth slices: never deeper than the kernel allows, never more of them than slices of
/// `KC` would make; on the AVX2 tile a 384-deep product is one slice, a 1536-deep one four
/// of 384 and a 4096-deep one eleven of 373 (`slice_depth`).
#[test]
fn depth_slices_are_no_more_and_no_deeper_than_the_kernel_takes() {
    fn check<K: Kernel>(name: &str) {
        for k in 0..5000 {
            let depth = slice_depth::<K>(k);
            assert!(
                (1..=K::SLICE_MAX).contains(&depth),
                "{name} k = {k}: slices of {depth}"
            );
            assert!(
                k.div_ceil(depth) <= k.div_ceil(K::KC),
                "{name} k = {k}: {depth}"
            );
        }
    }
    check::<avx2::Avx2>("AVX2");
    check::<avx512::Avx512>("AVX-512");
    assert_eq!(slice_depth::<avx2::Avx2>(384), 384);
    assert_eq!(slice_depth::<avx2::Avx2>(1536), 384);
    assert_eq!(slice_depth::<avx2::Avx2>(4096), 373);
    assert_eq!(slice_depth::<avx2::Avx2>(640), 320);
    assert_eq!(slice_depth::<avx512::Avx512>(384), 384);
    assert_eq!(slice_depth::<avx512::Avx512>(600), 512);
}
