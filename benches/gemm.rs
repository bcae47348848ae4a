//! Matrix multiplication: our ndarray backend (the `gemm` crate with our threading) against
//! `matrixmultiply` with its own threading (ndarray's `dot`), at large and skinny LoRA
//! shapes. `cargo xtask bench` reports GFLOP/s and the fraction of the machine's measured
//! FMA peak, which this bench writes to `target/bench/fma_peak.json`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

// The same allocator as the `lora` binary, so the figures are what users of it get.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use lora::{Backend, NdArray, Transpose};
use lora_benches::{fma_isa, fma_peak_gflops, rand};
use ndarray::Array2;

/// `(m, n, k)`: two large products and the skinny ones a rank-8/16 LoRA runs.
const SHAPES: [(usize, usize, usize); 6] = [
    (2048, 2048, 2048),
    (512, 4096, 4096),
    (2048, 384, 384),
    (2048, 16, 4096),
    (2048, 4096, 16),
    (16, 4096, 2048),
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
    for &(m, n, k) in &SHAPES {
        let shape = format!("{m}x{n}x{k}");
        g.throughput(Throughput::Elements(2 * (m * n * k) as u64));
        let a = rand(&b, &[m, k], 1);
        let bb = rand(&b, &[k, n], 2);
        let mut out = b.zeros(&[m, n]).unwrap();
        g.bench_function(format!("ndarray_backend/{shape}"), |bch| {
            bch.iter(|| {
                b.gemm(1.0, &a, Transpose::No, &bb, Transpose::No, 0.0, &mut out)
                    .unwrap()
            })
        });
        let a2 = Array2::from_shape_vec((m, k), b.to_host(&a).unwrap()).unwrap();
        let b2 = Array2::from_shape_vec((k, n), b.to_host(&bb).unwrap()).unwrap();
        g.bench_function(format!("matrixmultiply/{shape}"), |bch| {
            bch.iter(|| a2.dot(&b2))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
