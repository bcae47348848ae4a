//! Quantized bases (issue 4), paired against their baselines in the same timed loop:
//!
//! * `qlora_fwd_bwd`: LoRA forward+backward on an NF4 (double-quantized) base against the
//!   same LoRA on the f32 base, at (512, 4096, 4096, r=16). Goal: 1.25x or less.
//! * `dequantize_nf4`: dequantizing a 4096x4096 NF4 weight against copying its f32
//!   result (`memcpy` of the same output bytes): the fraction of copy bandwidth.
//!
//! Results go to `target/bench/quant.json` (same layout as `paired.json`; "frozen" is the
//! baseline) plus the weight bytes of each base.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{Criterion, criterion_group, criterion_main};
use lora::quant::{QuantBackend, QuantConfig, QuantLinear};
use lora::{DenseLinear, Linear, LoraLinear, LoraSpec, Mode, NdArray};
use lora_benches::{paired, rand_host, write_paired};

const QLORA_SHAPE: (usize, usize, usize, usize) = (512, 4096, 4096, 16);

fn bench_backend<B: QuantBackend>(
    c: &mut Criterion,
    b: &B,
    results: &mut BTreeMap<String, (f64, f64, f64)>,
    bytes: &mut BTreeMap<String, (usize, usize)>,
) {
    let quick = std::env::var_os("LORA_BENCH_QUICK").is_some();
    let name = b.name();
    let (t, inp, out, r) = QLORA_SHAPE;
    let shape = format!("{t}x{inp}x{out}r{r}");
    let w = rand_host(out * inp, 3);
    let bias = rand_host(out, 4);
    let x = b.from_host(&rand_host(t * inp, 1), &[t, inp]).unwrap();
    let dy = b.from_host(&rand_host(t * out, 2), &[t, out]).unwrap();
    let spec = LoraSpec {
        r,
        alpha: 2.0 * r as f32,
        ..LoraSpec::default()
    };
    let dense = DenseLinear::<B>::new(
        b.from_host(&w, &[out, inp]).unwrap(),
        Some(b.from_host(&bias, &[out]).unwrap()),
    )
    .unwrap();
    let q = QuantConfig::qlora().quantize(&w, &[out, inp]).unwrap();
    let quant =
        QuantLinear::<B>::new(q.clone(), Some(b.from_host(&bias, &[out]).unwrap())).unwrap();
    bytes.insert(
        format!("{name}/qlora_fwd_bwd/{shape}"),
        (dense.resident_bytes(), quant.resident_bytes()),
    );
    let mut f32_lora = LoraLinear::new("layer", Box::new(dense));
    let mut q_lora = LoraLinear::new("layer", Box::new(quant));
    f32_lora.inject_lora(b, &spec).unwrap();
    q_lora.inject_lora(b, &spec).unwrap();
    let (f32_lora, q_lora) = (RefCell::new(f32_lora), RefCell::new(q_lora));

    let mut g = c.benchmark_group(format!("quant_{name}"));
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(if quick { 300 } else { 1000 }));
    g.measurement_time(Duration::from_secs(if quick { 4 } else { 10 }));
    paired(
        &mut g,
        format!("{name}/qlora_fwd_bwd/{shape}"),
        results,
        || {
            let mut l = f32_lora.borrow_mut();
            black_box(l.forward(b, &x, Mode::Train).unwrap());
            black_box(l.backward(b, &dy).unwrap());
            b.synchronize().unwrap();
        },
        || {
            let mut l = q_lora.borrow_mut();
            black_box(l.forward(b, &x, Mode::Train).unwrap());
            black_box(l.backward(b, &dy).unwrap());
            b.synchronize().unwrap();
        },
    );

    // Dequantize throughput against a plain copy of the same f32 output.
    let src = vec![1.0f32; out * inp];
    let mut dst = vec![0.0f32; out * inp];
    let dst = RefCell::new(&mut dst);
    paired(
        &mut g,
        format!("{name}/dequantize_nf4/{out}x{inp}"),
        results,
        || {
            dst.borrow_mut().copy_from_slice(black_box(&src));
            black_box(&dst);
        },
        || {
            black_box(b.dequantize_rows(&q, 0, out).unwrap());
            b.synchronize().unwrap();
        },
    );
    g.finish();
}

fn bench(c: &mut Criterion) {
    let mut results = BTreeMap::new();
    let mut bytes = BTreeMap::new();
    bench_backend(c, &NdArray::new(), &mut results, &mut bytes);
    #[cfg(feature = "tch")]
    bench_backend(
        c,
        &lora::Tch::cuda(0).unwrap_or_else(|_| lora::Tch::cpu()),
        &mut results,
        &mut bytes,
    );
    #[cfg(feature = "cuda")]
    match lora::Cuda::new(0) {
        Ok(b) => bench_backend(c, &b, &mut results, &mut bytes),
        Err(e) => eprintln!("cuda benchmarks skipped: {e}"),
    }
    write_paired("quant.json", &results);
    let dir = lora_benches::bench_out_dir();
    let body: Vec<String> = bytes
        .iter()
        .map(|(k, (f, q))| format!("  \"{k}\": {{\"f32_bytes\": {f}, \"quant_bytes\": {q}}}"))
        .collect();
    std::fs::write(
        dir.join("quant_bytes.json"),
        format!("{{\n{}\n}}\n", body.join(",\n")),
    )
    .ok();
}

criterion_group!(benches, bench);
criterion_main!(benches);
