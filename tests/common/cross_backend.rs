//! Checks written once, generic over the backend, that compare any backend with the
//! ndarray reference. `tests/cross_backend.rs` lists the backends compiled in.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lora::models::Mlp;
use lora::{
    Adam, Backend, FullBackend, LoraInit, LoraSpec, Mode, Model, Optimizer, UnaryOp, mse_loss,
};

use crate::{assert_close, assert_close_scaled, rand_vec, to64};

/// 20 training steps (forward, backward, AdamW, dropout on) on both backends from the same
/// seed: the shared generator makes the runs comparable step by step.
pub fn train_twenty_steps<B: FullBackend>(b: &B) -> (Vec<f64>, Vec<f32>) {
    let mut m = Mlp::new(b, &[4, 16, 16, 3], UnaryOp::Gelu, 5).expect("training step");
    for l in m.linears_mut().into_iter().skip(1) {
        l.inject_lora(
            b,
            &LoraSpec {
                r: 2,
                alpha: 8.0,
                dropout: 0.1,
                use_rslora: false,
                init: LoraInit::KaimingUniform,
                seed: 9,
            },
        )
        .expect("training step");
    }
    let x = b
        .from_host(&rand_vec(32 * 4, 6, 1), &[32, 4])
        .expect("training step");
    let y = b
        .from_host(&rand_vec(32 * 3, 6, 2), &[32, 3])
        .expect("training step");
    let mut opt = Adam::<B>::adamw(1e-2).expect("training step");
    let mut losses = Vec::new();
    for _ in 0..20 {
        let p = m.forward(b, &x, Mode::Train).expect("training step");
        let (loss, dy) = mse_loss(b, &p, &y).expect("training step");
        m.backward(b, &dy).expect("training step");
        opt.step(b, &mut m.params_and_grads())
            .expect("training step");
        losses.push(loss);
    }
    let params: Vec<f32> = m
        .linears()
        .iter()
        .filter_map(|l| l.adapter())
        .flat_map(|a| {
            a.tensors()
                .into_iter()
                .flat_map(|(_, t)| b.to_host(t).expect("training step"))
        })
        .collect();
    (losses, params)
}

/// Every primitive of backend `t` on random inputs against the ndarray reference.
pub fn check_every_primitive<B: FullBackend>(t: &B) {
    use lora::{BinaryOp, Transpose};
    let r = lora::NdArray::new();
    let shape = [3usize, 5, 4];
    let xa = rand_vec(60, 4, 1);
    let xb: Vec<f32> = rand_vec(60, 4, 2).iter().map(|v| v + 1.5).collect();
    let (ra, rb) = (
        r.from_host(&xa, &shape).expect("primitive"),
        r.from_host(&xb, &shape).expect("primitive"),
    );
    let (ta, tb) = (
        t.from_host(&xa, &shape).expect("primitive"),
        t.from_host(&xb, &shape).expect("primitive"),
    );
    let same = |what: &str, got: Vec<f32>, want: Vec<f32>| {
        assert_close(what, &got, &to64(&want), 1e-5, 1e-6)
    };
    for op in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div] {
        same(
            &format!("{op:?}"),
            t.to_host(&t.binary(op, &ta, &tb).expect("primitive"))
                .expect("primitive"),
            r.to_host(&r.binary(op, &ra, &rb).expect("primitive"))
                .expect("primitive"),
        );
    }
    for op in [UnaryOp::Relu, UnaryOp::Gelu, UnaryOp::Tanh, UnaryOp::Square] {
        same(
            &format!("{op:?}"),
            t.to_host(&t.unary(op, &ta).expect("primitive"))
                .expect("primitive"),
            r.to_host(&r.unary(op, &ra).expect("primitive"))
                .expect("primitive"),
        );
    }
    same(
        "Sqrt",
        t.to_host(&t.unary(UnaryOp::Sqrt, &tb).expect("primitive"))
            .expect("primitive"),
        r.to_host(&r.unary(UnaryOp::Sqrt, &rb).expect("primitive"))
            .expect("primitive"),
    );
    for op in [UnaryOp::Relu, UnaryOp::Gelu, UnaryOp::Tanh] {
        same(
            &format!("{op:?} backward"),
            t.to_host(&t.unary_backward(op, &ta, &tb).expect("primitive"))
                .expect("primitive"),
            r.to_host(&r.unary_backward(op, &ra, &rb).expect("primitive"))
                .expect("primitive"),
        );
    }
    let (mut ry, mut ty) = (rb.clone(), tb.clone());
    r.axpby(0.3, &ra, -1.7, &mut ry).expect("primitive");
    t.axpby(0.3, &ta, -1.7, &mut ty).expect("primitive");
    same(
        "axpby",
        t.to_host(&ty).expect("primitive"),
        r.to_host(&ry).expect("primitive"),
    );
    same(
        "axpby leaves the clone's source alone",
        t.to_host(&tb).expect("primitive"),
        xb.clone(),
    );
    same(
        "affine",
        t.to_host(&t.affine(&ta, 2.5, -1.0).expect("primitive"))
            .expect("primitive"),
        r.to_host(&r.affine(&ra, 2.5, -1.0).expect("primitive"))
            .expect("primitive"),
    );
    let row = rand_vec(4, 4, 3);
    let (mut rr, mut tr) = (ra.clone(), ta.clone());
    r.add_row_broadcast(&mut rr, &r.from_host(&row, &[4]).expect("primitive"))
        .expect("primitive");
    t.add_row_broadcast(&mut tr, &t.from_host(&row, &[4]).expect("primitive"))
        .expect("primitive");
    same(
        "add_row_broadcast",
        t.to_host(&tr).expect("primitive"),
        r.to_host(&rr).expect("primitive"),
    );
    same(
        "sum_rows",
        t.to_host(&t.sum_rows(&ta).expect("primitive"))
            .expect("primitive"),
        r.to_host(&r.sum_rows(&ra).expect("primitive"))
            .expect("primitive"),
    );
    same(
        "sum_cols",
        t.to_host(&t.sum_cols(&ta).expect("primitive"))
            .expect("primitive"),
        r.to_host(&r.sum_cols(&ra).expect("primitive"))
            .expect("primitive"),
    );
    assert!((t.sum_all(&ta).expect("primitive") - r.sum_all(&ra).expect("primitive")).abs() < 1e-5);
    assert_eq!(
        t.max_abs(&ta).expect("primitive"),
        r.max_abs(&ra).expect("primitive")
    );
    assert!(t.all_finite(&ta).expect("primitive"));
    assert!(
        !t.all_finite(&t.from_host(&[1.0, f32::NAN], &[2]).expect("primitive"))
            .expect("primitive")
    );
    let rows = [14usize, 0, 7];
    same(
        "gather_rows",
        t.to_host(&t.gather_rows(&ta, &rows).expect("primitive"))
            .expect("primitive"),
        r.to_host(&r.gather_rows(&ra, &rows).expect("primitive"))
            .expect("primitive"),
    );
    let src = rand_vec(12, 4, 4);
    let (mut rs, mut ts) = (ra.clone(), ta.clone());
    r.scatter_add_rows(
        &mut rs,
        &rows,
        &r.from_host(&src, &[3, 4]).expect("primitive"),
    )
    .expect("primitive");
    t.scatter_add_rows(
        &mut ts,
        &rows,
        &t.from_host(&src, &[3, 4]).expect("primitive"),
    )
    .expect("primitive");
    same(
        "scatter_add_rows",
        t.to_host(&ts).expect("primitive"),
        r.to_host(&rs).expect("primitive"),
    );
    let st = lora::rng::RngState::new(1, 2);
    assert_eq!(
        t.to_host(&t.dropout_mask(&shape, 0.3, st).expect("primitive"))
            .expect("primitive"),
        r.to_host(&r.dropout_mask(&shape, 0.3, st).expect("primitive"))
            .expect("primitive"),
        "dropout masks are bit-identical"
    );
    for (tra, trb) in crate::TRANSPOSE_PAIRS {
        let a = rand_vec(20, 5, 1);
        let bm = rand_vec(20, 5, 2);
        let c0 = rand_vec(16, 5, 3);
        let ash = if tra == Transpose::No { [4, 5] } else { [5, 4] };
        let bsh = if trb == Transpose::No { [5, 4] } else { [4, 5] };
        let mut rc = r.from_host(&c0, &[4, 4]).expect("primitive");
        let mut tc = t.from_host(&c0, &[4, 4]).expect("primitive");
        r.gemm(
            0.7,
            &r.from_host(&a, &ash).expect("primitive"),
            tra,
            &r.from_host(&bm, &bsh).expect("primitive"),
            trb,
            0.5,
            &mut rc,
        )
        .expect("primitive");
        t.gemm(
            0.7,
            &t.from_host(&a, &ash).expect("primitive"),
            tra,
            &t.from_host(&bm, &bsh).expect("primitive"),
            trb,
            0.5,
            &mut tc,
        )
        .expect("primitive");
        same(
            &format!("gemm {tra:?} {trb:?}"),
            t.to_host(&tc).expect("primitive"),
            r.to_host(&rc).expect("primitive"),
        );
    }
}

/// The same optimizer for the reference and for the backend under test.
type OptimizerPair<B> = (
    &'static str,
    Box<dyn Optimizer<lora::NdArray>>,
    Box<dyn Optimizer<B>>,
);

/// SGD (momentum, dampening, Nesterov, decay), Adam (L2) and AdamW, five steps each on
/// backend `t` and on the reference, from the same parameters and gradients.
pub fn check_every_optimizer<B: FullBackend>(t: &B) {
    use lora::{AdamHyper, ParamGrad, Sgd, SgdHyper};
    let r = lora::NdArray::new();
    let sgd = |momentum, nesterov| SgdHyper {
        lr: 0.1,
        momentum,
        dampening: 0.0,
        weight_decay: 0.01,
        nesterov,
    };
    let adam = |decoupled| AdamHyper {
        lr: 1e-2,
        beta1: 0.8,
        beta2: 0.99,
        eps: 1e-6,
        weight_decay: 0.1,
        decoupled,
    };
    fn run<X: FullBackend>(b: &X, mut opt: Box<dyn Optimizer<X>>) -> Vec<f32> {
        let mut p = b.from_host(&rand_vec(12, 8, 1), &[3, 4]).expect("param");
        for step in 0..5 {
            let g = b
                .from_host(&rand_vec(12, 8, 10 + step), &[3, 4])
                .expect("grad");
            opt.step(
                b,
                &mut [ParamGrad {
                    param: &mut p,
                    grad: &g,
                }],
            )
            .expect("step");
        }
        b.to_host(&p).expect("host")
    }
    let cases: Vec<OptimizerPair<B>> = vec![
        (
            "sgd",
            Box::new(Sgd::new(sgd(0.0, false)).expect("sgd")),
            Box::new(Sgd::new(sgd(0.0, false)).expect("sgd")),
        ),
        (
            "sgd momentum",
            Box::new(Sgd::new(sgd(0.9, false)).expect("sgd")),
            Box::new(Sgd::new(sgd(0.9, false)).expect("sgd")),
        ),
        (
            "sgd nesterov",
            Box::new(Sgd::new(sgd(0.9, true)).expect("sgd")),
            Box::new(Sgd::new(sgd(0.9, true)).expect("sgd")),
        ),
        (
            "adam",
            Box::new(Adam::new(adam(false)).expect("adam")),
            Box::new(Adam::new(adam(false)).expect("adam")),
        ),
        (
            "adamw",
            Box::new(Adam::new(adam(true)).expect("adamw")),
            Box::new(Adam::new(adam(true)).expect("adamw")),
        ),
    ];
    for (name, ro, to) in cases {
        assert_close(name, &run(t, to), &to64(&run(&r, ro)), 1e-4, 1e-5);
    }
}

/// QLoRA on both backends: a LoRA layer over NF4, FP4 and int8 bases (several row blocks,
/// so the blockwise dequantize-and-multiply path runs), forward, backward and adapter
/// gradients against the ndarray reference; plus `slice_cols` / `assign_cols`.
pub fn check_quantized_layers<B: lora::quant::QuantBackend>(t: &B) {
    use lora::LoraLinear;
    use lora::quant::{QuantConfig, QuantFormat, QuantLinear};
    let r = lora::NdArray::new();
    // in = 2048 gives 512 rows per dequantized block: three blocks of output rows.
    let (o, i, n) = (1100, 2048, 5);
    let w = rand_vec(o * i, 11, 0);
    let x = rand_vec(n * i, 12, 1);
    let dy = rand_vec(n * o, 13, 2);
    let b_factor = rand_vec(o * 4, 14, 3);
    for cfg in [
        QuantConfig::qlora(),
        QuantConfig {
            format: QuantFormat::Fp4,
            blocksize: 128,
            double_quant: false,
        },
        QuantConfig::new(QuantFormat::Int8),
    ] {
        let q = cfg.quantize(&w, &[o, i]).unwrap();
        let spec = LoraSpec {
            r: 4,
            alpha: 8.0,
            ..LoraSpec::default()
        };
        let mut lt = LoraLinear::new(
            "m",
            Box::new(QuantLinear::<B>::new(q.clone(), None).unwrap()),
        );
        let mut lr = LoraLinear::new(
            "m",
            Box::new(QuantLinear::<lora::NdArray>::new(q, None).unwrap()),
        );
        lt.inject_lora(t, &spec).unwrap();
        lr.inject_lora(&r, &spec).unwrap();
        lt.adapter_mut()
            .unwrap()
            .set_tensor("lora_B", t.from_host(&b_factor, &[o, 4]).unwrap())
            .unwrap();
        lr.adapter_mut()
            .unwrap()
            .set_tensor("lora_B", r.from_host(&b_factor, &[o, 4]).unwrap())
            .unwrap();
        let what = cfg.format.as_str();
        let yt = lt
            .forward(t, &t.from_host(&x, &[n, i]).unwrap(), Mode::Train)
            .unwrap();
        let yr = lr
            .forward(&r, &r.from_host(&x, &[n, i]).unwrap(), Mode::Train)
            .unwrap();
        assert_close_scaled(
            &format!("{what} QLoRA forward"),
            &t.to_host(&yt).unwrap(),
            &to64(&r.to_host(&yr).unwrap()),
            1e-4,
            1e-5,
        );
        let dxt = lt.backward(t, &t.from_host(&dy, &[n, o]).unwrap()).unwrap();
        let dxr = lr
            .backward(&r, &r.from_host(&dy, &[n, o]).unwrap())
            .unwrap();
        assert_close_scaled(
            &format!("{what} QLoRA dx"),
            &t.to_host(&dxt).unwrap(),
            &to64(&r.to_host(&dxr).unwrap()),
            1e-4,
            1e-5,
        );
        let gt: Vec<Vec<f32>> = lt
            .params_and_grads()
            .iter()
            .map(|p| t.to_host(p.grad).unwrap())
            .collect();
        let gr: Vec<Vec<f32>> = lr
            .params_and_grads()
            .iter()
            .map(|p| r.to_host(p.grad).unwrap())
            .collect();
        for (a, b) in gt.iter().zip(&gr) {
            assert_close_scaled(
                &format!("{what} QLoRA adapter gradients"),
                a,
                &to64(b),
                1e-4,
                1e-5,
            );
        }
        // The dequantized weight is the same on both backends, exactly.
        assert_eq!(
            t.to_host(&lt.base().weight(t).unwrap()).unwrap(),
            r.to_host(&lr.base().weight(&r).unwrap()).unwrap(),
            "{what} dequantized weight"
        );
    }
    // The column primitives the quantized layer uses.
    let a = rand_vec(6 * 10, 15, 4);
    let (at, ar) = (
        t.from_host(&a, &[6, 10]).unwrap(),
        r.from_host(&a, &[6, 10]).unwrap(),
    );
    let st = t.slice_cols(&at, 3, 4).unwrap();
    let sr = r.slice_cols(&ar, 3, 4).unwrap();
    assert_eq!(
        t.to_host(&st).unwrap(),
        r.to_host(&sr).unwrap(),
        "slice_cols"
    );
    let (mut dt, mut dr) = (t.zeros(&[6, 10]).unwrap(), r.zeros(&[6, 10]).unwrap());
    t.assign_cols(&mut dt, 5, &st).unwrap();
    r.assign_cols(&mut dr, 5, &sr).unwrap();
    assert_eq!(
        t.to_host(&dt).unwrap(),
        r.to_host(&dr).unwrap(),
        "assign_cols"
    );
    assert!(
        t.slice_cols(&at, 8, 4).is_err(),
        "slice_cols past the end is an error"
    );
    assert!(
        t.assign_cols(&mut dt, 8, &st).is_err(),
        "assign_cols past the end is an error"
    );
}

/// Batched GEMM, permute, masked softmax and LayerNorm (with backwards) against the
/// reference, then the tiny BERT of `fixtures/peft_bert` with a PEFT adapter: forward,
/// and the adapter gradients of a full backward.
pub fn check_transformer_ops<B: FullBackend>(t: &B) {
    use lora::Transpose;
    use lora::models::bert::{BertModel, TokenBatch};
    let r = lora::NdArray::new();
    let both = |v: &[f32], s: &[usize]| (t.from_host(v, s).unwrap(), r.from_host(v, s).unwrap());
    let cmp = |what: &str, a: &B::Tensor, b: &lora::NdTensor| {
        assert_close(
            what,
            &t.to_host(a).unwrap(),
            &to64(&r.to_host(b).unwrap()),
            1e-4,
            1e-5,
        );
    };
    let (x_t, x_r) = both(&rand_vec(2 * 3 * 4 * 5, 20, 0), &[2, 3, 4, 5]);
    cmp(
        "permute",
        &t.permute(&x_t, &[0, 2, 1, 3]).unwrap(),
        &r.permute(&x_r, &[0, 2, 1, 3]).unwrap(),
    );
    let (a_t, a_r) = both(&rand_vec(6 * 4 * 5, 21, 0), &[6, 4, 5]);
    let (b_t, b_r) = both(&rand_vec(6 * 3 * 5, 22, 0), &[6, 3, 5]);
    let (mut c_t, mut c_r) = both(&rand_vec(6 * 4 * 3, 23, 0), &[6, 4, 3]);
    t.bmm(
        0.7,
        &a_t,
        Transpose::No,
        &b_t,
        Transpose::Yes,
        0.5,
        &mut c_t,
    )
    .unwrap();
    r.bmm(
        0.7,
        &a_r,
        Transpose::No,
        &b_r,
        Transpose::Yes,
        0.5,
        &mut c_r,
    )
    .unwrap();
    cmp("bmm", &c_t, &c_r);
    let mask: Vec<f32> = (0..10)
        .map(|i| if i % 5 == 4 { f32::MIN } else { 0.0 })
        .collect();
    let (m_t, m_r) = both(&mask, &[2, 5]);
    let (y_t, y_r) = (
        t.softmax(&x_t, Some(&m_t)).unwrap(),
        r.softmax(&x_r, Some(&m_r)).unwrap(),
    );
    cmp("masked softmax", &y_t, &y_r);
    let (g_t, g_r) = both(&rand_vec(120, 24, 0), &[2, 3, 4, 5]);
    cmp(
        "softmax backward",
        &t.softmax_backward(&y_t, &g_t).unwrap(),
        &r.softmax_backward(&y_r, &g_r).unwrap(),
    );
    let (gm_t, gm_r) = both(&rand_vec(5, 25, 0), &[5]);
    let (bt_t, bt_r) = both(&rand_vec(5, 26, 0), &[5]);
    let (ln_t, st_t) = t.layer_norm(&x_t, &gm_t, &bt_t, 1e-12).unwrap();
    let (ln_r, st_r) = r.layer_norm(&x_r, &gm_r, &bt_r, 1e-12).unwrap();
    cmp("layer_norm", &ln_t, &ln_r);
    let (sum_t, aln_t, ast_t) = t.add_layer_norm(&x_t, &g_t, &gm_t, &bt_t, 1e-12).unwrap();
    let (sum_r, aln_r, ast_r) = r.add_layer_norm(&x_r, &g_r, &gm_r, &bt_r, 1e-12).unwrap();
    cmp("add_layer_norm sum", &sum_t, &sum_r);
    cmp("add_layer_norm", &aln_t, &aln_r);
    cmp("add_layer_norm stats", &ast_t, &ast_r);
    cmp(
        "layer_norm backward",
        &t.layer_norm_backward(&x_t, &st_t, &gm_t, &g_t).unwrap(),
        &r.layer_norm_backward(&x_r, &st_r, &gm_r, &g_r).unwrap(),
    );

    let dir = crate::fixtures_dir().join("peft_bert");
    let batch = TokenBatch::new(
        vec![2, 7, 9, 3, 0, 5, 11, 13, 17, 19],
        vec![1, 1, 1, 1, 0, 1, 1, 1, 1, 1],
        2,
    )
    .unwrap();
    let mut mt = BertModel::from_pretrained(t, &dir.join("base")).unwrap();
    let mut mr = BertModel::from_pretrained(&r, &dir.join("base")).unwrap();
    lora::peft::load_pretrained(&dir.join("adapters"), &mut mt, t).unwrap();
    lora::peft::load_pretrained(&dir.join("adapters"), &mut mr, &r).unwrap();
    let ht = mt.forward_batch(t, &batch, Mode::Train).unwrap();
    let hr = mr.forward_batch(&r, &batch, Mode::Train).unwrap();
    cmp("tiny BERT forward", &ht, &hr);
    let dh = rand_vec(2 * 5 * 16, 27, 0);
    mt.backward_batch(t, &t.from_host(&dh, &[2, 5, 16]).unwrap())
        .unwrap();
    mr.backward_batch(&r, &r.from_host(&dh, &[2, 5, 16]).unwrap())
        .unwrap();
    let gt: Vec<Vec<f32>> = mt
        .params_and_grads()
        .iter()
        .map(|p| t.to_host(p.grad).unwrap())
        .collect();
    let gr: Vec<Vec<f32>> = mr
        .params_and_grads()
        .iter()
        .map(|p| r.to_host(p.grad).unwrap())
        .collect();
    assert!(!gr.is_empty());
    for (a, b) in gt.iter().zip(&gr) {
        assert_close_scaled("tiny BERT adapter gradients", a, &to64(b), 1e-4, 1e-5);
    }
}
