//! Data-driven initialisations (`init_lora_weights`): PiSSA and OLoRA start the adapter
//! from the base weight's principal directions and move them out of the base, so the
//! model's output is unchanged at step 0 and training adapts the most important part of
//! `W` (PEFT's `pissa_init` / `olora_init`, `tuners/lora/layer.py`):
//!
//! * `pissa`: `W = U S Vᵀ` (thin SVD); `A = √(S_r/s) V_rᵀ`, `B = U_r √(S_r/s)`.
//! * `olora`: `W = Q R` (thin QR); `A = R_r` (first `r` rows), `B = Q_r` (first `r`
//!   columns).
//!
//! and then `W ← W - s·B A`. The factorizations run on the host in f64 (faer); singular
//! and QR vectors carry a sign, so `A` and `B` may differ from PyTorch's by signs while
//! `B A` and the new `W` agree.

use faer::Mat;
use lora_core::{HostTensor, LoraLinear, LoraOps, Tensor};

use crate::error::{PeftError, Result};

/// A data-driven initialisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitMethod {
    /// Principal singular values and vectors (PiSSA).
    Pissa,
    /// Orthonormal QR factors (OLoRA).
    Olora,
}

impl InitMethod {
    /// PEFT's name of the method, if lora-rs implements it.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "pissa" => Some(InitMethod::Pissa),
            "olora" => Some(InitMethod::Olora),
            _ => None,
        }
    }
}

/// Sets adapter `adapter_name` of `layer` (rank `r`, scaling `s`) by `method` and moves
/// `s·B A` out of the frozen weight.
pub fn initialise<B: LoraOps>(
    backend: &B,
    layer: &mut LoraLinear<B>,
    adapter_name: &str,
    method: InitMethod,
    scaling: f32,
) -> Result<()> {
    let name = layer.name().to_string();
    let err = |reason: String| PeftError::Unsupported {
        field: "init_lora_weights",
        value: format!("{method:?} on {name}"),
        reason,
    };
    if layer.base_mut().as_dense_mut().is_none() {
        return Err(err("needs a dense (unquantized) base weight".into()));
    }
    let w = HostTensor::from_backend(backend, &layer.base().weight(backend)?)?;
    let (out, inp) = (w.shape[0], w.shape[1]);
    let adapter = layer
        .adapter_named(adapter_name)
        .ok_or_else(|| err(format!("no adapter {adapter_name:?}")))?;
    let r = adapter.tensors()[0].1.shape().dims()[0];
    if r > out.min(inp) {
        return Err(err(format!(
            "rank {r} exceeds min(in, out) = {}",
            out.min(inp)
        )));
    }
    let m = Mat::<f64>::from_fn(out, inp, |i, j| f64::from(w.data[i * inp + j]));
    let s = f64::from(scaling);
    let (a, b): (Vec<f32>, Vec<f32>) = match method {
        InitMethod::Pissa => {
            let svd = m
                .thin_svd()
                .map_err(|e| err(format!("the SVD did not converge: {e:?}")))?;
            let (u, sv, v) = (svd.U(), svd.S(), svd.V());
            let root: Vec<f64> = (0..r).map(|k| (sv[k] / s).sqrt()).collect();
            (
                (0..r * inp)
                    .map(|idx| (root[idx / inp] * v[(idx % inp, idx / inp)]) as f32)
                    .collect(),
                (0..out * r)
                    .map(|idx| (u[(idx / r, idx % r)] * root[idx % r]) as f32)
                    .collect(),
            )
        }
        InitMethod::Olora => {
            let qr = m.qr();
            let (q, rr) = (qr.compute_thin_Q(), qr.thin_R());
            (
                (0..r * inp)
                    .map(|idx| rr[(idx / inp, idx % inp)] as f32)
                    .collect(),
                (0..out * r)
                    .map(|idx| q[(idx / r, idx % r)] as f32)
                    .collect(),
            )
        }
    };
    let (a, b) = (
        backend.from_host_vec(a, &[r, inp])?,
        backend.from_host_vec(b, &[out, r])?,
    );
    let delta = backend.lora_delta_weight(&a, &b, scaling, false)?;
    let adapter = layer
        .adapter_named_mut(adapter_name)
        .ok_or_else(|| err(format!("no adapter {adapter_name:?}")))?;
    adapter.set_tensor("lora_A", a)?;
    adapter.set_tensor("lora_B", b)?;
    layer.base_mut().add_to_weight(backend, &delta, -1.0)?;
    Ok(())
}
