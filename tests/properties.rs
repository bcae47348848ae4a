//! Property tests: over random shapes (one row, odd sizes, r = 1 and r = min(in, out)),
//! alphas, rsLoRA, dropout probabilities and seeds, every backend's LoRA forward, backward
//! and merge equal the f64 host reference. Written once, generic over the backend, and run
//! on every backend by `backend_suite!` (tests/common/backend_suite.rs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lora::rng::{self, RngState};
use lora::{Adapter, Backend, DenseLinear, FullBackend, LoraInit, LoraLinear, LoraSpec, Mode};
use lora_tests::{HostLora, assert_close, backend_suite, rand_vec, to64};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Case {
    n: usize,
    inp: usize,
    out: usize,
    r: usize,
    alpha: f32,
    rslora: bool,
    dropout: f32,
    seed: u64,
    batch3d: bool,
}

fn cases() -> impl Strategy<Value = Case> {
    (
        1usize..12,
        1usize..24,
        1usize..24,
        any::<u64>(),
        0.25f32..64.0,
        any::<bool>(),
        prop_oneof![Just(0.0f32), 0.05f32..0.9],
        any::<bool>(),
        0usize..3,
    )
        .prop_flat_map(
            |(n, inp, out, seed, alpha, rslora, dropout, batch3d, r_kind)| {
                let max_r = inp.min(out);
                let r = match r_kind {
                    0 => Just(1).boxed(),
                    1 => Just(max_r).boxed(),
                    _ => (1..=max_r).boxed(),
                };
                r.prop_map(move |r| Case {
                    n,
                    inp,
                    out,
                    r,
                    alpha,
                    rslora,
                    dropout,
                    seed,
                    batch3d,
                })
            },
        )
}

/// Runs one case on backend `b` and compares with the host reference.
fn check_case<B: FullBackend>(b: &B, c: &Case) {
    let name = "model.layers.1.mlp.up_proj";
    let w = rand_vec(c.out * c.inp, c.seed, 1);
    let bias = rand_vec(c.out, c.seed, 2);
    let x = rand_vec(c.n * c.inp, c.seed, 3);
    let g = rand_vec(c.n * c.out, c.seed, 4);
    let base = DenseLinear::<B>::new(
        b.from_host(&w, &[c.out, c.inp]).unwrap(),
        Some(b.from_host(&bias, &[c.out]).unwrap()),
    )
    .unwrap();
    let mut l = LoraLinear::new(name, Box::new(base));
    let spec = LoraSpec {
        r: c.r,
        alpha: c.alpha,
        dropout: c.dropout,
        use_rslora: c.rslora,
        init: LoraInit::Random,
        seed: c.seed,
    };
    l.inject_lora(b, &spec).unwrap();
    // Rows as [n] or [1, n] batches: the matrix view must make them the same thing.
    let x_shape = if c.batch3d {
        vec![1, c.n, c.inp]
    } else {
        vec![c.n, c.inp]
    };
    let xt = b.from_host(&x, &x_shape).unwrap();
    let ad: &dyn Adapter<B> = l.adapter().unwrap();
    let scaling = if c.rslora {
        f64::from(c.alpha) / (c.r as f64).sqrt()
    } else {
        f64::from(c.alpha) / c.r as f64
    };
    let mut mask = vec![1.0f32; c.n * c.inp];
    if c.dropout > 0.0 {
        rng::dropout_mask(
            RngState::new(c.seed, rng::stream_id(name, "dropout")),
            c.dropout,
            &mut mask,
        );
    }
    let h = HostLora {
        n: c.n,
        inp: c.inp,
        out: c.out,
        r: c.r,
        x: to64(&x),
        w: to64(&w),
        bias: to64(&bias),
        a: to64(&b.to_host(ad.tensors()[0].1).unwrap()),
        b: to64(&b.to_host(ad.tensors()[1].1).unwrap()),
        s: scaling,
        mask: to64(&mask),
    };
    let tol = |k: usize| 1e-5 * (k as f64).sqrt().max(1.0);
    // The LoRA terms carry the scaling (up to 64 / sqrt(1) here): their f32 rounding error,
    // and so the absolute tolerance, scales with it; results near zero from cancelling
    // terms are judged against that, not against their own tiny magnitude.
    let atol = 1e-5 * scaling.max(1.0);

    // Training forward + backward (dropout active when p > 0).
    let y = l.forward(b, &xt, Mode::Train).unwrap();
    let y_dims = b.to_host(&y).unwrap();
    assert_close(
        &format!("{} forward {c:?}", b.name()),
        &y_dims,
        &h.forward(),
        tol(c.inp),
        atol,
    );
    let gt = b
        .from_host(
            &g,
            &x_shape[..x_shape.len() - 1]
                .iter()
                .copied()
                .chain([c.out])
                .collect::<Vec<_>>(),
        )
        .unwrap();
    let dx = l.backward(b, &gt).unwrap();
    let (want_dx, want_da, want_db) = h.backward(&to64(&g));
    assert_close(
        &format!("{} dx {c:?}", b.name()),
        &b.to_host(&dx).unwrap(),
        &want_dx,
        tol(c.out),
        atol,
    );
    let pg = l.params_and_grads();
    assert_close(
        &format!("{} dA {c:?}", b.name()),
        &b.to_host(pg[0].grad).unwrap(),
        &want_da,
        tol(c.n),
        atol,
    );
    assert_close(
        &format!("{} dB {c:?}", b.name()),
        &b.to_host(pg[1].grad).unwrap(),
        &want_db,
        tol(c.n),
        atol,
    );
    drop(pg);

    // Eval: no dropout; merged forward equals unmerged.
    let mut h_eval = h.clone();
    h_eval.mask = vec![1.0; c.n * c.inp];
    let unmerged = b.to_host(&l.forward(b, &xt, Mode::Eval).unwrap()).unwrap();
    assert_close(
        &format!("{} eval forward {c:?}", b.name()),
        &unmerged,
        &h_eval.forward(),
        tol(c.inp),
        atol,
    );
    l.merge(b, true).unwrap();
    let merged = b.to_host(&l.forward(b, &xt, Mode::Eval).unwrap()).unwrap();
    assert_close(
        &format!("{} merged forward {c:?}", b.name()),
        &merged,
        &to64(&unmerged),
        tol(c.inp + c.r),
        atol,
    );
    l.unmerge(b).unwrap();
    let w_back = b.to_host(&l.base().weight(b).unwrap()).unwrap();
    let delta_max = b
        .max_abs(&l.adapter().unwrap().delta_weight(b).unwrap())
        .unwrap();
    for (a, o) in w_back.iter().zip(&w) {
        assert!(
            (a - o).abs() <= 2.0 * f32::EPSILON * (a.abs().max(*o).max(delta_max) + o.abs()),
            "unmerge {a} vs {o}"
        );
    }
}

/// 96 random cases per backend; failures shrink and their seeds persist in
/// `proptest-regressions/properties.txt` as with `proptest!`.
fn check_random_cases<B: FullBackend>(b: &B) {
    let config = ProptestConfig {
        cases: 96,
        source_file: Some(file!()),
        ..ProptestConfig::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    if let Err(e) = runner.run(&cases(), |c| {
        check_case(b, &c);
        Ok(())
    }) {
        panic!("{e}");
    }
}

backend_suite! { all:
    fn lora_layer_matches_the_f64_reference(b) {
        check_random_cases(b);
    }
}

proptest! {
    #[test]
    fn dropout_masks_are_a_pure_function_of_seed_stream_offset(seed in any::<u64>(), stream in any::<u64>(), block in 0u64..1_000_000, n in 1usize..300, p in 0.0f32..0.95) {
        let b = lora::NdArray::new();
        let st = RngState { seed, stream, offset: block * 4 };
        let m = b.to_host(&b.dropout_mask(&[n], p, st).unwrap()).unwrap();
        let keep = 1.0 / (1.0 - p);
        for (i, v) in m.iter().enumerate() {
            let u = rng::word_to_unit_f32(rng::word_at(seed, stream, st.offset + i as u64));
            prop_assert_eq!(*v, if u >= p { keep } else { 0.0 });
        }
    }

    #[test]
    fn fresh_default_adapters_never_change_outputs(n in 1usize..6, inp in 1usize..10, out in 1usize..10, seed in any::<u64>(), alpha in 0.1f32..100.0) {
        let b = lora::NdArray::new();
        let w = b.from_host(&rand_vec(out * inp, seed, 1), &[out, inp]).unwrap();
        let mut l = LoraLinear::new("x", Box::new(DenseLinear::new(w, None).unwrap()));
        let x = b.from_host(&rand_vec(n * inp, seed, 2), &[n, inp]).unwrap();
        let base = b.to_host(&l.forward(&b, &x, Mode::Eval).unwrap()).unwrap();
        l.inject_lora(&b, &LoraSpec { r: 1, alpha, seed, ..LoraSpec::default() }).unwrap();
        prop_assert_eq!(b.to_host(&l.forward(&b, &x, Mode::Train).unwrap()).unwrap(), base);
    }
}
