//! Gradients of the LoRA layer against central finite differences.
//!
//! The loss is `L = Σ tanh(y) ⊙ R` (non-linear, so the check is not exact by
//! construction), evaluated in f64 from the layer's f32 outputs. Each element of `x`, `A`
//! and `B` is perturbed by ±ε and `(L(+ε) - L(-ε)) / 2ε` compared with the analytic
//! gradient from the backward pass.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lora::{
    Backend, DenseLinear, LoraInit, LoraLinear, LoraOps, LoraSpec, Mode, NdArray, NdTensor, Tensor,
};
use lora_tests::{backend, host, rand_tensor, rand_vec};

const EPS: f32 = 3e-3;

fn loss(y: &[f32], r: &[f32]) -> f64 {
    y.iter()
        .zip(r)
        .map(|(&y, &r)| f64::from(y).tanh() * f64::from(r))
        .sum()
}

fn dloss(b: &NdArray, y: &NdTensor, r: &[f32]) -> NdTensor {
    let g: Vec<f32> = host(b, y)
        .iter()
        .zip(r)
        .map(|(&y, &r)| ((1.0 - f64::from(y).tanh().powi(2)) * f64::from(r)) as f32)
        .collect();
    b.from_host(&g, y.shape().dims()).unwrap()
}

/// Compares an analytic gradient with finite differences of `f` at `theta`.
fn check(what: &str, theta: &[f32], analytic: &[f32], mut f: impl FnMut(&[f32]) -> f64) {
    let scale = analytic
        .iter()
        .fold(0.0f32, |m, v| m.max(v.abs()))
        .max(1e-3);
    let mut p = theta.to_vec();
    for i in 0..theta.len() {
        p[i] = theta[i] + EPS;
        let up = f(&p);
        p[i] = theta[i] - EPS;
        let down = f(&p);
        p[i] = theta[i];
        let fd = ((up - down) / (2.0 * f64::from(EPS))) as f32;
        let err = (fd - analytic[i]).abs();
        assert!(
            err <= 2e-3 * scale + 1e-2 * analytic[i].abs(),
            "{what}[{i}]: finite difference {fd} vs backward {}",
            analytic[i]
        );
    }
}

fn layer(
    b: &NdArray,
    shape: (usize, usize, usize),
    r: usize,
    alpha: f32,
    rslora: bool,
) -> LoraLinear<NdArray> {
    let (_, inp, out) = shape;
    let w = rand_tensor(&[out, inp], 1, 10);
    let bias = rand_tensor(&[out], 1, 11);
    let mut l = LoraLinear::new(
        "blocks.0.proj",
        Box::new(DenseLinear::new(w, Some(bias)).unwrap()),
    );
    // Random B so that dA is not trivially zero.
    let spec = LoraSpec {
        r,
        alpha,
        dropout: 0.0,
        use_rslora: rslora,
        init: LoraInit::Random,
        seed: 5,
    };
    l.inject_lora(b, &spec).unwrap();
    l
}

fn run_layer_case(x_shape: &[usize], inp: usize, out: usize, r: usize, alpha: f32, rslora: bool) {
    let b = backend();
    let n: usize = x_shape.iter().product::<usize>() / inp;
    let mut l = layer(&b, (n, inp, out), r, alpha, rslora);
    let x = rand_tensor(x_shape, 2, 20);
    let rw = rand_vec(n * out, 3, 30);

    let y = l.forward(&b, &x, Mode::Train).unwrap();
    let dx = l.backward(&b, &dloss(&b, &y, &rw)).unwrap();
    let a_t = l.adapter().unwrap().tensors()[0].1.clone();
    let b_t = l.adapter().unwrap().tensors()[1].1.clone();
    let mut pg = l.params_and_grads();
    let d_a = host(&b, pg[0].grad);
    let d_b = host(&b, pg[1].grad);
    pg.clear();

    let xh = host(&b, &x);
    let ah = host(&b, &a_t);
    let bh = host(&b, &b_t);
    let tag = format!("x {x_shape:?} in {inp} out {out} r {r} alpha {alpha} rslora {rslora}");

    // d/dx
    check(&format!("dx ({tag})"), &xh, &host(&b, &dx), |p| {
        let xp = b.from_host(p, x_shape).unwrap();
        loss(&host(&b, &l.forward(&b, &xp, Mode::Eval).unwrap()), &rw)
    });
    // d/dA and d/dB: replace the adapter tensor, evaluate, restore.
    for (name, theta, grad) in [("lora_A", &ah, &d_a), ("lora_B", &bh, &d_b)] {
        let shape = if name == "lora_A" {
            vec![r, inp]
        } else {
            vec![out, r]
        };
        check(&format!("d{name} ({tag})"), theta, grad, |p| {
            let ad = l.adapter_mut().unwrap();
            ad.set_tensor(name, b.from_host(p, &shape).unwrap())
                .unwrap();
            let v = loss(&host(&b, &l.forward(&b, &x, Mode::Eval).unwrap()), &rw);
            ad_restore(&mut l, name, theta, &shape);
            v
        });
    }
}

fn ad_restore(l: &mut LoraLinear<NdArray>, name: &str, theta: &[f32], shape: &[usize]) {
    let b = backend();
    l.adapter_mut()
        .unwrap()
        .set_tensor(name, b.from_host(theta, shape).unwrap())
        .unwrap();
}

#[test]
fn layer_gradients_match_finite_differences_across_shapes_and_ranks() {
    run_layer_case(&[5, 7], 7, 6, 3, 6.0, false);
    run_layer_case(&[1, 4], 4, 9, 1, 1.0, false); // one row, r = 1
    run_layer_case(&[6, 8], 8, 8, 8, 16.0, false); // r = min(in, out)
    run_layer_case(&[2, 3, 5], 5, 4, 2, 4.0, true); // 3-D input, rsLoRA
}

/// With dropout the mask must be the same in every evaluation, so this case drives the
/// op-level `lora_forward` / `lora_backward` with an explicit mask from the shared
/// generator, plus the frozen layer's own forward/backward.
#[test]
fn gradients_with_dropout_match_finite_differences() {
    let b = backend();
    for (n, inp, out, r, p) in [(6, 5, 7, 2, 0.3f32), (3, 9, 4, 4, 0.5), (1, 3, 3, 1, 0.1)] {
        let w = rand_tensor(&[out, inp], 4, 40);
        let base = DenseLinear::<NdArray>::new(w, None).unwrap();
        let a0 = rand_vec(r * inp, 4, 41);
        let b0 = rand_vec(out * r, 4, 42);
        let x0 = rand_vec(n * inp, 4, 43);
        let rw = rand_vec(n * out, 4, 44);
        let s = 2.0 / r as f32;
        let mask = b
            .dropout_mask(&[n, inp], p, lora::rng::RngState::new(9, 1))
            .unwrap();
        let mask_h = host(&b, &mask);
        assert!(mask_h.contains(&0.0) || n * inp < 8, "mask drops something");

        let fwd = |xv: &[f32], av: &[f32], bv: &[f32]| -> (NdTensor, NdTensor) {
            let x = b.from_host(xv, &[n, inp]).unwrap();
            let a = b.from_host(av, &[r, inp]).unwrap();
            let bt = b.from_host(bv, &[out, r]).unwrap();
            let mut y = lora::Linear::forward(&base, &b, &x).unwrap();
            let h = b.lora_forward(&x, &a, &bt, s, Some(&mask), &mut y).unwrap();
            (y, h)
        };
        let (y, h) = fwd(&x0, &a0, &b0);
        let g = dloss(&b, &y, &rw);
        let mut dx = lora::Linear::backward(&base, &b, &g).unwrap();
        let grads = b
            .lora_backward(
                &b.from_host(&x0, &[n, inp]).unwrap(),
                &b.from_host(&a0, &[r, inp]).unwrap(),
                &b.from_host(&b0, &[out, r]).unwrap(),
                s,
                Some(&mask),
                &h,
                &g,
                &mut dx,
            )
            .unwrap();
        let tag = format!("n {n} in {inp} out {out} r {r} p {p}");
        check(
            &format!("dx with dropout ({tag})"),
            &x0,
            &host(&b, &dx),
            |v| loss(&host(&b, &fwd(v, &a0, &b0).0), &rw),
        );
        check(
            &format!("dA with dropout ({tag})"),
            &a0,
            &host(&b, &grads.d_a),
            |v| loss(&host(&b, &fwd(&x0, v, &b0).0), &rw),
        );
        check(
            &format!("dB with dropout ({tag})"),
            &b0,
            &host(&b, &grads.d_b),
            |v| loss(&host(&b, &fwd(&x0, &a0, v).0), &rw),
        );
    }
}

/// The MLP's full backward (used for pretraining) against finite differences of one
/// weight, so the demo's base model is trained with correct gradients too.
#[test]
fn mlp_full_backward_matches_finite_differences() {
    use lora::Model;
    use lora::models::Mlp;
    let b = backend();
    let mut mlp = Mlp::new(&b, &[3, 5, 4, 2], lora::UnaryOp::Tanh, 7).unwrap();
    let x = rand_tensor(&[4, 3], 8, 80);
    let rw = rand_vec(8, 8, 81);
    let y = mlp.forward(&b, &x, Mode::Train).unwrap();
    let grads = mlp.backward_full(&b, &dloss(&b, &y, &rw)).unwrap();
    let w_name = "layers.2";
    let w0 = host(
        &b,
        &lora::Linear::weight(mlp.linears()[1].base(), &b).unwrap(),
    );
    let analytic = host(&b, &grads[1].0);
    check("MLP dW of layers.2", &w0, &analytic, |p| {
        let l = mlp
            .linears_mut()
            .into_iter()
            .find(|l| l.name() == w_name)
            .unwrap();
        let dense = l.base_mut().as_dense_mut().unwrap();
        *dense.params_mut().0 = b.from_host(p, &[4, 5]).unwrap();
        let v = loss(&host(&b, &mlp.forward(&b, &x, Mode::Eval).unwrap()), &rw);
        let l = mlp
            .linears_mut()
            .into_iter()
            .find(|l| l.name() == w_name)
            .unwrap();
        *l.base_mut().as_dense_mut().unwrap().params_mut().0 = b.from_host(&w0, &[4, 5]).unwrap();
        v
    });
}
