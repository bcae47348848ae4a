//! The libtorch backend against libtorch's own autograd, and on CUDA when libtorch sees a
//! GPU. (The backend-generic checks against ndarray are in `cross_backend.rs`.) Built only
//! with `--features tch` (`cargo xtask test` does it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lora::{Backend, DenseLinear, LoraInit, LoraLinear, LoraSpec, Mode, Tch};
use lora_tests::cross_backend::train_twenty_steps;
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

#[test]
fn cuda_device_runs_when_libtorch_sees_a_gpu() {
    match Tch::cuda(0) {
        Err(e) => println!("skipped: {e}"),
        Ok(gpu) => {
            let (l_ref, _) = train_twenty_steps(&lora::NdArray::new());
            let (l_gpu, _) = train_twenty_steps(&gpu);
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
