//! Shared helpers for the workspace tests: random tensors from the shared generator, host
//! references in f64, and closeness checks with readable failures.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod backend_suite;
pub mod cross_backend;
pub mod decoder_fixtures;
pub mod matmul_check;
pub mod peft_mlp_check;

use lora::rng::{self, RngState};
use lora::{Backend, NdArray, NdTensor};

/// The reference backend.
pub fn backend() -> NdArray {
    NdArray::new()
}

/// Uniform values in `[-1, 1)` from stream `stream` of `seed`.
pub fn rand_vec(n: usize, seed: u64, stream: u64) -> Vec<f32> {
    let mut v = vec![0.0; n];
    rng::uniform(RngState::new(seed, stream), -1.0, 1.0, &mut v);
    v
}

/// A random tensor on the reference backend.
pub fn rand_tensor(shape: &[usize], seed: u64, stream: u64) -> NdTensor {
    backend()
        .from_host(&rand_vec(shape.iter().product(), seed, stream), shape)
        .expect("from_host")
}

/// Host copy.
pub fn host<B: Backend>(b: &B, t: &B::Tensor) -> Vec<f32> {
    b.to_host(t).expect("to_host")
}

/// [`assert_close`] with the absolute tolerance relative to the largest `|want|`: for long
/// f32 dot products (k in the thousands) whose blocking differs between the two sides,
/// the rounding scales with the magnitudes summed, not with each (cancelling) result.
pub fn assert_close_scaled(what: &str, got: &[f32], want: &[f64], rtol: f64, atol_rel: f64) {
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert_close(what, got, want, rtol, atol_rel * scale);
}

/// Asserts `|got - want| <= atol + rtol * |want|` elementwise, reporting the worst element.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], rtol: f64, atol: f64) {
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: length {} vs {}",
        got.len(),
        want.len()
    );
    let mut worst = (0usize, 0.0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (f64::from(g) - w).abs() - (atol + rtol * w.abs());
        if err > worst.1 || !f64::from(g).is_finite() {
            worst = (i, err.max(f64::MAX * f64::from(u8::from(!g.is_finite()))));
        }
    }
    let (i, excess) = worst;
    assert!(
        excess <= 0.0,
        "{what}: element {i}: got {} want {} (rtol {rtol}, atol {atol})",
        got[i],
        want[i]
    );
}

/// Row-major `[m, k] x [k, n]` in f64; `ta`/`tb` read the operands transposed.
pub fn matmul64(
    a: &[f64],
    b: &[f64],
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0;
            for p in 0..k {
                let av = if ta { a[p * m + i] } else { a[i * k + p] };
                let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                s += av * bv;
            }
            out[i * n + j] = s;
        }
    }
    out
}

/// f32 -> f64.
pub fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

/// A LoRA layer problem on the host, in f64: the independent reference for forward and
/// backward (`x: [n, in]`, `w: [out, in]`, `bias: [out]`, `a: [r, in]`, `b: [out, r]`).
#[derive(Debug, Clone)]
pub struct HostLora {
    /// Rows.
    pub n: usize,
    /// In features.
    pub inp: usize,
    /// Out features.
    pub out: usize,
    /// Rank.
    pub r: usize,
    /// Input.
    pub x: Vec<f64>,
    /// Frozen weight.
    pub w: Vec<f64>,
    /// Bias.
    pub bias: Vec<f64>,
    /// lora_A.
    pub a: Vec<f64>,
    /// lora_B.
    pub b: Vec<f64>,
    /// Scaling.
    pub s: f64,
    /// Dropout mask on the LoRA input (ones without dropout).
    pub mask: Vec<f64>,
}

impl HostLora {
    /// `y = x Wᵀ + bias + s (x ⊙ M) Aᵀ Bᵀ`.
    pub fn forward(&self) -> Vec<f64> {
        let mut y = matmul64(&self.x, &self.w, self.n, self.inp, self.out, false, true);
        let xm: Vec<f64> = self.x.iter().zip(&self.mask).map(|(x, m)| x * m).collect();
        let h = matmul64(&xm, &self.a, self.n, self.inp, self.r, false, true);
        let l = matmul64(&h, &self.b, self.n, self.r, self.out, false, true);
        for i in 0..self.n {
            for j in 0..self.out {
                y[i * self.out + j] += self.bias[j] + self.s * l[i * self.out + j];
            }
        }
        y
    }

    /// `(dx, dA, dB)` for output gradient `g`, straight from the formulas in
    /// `shared/reference/peft-compat.md`.
    pub fn backward(&self, g: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let xm: Vec<f64> = self.x.iter().zip(&self.mask).map(|(x, m)| x * m).collect();
        let h = matmul64(&xm, &self.a, self.n, self.inp, self.r, false, true);
        let d_b: Vec<f64> = matmul64(g, &h, self.out, self.n, self.r, true, false)
            .into_iter()
            .map(|v| v * self.s)
            .collect();
        let gb = matmul64(g, &self.b, self.n, self.out, self.r, false, false);
        let d_a: Vec<f64> = matmul64(&gb, &xm, self.r, self.n, self.inp, true, false)
            .into_iter()
            .map(|v| v * self.s)
            .collect();
        let mut dx = matmul64(g, &self.w, self.n, self.out, self.inp, false, false);
        let gba = matmul64(&gb, &self.a, self.n, self.r, self.inp, false, false);
        for (i, d) in dx.iter_mut().enumerate() {
            *d += self.s * gba[i] * self.mask[i];
        }
        (dx, d_a, d_b)
    }
}

/// A JSON array of numbers as f32 (fixtures).
pub fn json_f32(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .expect("a JSON array")
        .iter()
        .map(|x| x.as_f64().expect("a number") as f32)
        .collect()
}

/// The linear layers of a checkpoint as a [`lora::Model`] without a forward: enough to
/// inject, load, merge and save adapters by module name (a BERT's `query`, `dense`, ...).
#[derive(Debug)]
pub struct LinearBank {
    layers: Vec<lora::LoraLinear<NdArray>>,
}

impl LinearBank {
    /// Every `<module>.weight` (2-D) with a `<module>.bias` in `tensors` becomes a layer
    /// named `<module>` (embeddings have no bias and are left out).
    pub fn from_state_dict(tensors: &std::collections::BTreeMap<String, lora::HostTensor>) -> Self {
        let b = backend();
        let mut layers = Vec::new();
        for (k, w) in tensors {
            let Some(module) = k.strip_suffix(".weight") else {
                continue;
            };
            let Some(bias) = tensors.get(&format!("{module}.bias")) else {
                continue;
            };
            if w.shape.len() != 2 {
                continue;
            }
            let dense = lora::DenseLinear::new(
                w.to_backend(&b).expect("weight"),
                Some(bias.to_backend(&b).expect("bias")),
            )
            .expect("dense");
            layers.push(lora::LoraLinear::new(module, Box::new(dense)));
        }
        LinearBank { layers }
    }
}

impl lora::Model<NdArray> for LinearBank {
    fn forward(&mut self, _: &NdArray, _: &NdTensor, _: lora::Mode) -> lora::Result<NdTensor> {
        Err(lora::Error::state("LinearBank", "has no forward"))
    }
    fn backward(&mut self, _: &NdArray, _: &NdTensor) -> lora::Result<()> {
        Err(lora::Error::state("LinearBank", "has no backward"))
    }
    fn linears(&self) -> Vec<&lora::LoraLinear<NdArray>> {
        self.layers.iter().collect()
    }
    fn linears_mut(&mut self) -> Vec<&mut lora::LoraLinear<NdArray>> {
        self.layers.iter_mut().collect()
    }
}

/// The all-MiniLM-L6-v2 directory (`LORA_RS_MINILM`, else the cache that
/// `cargo xtask fetch-model minilm` fills). `None` with a printed reason when it is absent
/// and the run does not require it; `cargo xtask test` fetches it and sets
/// `LORA_RS_REQUIRE_MODELS`, so there a missing model fails the test.
pub fn minilm_dir() -> Option<std::path::PathBuf> {
    let dir = lora::models::cache::minilm_dir();
    if dir.join("model.safetensors").is_file() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("LORA_RS_REQUIRE_MODELS").is_none(),
        "all-MiniLM-L6-v2 is missing at {}: run `cargo xtask fetch-model minilm`",
        dir.display()
    );
    eprintln!(
        "skipped: all-MiniLM-L6-v2 not found at {} (run `cargo xtask fetch-model minilm`)",
        dir.display()
    );
    None
}

/// `tests/fixtures`, or `LORA_RS_FIXTURES` when set (a GPU bundle runs the test binaries
/// away from the source tree).
pub fn fixtures_dir() -> std::path::PathBuf {
    std::env::var_os("LORA_RS_FIXTURES")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures"))
}

/// Central finite differences of `f` at `x` (step 1e-5, f64), one entry per coordinate.
pub fn central_differences(x: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    (0..x.len())
        .map(|i| {
            let (mut p, mut m) = (x.to_vec(), x.to_vec());
            p[i] += 1e-5;
            m[i] -= 1e-5;
            (f(&p) - f(&m)) / 2e-5
        })
        .collect()
}

/// Every `(op_a, op_b)` transpose pair, for GEMM checks.
pub const TRANSPOSE_PAIRS: [(lora::Transpose, lora::Transpose); 4] = [
    (lora::Transpose::No, lora::Transpose::No),
    (lora::Transpose::Yes, lora::Transpose::No),
    (lora::Transpose::No, lora::Transpose::Yes),
    (lora::Transpose::Yes, lora::Transpose::Yes),
];
