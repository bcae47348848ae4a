//! The GEMM paths against an f64 host reference.

use super::*;
use lora_core::rng::{RngState, uniform};

fn rand(shape: &[usize], stream: u64) -> NdTensor {
    let mut v = vec![0.0; shape.iter().product()];
    uniform(RngState::new(9, stream), -1.0, 1.0, &mut v);
    NdTensor::from_vec(v, shape).unwrap_or_else(|e| panic!("{e}"))
}

/// f64 triple loop on the host: the reference for every path of `gemm_into`.
fn naive(
    alpha: f32,
    a: &NdTensor,
    ta: Transpose,
    b: &NdTensor,
    tb: Transpose,
    beta: f32,
    c: &NdTensor,
) -> Vec<f32> {
    let (ar, ac) = a.shape().as_matrix();
    let (br, bc) = b.shape().as_matrix();
    let (m, k) = ta.apply((ar, ac));
    let n = tb.apply((br, bc)).1;
    let at = |i: usize, p: usize| match ta {
        Transpose::No => a.as_slice()[i * ac + p],
        Transpose::Yes => a.as_slice()[p * ac + i],
    };
    let bt = |p: usize, j: usize| match tb {
        Transpose::No => b.as_slice()[p * bc + j],
        Transpose::Yes => b.as_slice()[j * bc + p],
    };
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let s: f64 = (0..k)
                .map(|p| f64::from(at(i, p)) * f64::from(bt(p, j)))
                .sum();
            let old = if beta == 0.0 {
                0.0
            } else {
                f64::from(beta) * f64::from(c.as_slice()[i * n + j])
            };
            out[i * n + j] = (f64::from(alpha) * s + old) as f32;
        }
    }
    out
}

#[test]
fn every_path_and_transpose_matches_the_naive_product() {
    // Shapes chosen to hit: single-thread, row panels, column panels, one panel per thread,
    // and on x86-64 CPUs with AVX2 the skinny kernels (a narrow output with and without
    // packing its operand, token reductions into a narrow side, partial strips and odd
    // widths).
    let shapes = [
        (3, 5, 4),
        (700, 8, 300),
        (8, 900, 700),
        (130, 12, 77),
        (12, 131, 90),
        (131, 40, 64),
        (300, 260, 280),
        // One panel per thread split by columns (it packs less than rows on our kernel).
        (260, 300, 280),
        // One panel per thread split by rows with a row-major `A` too (`m >= 2n`).
        (600, 200, 150),
        // Token reductions over several accumulator blocks with a partial last vector
        // (16 x 1100: 256-column blocks, 1100 = 137 x 8 + 4) and a token count that is
        // not a multiple of 8; rank-8 narrow outputs (eight rows at a time) with a tail.
        (16, 1100, 203),
        (1100, 16, 203),
        (1001, 8, 37),
        // Odd ranks (one partial rank group) over more tokens than one AVX-512 block, with
        // a partial last column vector.
        (5, 70, 150),
        (70, 3, 150),
        // Our kernel at attention's depth of 32 (both output sides 64 or more).
        (100, 70, 32),
        // Attention's `p·v` (and, transposed, `pᵀ·g`) at MiniLM's head size (AVX-512:
        // twelve rows of two vectors; AVX2: six rows, then single rows), and a width one
        // past two vectors with a row tail. (130, 12, 77) above ends on four AVX2 rows.
        (128, 32, 128),
        (45, 33, 20),
        (1, 1, 1),
        (17, 0, 9),
    ];
    for &(m, n, k) in &shapes {
        for ta in [Transpose::No, Transpose::Yes] {
            for tb in [Transpose::No, Transpose::Yes] {
                let a = rand(
                    &match ta {
                        Transpose::No => [m, k],
                        Transpose::Yes => [k, m],
                    },
                    1,
                );
                let b = rand(
                    &match tb {
                        Transpose::No => [k, n],
                        Transpose::Yes => [n, k],
                    },
                    2,
                );
                let c0 = rand(&[m, n], 3);
                for (alpha, beta) in [(1.0, 0.0), (0.5, 1.0), (-2.0, 0.25)] {
                    let mut c = c0.clone();
                    gemm_into(alpha, &a, ta, &b, tb, beta, &mut c)
                        .unwrap_or_else(|e| panic!("{e}"));
                    let want = naive(alpha, &a, ta, &b, tb, beta, &c0);
                    for (got, want) in c.as_slice().iter().zip(&want) {
                        let tol = 1e-5 * (k as f32).sqrt().max(1.0) * (1.0 + want.abs());
                        assert!(
                            (got - want).abs() <= tol,
                            "{m}x{n}x{k} {ta:?} {tb:?}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn beta_zero_ignores_nan_in_output() {
    // A small product, and token reductions into either narrow side (`aᵀ b` over 20
    // tokens), which write their output block by block from an accumulator.
    for (m, n, k, ta) in [
        (4, 2, 3, Transpose::No),
        (5, 70, 20, Transpose::Yes),
        (70, 5, 20, Transpose::Yes),
    ] {
        let a = match ta {
            Transpose::No => rand(&[m, k], 1),
            Transpose::Yes => rand(&[k, m], 1),
        };
        let b = rand(&[k, n], 2);
        let mut c =
            NdTensor::from_vec(vec![f32::NAN; m * n], &[m, n]).unwrap_or_else(|e| panic!("{e}"));
        gemm_into(1.0, &a, ta, &b, Transpose::No, 0.0, &mut c).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            c.as_slice().iter().all(|v| v.is_finite()),
            "{m}x{n}x{k} {ta:?}: a NaN in the output leaked through beta = 0"
        );
    }
    // `gemm_serial` with no depth writes zeros under `beta = 0` too, never reading `c`.
    let (a, b) = (vec![0.0; 0], vec![0.0; 0]);
    let mut c = vec![f32::NAN; 3 * 5];
    let view = |data, rows, cols| View {
        data,
        rows,
        cols,
        ld: cols,
        trans: Transpose::No,
    };
    gemm_serial(1.0, view(&a, 2, 0), view(&b, 0, 4), 0.0, &mut c, 5)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c[..4], [0.0; 4]);
    assert_eq!(c[5..9], [0.0; 4]);
    assert!(c[4].is_nan() && c[9..].iter().all(|v| v.is_nan()), "{c:?}");
}

#[test]
fn mismatched_inner_dimension_is_an_error_naming_shapes() {
    let a = rand(&[4, 3], 1);
    let b = rand(&[5, 2], 2);
    let mut c = rand(&[4, 2], 3);
    let err = gemm_into(1.0, &a, Transpose::No, &b, Transpose::No, 0.0, &mut c)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("[5, 2]") && err.contains("[4, 3]"), "{err}");
}

/// `alpha · op(a) op(b)` on the f64 reference, as a new `[m, n]` tensor.
fn reference(
    alpha: f32,
    (a, ta): (&NdTensor, Transpose),
    (b, tb): (&NdTensor, Transpose),
) -> NdTensor {
    let (m, n) = (
        ta.apply(a.shape().as_matrix()).0,
        tb.apply(b.shape().as_matrix()).1,
    );
    let unread = NdTensor::from_vec(vec![0.0; m * n], &[m, n]).unwrap_or_else(|e| panic!("{e}"));
    let c = naive(alpha, a, ta, b, tb, 0.0, &unread);
    NdTensor::from_vec(c, &[m, n]).unwrap_or_else(|e| panic!("{e}"))
}

/// Every element of `got` within `2e-5 · √depth · (1 + |want|)` of `want` (f32 sums of
/// `depth` terms).
fn assert_near(what: &str, got: &[f32], want: &[f32], depth: usize) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (got, want)) in got.iter().zip(want).enumerate() {
        let tol = 2e-5 * (depth as f32).sqrt() * (1.0 + want.abs());
        assert!((got - want).abs() <= tol, "{what}[{i}]: {got} vs {want}");
    }
}

/// A fused LoRA product over `m x n x k` returned `None`: only where it does not apply on
/// this machine (no kernel of ours, a shape it does not take, or one split by columns).
fn assert_not_fusable((m, n, k): (usize, usize, usize), what: &str) {
    let threads = rayon::current_num_threads();
    assert!(
        !sgemm::available()
            || !sgemm::suits(m, n, k)
            || !sgemm::prefers_row_panels(m, n, threads, false),
        "{what}: not fused"
    );
}

/// The fused LoRA backward (one product over `dy` with `dy B` and `dyᵀ H` from its
/// blocks) against the three products it replaces, on the f64 reference: several depth
/// slices of `dy` (out = 1100 on either tile), a last slice under 8 columns (out = 515:
/// the hook's element-wise fallback), ranks 1, 5, 8, 16 and 33, one band and one per
/// thread, and a 3-D `dy`.
#[test]
fn fused_lora_backward_matches_the_composed_products() {
    // Room for kept panels (off by default), which the second call of each case reads.
    sgemm::set_budget_bytes(1 << 30);
    let cases: [(&[usize], usize, usize); 7] = [
        (&[300, 1100], 96, 8),
        (&[2, 150, 515], 70, 5),
        (&[700, 384], 384, 16),
        (&[64, 64], 64, 1),
        (&[330, 200], 300, 33),
        (&[1030, 96], 160, 8),
        (&[90, 40], 100, 4),
    ];
    for (dy_shape, inp, r) in cases {
        let out = *dy_shape.last().unwrap_or(&0);
        let m: usize = dy_shape.iter().product::<usize>() / out;
        let dy = rand(dy_shape, 11);
        let w = rand(&[out, inp], 12);
        let (a, b) = (rand(&[r, inp], 13), rand(&[out, r], 14));
        let (x, h) = (rand(&[m, inp], 15), rand(&[m, r], 16));
        let s = 0.75;
        let mut dx_shape = dy_shape.to_vec();
        *dx_shape.last_mut().unwrap_or(&mut 0) = inp;
        let run = || {
            lora_dense_backward(&dy, &w, (&a, &b, s), (&x, &h), &dx_shape)
                .unwrap_or_else(|e| panic!("{e}"))
        };
        let Some((dx, grads)) = run() else {
            assert_not_fusable((m, inp, out), &format!("{dy_shape:?}"));
            continue;
        };
        // The second use packs `w` once and reads those panels: the same sums in the
        // same order, so the same bits.
        let again = run().map(|(dx, g)| (dx, g.d_a, g.d_b));
        assert!(w.kept_b(Transpose::No).is_some(), "{dy_shape:?}: w kept");
        assert!(
            again == Some((dx.clone(), grads.d_a.clone(), grads.d_b.clone())),
            "{dy_shape:?}: kept panels changed the result"
        );
        assert_eq!(dx.shape().dims(), &dx_shape[..]);
        let dy2 = dy.reshaped(&[m, out]).unwrap_or_else(|e| panic!("{e}"));
        let g = reference(1.0, (&dy2, Transpose::No), (&b, Transpose::No));
        let base = reference(1.0, (&dy2, Transpose::No), (&w, Transpose::No));
        let want_dx = naive(s, &g, Transpose::No, &a, Transpose::No, 1.0, &base);
        let want_da = reference(s, (&g, Transpose::Yes), (&x, Transpose::No));
        let want_db = reference(s, (&dy2, Transpose::Yes), (&h, Transpose::No));
        for (what, got, want, depth) in [
            ("dx", dx.as_slice(), &want_dx[..], out),
            ("dA", grads.d_a.as_slice(), want_da.as_slice(), m * out),
            ("dB", grads.d_b.as_slice(), want_db.as_slice(), m),
        ] {
            assert_near(
                &format!("{dy_shape:?} x {inp} r{r} {what}"),
                got,
                want,
                depth,
            );
        }
    }
}

#[test]
fn fused_lora_backward_names_a_mismatched_adapter() {
    let (dy, w) = (rand(&[100, 96], 1), rand(&[96, 80], 2));
    let (a, b) = (rand(&[8, 81], 3), rand(&[96, 8], 4));
    let (x, h) = (rand(&[100, 80], 5), rand(&[100, 8], 6));
    let err = lora_dense_backward(&dy, &w, (&a, &b, 1.0), (&x, &h), &[100, 80])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("lora_A") && err.contains("81"), "{err}");
}

/// The fused LoRA forward (`x Aᵀ` from each block of `x` the base product packs) against
/// the f64 reference: several depth slices of `x` (in = 1100), a last slice under 8
/// columns (in = 515), ranks 1 to 33, with and without a bias, a 3-D `x`.
#[test]
fn fused_lora_forward_matches_the_composed_products() {
    sgemm::set_budget_bytes(1 << 30);
    let cases: [(&[usize], usize, usize); 6] = [
        (&[300, 1100], 96, 8),
        (&[2, 150, 515], 70, 5),
        (&[700, 384], 384, 16),
        (&[64, 64], 64, 1),
        (&[330, 300], 200, 33),
        (&[90, 100], 40, 4),
    ];
    for (i, (x_shape, out, r)) in cases.into_iter().enumerate() {
        let inp = *x_shape.last().unwrap_or(&0);
        let m: usize = x_shape.iter().product::<usize>() / inp;
        let x = rand(x_shape, 21);
        let w = rand(&[out, inp], 22);
        let bias = (i % 2 == 0).then(|| rand(&[out], 23));
        let (a, b) = (rand(&[r, inp], 24), rand(&[out, r], 25));
        let s = 1.5;
        let mut y_shape = x_shape.to_vec();
        *y_shape.last_mut().unwrap_or(&mut 0) = out;
        let run = || {
            lora_dense_forward(&x, (&w, bias.as_ref()), (&a, &b, s), &y_shape)
                .unwrap_or_else(|e| panic!("{e}"))
        };
        let Some((y, h)) = run() else {
            assert_not_fusable((m, out, inp), &format!("{x_shape:?}"));
            continue;
        };
        // As in the backward test: the second use reads `wᵀ`'s kept panels.
        let again = run();
        assert!(w.kept_b(Transpose::Yes).is_some(), "{x_shape:?}: w kept");
        assert!(
            again == Some((y.clone(), h.clone())),
            "{x_shape:?}: kept panels changed the result"
        );
        assert_eq!(y.shape().dims(), &y_shape[..]);
        let x2 = x.reshaped(&[m, inp]).unwrap_or_else(|e| panic!("{e}"));
        let want_h = reference(1.0, (&x2, Transpose::No), (&a, Transpose::Yes));
        let base = reference(1.0, (&x2, Transpose::No), (&w, Transpose::Yes));
        let mut want_y = naive(s, &want_h, Transpose::No, &b, Transpose::Yes, 1.0, &base);
        if let Some(bias) = &bias {
            for (k, v) in want_y.iter_mut().enumerate() {
                *v += bias.as_slice()[k % out];
            }
        }
        for (what, got, want) in [
            ("y", y.as_slice(), &want_y[..]),
            ("H", h.as_slice(), want_h.as_slice()),
        ] {
            assert_near(&format!("{x_shape:?} x {out} r{r} {what}"), got, want, inp);
        }
    }
}

/// A weight's kept panels (`sgemm/prepacked.rs`) follow its values: products after a write
/// to it, and a clone's products (which keep the old values), match the f64 reference, on
/// a row split and a column split, for `x Wᵀ` and `dy W`, through `gemm_new` and
/// `gemm_plus_new`.
#[test]
fn kept_weight_panels_follow_writes_and_clones() {
    if !sgemm::available() {
        eprintln!("skipped: this CPU runs none of our kernels, which keep no panels");
        return;
    }
    sgemm::set_budget_bytes(1 << 30);
    // (m, n, k): rows split (m >= 2n), columns split (two panels of 1200 columns).
    for (m, n, k) in [(1000, 200, 256), (128, 2400, 300)] {
        for tb in [Transpose::Yes, Transpose::No] {
            let x = rand(&[m, k], 31);
            let (rows, cols) = tb.apply((k, n));
            let mut w = rand(&[rows, cols], 32);
            let check = |w: &NdTensor, what: &str| {
                let want = reference(1.0, (&x, Transpose::No), (w, tb));
                for use_ in 0..3 {
                    let got = gemm_new(1.0, (&x, Transpose::No), (w, tb), &[m, n])
                        .unwrap_or_else(|e| panic!("{e}"));
                    let what = format!("{m}x{n}x{k} {tb:?} {what}, use {use_}");
                    assert_near(&what, got.as_slice(), want.as_slice(), k);
                    let plus = gemm_plus_new(((&x, Transpose::No), (w, tb)), None, None, &[m, n])
                        .unwrap_or_else(|e| panic!("{e}"));
                    if let Some(plus) = plus {
                        assert_near(&format!("{what} plus"), plus.as_slice(), want.as_slice(), k);
                    }
                }
                assert!(w.kept_b(tb).is_some(), "{m}x{n}x{k} {tb:?} {what}: kept");
            };
            check(&w, "first values");
            // Shared storage: the write copies it; the clone keeps the old values and panels.
            let old = w.clone();
            w.as_mut_slice().iter_mut().for_each(|v| *v = 0.5 - *v);
            check(&w, "after a write to shared storage");
            check(&old, "the clone");
            drop(old);
            // Sole owner: the write is in place, and the panels must go.
            w.as_mut_slice().iter_mut().for_each(|v| *v *= -2.0);
            check(&w, "after a write in place");
        }
    }
}
