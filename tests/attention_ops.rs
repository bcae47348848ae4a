//! The primitives transformer encoders need (batched GEMM, permute, masked softmax,
//! LayerNorm) on the reference backend, against f64 host references and central finite
//! differences for the backwards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lora::{Backend, Tensor, Transpose};
use lora_tests::{assert_close, backend, central_differences, host, matmul64, rand_vec, to64};

#[test]
fn bmm_equals_per_batch_matmul_for_every_transpose() {
    let b = backend();
    let (n, m, k, p) = (5, 7, 9, 4);
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let ash = if ta { [n, k, m] } else { [n, m, k] };
        let bsh = if tb { [n, p, k] } else { [n, k, p] };
        let (av, bv, cv) = (
            rand_vec(n * m * k, 1, 0),
            rand_vec(n * k * p, 2, 0),
            rand_vec(n * m * p, 3, 0),
        );
        let (a, bb) = (
            b.from_host(&av, &ash).unwrap(),
            b.from_host(&bv, &bsh).unwrap(),
        );
        let mut c = b.from_host(&cv, &[n, m, p]).unwrap();
        let t = |f: bool| if f { Transpose::Yes } else { Transpose::No };
        b.bmm(0.5, &a, t(ta), &bb, t(tb), 2.0, &mut c).unwrap();
        let mut want = Vec::new();
        for i in 0..n {
            let prod = matmul64(
                &to64(&av[i * m * k..(i + 1) * m * k]),
                &to64(&bv[i * k * p..(i + 1) * k * p]),
                m,
                k,
                p,
                ta,
                tb,
            );
            want.extend(
                prod.iter()
                    .zip(&cv[i * m * p..(i + 1) * m * p])
                    .map(|(x, c)| 0.5 * x + 2.0 * f64::from(*c)),
            );
        }
        assert_close(
            &format!("bmm ta={ta} tb={tb}"),
            &host(&b, &c),
            &want,
            1e-5,
            1e-6,
        );
    }
    // Mismatched batches are an error, not a panic.
    let a = b.zeros(&[2, 3, 4]).unwrap();
    let bb = b.zeros(&[3, 4, 5]).unwrap();
    let mut c = b.zeros(&[2, 3, 5]).unwrap();
    assert!(
        b.bmm(1.0, &a, Transpose::No, &bb, Transpose::No, 0.0, &mut c)
            .is_err()
    );
}

#[test]
fn permute_moves_every_element() {
    let b = backend();
    let dims = [2, 3, 4, 5];
    let v = rand_vec(120, 4, 0);
    let t = b.from_host(&v, &dims).unwrap();
    let p = b.permute(&t, &[0, 2, 1, 3]).unwrap();
    assert_eq!(p.shape().dims(), &[2, 4, 3, 5]);
    let got = host(&b, &p);
    for i in 0..2 {
        for j in 0..3 {
            for k in 0..4 {
                for l in 0..5 {
                    assert_eq!(
                        got[((i * 4 + k) * 3 + j) * 5 + l],
                        v[((i * 3 + j) * 4 + k) * 5 + l]
                    );
                }
            }
        }
    }
    assert!(b.permute(&t, &[0, 1, 1, 3]).is_err());
    assert!(b.permute(&t, &[0, 1, 2]).is_err());
}

fn softmax64(x: &[f64]) -> Vec<f64> {
    let max = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = x.iter().map(|v| (v - max).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

#[test]
fn masked_softmax_and_its_backward() {
    let b = backend();
    let (batch, heads, q, n) = (2, 3, 4, 6);
    let xv = rand_vec(batch * heads * q * n, 5, 0)
        .iter()
        .map(|v| v * 3.0)
        .collect::<Vec<f32>>();
    let mask: Vec<f32> = (0..batch * n)
        .map(|i| {
            if i % n >= n - 1 - i / n {
                f32::MIN
            } else {
                0.0
            }
        })
        .collect();
    let x = b.from_host(&xv, &[batch, heads, q, n]).unwrap();
    let m = b.from_host(&mask, &[batch, n]).unwrap();
    let y = b.softmax(&x, Some(&m)).unwrap();
    let mut want = Vec::new();
    for r in 0..batch * heads * q {
        let bi = r / (heads * q);
        let row: Vec<f64> = (0..n)
            .map(|j| f64::from(xv[r * n + j]) + f64::from(mask[bi * n + j]))
            .collect();
        want.extend(softmax64(&row));
    }
    assert_close("masked softmax", &host(&b, &y), &want, 1e-5, 1e-7);
    // Masked positions get exactly zero probability.
    let yv = host(&b, &y);
    assert_eq!(yv[n - 1], 0.0);

    // Backward: d/dx of sum(w * softmax(x)) by central differences (no mask).
    let (rows, n) = (3, 5);
    let xv = rand_vec(rows * n, 6, 0);
    let w = rand_vec(rows * n, 7, 0);
    let x = b.from_host(&xv, &[rows, n]).unwrap();
    let y = b.softmax(&x, None).unwrap();
    let dx = host(
        &b,
        &b.softmax_backward(&y, &b.from_host(&w, &[rows, n]).unwrap())
            .unwrap(),
    );
    let f = |xs: &[f64]| -> f64 {
        (0..rows)
            .map(|r| {
                softmax64(&xs[r * n..(r + 1) * n])
                    .iter()
                    .zip(&w[r * n..(r + 1) * n])
                    .map(|(p, w)| p * f64::from(*w))
                    .sum::<f64>()
            })
            .sum()
    };
    let fd = central_differences(&to64(&xv), f);
    assert_close(
        "softmax backward vs finite differences",
        &dx,
        &fd,
        1e-3,
        1e-5,
    );
}

fn layer_norm64(x: &[f64], g: &[f64], bta: &[f64], eps: f64) -> Vec<f64> {
    let n = g.len();
    x.chunks(n)
        .flat_map(|r| {
            let mean = r.iter().sum::<f64>() / n as f64;
            let var = r.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
            r.iter()
                .zip(g)
                .zip(bta)
                .map(move |((v, g), b)| (v - mean) / (var + eps).sqrt() * g + b)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn layer_norm_and_its_backward() {
    let b = backend();
    let (rows, n, eps) = (4, 8, 1e-5f32);
    let xv = rand_vec(rows * n, 8, 0)
        .iter()
        .map(|v| v * 2.0 + 0.5)
        .collect::<Vec<f32>>();
    let (gv, bv, wv) = (
        rand_vec(n, 9, 0),
        rand_vec(n, 10, 0),
        rand_vec(rows * n, 11, 0),
    );
    let x = b.from_host(&xv, &[2, 2, n]).unwrap();
    let (g, bt) = (
        b.from_host(&gv, &[n]).unwrap(),
        b.from_host(&bv, &[n]).unwrap(),
    );
    let (y, stats) = b.layer_norm(&x, &g, &bt, eps).unwrap();
    let want = layer_norm64(&to64(&xv), &to64(&gv), &to64(&bv), f64::from(eps));
    assert_close("layer_norm", &host(&b, &y), &want, 1e-5, 1e-6);
    let dx = host(
        &b,
        &b.layer_norm_backward(&x, &stats, &g, &b.from_host(&wv, &[2, 2, n]).unwrap())
            .unwrap(),
    );
    let f = |xs: &[f64]| -> f64 {
        layer_norm64(xs, &to64(&gv), &to64(&bv), f64::from(eps))
            .iter()
            .zip(&wv)
            .map(|(y, w)| y * f64::from(*w))
            .sum()
    };
    let fd = central_differences(&to64(&xv), f);
    assert_close(
        "layer_norm backward vs finite differences",
        &dx,
        &fd,
        1e-3,
        1e-4,
    );
    // gamma of the wrong size is an error naming it.
    let e = b
        .layer_norm(&x, &b.zeros(&[n + 1]).unwrap(), &bt, eps)
        .unwrap_err();
    assert!(e.to_string().contains("gamma"), "{e}");
}

/// `dx` of LayerNorm in f64 from its definition: `rstd·(g·dy - mean(g·dy) - x̂·mean(g·dy·x̂))`.
fn layer_norm_backward64(x: &[f64], g: &[f64], dy: &[f64], eps: f64) -> Vec<f64> {
    let n = g.len();
    x.chunks(n)
        .zip(dy.chunks(n))
        .flat_map(|(r, d)| {
            let mean = r.iter().sum::<f64>() / n as f64;
            let var = r.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
            let rstd = 1.0 / (var + eps).sqrt();
            let xhat: Vec<f64> = r.iter().map(|v| (v - mean) * rstd).collect();
            let gd: Vec<f64> = d.iter().zip(g).map(|(d, g)| d * g).collect();
            let m1 = gd.iter().sum::<f64>() / n as f64;
            let m2 = gd.iter().zip(&xhat).map(|(a, b)| a * b).sum::<f64>() / n as f64;
            (0..n)
                .map(|i| rstd * (gd[i] - m1 - xhat[i] * m2))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `add_layer_norm` returns the f32 sum exactly and its LayerNorm against f64, and the
/// backward from that sum matches the f64 formula: rows of 8 (shorter than a vector),
/// 37 (whole vectors and a tail) and 384 (MiniLM's), the larger shapes over several
/// threads. A residual of another shape and an empty last axis are errors naming them.
#[test]
fn add_layer_norm_and_the_backward_on_wide_rows() {
    let b = backend();
    let eps = 1e-12f32;
    for (rows, n) in [(4, 8), (1000, 37), (100, 384)] {
        let len = rows * n;
        let xv: Vec<f32> = rand_vec(len, 30, 0).iter().map(|v| v * 3.0 + 1.0).collect();
        let (rv, gv, bv, dv) = (
            rand_vec(len, 31, 0),
            rand_vec(n, 32, 0),
            rand_vec(n, 33, 0),
            rand_vec(len, 34, 0),
        );
        let (x, r) = (
            b.from_host(&xv, &[rows, n]).unwrap(),
            b.from_host(&rv, &[rows, n]).unwrap(),
        );
        let (g, bt) = (
            b.from_host(&gv, &[n]).unwrap(),
            b.from_host(&bv, &[n]).unwrap(),
        );
        let (sum, y, stats) = b.add_layer_norm(&x, &r, &g, &bt, eps).unwrap();
        let sum_host: Vec<f32> = xv.iter().zip(&rv).map(|(a, c)| a + c).collect();
        assert_eq!(host(&b, &sum), sum_host, "sum {rows}x{n}");
        let want = layer_norm64(&to64(&sum_host), &to64(&gv), &to64(&bv), f64::from(eps));
        assert_close(
            &format!("add_layer_norm {rows}x{n}"),
            &host(&b, &y),
            &want,
            1e-5,
            1e-6,
        );
        let (y2, _) = b.layer_norm(&sum, &g, &bt, eps).unwrap();
        assert_eq!(
            host(&b, &y2),
            host(&b, &y),
            "layer_norm of the sum {rows}x{n}"
        );
        let dy = b.from_host(&dv, &[rows, n]).unwrap();
        let dx = b.layer_norm_backward(&sum, &stats, &g, &dy).unwrap();
        let want = layer_norm_backward64(&to64(&sum_host), &to64(&gv), &to64(&dv), f64::from(eps));
        assert_close(
            &format!("layer_norm backward {rows}x{n}"),
            &host(&b, &dx),
            &want,
            1e-4,
            1e-5,
        );
    }
    let x = b.zeros(&[3, 4]).unwrap();
    let g = b.zeros(&[4]).unwrap();
    let e = b
        .add_layer_norm(&x, &b.zeros(&[3, 5]).unwrap(), &g, &g, eps)
        .unwrap_err();
    assert!(e.to_string().contains("residual"), "{e}");
    let empty = b.zeros(&[3, 0]).unwrap();
    let none = b.zeros(&[0]).unwrap();
    let e = b.layer_norm(&empty, &none, &none, eps).unwrap_err();
    assert!(e.to_string().contains("layer_norm x"), "{e}");
}

/// `all_finite` on what LayerNorm, the fused GELU product and attention over rows return
/// (ndarray learns it inside those kernels and remembers it on the tensor) agrees with a
/// look at every element on the host, with and without a NaN or an infinity in the input;
/// and a write into a tensor forgets what was known (a NaN written into a tensor found
/// finite is found).
#[test]
fn all_finite_of_kernel_outputs_matches_the_host() {
    use lora::ops::AttentionMask;
    use lora::{DecoderOps, UnaryOp};
    let b = backend();
    let host_finite =
        |t: &<lora::NdArray as Backend>::Tensor| host(&b, t).iter().all(|v| v.is_finite());
    let (rows, n) = (96, 384);
    for bad in [None, Some(f32::NAN), Some(f32::INFINITY)] {
        let mut xv = rand_vec(rows * n, 40, 0);
        if let Some(bad) = bad {
            xv[rows * n / 2 + 7] = bad;
        }
        let x = b.from_host(&xv, &[rows, n]).unwrap();
        let r = b.from_host(&rand_vec(rows * n, 41, 0), &[rows, n]).unwrap();
        let g = b.from_host(&rand_vec(n, 42, 0), &[n]).unwrap();
        let (_, y, _) = b.add_layer_norm(&x, &r, &g, &g, 1e-12).unwrap();
        assert_eq!(
            b.all_finite(&y).unwrap(),
            host_finite(&y),
            "layer norm, {bad:?}"
        );
        let w = b.from_host(&rand_vec(256 * n, 43, 0), &[256, n]).unwrap();
        let (_, post) = b
            .matmul_plus_act(
                ((&x, Transpose::No), (&w, Transpose::Yes)),
                None,
                None,
                UnaryOp::Gelu,
                &[rows, 256],
            )
            .unwrap();
        assert_eq!(
            b.all_finite(&post).unwrap(),
            host_finite(&post),
            "gelu, {bad:?}"
        );
        // Two sequences of 48 tokens, 12 heads of 32.
        let keep = vec![1u32; rows];
        let dense = std::cell::OnceCell::new();
        let mask = AttentionMask {
            heads: 12,
            causal: false,
            past: 0,
            keep: &keep,
            dense: &dense,
        };
        let (ctx, _) = b.self_attention_rows(&r, &r, &x, &mask, 2, 0.2).unwrap();
        assert_eq!(
            b.all_finite(&ctx).unwrap(),
            host_finite(&ctx),
            "attention, {bad:?}"
        );
    }
    let mut t = b.from_host(&rand_vec(64, 44, 0), &[8, 8]).unwrap();
    assert!(b.all_finite(&t).unwrap());
    let shared = t.clone();
    b.axpby(
        1.0,
        &b.from_host(&[f32::NAN; 64], &[8, 8]).unwrap(),
        1.0,
        &mut t,
    )
    .unwrap();
    assert!(!b.all_finite(&t).unwrap(), "a NaN written after a check");
    assert!(
        b.all_finite(&shared).unwrap(),
        "the clone kept its own storage"
    );
}
