//! Shared pieces of the benchmarks: the workload shapes, inputs, and the machine's FMA peak.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use lora::rng::{RngState, uniform};

pub mod minilm;
pub mod random_llama;
use lora::{Backend, NdArray, NdTensor};

/// Per-sample `(baseline seconds, measured seconds)` of one paired benchmark.
type Samples = RefCell<Vec<(f64, f64)>>;

/// The median (NaN when empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Writes `{"<backend>/<op>/<shape>": {"ratio": r, "frozen_s": f, "lora_s": l}}` (medians
/// per iteration; "frozen" is the baseline, "lora" the measured side) to
/// `target/bench/<file>`.
pub fn write_paired(file: &str, results: &BTreeMap<String, (f64, f64, f64)>) {
    let dir = bench_out_dir();
    std::fs::create_dir_all(&dir).ok();
    let body: Vec<String> = results
        .iter()
        .map(|(k, (r, f, l))| {
            format!("  \"{k}\": {{\"ratio\": {r:.4}, \"frozen_s\": {f:.6e}, \"lora_s\": {l:.6e}}}")
        })
        .collect();
    std::fs::write(dir.join(file), format!("{{\n{}\n}}\n", body.join(",\n"))).ok();
}

/// Times `baseline` and `measured` alternately inside one timed loop; criterion sees the
/// measured time, `results[id]` gets `(median ratio, baseline, measured)`. On a shared
/// VM the clock drifts by more than the effects we measure between two separately timed
/// benchmarks, so only interleaved ratios are meaningful.
pub fn paired(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    id: String,
    results: &mut BTreeMap<String, (f64, f64, f64)>,
    mut baseline: impl FnMut(),
    mut measured: impl FnMut(),
) {
    let samples: Samples = RefCell::new(Vec::new());
    g.bench_function(&id, |bch| {
        bch.iter_custom(|iters| {
            let (mut t_base, mut t_meas) = (Duration::ZERO, Duration::ZERO);
            for _ in 0..iters {
                let t0 = Instant::now();
                baseline();
                let t1 = Instant::now();
                measured();
                t_meas += t1.elapsed();
                t_base += t1 - t0;
            }
            let n = iters.max(1) as f64;
            samples
                .borrow_mut()
                .push((t_base.as_secs_f64() / n, t_meas.as_secs_f64() / n));
            t_meas
        })
    });
    let s = samples.into_inner();
    if !s.is_empty() {
        let ratio = median(s.iter().map(|(f, l)| l / f).collect());
        let f = median(s.iter().map(|(f, _)| *f).collect());
        let l = median(s.iter().map(|(_, l)| *l).collect());
        results.insert(id, (ratio, f, l));
    }
}

/// `(tokens, in, out, r)` of the LoRA linear workloads (issue 2; PyTorch+PEFT measures
/// 1.11x to 1.55x LoRA-over-frozen at these shapes).
pub const LORA_SHAPES: [(usize, usize, usize, usize); 3] = [
    (512, 4096, 4096, 16),
    (2048, 384, 384, 8),
    (2048, 384, 1536, 8),
];

/// Only without `--quick`: 4096 tokens through a 4096 -> 11008 projection (7B-class MLP).
pub const LARGE_SHAPE: (usize, usize, usize, usize) = (4096, 4096, 11008, 16);

/// The CUDA backend's shapes (the GPU workloads).
pub const GPU_SHAPES: [(usize, usize, usize, usize); 2] =
    [(4096, 4096, 4096, 16), (4096, 4096, 11008, 16)];

/// Where benchmark results go: `LORA_BENCH_OUT`, else `target/bench` of this checkout.
pub fn bench_out_dir() -> std::path::PathBuf {
    std::env::var_os("LORA_BENCH_OUT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench"))
}

/// The shapes of this run.
pub fn lora_shapes() -> Vec<(usize, usize, usize, usize)> {
    let mut v = LORA_SHAPES.to_vec();
    if std::env::var_os("LORA_BENCH_QUICK").is_none() {
        v.push(LARGE_SHAPE);
    }
    v
}

/// Uniform `[-1, 1)` host values from stream `stream`.
pub fn rand_host(n: usize, stream: u64) -> Vec<f32> {
    let mut v = vec![0.0; n];
    uniform(RngState::new(42, stream), -1.0, 1.0, &mut v);
    v
}

/// Uniform `[-1, 1)` tensor.
pub fn rand(b: &NdArray, shape: &[usize], stream: u64) -> NdTensor {
    let mut v = vec![0.0; shape.iter().product()];
    uniform(RngState::new(42, stream), -1.0, 1.0, &mut v);
    b.from_host(&v, shape).unwrap()
}

/// The vector ISA the FMA peak uses on this CPU: `"avx512f"`, `"avx2+fma"` or `None`, that
/// of our kernels ([`lora::ndarray_pool::kernel_lanes`], after `LORA_NDARRAY_ISA`'s cap).
/// The `gemm` crate picks its own at run time and ignores the cap.
pub fn fma_isa() -> Option<&'static str> {
    lora::ndarray_pool::kernel_lanes().map(|l| if l == 16 { "avx512f" } else { "avx2+fma" })
}

/// Measured f32 FMA peak of this machine in GFLOP/s: every hardware thread runs twelve
/// independent chains of fused multiply-adds at the width our kernels run
/// ([`lora::ndarray_pool::kernel_lanes`]: 16-lane AVX-512 where they use it and
/// `LORA_NDARRAY_ISA` does not cap it, so that a GEMM running AVX-512 kernels is measured
/// against the right ceiling; else 8-lane AVX2), and the best of three runs of about 0.3 s
/// counts.
/// Twelve chains keep two FMA ports busy with a latency up to six cycles and still fit the
/// sixteen AVX2 registers. (Eight chains and one 70 ms run read 102 GFLOP/s on the 2-core
/// AMD EPYC, where GEMMs reached 145 and a C loop with twelve chains 195.)
/// `None` without AVX2+FMA.
pub fn fma_peak_gflops() -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        let lanes = lora::ndarray_pool::kernel_lanes()?;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        const ITERS: u64 = 150_000_000;
        let mut best = f64::MAX;
        for _ in 0..3 {
            let start = std::time::Instant::now();
            let sink: f32 = std::thread::scope(|s| {
                let hs: Vec<_> = (0..threads)
                    .map(|_| s.spawn(move || fma_x86::run(lanes, ITERS)))
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
            });
            best = best.min(start.elapsed().as_secs_f64());
            std::hint::black_box(sink);
        }
        // chains x lanes x 2 flops per FMA
        Some(
            threads as f64 * ITERS as f64 * fma_x86::CHAINS as f64 * lanes as f64 * 2.0
                / best
                / 1e9,
        )
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod fma_x86 {
    use std::arch::x86_64::*;

    /// Independent FMA chains per thread.
    pub const CHAINS: usize = 12;

    /// `CHAINS` dependency-free FMA chains of `lanes` floats, `iters` rounds.
    pub fn run(lanes: usize, iters: u64) -> f32 {
        if lanes == 16 {
            // SAFETY: `kernel_lanes` returns 16 only after detecting AVX-512F (BW, DQ, VL).
            unsafe { chains_avx512(iters) }
        } else {
            // SAFETY: `kernel_lanes` returns 8 only after detecting AVX2 and FMA.
            unsafe { chains_avx2(iters) }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn chains_avx2(iters: u64) -> f32 {
        let a = _mm256_set1_ps(0.999_999);
        let b = _mm256_set1_ps(1e-7);
        let mut acc = [_mm256_set1_ps(1.0); CHAINS];
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm256_fmadd_ps(*v, a, b);
            }
        }
        let mut total = _mm256_setzero_ps();
        for v in acc {
            total = _mm256_add_ps(total, v);
        }
        let mut out = [0.0f32; 8];
        // SAFETY: `out` holds exactly the 8 floats an unaligned 256-bit store writes.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), total) };
        out.iter().sum()
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn chains_avx512(iters: u64) -> f32 {
        let a = _mm512_set1_ps(0.999_999);
        let b = _mm512_set1_ps(1e-7);
        let mut acc = [_mm512_set1_ps(1.0); CHAINS];
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm512_fmadd_ps(*v, a, b);
            }
        }
        let mut total = _mm512_setzero_ps();
        for v in acc {
            total = _mm512_add_ps(total, v);
        }
        _mm512_reduce_add_ps(total)
    }
}

/// mimalloc's `mi_option_purge_delay` (mimalloc 3's `mi_option_e`; libmimalloc-sys names
/// no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// What `lora`'s `main` does first: mimalloc keeps freed pages instead of returning them
/// to the OS after 10 ms, so a training step's buffers are not faulted in anew each step.
#[allow(unsafe_code)]
pub fn keep_freed_memory() {
    // SAFETY: sets one integer option of the allocator; valid at any time, from any thread.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}
