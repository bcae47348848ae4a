//! Matrix multiplication: our ndarray backend (our kernels on x86-64 CPUs with AVX2 or
//! AVX-512, the `gemm` crate elsewhere and for shallow products, with our threading)
//! against the `gemm` crate with its own rayon threading and `matrixmultiply` with its own (ndarray's `dot`), at
//! large and skinny LoRA shapes and the decoder step's products (`xWt`: the second operand
//! transposed, as a linear layer's forward reads its weight). `cargo xtask bench` reports GFLOP/s and the fraction of the machine's measured
//! FMA peak, which this bench writes to `target/bench/fma_peak.json`.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(unsafe_code)] // the `gemm` crate has only an unsafe entry point

use std::time::Duration;

// The same allocator as the `lora` binary, so the figures are what users of it get.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use lora::{Backend, NdArray, Transpose};
use lora_benches::{fma_isa, fma_peak_gflops, rand};
use ndarray::Array2;

/// `(m, n, k, second operand transposed)`: two large products, the skinny ones a rank-8/16
/// LoRA runs, and the decoder benchmark's largest (1024 tokens: `gate_proj`'s forward,
/// `down_proj`'s input gradient, the output head's forward and input gradient).
const SHAPES: [(usize, usize, usize, bool); 10] = [
    (2048, 2048, 2048, false),
    (512, 4096, 4096, false),
    (2048, 384, 384, false),
    (2048, 16, 4096, false),
    (2048, 4096, 16, false),
    (16, 4096, 2048, false),
    (1024, 2816, 1024, true),
    (1024, 1024, 2816, false),
    (1024, 32000, 1024, true),
    (1024, 1024, 32000, false),
];

fn bench(c: &mut Criterion) {
    if let Some(peak) = fma_peak_gflops() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
        std::fs::create_dir_all(&dir).ok();
        std::fs::write(
            dir.join("fma_peak.json"),
            format!(
                "{{\"fma_peak_gflops\": {peak:.1}, \"isa\": \"{}\"}}\n",
                fma_isa().unwrap_or("none")
            ),
        )
        .ok();
        println!(
            "measured f32 FMA peak: {peak:.1} GFLOP/s ({})",
            fma_isa().unwrap_or("none")
        );
    }
    let quick = std::env::var_os("LORA_BENCH_QUICK").is_some();
    let b = NdArray::new();
    let mut g = c.benchmark_group("gemm");
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(if quick { 2 } else { 4 }));
    for &(m, n, k, bt) in &SHAPES {
        if quick && n == 32000 {
            continue; // the output head's products take seconds per sample
        }
        let shape = format!("{m}x{n}x{k}");
        let (suffix, trans_b) = match bt {
            true => ("_xWt", Transpose::Yes),
            false => ("", Transpose::No),
        };
        g.throughput(Throughput::Elements(2 * (m * n * k) as u64));
        let a = rand(&b, &[m, k], 1);
        let bb = rand(&b, &if bt { [n, k] } else { [k, n] }, 2);
        let mut out = b.zeros(&[m, n]).unwrap();
        g.bench_function(format!("ndarray_backend{suffix}/{shape}"), |bch| {
            bch.iter(|| {
                b.gemm(1.0, &a, Transpose::No, &bb, trans_b, 0.0, &mut out)
                    .unwrap()
            })
        });
        let (ah, bh) = (b.to_host(&a).unwrap(), b.to_host(&bb).unwrap());
        let mut c = vec![0.0f32; m * n];
        // Row and column strides of op(b).
        let (b_rs, b_cs) = if bt { (1, k as isize) } else { (n as isize, 1) };
        g.bench_function(format!("gemm_crate{suffix}/{shape}"), |bch| {
            bch.iter(|| {
                // SAFETY: the buffers hold m x k, k x n (or n x k) and m x n elements,
                // matching the strides given.
                unsafe {
                    gemm::gemm(
                        m,
                        n,
                        k,
                        c.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        ah.as_ptr(),
                        1,
                        k as isize,
                        bh.as_ptr(),
                        b_cs,
                        b_rs,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::Rayon(0),
                    )
                }
            })
        });
        if !bt {
            let a2 = Array2::from_shape_vec((m, k), ah.clone()).unwrap();
            let b2 = Array2::from_shape_vec((k, n), bh.clone()).unwrap();
            g.bench_function(format!("matrixmultiply/{shape}"), |bch| {
                bch.iter(|| a2.dot(&b2))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
