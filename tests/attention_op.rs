//! `DecoderOps::self_attention` and its backward on every backend, causal (decoders) and
//! bidirectional (encoders): against an f64 host reference (with padding, a query that sees
//! no key, several query blocks, a KV cache, and grouped-query attention), finite
//! differences of that reference, and on large shapes the default implementation over the
//! primitives (which a fused backend must reproduce).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::OnceCell;

use lora::ops::{
    AttentionMask, DenseMask, attention_backward, attention_forward, attention_rows_backward,
    attention_rows_forward, dense_mask_host,
};
use lora::{Backend, DecoderOps, FullBackend, Tensor as _};
use lora_tests::{assert_close, backend_suite, central_differences, rand_vec, to64};

/// One attention problem: `batch` sequences of `heads` query heads sharing `kv_heads`
/// key/value heads, `t` queries after `past` cached keys, head size `d`; `keep` flags
/// every key of every sequence.
struct Case {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    t: usize,
    past: usize,
    d: usize,
    keep: Vec<u32>,
    causal: bool,
}

impl Case {
    fn new(batch: usize, heads: usize, t: usize, past: usize, d: usize, pad: usize) -> Self {
        let kv = past + t;
        // The last sequence is left-padded with `pad` keys.
        let keep = (0..batch * kv)
            .map(|i| u32::from(!(i / kv == batch - 1 && i % kv < pad)))
            .collect();
        Case {
            batch,
            heads,
            kv_heads: heads,
            t,
            past,
            d,
            keep,
            causal: true,
        }
    }
    /// Encoder attention: every query sees every real key.
    fn bidirectional(mut self) -> Self {
        self.causal = false;
        self
    }
    /// Grouped-query attention: `kv_heads` key/value heads, each read by
    /// `heads / kv_heads` consecutive query heads.
    fn gqa(mut self, kv_heads: usize) -> Self {
        self.kv_heads = kv_heads;
        self
    }
    fn kv(&self) -> usize {
        self.past + self.t
    }
    fn items(&self) -> usize {
        self.batch * self.heads
    }
    fn kv_items(&self) -> usize {
        self.batch * self.kv_heads
    }
    /// The key/value item query item `item` reads: same sequence, head `head * kv / heads`.
    fn kv_item(&self, item: usize) -> usize {
        (item / self.heads) * self.kv_heads + (item % self.heads) * self.kv_heads / self.heads
    }
    fn visible(&self, item: usize, i: usize, j: usize) -> bool {
        (!self.causal || j <= self.past + i) && self.keep[(item / self.heads) * self.kv() + j] != 0
    }
    /// The additive bias and the per-query "sees some key" flags, from `visible` (an
    /// independent statement of the rule `dense_mask_host` implements).
    fn mask_host(&self) -> (Vec<f32>, Vec<f32>) {
        let (t, kv) = (self.t, self.kv());
        let mut bias = Vec::new();
        let mut rows = Vec::new();
        for item in 0..self.items() {
            for i in 0..t {
                let row: Vec<f32> = (0..kv)
                    .map(|j| if self.visible(item, i, j) { 0.0 } else { -1e30 })
                    .collect();
                rows.push(if row.contains(&0.0) { 1.0 } else { 0.0 });
                bias.extend(row);
            }
        }
        (bias, rows)
    }
    /// f64 reference: per item `softmax(scale·q·kᵀ + mask)·v`, zero for blind queries.
    fn forward64(&self, q: &[f64], k: &[f64], v: &[f64], scale: f64) -> Vec<f64> {
        let (t, kv, d) = (self.t, self.kv(), self.d);
        let mut out = vec![0.0; self.items() * t * d];
        for item in 0..self.items() {
            for i in 0..t {
                let qi = &q[(item * t + i) * d..][..d];
                let s: Vec<Option<f64>> = (0..kv)
                    .map(|j| {
                        let kj = &k[(self.kv_item(item) * kv + j) * d..][..d];
                        self.visible(item, i, j)
                            .then(|| scale * qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>())
                    })
                    .collect();
                let Some(max) = s.iter().flatten().copied().reduce(f64::max) else {
                    continue;
                };
                let e: Vec<f64> = s
                    .iter()
                    .map(|x| x.map_or(0.0, |x| (x - max).exp()))
                    .collect();
                let sum: f64 = e.iter().sum();
                for (j, w) in e.iter().enumerate() {
                    for c in 0..d {
                        let vj = (self.kv_item(item) * kv + j) * d;
                        out[(item * t + i) * d + c] += w / sum * v[vj + c];
                    }
                }
            }
        }
        out
    }
}

struct Inputs<T> {
    q: (Vec<f32>, T),
    k: (Vec<f32>, T),
    v: (Vec<f32>, T),
    dense: OnceCell<DenseMask<T>>,
}

fn inputs<B: Backend>(b: &B, c: &Case, seed: u64) -> Inputs<B::Tensor> {
    let (n, nkv, kv, d) = (c.items(), c.kv_items(), c.kv(), c.d);
    let mk = |len: usize, stream: u64, shape: &[usize]| {
        let h: Vec<f32> = rand_vec(len, seed, stream)
            .iter()
            .map(|x| x * 2.0)
            .collect();
        let t = b.from_host(&h, shape).unwrap();
        (h, t)
    };
    Inputs {
        q: mk(n * c.t * d, 0, &[n, c.t, d]),
        k: mk(nkv * kv * d, 1, &[nkv, kv, d]),
        v: mk(nkv * kv * d, 2, &[nkv, kv, d]),
        dense: OnceCell::new(),
    }
}

fn mask<'a, T>(c: &'a Case, x: &'a Inputs<T>) -> AttentionMask<'a, T> {
    AttentionMask {
        heads: c.heads,
        causal: c.causal,
        past: c.past,
        keep: &c.keep,
        dense: &x.dense,
    }
}

fn check_forward<B: FullBackend>(b: &B, c: &Case) {
    let x = inputs(b, c, 7);
    let scale = 1.0 / (c.d as f64).sqrt();
    let (out, _) = b
        .self_attention(&x.q.1, &x.k.1, &x.v.1, &mask(c, &x), scale as f32)
        .unwrap();
    let want = c.forward64(&to64(&x.q.0), &to64(&x.k.0), &to64(&x.v.0), scale);
    assert_close(
        "self_attention",
        &b.to_host(&out).unwrap(),
        &want,
        1e-4,
        1e-5,
    );
}

/// Small case: the backward against central differences of the f64 forward.
fn check_backward_fd<B: FullBackend>(b: &B, c: &Case) {
    let x = inputs(b, c, 8);
    let scale = 1.0 / (c.d as f64).sqrt();
    let m = mask(c, &x);
    let (out, saved) = b
        .self_attention(&x.q.1, &x.k.1, &x.v.1, &m, scale as f32)
        .unwrap();
    let g = rand_vec(out.shape_numel(), 8, 5);
    let gt = b.from_host(&g, &[c.items(), c.t, c.d]).unwrap();
    let (dq, dk, dv) = b
        .self_attention_backward((&x.q.1, &x.k.1, &x.v.1), &saved, &m, &gt, scale as f32)
        .unwrap();
    let (q, k, v, g) = (to64(&x.q.0), to64(&x.k.0), to64(&x.v.0), to64(&g));
    let dot = |o: Vec<f64>| o.iter().zip(&g).map(|(a, b)| a * b).sum::<f64>();
    let fd_q = central_differences(&q, |q| dot(c.forward64(q, &k, &v, scale)));
    let fd_k = central_differences(&k, |k| dot(c.forward64(&q, k, &v, scale)));
    let fd_v = central_differences(&v, |v| dot(c.forward64(&q, &k, v, scale)));
    assert_close("d q", &b.to_host(&dq).unwrap(), &fd_q, 1e-3, 1e-4);
    assert_close("d k", &b.to_host(&dk).unwrap(), &fd_k, 1e-3, 1e-4);
    assert_close("d v", &b.to_host(&dv).unwrap(), &fd_v, 1e-3, 1e-4);
}

/// Large case: the backend's forward and backward against the defaults over the
/// primitives (which keep the probabilities where a fused backend may keep less).
fn check_backward_default<B: FullBackend>(b: &B, c: &Case) {
    let x = inputs(b, c, 9);
    let scale = 0.125f32;
    let m = mask(c, &x);
    let (out, saved) = b.self_attention(&x.q.1, &x.k.1, &x.v.1, &m, scale).unwrap();
    let (want_out, probs) = attention_forward(b, &x.q.1, &x.k.1, &x.v.1, &m, scale).unwrap();
    let want_out = to64(&b.to_host(&want_out).unwrap());
    assert_close("forward", &b.to_host(&out).unwrap(), &want_out, 1e-4, 1e-5);
    let gt = b
        .from_host(&rand_vec(out.shape_numel(), 9, 5), &[c.items(), c.t, c.d])
        .unwrap();
    let got = b
        .self_attention_backward((&x.q.1, &x.k.1, &x.v.1), &saved, &m, &gt, scale)
        .unwrap();
    let want = attention_backward(b, &x.q.1, &x.k.1, &x.v.1, &probs, &gt, scale).unwrap();
    for (name, g, w) in [
        ("dq", got.0, want.0),
        ("dk", got.1, want.1),
        ("dv", got.2, want.2),
    ] {
        let w = to64(&b.to_host(&w).unwrap());
        assert_close(name, &b.to_host(&g).unwrap(), &w, 1e-4, 1e-5);
    }
}

/// `self_attention_rows` and its backward (q, k, v as the projections' rows) against the
/// default over the item layout (split the heads, `self_attention`, merge).
fn check_rows<B: FullBackend>(b: &B, c: &Case) {
    let x = inputs(b, c, 10);
    let (scale, m) = (0.3f32, mask(c, &x));
    let (kv, d) = (c.kv(), c.d);
    let q = b.from_host(&x.q.0, &[c.batch * c.t, c.heads * d]).unwrap();
    let k = b
        .from_host(&x.k.0, &[c.batch * kv, c.kv_heads * d])
        .unwrap();
    let v = b
        .from_host(&x.v.0, &[c.batch * kv, c.kv_heads * d])
        .unwrap();
    let (out, saved) = b
        .self_attention_rows(&q, &k, &v, &m, c.batch, scale)
        .unwrap();
    let (want, want_saved) = attention_rows_forward(b, &q, &k, &v, &m, c.batch, scale).unwrap();
    assert_eq!(out.shape().dims(), q.shape().dims());
    let want = to64(&b.to_host(&want).unwrap());
    assert_close("rows forward", &b.to_host(&out).unwrap(), &want, 1e-5, 1e-6);
    let g = b
        .from_host(&rand_vec(q.shape_numel(), 10, 5), q.shape().dims())
        .unwrap();
    let got = b
        .self_attention_rows_backward((&q, &k, &v), &saved, &m, c.batch, &g, scale)
        .unwrap();
    let want =
        attention_rows_backward(b, (&q, &k, &v), &want_saved, &m, c.batch, &g, scale).unwrap();
    for (name, g, w) in [
        ("rows dq", got.0, want.0),
        ("rows dk", got.1, want.1),
        ("rows dv", got.2, want.2),
    ] {
        assert_eq!(g.shape().dims(), w.shape().dims(), "{name}");
        let w = to64(&b.to_host(&w).unwrap());
        assert_close(name, &b.to_host(&g).unwrap(), &w, 1e-5, 1e-6);
    }
}

trait Numel {
    fn shape_numel(&self) -> usize;
}
impl<T: lora::Tensor> Numel for T {
    fn shape_numel(&self) -> usize {
        self.shape().numel()
    }
}

backend_suite! { all:
    fn self_attention_over_rows_equals_the_split_heads(b) {
        check_rows(b, &Case::new(2, 2, 5, 0, 4, 2));
        check_rows(b, &Case::new(2, 1, 70, 100, 8, 30));
        check_rows(b, &Case::new(2, 4, 130, 0, 16, 40).gqa(2));
        check_rows(b, &Case::new(3, 2, 140, 0, 16, 40).bidirectional());
        check_rows(b, &Case::new(2, 12, 20, 0, 32, 5).bidirectional());
    }

    fn self_attention_equals_the_f64_reference(b) {
        // Padding that leaves the first queries of the last sequence blind.
        check_forward(b, &Case::new(2, 2, 5, 0, 4, 2));
        // Several query blocks of 64, and queries after 100 cached keys.
        check_forward(b, &Case::new(1, 2, 150, 0, 8, 0));
        check_forward(b, &Case::new(2, 1, 70, 100, 8, 30));
        // Four query heads over two key/value heads, and over one.
        check_forward(b, &Case::new(2, 4, 5, 0, 4, 2).gqa(2));
        check_forward(b, &Case::new(1, 4, 70, 3, 8, 0).gqa(1));
        // Encoder attention: padded keys, several query blocks, a fully padded sequence.
        check_forward(b, &Case::new(2, 3, 5, 0, 4, 2).bidirectional());
        check_forward(b, &Case::new(2, 2, 150, 0, 8, 20).bidirectional());
        check_forward(b, &Case::new(2, 2, 6, 0, 4, 6).bidirectional());
    }

    fn self_attention_backward_equals_finite_differences(b) {
        check_backward_fd(b, &Case::new(2, 2, 5, 0, 4, 2));
        check_backward_fd(b, &Case::new(2, 4, 4, 0, 3, 1).gqa(2));
        check_backward_fd(b, &Case::new(2, 2, 5, 0, 4, 2).bidirectional());
    }

    fn self_attention_backward_equals_the_default_on_long_sequences(b) {
        check_backward_default(b, &Case::new(2, 2, 150, 0, 16, 40));
        check_backward_default(b, &Case::new(2, 4, 130, 0, 16, 40).gqa(2));
        check_backward_default(b, &Case::new(3, 2, 140, 0, 16, 40).bidirectional());
    }
}

#[test]
fn the_dense_mask_follows_the_visibility_rule() {
    for c in [
        Case::new(2, 2, 5, 0, 4, 2),
        Case::new(2, 3, 7, 4, 4, 6),
        Case::new(1, 1, 3, 0, 4, 0),
        Case::new(2, 2, 5, 0, 4, 2).bidirectional(),
        Case::new(2, 1, 4, 0, 4, 4).bidirectional(),
    ] {
        let x = inputs(&lora::NdArray::new(), &c, 1);
        let (bias, rows) = dense_mask_host(&mask(&c, &x), c.t);
        let (want_bias, want_rows) = c.mask_host();
        assert_eq!(bias, want_bias);
        assert_eq!(rows, want_rows);
    }
}

#[test]
fn mismatched_attention_shapes_are_errors() {
    let b = lora::NdArray::new();
    let c = Case::new(1, 2, 5, 0, 4, 0);
    let x = inputs(&b, &c, 1);
    // Rows layout: q rows not a whole number of sequences, keys of three heads for two.
    let q = b.from_host(&x.q.0, &[5, 8]).unwrap();
    let k = b.from_host(&x.k.0, &[5, 8]).unwrap();
    for (q, k, seqs, want) in [
        (&q, &k, 2, "self_attention_rows q"),
        (
            &q,
            &b.zeros(&[5, 12]).unwrap(),
            1,
            "self_attention_rows k / v",
        ),
        (
            &q,
            &b.zeros(&[4, 8]).unwrap(),
            1,
            "self_attention_rows k / v",
        ),
    ] {
        let e = b
            .self_attention_rows(q, k, k, &mask(&c, &x), seqs, 1.0)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{e}");
    }
    let short_k = b.from_host(&[0.0; 2 * 4 * 4], &[2, 4, 4]).unwrap();
    let e = b
        .self_attention(&x.q.1, &short_k, &x.v.1, &mask(&c, &x), 1.0)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("self_attention k / v"), "{e}");
    // Three key/value items cannot serve two query items, nor groups of two of three heads.
    for (c, k_items) in [
        (Case::new(1, 2, 5, 0, 4, 0), 3),
        (Case::new(1, 3, 5, 0, 4, 0), 2),
    ] {
        let x = inputs(&b, &c, 1);
        let k = b
            .from_host(&vec![0.0; k_items * 5 * 4], &[k_items, 5, 4])
            .unwrap();
        let e = b
            .self_attention(&x.q.1, &k, &k, &mask(&c, &x), 1.0)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains("self_attention k / v"), "{e}");
    }
}
