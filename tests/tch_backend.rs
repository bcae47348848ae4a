//! The libtorch backend against the ndarray reference and against libtorch's own autograd.
//! Built only with `--features tch` (`cargo xtask test` does it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lora::models::Mlp;
use lora::{
    Adam, Backend, DenseLinear, FullBackend, LoraInit, LoraLinear, LoraSpec, Mode, Model,
    Optimizer, Tch, UnaryOp, mse_loss,
};
use lora_tests::{assert_close, rand_vec, to64};

/// libtorch autograd is a second oracle for the hand-written LoRA backward.
#[test]
fn lora_backward_matches_libtorch_autograd() {
    let b = Tch::cpu();
    for (n, inp, out, r, rslora) in [
        (6, 10, 7, 3, false),
        (1, 4, 4, 4, true),
        (9, 5, 12, 2, false),
    ] {
        let w = rand_vec(out * inp, 1, 1);
        let bias = rand_vec(out, 1, 2);
        let mut l = LoraLinear::new(
            "q",
            Box::new(
                DenseLinear::new(
                    b.from_host(&w, &[out, inp]).unwrap(),
                    Some(b.from_host(&bias, &[out]).unwrap()),
                )
                .unwrap(),
            ),
        );
        let spec = LoraSpec {
            r,
            alpha: 6.0,
            dropout: 0.0,
            use_rslora: rslora,
            init: LoraInit::Random,
            seed: 3,
        };
        l.inject_lora(&b, &spec).unwrap();
        let x = rand_vec(n * inp, 2, 3);
        let g = rand_vec(n * out, 2, 4);
        let xt = b.from_host(&x, &[n, inp]).unwrap();
        l.forward(&b, &xt, Mode::Train).unwrap();
        let dx = b
            .to_host(
                &l.backward(&b, &b.from_host(&g, &[n, out]).unwrap())
                    .unwrap(),
            )
            .unwrap();
        let ad = l.adapter().unwrap();
        let a_h = b.to_host(ad.tensors()[0].1).unwrap();
        let b_h = b.to_host(ad.tensors()[1].1).unwrap();
        let pg = l.params_and_grads();
        let (da, db) = (
            b.to_host(pg[0].grad).unwrap(),
            b.to_host(pg[1].grad).unwrap(),
        );

        // The same layer written with libtorch ops and differentiated by autograd.
        let s = if rslora {
            6.0 / (r as f64).sqrt()
        } else {
            6.0 / r as f64
        };
        let tx = tch::Tensor::from_slice(&x)
            .reshape([n as i64, inp as i64])
            .set_requires_grad(true);
        let ta = tch::Tensor::from_slice(&a_h)
            .reshape([r as i64, inp as i64])
            .set_requires_grad(true);
        let tb = tch::Tensor::from_slice(&b_h)
            .reshape([out as i64, r as i64])
            .set_requires_grad(true);
        let tw = tch::Tensor::from_slice(&w).reshape([out as i64, inp as i64]);
        let tbias = tch::Tensor::from_slice(&bias);
        let y = tx.linear(&tw, Some(&tbias)) + tx.matmul(&ta.tr_t()).matmul(&tb.tr_t()) * s;
        let tg = tch::Tensor::from_slice(&g).reshape([n as i64, out as i64]);
        (y * tg).sum(tch::Kind::Float).backward();
        let grad = |t: &tch::Tensor| to64(&Vec::<f32>::try_from(&t.grad().reshape([-1])).unwrap());
        assert_close("dx vs autograd", &dx, &grad(&tx), 1e-5, 1e-6);
        assert_close("dA vs autograd", &da, &grad(&ta), 1e-5, 1e-6);
        assert_close("dB vs autograd", &db, &grad(&tb), 1e-5, 1e-6);
    }
}

trait TrT {
    fn tr_t(&self) -> tch::Tensor;
}
impl TrT for tch::Tensor {
    fn tr_t(&self) -> tch::Tensor {
        self.transpose(0, 1)
    }
}

/// 20 training steps (forward, backward, AdamW, dropout on) on both backends from the same
/// seed: the shared generator makes the runs comparable step by step.
fn train<B: FullBackend>(b: &B) -> (Vec<f64>, Vec<f32>) {
    let mut m = Mlp::new(b, &[4, 16, 16, 3], UnaryOp::Gelu, 5).unwrap();
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
        .unwrap();
    }
    let x = b.from_host(&rand_vec(32 * 4, 6, 1), &[32, 4]).unwrap();
    let y = b.from_host(&rand_vec(32 * 3, 6, 2), &[32, 3]).unwrap();
    let mut opt = Adam::<B>::adamw(1e-2).unwrap();
    let mut losses = Vec::new();
    for _ in 0..20 {
        let p = m.forward(b, &x, Mode::Train).unwrap();
        let (loss, dy) = mse_loss(b, &p, &y).unwrap();
        m.backward(b, &dy).unwrap();
        opt.step(b, &mut m.params_and_grads()).unwrap();
        losses.push(loss);
    }
    let params: Vec<f32> = m
        .linears()
        .iter()
        .filter_map(|l| l.adapter())
        .flat_map(|a| {
            a.tensors()
                .into_iter()
                .flat_map(|(_, t)| b.to_host(t).unwrap())
        })
        .collect();
    (losses, params)
}

#[test]
fn twenty_step_training_run_equals_the_ndarray_reference() {
    let (l_ref, p_ref) = train(&lora::NdArray::new());
    let (l_tch, p_tch) = train(&Tch::cpu());
    assert!(l_ref[19] < l_ref[0], "training reduces the loss");
    assert_close(
        "losses",
        &l_tch.iter().map(|v| *v as f32).collect::<Vec<_>>(),
        &l_ref,
        1e-4,
        1e-6,
    );
    assert_close(
        "adapter parameters after 20 steps",
        &p_tch,
        &to64(&p_ref),
        1e-4,
        1e-5,
    );
}

#[test]
fn cuda_device_runs_when_libtorch_sees_a_gpu() {
    match Tch::cuda(0) {
        Err(e) => println!("skipped: {e}"),
        Ok(gpu) => {
            let (l_ref, _) = train(&lora::NdArray::new());
            let (l_gpu, _) = train(&gpu);
            assert_close(
                "losses on CUDA",
                &l_gpu.iter().map(|v| *v as f32).collect::<Vec<_>>(),
                &l_ref,
                1e-3,
                1e-5,
            );
        }
    }
}

/// Every primitive on random inputs, tch against ndarray.
#[test]
fn every_primitive_equals_the_ndarray_reference() {
    use lora::{BinaryOp, Transpose};
    let (r, t) = (lora::NdArray::new(), Tch::cpu());
    let shape = [3usize, 5, 4];
    let xa = rand_vec(60, 4, 1);
    let xb: Vec<f32> = rand_vec(60, 4, 2).iter().map(|v| v + 1.5).collect();
    let (ra, rb) = (
        r.from_host(&xa, &shape).unwrap(),
        r.from_host(&xb, &shape).unwrap(),
    );
    let (ta, tb) = (
        t.from_host(&xa, &shape).unwrap(),
        t.from_host(&xb, &shape).unwrap(),
    );
    let same = |what: &str, got: Vec<f32>, want: Vec<f32>| {
        assert_close(what, &got, &to64(&want), 1e-5, 1e-6)
    };
    for op in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div] {
        same(
            &format!("{op:?}"),
            t.to_host(&t.binary(op, &ta, &tb).unwrap()).unwrap(),
            r.to_host(&r.binary(op, &ra, &rb).unwrap()).unwrap(),
        );
    }
    for op in [UnaryOp::Relu, UnaryOp::Gelu, UnaryOp::Tanh, UnaryOp::Square] {
        same(
            &format!("{op:?}"),
            t.to_host(&t.unary(op, &ta).unwrap()).unwrap(),
            r.to_host(&r.unary(op, &ra).unwrap()).unwrap(),
        );
    }
    same(
        "Sqrt",
        t.to_host(&t.unary(UnaryOp::Sqrt, &tb).unwrap()).unwrap(),
        r.to_host(&r.unary(UnaryOp::Sqrt, &rb).unwrap()).unwrap(),
    );
    for op in [UnaryOp::Relu, UnaryOp::Gelu, UnaryOp::Tanh] {
        same(
            &format!("{op:?} backward"),
            t.to_host(&t.unary_backward(op, &ta, &tb).unwrap()).unwrap(),
            r.to_host(&r.unary_backward(op, &ra, &rb).unwrap()).unwrap(),
        );
    }
    let (mut ry, mut ty) = (rb.clone(), tb.clone());
    r.axpby(0.3, &ra, -1.7, &mut ry).unwrap();
    t.axpby(0.3, &ta, -1.7, &mut ty).unwrap();
    same("axpby", t.to_host(&ty).unwrap(), r.to_host(&ry).unwrap());
    same(
        "axpby leaves the clone's source alone",
        t.to_host(&tb).unwrap(),
        xb.clone(),
    );
    same(
        "affine",
        t.to_host(&t.affine(&ta, 2.5, -1.0).unwrap()).unwrap(),
        r.to_host(&r.affine(&ra, 2.5, -1.0).unwrap()).unwrap(),
    );
    let row = rand_vec(4, 4, 3);
    let (mut rr, mut tr) = (ra.clone(), ta.clone());
    r.add_row_broadcast(&mut rr, &r.from_host(&row, &[4]).unwrap())
        .unwrap();
    t.add_row_broadcast(&mut tr, &t.from_host(&row, &[4]).unwrap())
        .unwrap();
    same(
        "add_row_broadcast",
        t.to_host(&tr).unwrap(),
        r.to_host(&rr).unwrap(),
    );
    same(
        "sum_rows",
        t.to_host(&t.sum_rows(&ta).unwrap()).unwrap(),
        r.to_host(&r.sum_rows(&ra).unwrap()).unwrap(),
    );
    same(
        "sum_cols",
        t.to_host(&t.sum_cols(&ta).unwrap()).unwrap(),
        r.to_host(&r.sum_cols(&ra).unwrap()).unwrap(),
    );
    assert!((t.sum_all(&ta).unwrap() - r.sum_all(&ra).unwrap()).abs() < 1e-5);
    assert_eq!(t.max_abs(&ta).unwrap(), r.max_abs(&ra).unwrap());
    assert!(t.all_finite(&ta).unwrap());
    assert!(
        !t.all_finite(&t.from_host(&[1.0, f32::NAN], &[2]).unwrap())
            .unwrap()
    );
    let rows = [14usize, 0, 7];
    same(
        "gather_rows",
        t.to_host(&t.gather_rows(&ta, &rows).unwrap()).unwrap(),
        r.to_host(&r.gather_rows(&ra, &rows).unwrap()).unwrap(),
    );
    let src = rand_vec(12, 4, 4);
    let (mut rs, mut ts) = (ra.clone(), ta.clone());
    r.scatter_add_rows(&mut rs, &rows, &r.from_host(&src, &[3, 4]).unwrap())
        .unwrap();
    t.scatter_add_rows(&mut ts, &rows, &t.from_host(&src, &[3, 4]).unwrap())
        .unwrap();
    same(
        "scatter_add_rows",
        t.to_host(&ts).unwrap(),
        r.to_host(&rs).unwrap(),
    );
    let st = lora::rng::RngState::new(1, 2);
    assert_eq!(
        t.to_host(&t.dropout_mask(&shape, 0.3, st).unwrap())
            .unwrap(),
        r.to_host(&r.dropout_mask(&shape, 0.3, st).unwrap())
            .unwrap(),
        "dropout masks are bit-identical"
    );
    for (tra, trb) in [
        (Transpose::No, Transpose::No),
        (Transpose::Yes, Transpose::No),
        (Transpose::No, Transpose::Yes),
        (Transpose::Yes, Transpose::Yes),
    ] {
        let a = rand_vec(20, 5, 1);
        let bm = rand_vec(20, 5, 2);
        let c0 = rand_vec(16, 5, 3);
        let ash = if tra == Transpose::No { [4, 5] } else { [5, 4] };
        let bsh = if trb == Transpose::No { [5, 4] } else { [4, 5] };
        let mut rc = r.from_host(&c0, &[4, 4]).unwrap();
        let mut tc = t.from_host(&c0, &[4, 4]).unwrap();
        r.gemm(
            0.7,
            &r.from_host(&a, &ash).unwrap(),
            tra,
            &r.from_host(&bm, &bsh).unwrap(),
            trb,
            0.5,
            &mut rc,
        )
        .unwrap();
        t.gemm(
            0.7,
            &t.from_host(&a, &ash).unwrap(),
            tra,
            &t.from_host(&bm, &bsh).unwrap(),
            trb,
            0.5,
            &mut tc,
        )
        .unwrap();
        same(
            &format!("gemm {tra:?} {trb:?}"),
            t.to_host(&tc).unwrap(),
            r.to_host(&rc).unwrap(),
        );
    }
}
