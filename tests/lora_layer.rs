//! Semantics of the LoRA layer: no-op init, forward against an f64 reference (dropout only
//! on the LoRA input and only in training), merge/unmerge, safe_merge, init distributions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lora::rng::{self, RngState};
use lora::{Backend, DenseLinear, Linear, LoraInit, LoraLinear, LoraSpec, Mode, NdArray, Tensor};
use lora_tests::{HostLora, assert_close, backend, host, rand_tensor, to64};

fn base(out: usize, inp: usize, seed: u64) -> Box<DenseLinear<NdArray>> {
    Box::new(
        DenseLinear::new(
            rand_tensor(&[out, inp], seed, 1),
            Some(rand_tensor(&[out], seed, 2)),
        )
        .unwrap(),
    )
}

fn spec(r: usize, alpha: f32, dropout: f32, init: LoraInit) -> LoraSpec {
    LoraSpec {
        r,
        alpha,
        dropout,
        use_rslora: false,
        init,
        seed: 77,
    }
}

/// The f64 reference of layer `l` (a base with a bias, its default adapter) for input
/// `x`, scaling `s` and dropout mask `mask` (`[n, in]`).
fn host_lora(
    l: &LoraLinear<NdArray>,
    x: &<NdArray as Backend>::Tensor,
    s: f64,
    mask: &[f32],
) -> HostLora {
    let b = backend();
    let ad = l.adapter().unwrap();
    let (a, bt) = (ad.tensors()[0].1, ad.tensors()[1].1);
    let ((n, inp), (out, r)) = (x.shape().as_matrix(), bt.shape().as_matrix());
    HostLora {
        n,
        inp,
        out,
        r,
        x: to64(&host(&b, x)),
        w: to64(&host(&b, &l.base().weight(&b).unwrap())),
        bias: to64(&host(&b, l.base().bias().unwrap())),
        a: to64(&host(&b, a)),
        b: to64(&host(&b, bt)),
        s,
        mask: to64(mask),
    }
}

#[test]
fn fresh_adapter_is_bit_identical_to_the_base_in_both_modes() {
    let b = backend();
    for (x_shape, inp, out, r) in [
        (vec![4, 6], 6, 5, 2),
        (vec![2, 3, 8], 8, 8, 8),
        (vec![1, 1], 1, 3, 1),
    ] {
        let x = rand_tensor(&x_shape, 3, 3);
        let mut l = LoraLinear::new("q", base(out, inp, 1));
        let want = host(&b, &l.base().forward(&b, &x).unwrap());
        l.inject_lora(&b, &spec(r, 16.0, 0.5, LoraInit::KaimingUniform))
            .unwrap();
        for mode in [Mode::Eval, Mode::Train] {
            let got = host(&b, &l.forward(&b, &x, mode).unwrap());
            assert_eq!(got, want, "x {x_shape:?}, mode {mode:?}");
        }
        let gauss = {
            let mut g = LoraLinear::new("q", base(out, inp, 1));
            g.inject_lora(&b, &spec(r, 16.0, 0.0, LoraInit::Gaussian))
                .unwrap();
            host(&b, &g.forward(&b, &x, Mode::Eval).unwrap())
        };
        assert_eq!(gauss, want, "gaussian init is a no-op too");
    }
}

/// Forward in training mode against the f64 formula with the mask the shared generator
/// gives for this layer's dropout stream; in eval mode, no mask at all.
#[test]
fn forward_matches_reference_with_dropout_only_in_training() {
    let b = backend();
    let (n, inp, out, r, p) = (7, 9, 5, 3, 0.4f32);
    let name = "encoder.layer.0.attention.self.query";
    let mut l = LoraLinear::new(name, base(out, inp, 4));
    let sp = spec(r, 6.0, p, LoraInit::Random);
    l.inject_lora(&b, &sp).unwrap();
    let x = rand_tensor(&[n, inp], 5, 5);
    let mut h = host_lora(&l, &x, 2.0, &vec![1.0; n * inp]);
    let eval = host(&b, &l.forward(&b, &x, Mode::Eval).unwrap());
    assert_close("eval forward", &eval, &h.forward(), 1e-5, 1e-5);

    // The first training forward draws the mask at offset 0 of the layer's dropout stream.
    let mut mask = vec![0.0; n * inp];
    rng::dropout_mask(
        RngState::new(77, rng::stream_id(name, "dropout")),
        p,
        &mut mask,
    );
    assert!(mask.contains(&0.0), "the mask drops something");
    h.mask = to64(&mask);
    let train = host(&b, &l.forward(&b, &x, Mode::Train).unwrap());
    assert_close("train forward", &train, &h.forward(), 1e-5, 1e-5);

    // And the base path never sees dropout: with B = 0 the output is the base's exactly.
    let zero_b = b.zeros(&[out, r]).unwrap();
    l.adapter_mut()
        .unwrap()
        .set_tensor("lora_B", zero_b)
        .unwrap();
    let train0 = host(&b, &l.forward(&b, &x, Mode::Train).unwrap());
    assert_eq!(train0, host(&b, &l.base().forward(&b, &x).unwrap()));
}

#[test]
fn backward_matches_reference_formulas() {
    let b = backend();
    let (n, inp, out, r) = (6, 8, 7, 4);
    let mut l = LoraLinear::new("v", base(out, inp, 6));
    l.inject_lora(
        &b,
        &LoraSpec {
            use_rslora: true,
            ..spec(r, 8.0, 0.0, LoraInit::Random)
        },
    )
    .unwrap();
    let x = rand_tensor(&[n, inp], 7, 7);
    let g = rand_tensor(&[n, out], 7, 8);
    let ad = l.adapter().unwrap();
    let h = HostLora {
        n,
        inp,
        out,
        r,
        x: to64(&host(&b, &x)),
        w: to64(&host(&b, &l.base().weight(&b).unwrap())),
        bias: vec![0.0; out],
        a: to64(&host(&b, ad.tensors()[0].1)),
        b: to64(&host(&b, ad.tensors()[1].1)),
        s: 8.0 / 2.0, // rsLoRA: alpha / sqrt(4)
        mask: vec![1.0; n * inp],
    };
    l.forward(&b, &x, Mode::Train).unwrap();
    let dx = host(&b, &l.backward(&b, &g).unwrap());
    let (want_dx, want_da, want_db) = h.backward(&to64(&host(&b, &g)));
    let pg = l.params_and_grads();
    assert_close("dx", &dx, &want_dx, 1e-5, 1e-5);
    assert_close("dA", &host(&b, pg[0].grad), &want_da, 1e-5, 1e-5);
    assert_close("dB", &host(&b, pg[1].grad), &want_db, 1e-5, 1e-5);
}

#[test]
fn merge_then_forward_equals_unmerged_and_unmerge_restores_w() {
    let b = backend();
    for (inp, out, r) in [(16, 12, 4), (3, 3, 3), (40, 1, 1)] {
        let mut l = LoraLinear::new("o", base(out, inp, 8));
        l.inject_lora(&b, &spec(r, 32.0, 0.0, LoraInit::Random))
            .unwrap();
        let x = rand_tensor(&[5, inp], 9, 9);
        let w0 = host(&b, &l.base().weight(&b).unwrap());
        let unmerged = host(&b, &l.forward(&b, &x, Mode::Eval).unwrap());
        l.merge(&b, true).unwrap();
        assert!(l.is_merged());
        let w_merged = host(&b, &l.base().weight(&b).unwrap());
        assert_ne!(w_merged, w0, "merging changed W");
        let merged = host(&b, &l.forward(&b, &x, Mode::Eval).unwrap());
        assert_close("merged forward", &merged, &to64(&unmerged), 1e-5, 1e-5);
        l.unmerge(&b).unwrap();
        let w1 = host(&b, &l.base().weight(&b).unwrap());
        let delta = host(&b, &l.adapter().unwrap().delta_weight(&b).unwrap());
        for ((a, c), d) in w1.iter().zip(&w0).zip(&delta) {
            // (w + d) - d rounds at most one ulp of the larger magnitude, twice.
            let ulp = f32::EPSILON * a.abs().max(d.abs()).max(c.abs());
            assert!((a - c).abs() <= 2.0 * ulp, "unmerge: {a} vs {c}");
        }
        assert!(l.unmerge(&b).is_err(), "unmerge twice is an error");
    }
}

#[test]
fn delta_weight_is_scaling_times_b_a() {
    let b = backend();
    let mut l = LoraLinear::new("k", base(3, 4, 1));
    l.inject_lora(&b, &spec(2, 3.0, 0.0, LoraInit::Random))
        .unwrap();
    let ad = l.adapter().unwrap();
    let a = to64(&host(&b, ad.tensors()[0].1));
    let bb = to64(&host(&b, ad.tensors()[1].1));
    let want: Vec<f64> = lora_tests::matmul64(&bb, &a, 3, 2, 4, false, false)
        .iter()
        .map(|v| v * 1.5)
        .collect();
    assert_close(
        "delta_W",
        &host(&b, &ad.delta_weight(&b).unwrap()),
        &want,
        1e-6,
        1e-7,
    );
}

#[test]
fn safe_merge_refuses_non_finite_and_leaves_the_layer_untouched() {
    let b = backend();
    let mut l = LoraLinear::new("dense", base(3, 3, 1));
    l.inject_lora(&b, &spec(1, 1.0, 0.0, LoraInit::Random))
        .unwrap();
    let huge = b
        .from_host(&[f32::MAX, f32::MAX, f32::MAX], &[3, 1])
        .unwrap();
    l.adapter_mut().unwrap().set_tensor("lora_B", huge).unwrap();
    let a = b.from_host(&[4.0, 4.0, 4.0], &[1, 3]).unwrap();
    l.adapter_mut().unwrap().set_tensor("lora_A", a).unwrap();
    let w0 = host(&b, &l.base().weight(&b).unwrap());
    let err = l.merge(&b, true).unwrap_err().to_string();
    assert!(err.contains("dense") && err.contains("non-finite"), "{err}");
    assert!(!l.is_merged());
    assert_eq!(host(&b, &l.base().weight(&b).unwrap()), w0);
}

#[test]
fn init_distributions_follow_peft() {
    let b = backend();
    let (inp, out, r) = (256, 64, 16);
    let mut l = LoraLinear::new("x", base(out, inp, 1));
    l.inject_lora(&b, &spec(r, 16.0, 0.0, LoraInit::KaimingUniform))
        .unwrap();
    let a = host(&b, l.adapter().unwrap().tensors()[0].1);
    let bound = 1.0 / (inp as f32).sqrt();
    assert!(a.iter().all(|v| v.abs() <= bound));
    let max = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(max > 0.95 * bound, "Kaiming-uniform fills its range");
    assert!(
        host(&b, l.adapter().unwrap().tensors()[1].1)
            .iter()
            .all(|v| *v == 0.0)
    );

    let mut g = LoraLinear::new("x", base(out, inp, 1));
    g.inject_lora(&b, &spec(r, 16.0, 0.0, LoraInit::Gaussian))
        .unwrap();
    let a = host(&b, g.adapter().unwrap().tensors()[0].1);
    let var = a.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / a.len() as f64;
    let want = (1.0 / r as f64).powi(2);
    assert!(
        (var - want).abs() < 0.1 * want,
        "gaussian variance {var} vs {want}"
    );
}

#[test]
fn same_seed_same_adapter_and_different_layers_differ() {
    let b = backend();
    let make = |name: &str, seed: u64| {
        let mut l = LoraLinear::new(name, base(8, 8, 1));
        l.inject_lora(
            &b,
            &LoraSpec {
                seed,
                ..spec(2, 2.0, 0.0, LoraInit::KaimingUniform)
            },
        )
        .unwrap();
        host(&b, l.adapter().unwrap().tensors()[0].1)
    };
    assert_eq!(make("a.q", 1), make("a.q", 1));
    assert_ne!(make("a.q", 1), make("a.k", 1));
    assert_ne!(make("a.q", 1), make("a.q", 2));
}

#[test]
fn trainable_parameter_count_is_r_times_in_plus_out() {
    let b = backend();
    let mut l = LoraLinear::new("x", base(4096, 4096, 1).clone());
    assert_eq!(l.num_trainable(), 0);
    l.inject_lora(&b, &spec(8, 16.0, 0.0, LoraInit::KaimingUniform))
        .unwrap();
    assert_eq!(l.num_trainable(), 8 * (4096 + 4096));
    assert_eq!(l.base().num_parameters(), 4096 * 4096 + 4096);
    assert!(
        l.adapter()
            .unwrap()
            .tensors()
            .iter()
            .all(|(_, t)| t.shape().rank() == 2)
    );
}

/// `forward_activated` gives `forward` and `unary` of it, with or without an adapter
/// running (without one, ndarray applies GELU inside the base's product at this size),
/// keeps `x` for the backward in training, and rejects a NaN input naming the layer.
#[test]
fn forward_activated_is_forward_then_the_activation() {
    use lora::UnaryOp;
    let b = backend();
    let x = rand_tensor(&[96, 64], 5, 1);
    for with_adapter in [false, true] {
        let mut l = LoraLinear::new("intermediate", base(80, 64, 2));
        if with_adapter {
            l.inject_lora(&b, &spec(4, 8.0, 0.0, LoraInit::Random))
                .unwrap();
        }
        let want_pre = l.forward(&b, &x, Mode::Eval).unwrap();
        let want_post = host(&b, &b.unary(UnaryOp::Gelu, &want_pre).unwrap());
        let (pre, post) = l
            .forward_activated(&b, &x, Mode::Train, UnaryOp::Gelu)
            .unwrap();
        let what = format!("adapter {with_adapter}");
        assert_close(
            &what,
            &host(&b, &pre),
            &to64(&host(&b, &want_pre)),
            1e-6,
            1e-7,
        );
        assert_close(&what, &host(&b, &post), &to64(&want_post), 1e-6, 1e-7);
        let dy = rand_tensor(&[96, 80], 5, 2);
        let dx = l.backward(&b, &dy).expect("the training forward kept x");
        assert_eq!(dx.shape().dims(), &[96, 64]);
        let mut bad = host(&b, &x);
        bad[7] = f32::NAN;
        let bad = b.from_host(&bad, &[96, 64]).unwrap();
        let err = l
            .forward_activated(&b, &bad, Mode::Eval, UnaryOp::Gelu)
            .unwrap_err();
        assert!(err.to_string().contains("intermediate"), "{what}: {err}");
    }
}

/// `backward_accumulate` adds exactly what `backward` returns: a frozen layer with no
/// adapter (its product accumulates, `beta = 1`, at a size our kernel takes and one it
/// does not) and one with a LoRA adapter (backward, then an add); a sum shaped unlike the
/// input is an error naming both shapes.
#[test]
fn backward_accumulate_adds_the_input_gradient() {
    let b = backend();
    for (rows, inp, out, adapter) in [(130, 96, 80, false), (5, 7, 3, false), (130, 96, 80, true)] {
        let x = rand_tensor(&[rows, inp], 31, 1);
        let dy = rand_tensor(&[rows, out], 31, 2);
        let acc0 = rand_tensor(&[rows, inp], 31, 3);
        let mut l = LoraLinear::new("layer", base(out, inp, 5));
        if adapter {
            l.inject_lora(&b, &spec(4, 8.0, 0.0, LoraInit::Random))
                .unwrap();
        }
        l.forward(&b, &x, Mode::Train).unwrap();
        let dx = host(&b, &l.backward(&b, &dy).unwrap());
        l.forward(&b, &x, Mode::Train).unwrap();
        let mut acc = acc0.clone();
        l.backward_accumulate(&b, &dy, &mut acc).unwrap();
        let want: Vec<f64> = host(&b, &acc0)
            .iter()
            .zip(&dx)
            .map(|(a, d)| f64::from(*a) + f64::from(*d))
            .collect();
        let what = format!("{rows}x{inp}x{out} adapter={adapter}");
        assert_close(&what, &host(&b, &acc), &want, 1e-5, 1e-5);
    }
    let mut l = LoraLinear::new("layer", base(8, 6, 5));
    l.forward(&b, &rand_tensor(&[4, 6], 1, 1), Mode::Train)
        .unwrap();
    let mut wrong = rand_tensor(&[4, 7], 1, 2);
    let err = l
        .backward_accumulate(&b, &rand_tensor(&[4, 8], 1, 3), &mut wrong)
        .unwrap_err()
        .to_string();
    assert!(err.contains("[4, 7]") && err.contains("[4, 6]"), "{err}");
    // The dense base's own check, for callers of `Linear::backward_add` directly.
    let err = base(8, 6, 5)
        .backward_add(&b, &rand_tensor(&[4, 8], 1, 3), &mut wrong)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("input gradient sum") && err.contains("[4, 6]"),
        "{err}"
    );
}

/// `backward_params` (the first layer over frozen embeddings) leaves the gradients of the
/// f64 reference, with and without dropout, and consumes the saved input like `backward`;
/// DoRA, which has no such path, falls back to the full backward with its gradients; a
/// layer without adapters has nothing to do; a `dy` of the wrong shape is an error naming
/// the layer.
#[test]
fn backward_params_gives_the_adapter_gradients_alone() {
    let b = backend();
    let (n, inp, out, r) = (70, 96, 80, 4);
    let (x, g) = (rand_tensor(&[n, inp], 9, 1), rand_tensor(&[n, out], 9, 2));
    for dropout in [0.0, 0.3] {
        let name = "encoder.layer.0.attention.self.query";
        let mut l = LoraLinear::new(name, base(out, inp, 8));
        l.inject_lora(&b, &spec(r, 8.0, dropout, LoraInit::Random))
            .unwrap();
        let mut mask = vec![1.0; n * inp];
        if dropout > 0.0 {
            let stream = RngState::new(77, rng::stream_id(name, "dropout"));
            rng::dropout_mask(stream, dropout, &mut mask);
        }
        let h = host_lora(&l, &x, 2.0, &mask);
        l.forward(&b, &x, Mode::Train).unwrap();
        l.backward_params(&b, &g).unwrap();
        let (_, want_da, want_db) = h.backward(&to64(&host(&b, &g)));
        let pg = l.params_and_grads();
        let what = format!("dropout {dropout}");
        assert_close(
            &format!("dA, {what}"),
            &host(&b, pg[0].grad),
            &want_da,
            1e-5,
            1e-5,
        );
        assert_close(
            &format!("dB, {what}"),
            &host(&b, pg[1].grad),
            &want_db,
            1e-5,
            1e-5,
        );
        let err = l.backward_params(&b, &g).unwrap_err().to_string();
        assert!(
            err.contains(name) && err.contains("without a forward"),
            "{err}"
        );
    }

    // The full backward's gradients, then `backward_params`'s.
    let full_and_alone = |l: &mut LoraLinear<NdArray>| {
        let mut run = |alone: bool| {
            l.forward(&b, &x, Mode::Train).unwrap();
            match alone {
                true => l.backward_params(&b, &g).unwrap(),
                false => drop(l.backward(&b, &g).unwrap()),
            }
            (l.params_and_grads().iter())
                .map(|p| host(&b, p.grad))
                .collect::<Vec<_>>()
        };
        (run(false), run(true))
    };
    let mut dora = LoraLinear::new("dora", base(out, inp, 8));
    dora.add_dora(&b, "default", &spec(r, 8.0, 0.0, LoraInit::Random))
        .unwrap();
    let (full, alone) = full_and_alone(&mut dora);
    assert_eq!((full.len(), alone), (3, full));
    // Two adapters running: the full backward too.
    let mut two = LoraLinear::new("two", base(out, inp, 8));
    two.inject_lora(&b, &spec(r, 8.0, 0.0, LoraInit::Random))
        .unwrap();
    let other = LoraSpec {
        seed: 78,
        ..spec(r, 8.0, 0.0, LoraInit::Random)
    };
    two.add_lora(&b, "other", &other).unwrap();
    two.set_active_adapters(&["default", "other"]).unwrap();
    let (full, alone) = full_and_alone(&mut two);
    assert_eq!((full.len(), alone), (4, full));
    // Merged adapters get no gradient: an error, as from `backward`.
    two.merge(&b, false).unwrap();
    two.forward(&b, &x, Mode::Train).unwrap();
    let err = two.backward_params(&b, &g).unwrap_err().to_string();
    assert!(err.contains("two") && err.contains("merged"), "{err}");

    let mut frozen = LoraLinear::new("frozen", base(out, inp, 8));
    frozen.forward(&b, &x, Mode::Train).unwrap();
    frozen.backward_params(&b, &g).unwrap();
    frozen.forward(&b, &x, Mode::Train).unwrap();
    let err = (frozen.backward_params(&b, &rand_tensor(&[n, inp], 9, 3)))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("frozen") && err.contains(&format!("[{n}, {out}]")),
        "{err}"
    );
}

/// Kept weight panels (`ndarray_pool::set_kept_panel_limit`, off by default) change no bit
/// of a LoRA layer's outputs and gradients over repeated steps, nor of a plain layer's:
/// from the second use on, the tiles read panels packed once, in the order they would have
/// packed them. The limit is process-wide; every other test in this binary computes the
/// same bits with or without copies, so they may run meanwhile.
#[test]
fn kept_weight_panels_change_no_bits_of_repeated_steps() {
    let b = backend();
    // Shapes our GEMM takes (sides of 64 or more): a fused LoRA product and a plain one.
    // Square weights, so that a copy served for the other way round would still fit.
    let (n, inp, out) = (256, 192, 192);
    let x = rand_tensor(&[n, inp], 9, 1);
    let g = rand_tensor(&[n, out], 9, 2);
    let run = |limit: usize| {
        lora::ndarray_pool::set_kept_panel_limit(limit);
        let mut lora_layer = LoraLinear::new("q", base(out, inp, 9));
        lora_layer
            .inject_lora(&b, &spec(8, 16.0, 0.0, LoraInit::Random))
            .unwrap();
        let plain = base(out, inp, 10);
        let mut bits = Vec::new();
        for _ in 0..3 {
            let y = lora_layer.forward(&b, &x, Mode::Train).unwrap();
            let dx = lora_layer.backward(&b, &g).unwrap();
            let pg = lora_layer.params_and_grads();
            let (da, db) = (host(&b, pg[0].grad), host(&b, pg[1].grad));
            let plain_y = plain.forward(&b, &x).unwrap();
            let plain_dx = plain.backward(&b, &g).unwrap();
            for t in [&y, &dx, &plain_y, &plain_dx] {
                bits.extend(host(&b, t).iter().map(|v| v.to_bits()));
            }
            bits.extend(da.iter().chain(&db).map(|v| v.to_bits()));
        }
        // While the layers live: what their copies hold (0 when none were made).
        (bits, lora::ndarray_pool::stats().kept_panel_bytes)
    };
    let (packed_per_call, _) = run(0);
    let (kept, kept_bytes) = run(1 << 30);
    lora::ndarray_pool::set_kept_panel_limit(0);
    // Else the comparison below is of two runs that both packed per call.
    assert!(
        kept_bytes > 0 || !lora::ndarray_pool::own_kernels(),
        "no panels were kept with room for them"
    );
    assert!(packed_per_call == kept, "kept panels changed a result");
}
