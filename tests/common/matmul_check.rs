//! Products into fresh tensors (`Backend::matmul`) and DoRA's per-feature scaling
//! (`LoraOps::scale_features`) on any backend, against the host.

use lora::{Backend, LoraOps, Tensor as _};

use crate::{assert_close, rand_vec};

/// `matmul` into a fresh `[2, 2, 4]` tensor (matrix view 4 x 4) under every transpose,
/// against the product on the host; an empty inner dimension gives zeros.
pub fn check_matmul<B: Backend>(t: &B) {
    use lora::Transpose;
    for (tra, trb) in crate::TRANSPOSE_PAIRS {
        let a = rand_vec(20, 5, 1);
        let bm = rand_vec(20, 5, 2);
        let ash = if tra == Transpose::No { [4, 5] } else { [5, 4] };
        let bsh = if trb == Transpose::No { [5, 4] } else { [4, 5] };
        // Element (i, l) of a 4 x 5 matrix stored as is (`No`) or as its 5 x 4 transpose.
        let at = |m: &[f32], stored_transposed: bool, i: usize, l: usize| match stored_transposed {
            false => m[i * 5 + l],
            true => m[l * 4 + i],
        };
        let want: Vec<f64> = (0..16)
            .map(|ij| {
                let (i, j) = (ij / 4, ij % 4);
                (0..5)
                    .map(|l| {
                        0.7 * f64::from(at(&a, tra == Transpose::Yes, i, l))
                            * f64::from(at(&bm, trb == Transpose::No, j, l))
                    })
                    .sum()
            })
            .collect();
        let got = t
            .matmul(
                0.7,
                (&t.from_host(&a, &ash).expect("primitive"), tra),
                (&t.from_host(&bm, &bsh).expect("primitive"), trb),
                &[2, 2, 4],
            )
            .expect("primitive");
        assert_eq!(got.shape().dims(), [2, 2, 4]);
        assert_close(
            &format!("matmul {tra:?} {trb:?}"),
            &t.to_host(&got).expect("primitive"),
            &want,
            1e-5,
            1e-6,
        );
    }
    // An empty inner dimension gives zeros.
    let empty = t.zeros(&[3, 0]).expect("primitive");
    let product = t
        .matmul(
            1.0,
            (&empty, Transpose::No),
            (&empty, Transpose::Yes),
            &[3, 3],
        )
        .expect("primitive");
    assert_eq!(t.to_host(&product).expect("primitive"), vec![0.0; 9]);
}

/// `scale_features` multiplies each row of `[rows, features]` (and of a 3-D tensor's matrix
/// view) by the feature scales, against the host; a wrong-sized scale is an error.
pub fn check_scale_features<B: LoraOps>(t: &B) {
    let (x, v) = (rand_vec(2 * 3 * 4, 7, 1), rand_vec(4, 7, 2));
    let got = t
        .scale_features(
            &t.from_host(&x, &[2, 3, 4]).expect("primitive"),
            &t.from_host(&v, &[4]).expect("primitive"),
        )
        .expect("primitive");
    assert_eq!(got.shape().dims(), [2, 3, 4]);
    let want: Vec<f64> = x
        .iter()
        .enumerate()
        .map(|(i, a)| f64::from(*a) * f64::from(v[i % 4]))
        .collect();
    assert_close(
        "scale_features",
        &t.to_host(&got).expect("primitive"),
        &want,
        1e-6,
        1e-7,
    );
    let bad = t.from_host(&v[..3], &[3]).expect("primitive");
    assert!(t.scale_features(&got, &bad).is_err());
}

/// `matmul_plus` (a product, optionally plus a low-depth one and a bias, into a fresh
/// output) under every transpose of both pairs, against the host in f64: shapes where the
/// ndarray backend runs one product over the concatenated depth (the second pair's depth
/// joining a partial or a full last slice: the AVX2 tile's slices are 256 deep, the
/// AVX-512 tile's 512) and shapes where it falls back to separate steps; a bias of the
/// wrong length is an error. `matmul_plus_act` with GELU
/// gives the same output and `unary`'s GELU of it (on ndarray, computed inside the product
/// block by block: the last shape spans several threads and activation stretches).
pub fn check_matmul_plus<B: Backend>(t: &B) {
    use lora::{Transpose, UnaryOp};
    // (m, n, k1, k2): fused on x86-64 CPUs with AVX2 for all but (5, 7, 9, 3) and the one
    // with a second depth over 64, which run separate steps.
    let shapes = [
        (130, 70, 300, 8),
        (64, 100, 256, 16),
        (67, 65, 64, 64),
        (5, 7, 9, 3),
        (80, 80, 80, 65),
        (150, 530, 40, 8),
        (70, 65, 520, 8),
    ];
    // A `rows x cols` operand stored as is (`No`) or as its transpose, and its element.
    let operand = |rows: usize, cols: usize, tr: Transpose, seed: u64| {
        let v = rand_vec(rows * cols, 11, seed);
        let shape = match tr {
            Transpose::No => [rows, cols],
            Transpose::Yes => [cols, rows],
        };
        let tensor = t.from_host(&v, &shape).expect("primitive");
        let at = move |i: usize, j: usize| match tr {
            Transpose::No => f64::from(v[i * cols + j]),
            Transpose::Yes => f64::from(v[j * rows + i]),
        };
        (tensor, at)
    };
    for (m, n, k1, k2) in shapes {
        let bias_host = rand_vec(n, 11, 5);
        let bias = t.from_host(&bias_host, &[n]).expect("primitive");
        for (case, (ta1, tb1)) in crate::TRANSPOSE_PAIRS.into_iter().enumerate() {
            for (ta2, tb2) in crate::TRANSPOSE_PAIRS {
                let (a1, a1_at) = operand(m, k1, ta1, 1);
                let (b1, b1_at) = operand(k1, n, tb1, 2);
                let (a2, a2_at) = operand(m, k2, ta2, 3);
                let (b2, b2_at) = operand(k2, n, tb2, 4);
                let scale = 0.37f32;
                // With and without the second product, with and without the bias.
                for (with_second, with_bias) in [(true, case % 2 == 0), (false, true)] {
                    let want: Vec<f64> = (0..m * n)
                        .map(|ij| {
                            let (i, j) = (ij / n, ij % n);
                            let mut v: f64 = (0..k1).map(|l| a1_at(i, l) * b1_at(l, j)).sum();
                            if with_second {
                                let second: f64 = (0..k2).map(|l| a2_at(i, l) * b2_at(l, j)).sum();
                                v += f64::from(scale) * second;
                            }
                            if with_bias {
                                v += f64::from(bias_host[j]);
                            }
                            v
                        })
                        .collect();
                    let got = t
                        .matmul_plus(
                            ((&a1, ta1), (&b1, tb1)),
                            with_second.then_some((scale, ((&a2, ta2), (&b2, tb2)))),
                            with_bias.then_some(&bias),
                            &[m, n],
                        )
                        .expect("primitive");
                    let what = format!(
                        "matmul_plus {m}x{n}x({k1}+{k2}) {ta1:?}{tb1:?} + {ta2:?}{tb2:?}, \
                         second {with_second}, bias {with_bias}"
                    );
                    let got_host = t.to_host(&got).expect("primitive");
                    assert_close(&what, &got_host, &want, 1e-4, 1e-4);
                    // With GELU (applied inside ndarray's product): the pre-activation as
                    // above, the activation as `unary`'s on it.
                    let (pre, post) = t
                        .matmul_plus_act(
                            ((&a1, ta1), (&b1, tb1)),
                            with_second.then_some((scale, ((&a2, ta2), (&b2, tb2)))),
                            with_bias.then_some(&bias),
                            UnaryOp::Gelu,
                            &[m, n],
                        )
                        .expect("primitive");
                    let unfused = t.unary(UnaryOp::Gelu, &got).expect("primitive");
                    let exact = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
                    let pre_what = format!("{what}, GELU: pre-activation");
                    assert_close(
                        &pre_what,
                        &t.to_host(&pre).expect("primitive"),
                        &exact(&got_host),
                        1e-6,
                        1e-7,
                    );
                    let post_what = format!("{what}, GELU: activation");
                    let unfused = exact(&t.to_host(&unfused).expect("primitive"));
                    assert_close(
                        &post_what,
                        &t.to_host(&post).expect("primitive"),
                        &unfused,
                        1e-6,
                        1e-7,
                    );
                }
            }
        }
        let (a1, _) = operand(m, k1, Transpose::No, 1);
        let (b1, _) = operand(k1, n, Transpose::No, 2);
        let short = t
            .from_host(&bias_host[..n - 1], &[n - 1])
            .expect("primitive");
        let err = t
            .matmul_plus(
                ((&a1, Transpose::No), (&b1, Transpose::No)),
                None,
                Some(&short),
                &[m, n],
            )
            .expect_err("a bias of n - 1 values");
        assert!(err.to_string().contains(&format!("{}", n - 1)), "{err}");
    }
}
