//! The primitives decoder LLMs add (`DecoderOps`: RMSNorm, SiLU, rotary embedding, and
//! their backwards) on every backend, against f64 host references and central finite
//! differences of those references.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lora::{Backend, DecoderOps, FullBackend};
use lora_tests::{assert_close, backend_suite, central_differences, rand_vec, to64};

const ROWS: usize = 6;
const N: usize = 8;

fn rms_norm64(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    x.chunks(N)
        .flat_map(|row| {
            let r = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / N as f64 + eps).sqrt();
            row.iter()
                .zip(w)
                .map(move |(v, w)| v * r * w)
                .collect::<Vec<_>>()
        })
        .collect()
}

fn silu64(x: &[f64]) -> Vec<f64> {
    x.iter().map(|v| v / (1.0 + (-v).exp())).collect()
}

fn rotary64(x: &[f64], cos: &[f64], sin: &[f64]) -> Vec<f64> {
    let half = N / 2;
    (0..x.len())
        .map(|i| {
            let (row, j) = (i / N, i % N);
            let rot = if j < half {
                -x[row * N + j + half]
            } else {
                x[row * N + j - half]
            };
            x[i] * cos[i] + rot * sin[i]
        })
        .collect()
}

/// `Σ f(x)·g`: a scalar whose gradient with respect to `x` is the backward of `f` at `g`.
fn dot(v: &[f64], g: &[f64]) -> f64 {
    v.iter().zip(g).map(|(a, b)| a * b).sum()
}

fn check_rms_norm<B: FullBackend>(b: &B) {
    let (x, w, dy) = (
        rand_vec(ROWS * N, 1, 0),
        rand_vec(N, 1, 1),
        rand_vec(ROWS * N, 1, 2),
    );
    let eps = 1e-6;
    let xt = b.from_host(&x, &[ROWS, N]).unwrap();
    let wt = b.from_host(&w, &[N]).unwrap();
    let (y, inv_rms) = b.rms_norm(&xt, &wt, eps as f32).unwrap();
    let want = rms_norm64(&to64(&x), &to64(&w), eps);
    assert_close("rms_norm", &b.to_host(&y).unwrap(), &want, 1e-5, 1e-6);
    let dx = b
        .rms_norm_backward(&xt, &wt, &inv_rms, &b.from_host(&dy, &[ROWS, N]).unwrap())
        .unwrap();
    let fd = central_differences(&to64(&x), |x| {
        dot(&rms_norm64(x, &to64(&w), eps), &to64(&dy))
    });
    assert_close(
        "rms_norm_backward vs finite differences",
        &b.to_host(&dx).unwrap(),
        &fd,
        1e-4,
        1e-5,
    );
}

fn check_silu<B: FullBackend>(b: &B) {
    let x: Vec<f32> = rand_vec(ROWS * N, 2, 0).iter().map(|v| v * 6.0).collect();
    let dy = rand_vec(ROWS * N, 2, 1);
    let xt = b.from_host(&x, &[ROWS, N]).unwrap();
    let y = b.silu(&xt).unwrap();
    assert_close(
        "silu",
        &b.to_host(&y).unwrap(),
        &silu64(&to64(&x)),
        1e-5,
        1e-6,
    );
    let dx = b
        .silu_backward(&xt, &b.from_host(&dy, &[ROWS, N]).unwrap())
        .unwrap();
    let fd = central_differences(&to64(&x), |x| dot(&silu64(x), &to64(&dy)));
    assert_close(
        "silu_backward vs finite differences",
        &b.to_host(&dx).unwrap(),
        &fd,
        1e-4,
        1e-5,
    );
}

fn check_rotary<B: FullBackend>(b: &B) {
    let (x, dy) = (rand_vec(ROWS * N, 3, 0), rand_vec(ROWS * N, 3, 1));
    let angles: Vec<f32> = rand_vec(ROWS * N / 2, 3, 2)
        .iter()
        .map(|a| a * 3.0)
        .collect();
    // The rotate_half layout: the same angle for j and j + N/2.
    let angle = |i: usize| angles[(i / N) * (N / 2) + (i % N) % (N / 2)];
    let cos: Vec<f32> = (0..ROWS * N).map(|i| angle(i).cos()).collect();
    let sin: Vec<f32> = (0..ROWS * N).map(|i| angle(i).sin()).collect();
    let (ct, st) = (
        b.from_host(&cos, &[ROWS, N]).unwrap(),
        b.from_host(&sin, &[ROWS, N]).unwrap(),
    );
    let xt = b.from_host(&x, &[ROWS, N]).unwrap();
    let y = b.rotary(&xt, &ct, &st).unwrap();
    let want = rotary64(&to64(&x), &to64(&cos), &to64(&sin));
    assert_close("rotary", &b.to_host(&y).unwrap(), &want, 1e-5, 1e-6);
    let dx = b
        .rotary_backward(&b.from_host(&dy, &[ROWS, N]).unwrap(), &ct, &st)
        .unwrap();
    let fd = central_differences(&to64(&x), |x| {
        dot(&rotary64(x, &to64(&cos), &to64(&sin)), &to64(&dy))
    });
    assert_close(
        "rotary_backward vs finite differences",
        &b.to_host(&dx).unwrap(),
        &fd,
        1e-4,
        1e-5,
    );
}

backend_suite! { all:
    fn rms_norm_and_backward_equal_the_f64_reference(b) {
        check_rms_norm(b);
    }

    fn silu_and_backward_equal_the_f64_reference(b) {
        check_silu(b);
    }

    fn rotary_and_backward_equal_the_f64_reference(b) {
        check_rotary(b);
    }
}

#[test]
fn mismatched_shapes_are_errors_naming_the_operation() {
    let b = lora::NdArray::new();
    let x = b.from_host(&rand_vec(ROWS * N, 4, 0), &[ROWS, N]).unwrap();
    let w = b.from_host(&rand_vec(N - 1, 4, 1), &[N - 1]).unwrap();
    let e = b
        .rms_norm(&x, &w, 1e-6)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("rms_norm weight"), "{e}");
    let odd = b.from_host(&rand_vec(ROWS * 3, 4, 2), &[ROWS, 3]).unwrap();
    let e = b
        .rotary(&odd, &odd, &odd)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("rotary"), "{e}");
}
