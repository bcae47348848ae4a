//! Data-driven initialisations (`init_lora_weights`): PiSSA and OLoRA start the adapter
//! from the base weight's principal directions and move them out of the base, so the
//! model's output is unchanged at step 0 and training adapts the most important part of
//! `W` (PEFT's `pissa_init` / `olora_init`, `tuners/lora/layer.py`):
//!
//! * `pissa`: `W = U S Vᵀ` (thin SVD); `A = √(S_r/s) V_rᵀ`, `B = U_r √(S_r/s)`.
//! * `pissa_niter_K`: the same from a randomized SVD (`torch.svd_lowrank(W, q=r,
//!   niter=K)`: a Gaussian range finder with `K` power iterations), for large weights.
//! * `olora`: `W = Q R` (thin QR); `A = R_r` (first `r` rows), `B = Q_r` (first `r`
//!   columns).
//!
//! and then `W ← W - s·B A`. The factorizations run on the host in f64 (faer); singular
//! and QR vectors carry a sign, so `A` and `B` may differ from PyTorch's by signs while
//! `B A` and the new `W` agree. The random draws (`pissa_niter_K`, `orthogonal`) come
//! from the seeded generator, not PyTorch's.
//!
//! `loftq` (PEFT's `loftq_init`): starting from `res = W`, each iteration quantizes `res`
//! (NF4 with blocksize 64 and no double quantization, as `Params4bit(compress_statistics=
//! False)`, or row-wise int8 of the f16-rounded values, as `Int8Params`), sets
//! `res = W - dequant`, and takes its rank-`r` SVD `L = U √S`, `R = √S Vᵀ`; then
//! `res = W - L R` for the next round. The base becomes the last `dequant`, `A = R`,
//! `B = L` (not divided by the scaling: PEFT does not either), so the base loaded in 4 bits
//! plus the adapter approximates `W` better than the 4-bit base alone.
//!
//! `orthogonal` (PEFT's `orthogonal_init`) leaves `W` alone: a random orthogonal `Q`
//! (`r x r`, `r` even) is split into its odd and even rows, `A = (G₁ Q_odd)ᵀ / 10` and
//! `B = G₂ᵀ Q_even / 10` with Gaussian `G₁: [in, r/2]`, `G₂: [r/2, out]`, so both factors
//! are non-zero while `B A = 0`.

use faer::Mat;
use lora_core::rng::{self, RngState};
use lora_core::{HostTensor, LoraLinear, LoraOps, Tensor};

use crate::error::{PeftError, Result};

/// A data-driven initialisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitMethod {
    /// Principal singular values and vectors (PiSSA).
    Pissa,
    /// PiSSA from a randomized SVD with this many power iterations (`pissa_niter_K`).
    PissaNiter(usize),
    /// Orthonormal QR factors (OLoRA).
    Olora,
    /// Non-zero factors whose product is zero (`orthogonal`); the base is unchanged.
    Orthogonal,
    /// LoftQ: the base becomes its quantized-dequantized self and the adapter the rank-r
    /// SVD of what quantization lost, alternated `iters` times (`bits` 4: NF4, 8: int8).
    Loftq {
        /// 4 or 8.
        bits: u8,
        /// Alternations (at least 1).
        iters: usize,
    },
}

impl InitMethod {
    /// PEFT's name of the method, if lora-rs implements it.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "pissa" => Some(InitMethod::Pissa),
            "olora" => Some(InitMethod::Olora),
            "orthogonal" => Some(InitMethod::Orthogonal),
            // The settings come from `loftq_config` (`LoraConfig::init_method`).
            "loftq" => Some(InitMethod::Loftq { bits: 4, iters: 1 }),
            _ => name
                .strip_prefix("pissa_niter_")
                .and_then(|k| k.parse().ok())
                .map(InitMethod::PissaNiter),
        }
    }
}

/// `[rows, cols]` of N(0, 1) draws from `stream` of `seed`.
fn gaussian(rows: usize, cols: usize, seed: u64, stream: u64) -> Mat<f64> {
    let mut v = vec![0.0f32; rows * cols];
    rng::normal(RngState::new(seed, stream), 0.0, 1.0, &mut v);
    Mat::from_fn(rows, cols, |i, j| f64::from(v[i * cols + j]))
}

/// The thin `Q` of `m`'s QR factorization.
fn orthonormal(m: &Mat<f64>) -> Mat<f64> {
    m.qr().compute_thin_Q()
}

/// A truncated SVD `m ≈ U S Vᵀ`: `U [out, r]`, `S [r]`, `V [in, r]`.
type TruncatedSvd = (Mat<f64>, Vec<f64>, Mat<f64>);

/// `torch.svd_lowrank(m, q = r, niter)`.
fn randomized_svd(
    m: &Mat<f64>,
    r: usize,
    niter: usize,
    seed: u64,
    stream: u64,
) -> std::result::Result<TruncatedSvd, String> {
    let mut q = orthonormal(&(m * gaussian(m.ncols(), r, seed, stream)));
    for _ in 0..niter {
        let back = orthonormal(&(m.transpose() * &q));
        q = orthonormal(&(m * &back));
    }
    let small = q.transpose() * m;
    let svd = small
        .thin_svd()
        .map_err(|e| format!("the SVD did not converge: {e:?}"))?;
    let u = &q * svd.U();
    let sv = (0..r).map(|k| svd.S()[k]).collect();
    Ok((u, sv, svd.V().to_owned()))
}

/// Sets adapter `adapter_name` of `layer` (rank `r`, scaling `s`) by `method` and moves
/// `s·B A` out of the frozen weight.
pub fn initialise<B: LoraOps>(
    backend: &B,
    layer: &mut LoraLinear<B>,
    adapter_name: &str,
    method: InitMethod,
    scaling: f32,
    seed: u64,
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
    // PiSSA's factors from `W ≈ U S Vᵀ`.
    let pissa = |u: faer::MatRef<'_, f64>, sv: &[f64], v: faer::MatRef<'_, f64>| {
        let root: Vec<f64> = (0..r).map(|k| (sv[k] / s).sqrt()).collect();
        (
            (0..r * inp)
                .map(|idx| (root[idx / inp] * v[(idx % inp, idx / inp)]) as f32)
                .collect(),
            (0..out * r)
                .map(|idx| (u[(idx / r, idx % r)] * root[idx % r]) as f32)
                .collect(),
        )
    };
    let stream = |purpose: &str| rng::stream_id(&name, purpose);
    let (a, b, base): (Vec<f32>, Vec<f32>, BaseChange) = match method {
        InitMethod::Pissa => {
            let svd = m
                .thin_svd()
                .map_err(|e| err(format!("the SVD did not converge: {e:?}")))?;
            let sv: Vec<f64> = (0..r).map(|k| svd.S()[k]).collect();
            let (a, b) = pissa(svd.U(), &sv, svd.V());
            (a, b, BaseChange::Residual)
        }
        InitMethod::PissaNiter(niter) => {
            let (u, sv, v) =
                randomized_svd(&m, r, niter, seed, stream("pissa_niter")).map_err(err)?;
            let (a, b) = pissa(u.as_ref(), &sv, v.as_ref());
            (a, b, BaseChange::Residual)
        }
        InitMethod::Orthogonal => {
            if r % 2 != 0 {
                return Err(err(format!(
                    "orthogonal initialisation needs an even rank, not {r}"
                )));
            }
            let q = orthonormal(&gaussian(r, r, seed, stream("orthogonal_q")));
            let half = r / 2;
            let (g1, g2) = (
                gaussian(inp, half, seed, stream("orthogonal_a")),
                gaussian(half, out, seed, stream("orthogonal_b")),
            );
            let (q_odd, q_even) = (
                Mat::from_fn(half, r, |i, j| q[(2 * i, j)]),
                Mat::from_fn(half, r, |i, j| q[(2 * i + 1, j)]),
            );
            let (a_t, b) = (&g1 * &q_odd, g2.transpose() * &q_even);
            let a = (0..r * inp)
                .map(|idx| (a_t[(idx % inp, idx / inp)] / 10.0) as f32)
                .collect();
            let b = (0..out * r)
                .map(|idx| (b[(idx / r, idx % r)] / 10.0) as f32)
                .collect();
            (a, b, BaseChange::Unchanged)
        }
        InitMethod::Loftq { bits, iters } => {
            let (dequant, a, b) = loftq(&w.data, (out, inp), r, bits, iters).map_err(err)?;
            let lost = dequant.iter().zip(&w.data).map(|(q, v)| q - v).collect();
            (a, b, BaseChange::Add(lost))
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
                BaseChange::Residual,
            )
        }
    };
    let (a, b) = (
        backend.from_host_vec(a, &[r, inp])?,
        backend.from_host_vec(b, &[out, r])?,
    );
    let gain = match base {
        BaseChange::Residual => Some((backend.lora_delta_weight(&a, &b, scaling, false)?, -1.0)),
        BaseChange::Unchanged => None,
        BaseChange::Add(g) => Some((backend.from_host_vec(g, &[out, inp])?, 1.0)),
    };
    let adapter = layer
        .adapter_named_mut(adapter_name)
        .ok_or_else(|| err(format!("no adapter {adapter_name:?}")))?;
    adapter.set_tensor("lora_A", a)?;
    adapter.set_tensor("lora_B", b)?;
    if let Some((gain, sign)) = gain {
        layer.base_mut().add_to_weight(backend, &gain, sign)?;
    }
    Ok(())
}

/// What an initialisation does to the frozen base weight.
enum BaseChange {
    /// Moves the adapter out: `W ← W - s·B A` (PiSSA, OLoRA).
    Residual,
    /// Nothing (`orthogonal`: `B A = 0`).
    Unchanged,
    /// Adds this `[out, in]` row-major difference (LoftQ: `dequant - W`).
    Add(Vec<f32>),
}

/// LoftQ's result, all row-major: the dequantized base `[out, in]`, `A` `[r, in]`, `B`
/// `[out, r]`.
type LoftqFactors = (Vec<f32>, Vec<f32>, Vec<f32>);

/// LoftQ's alternation on a row-major `[out, in]` weight.
fn loftq(
    w: &[f32],
    (out, inp): (usize, usize),
    r: usize,
    bits: u8,
    iters: usize,
) -> std::result::Result<LoftqFactors, String> {
    let mut res = w.to_vec();
    let mut dequant = Vec::new();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 0..iters {
        dequant = match bits {
            4 => lora_quant::FourBitWeight::quantize(
                &res,
                &[out, inp],
                lora_quant::FourBitType::Nf4,
                64,
                false,
            )
            .map_err(|e| e.to_string())?
            .dequantize(),
            _ => {
                // bitsandbytes' `Int8Params` (what PEFT quantizes with) casts to f16 first.
                let res16: Vec<f32> = res
                    .iter()
                    .map(|&v| half::f16::from_f32(v).to_f32())
                    .collect();
                let q = lora_quant::Int8Weight::quantize(&res16, &[out, inp])
                    .map_err(|e| e.to_string())?;
                let mut v = vec![0.0; out * inp];
                q.dequantize_rows(0, &mut v);
                v
            }
        };
        let lost = Mat::<f64>::from_fn(out, inp, |i, j| {
            f64::from(w[i * inp + j] - dequant[i * inp + j])
        });
        let svd = lost
            .thin_svd()
            .map_err(|e| format!("the SVD did not converge: {e:?}"))?;
        let (u, sv, v) = (svd.U(), svd.S(), svd.V());
        let root: Vec<f64> = (0..r).map(|k| sv[k].sqrt()).collect();
        a = (0..r * inp)
            .map(|idx| (root[idx / inp] * v[(idx % inp, idx / inp)]) as f32)
            .collect();
        b = (0..out * r)
            .map(|idx| (u[(idx / r, idx % r)] * root[idx % r]) as f32)
            .collect();
        if i + 1 == iters {
            break;
        }
        for (idx, x) in res.iter_mut().enumerate() {
            let (row, col) = (idx / inp, idx % inp);
            let lr: f32 = (0..r).map(|k| b[row * r + k] * a[k * inp + col]).sum();
            *x = w[idx] - lr;
        }
    }
    Ok((dequant, a, b))
}
