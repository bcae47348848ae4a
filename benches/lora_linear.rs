//! LoRA linear layer against the frozen layer alone, at the shapes.
//!
//! * `frozen_fwd_bwd`: `y = x Wᵀ + b`, `dx = dy W` (the frozen layer's own cost).
//! * `lora_fwd_bwd`: the same plus the LoRA forward, `dA`, `dB` and the LoRA part of `dx`.
//! * `frozen_fwd` / `lora_fwd`: inference only.
//!
//! * `paired_fwd_bwd`: frozen and LoRA forward+backward run alternately inside one timed
//!   loop; the median of per-sample time ratios goes to `target/bench/paired.json`. This
//!   is the `lora_over_base` figure `cargo xtask bench` reports: on a shared 2-core VM,
//!   clock drift between two separately timed benchmarks is larger than the effect.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

// The same allocator as the `lora` binary, so the figures are what users of it get.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{Criterion, criterion_group, criterion_main};
use lora::{DenseLinear, Linear, LoraLinear, LoraSpec, Mode, NdArray};
use lora_benches::{LORA_SHAPES, rand};

/// Writes `{shape: median(lora / frozen)}` for the paired runs.
fn write_paired(ratios: &BTreeMap<String, f64>) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).ok();
    let body: Vec<String> = ratios
        .iter()
        .map(|(k, v)| format!("  \"{k}\": {v:.4}"))
        .collect();
    std::fs::write(
        dir.join("paired.json"),
        format!("{{\n{}\n}}\n", body.join(",\n")),
    )
    .ok();
}

fn bench(c: &mut Criterion) {
    let b = NdArray::new();
    let mut paired = BTreeMap::new();
    let quick = std::env::var_os("LORA_BENCH_QUICK").is_some();
    for &(t, inp, out, r) in &LORA_SHAPES {
        let shape = format!("{t}x{inp}x{out}r{r}");
        let x = rand(&b, &[t, inp], 1);
        let dy = rand(&b, &[t, out], 2);
        let dense =
            DenseLinear::<NdArray>::new(rand(&b, &[out, inp], 3), Some(rand(&b, &[out], 4)))
                .unwrap();
        let mut lora = LoraLinear::new("layer", Box::new(dense.clone()));
        lora.inject_lora(
            &b,
            &LoraSpec {
                r,
                alpha: 2.0 * r as f32,
                ..LoraSpec::default()
            },
        )
        .unwrap();

        let big = t * inp * out >= 1 << 30;
        let mut g = c.benchmark_group("lora_linear");
        g.sample_size(if big || quick { 10 } else { 30 });
        g.warm_up_time(Duration::from_millis(if quick { 300 } else { 1000 }));
        g.measurement_time(Duration::from_secs(if quick {
            2
        } else if big {
            8
        } else {
            4
        }));

        g.bench_function(format!("frozen_fwd_bwd/{shape}"), |bch| {
            bch.iter(|| {
                let y = dense.forward(&b, &x).unwrap();
                let dx = dense.backward(&b, &dy).unwrap();
                (y, dx)
            })
        });
        g.bench_function(format!("lora_fwd_bwd/{shape}"), |bch| {
            bch.iter(|| {
                let y = lora.forward(&b, &x, Mode::Train).unwrap();
                let dx = lora.backward(&b, &dy).unwrap();
                (y, dx)
            })
        });
        let samples: RefCell<Vec<f64>> = RefCell::new(Vec::new());
        g.bench_function(format!("paired_fwd_bwd/{shape}"), |bch| {
            bch.iter_custom(|iters| {
                let (mut t_frozen, mut t_lora) = (Duration::ZERO, Duration::ZERO);
                for _ in 0..iters {
                    let t0 = Instant::now();
                    std::hint::black_box((
                        dense.forward(&b, &x).unwrap(),
                        dense.backward(&b, &dy).unwrap(),
                    ));
                    let t1 = Instant::now();
                    std::hint::black_box((
                        lora.forward(&b, &x, Mode::Train).unwrap(),
                        lora.backward(&b, &dy).unwrap(),
                    ));
                    t_lora += t1.elapsed();
                    t_frozen += t1 - t0;
                }
                samples
                    .borrow_mut()
                    .push(t_lora.as_secs_f64() / t_frozen.as_secs_f64());
                t_lora
            })
        });
        let mut s = samples.into_inner();
        s.sort_by(f64::total_cmp);
        if !s.is_empty() {
            paired.insert(shape.clone(), s[s.len() / 2]);
        }
        g.bench_function(format!("frozen_fwd/{shape}"), |bch| {
            bch.iter(|| dense.forward(&b, &x).unwrap())
        });
        g.bench_function(format!("lora_fwd/{shape}"), |bch| {
            bch.iter(|| lora.forward(&b, &x, Mode::Eval).unwrap())
        });
        g.finish();
    }
    write_paired(&paired);
}

criterion_group!(benches, bench);
criterion_main!(benches);
