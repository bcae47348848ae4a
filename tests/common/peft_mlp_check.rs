//! The check the PEFT MLP fixtures share (`dora.rs`, `dora_nf4.rs`): a model with PEFT's
//! adapter loaded computes PEFT's output `y`, MSE loss and the gradient of every adapter
//! tensor (`grad.<module>.<tensor>` in the fixture's `io.safetensors`).

use std::collections::BTreeMap;

use lora::models::Mlp;
use lora::{FullBackend, HostTensor, Mode, Model};

use crate::{assert_close, to64};

/// Runs `m` forward and backward on the fixture's `x` and `target` and compares with PEFT;
/// `expected_grads` is how many adapter tensors must have been checked.
pub fn check_output_and_gradients<B: FullBackend>(
    b: &B,
    m: &mut Mlp<B>,
    io: &BTreeMap<String, HostTensor>,
    what: &str,
    expected_grads: usize,
) {
    let x = io["x"].to_backend(b).unwrap();
    let y = m.forward(b, &x, Mode::Train).unwrap();
    assert_close(
        &format!("{what}: output"),
        &b.to_host(&y).unwrap(),
        &to64(&io["y"].data),
        1e-5,
        1e-6,
    );
    let (loss, dy) = lora::mse_loss(b, &y, &io["target"].to_backend(b).unwrap()).unwrap();
    assert!(
        (loss - f64::from(io["loss"].data[0])).abs() < 1e-6,
        "{what}: loss"
    );
    m.backward(b, &dy).unwrap();
    let mut checked = 0;
    for layer in m.linears_mut() {
        let name = layer.name().to_string();
        let Some(adapter) = layer.adapter_mut() else {
            continue;
        };
        let names: Vec<&str> = adapter.tensors().iter().map(|(n, _)| *n).collect();
        let grads: Vec<Vec<f32>> = adapter
            .params_and_grads()
            .iter()
            .map(|p| b.to_host(p.grad).unwrap())
            .collect();
        for (tensor, g) in names.iter().zip(&grads) {
            let want = &io[&format!("grad.{name}.{tensor}")];
            assert_close(
                &format!("{what}: {name} d{tensor}"),
                g,
                &to64(&want.data),
                1e-4,
                1e-6,
            );
            checked += 1;
        }
    }
    assert_eq!(checked, expected_grads, "{what}: adapter tensors checked");
}
