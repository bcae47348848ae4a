//! The primitives decoder LLMs add (`DecoderOps`: RMSNorm, SiLU, rotary embedding,
//! cross-entropy with ignored rows, the embedding backward, and the backwards) on every
//! backend, against f64 host references and central finite differences of those
//! references. Shapes come small (finite differences) and large (ndarray's threaded path
//! starts at 32768 elements).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lora::{Backend, DecoderOps, FullBackend, Tensor};
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

/// Per-row `logsumexp(row) - row[target]`, 0 for ignored rows.
fn cross_entropy64(logits: &[f64], targets: &[Option<usize>], vocab: usize) -> Vec<f64> {
    logits
        .chunks(vocab)
        .zip(targets)
        .map(|(row, t)| {
            t.map_or(0.0, |t| {
                let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
                max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln() - row[t]
            })
        })
        .collect()
}

/// Targets for `rows` rows of `vocab` logits, every third row ignored.
fn targets(rows: usize, vocab: usize, seed: u64) -> Vec<Option<usize>> {
    rand_vec(rows, seed, 9)
        .iter()
        .enumerate()
        .map(|(r, u)| (r % 3 != 1).then(|| ((u + 1.0) * 0.5 * (vocab - 1) as f32) as usize))
        .collect()
}

fn check_cross_entropy<B: FullBackend>(b: &B, rows: usize, vocab: usize, spread: f32) {
    let logits: Vec<f32> = rand_vec(rows * vocab, 5, 0)
        .iter()
        .map(|v| v * spread)
        .collect();
    let t = targets(rows, vocab, 5);
    let lt = b.from_host(&logits, &[rows, vocab]).unwrap();
    let nll = b.cross_entropy(&lt, &t).unwrap();
    let want = cross_entropy64(&to64(&logits), &t, vocab);
    assert_close(
        "cross_entropy",
        &b.to_host(&nll).unwrap(),
        &want,
        1e-5,
        1e-5,
    );
    let scale = 0.25;
    let d = b.cross_entropy_backward(&lt, &t, scale as f32).unwrap();
    let got = b.to_host(&d).unwrap();
    if rows * vocab <= 64 {
        let fd = central_differences(&to64(&logits), |x| {
            scale * cross_entropy64(x, &t, vocab).iter().sum::<f64>()
        });
        assert_close(
            "cross_entropy_backward vs finite differences",
            &got,
            &fd,
            1e-4,
            1e-5,
        );
    } else {
        // (softmax - onehot)·scale, from the f64 log-sum-exp.
        let lg = to64(&logits);
        let want: Vec<f64> = (0..rows * vocab)
            .map(|i| {
                let (r, j) = (i / vocab, i % vocab);
                t[r].map_or(0.0, |tr| {
                    let row = &lg[r * vocab..(r + 1) * vocab];
                    let lse = cross_entropy64(row, &[Some(0)], vocab)[0] + row[0];
                    ((row[j] - lse).exp() - f64::from(u8::from(j == tr))) * scale
                })
            })
            .collect();
        assert_close("cross_entropy_backward", &got, &want, 1e-4, 1e-7);
    }
    // The fused call gives both, also when the logits' storage is shared.
    let shared = lt.clone();
    let (nll2, d2) = b.cross_entropy_with_grad(lt, &t, scale as f32).unwrap();
    assert_close(
        "cross_entropy_with_grad nll",
        &b.to_host(&nll2).unwrap(),
        &to64(&b.to_host(&nll).unwrap()),
        1e-6,
        1e-7,
    );
    assert_close(
        "cross_entropy_with_grad grad",
        &b.to_host(&d2).unwrap(),
        &to64(&got),
        1e-6,
        1e-8,
    );
    assert_eq!(
        b.to_host(&shared).unwrap(),
        logits,
        "the caller's copy is untouched"
    );
}

fn check_embedding_backward<B: FullBackend>(b: &B, n: usize, vocab: usize, hidden: usize) {
    // Few distinct ids, so most repeat.
    let ids: Vec<usize> = rand_vec(n, 6, 0)
        .iter()
        .map(|u| ((u + 1.0) * 0.5 * (vocab / 2) as f32) as usize)
        .collect();
    let d_out = rand_vec(n * hidden, 6, 1);
    let mut want = vec![0.0f64; vocab * hidden];
    for (i, &id) in ids.iter().enumerate() {
        for j in 0..hidden {
            want[id * hidden + j] += f64::from(d_out[i * hidden + j]);
        }
    }
    let g = b
        .embedding_backward(&b.from_host(&d_out, &[n, hidden]).unwrap(), &ids, vocab)
        .unwrap();
    assert_eq!(g.shape().dims(), [vocab, hidden]);
    assert_close(
        "embedding_backward",
        &b.to_host(&g).unwrap(),
        &want,
        1e-5,
        1e-6,
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

    fn cross_entropy_and_backward_equal_the_f64_reference(b) {
        check_cross_entropy(b, ROWS, N, 3.0);
        check_cross_entropy(b, 48, 1000, 8.0);
    }

    fn cross_entropy_of_extreme_logits_stays_finite(b) {
        // Spread 60: a target 100+ nats below the row maximum.
        check_cross_entropy(b, 4, 16, 60.0);
    }

    fn embedding_backward_sums_repeated_ids(b) {
        check_embedding_backward(b, 12, 10, 3);
        check_embedding_backward(b, 600, 100, 64);
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
    let e = b
        .cross_entropy(&x, &[Some(N)])
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("cross_entropy targets"), "{e}");
    let mut t = vec![None; ROWS];
    t[2] = Some(N);
    let e = b
        .cross_entropy_backward(&x, &t, 1.0)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("target 8 of row 2"), "{e}");
    let e = b
        .embedding_backward(&x, &[0, 1, 2, 3, 4, 99], 10)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("id 99"), "{e}");
}
