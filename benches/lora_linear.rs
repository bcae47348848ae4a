//! LoRA linear layer against the frozen layer alone, at the shapes.
//!
//! Each benchmark runs the frozen layer and the LoRA layer *alternately inside one timed
//! loop* and reports the LoRA time to criterion; the frozen time of the same loop goes to
//! `target/bench/paired.json` with the median of per-sample ratios. On a shared 2-core VM
//! the clock drifts by more than the effect between two separately timed benchmarks, so
//! only interleaved ratios are meaningful.
//!
//! * `fwd_bwd`: frozen `y = x Wᵀ + b`, `dx = dy W` against the same plus the LoRA forward,
//!   `dA`, `dB` and the LoRA part of `dx` (training).
//! * `fwd`: inference forward of both.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

// The same allocator as the `lora` binary, so the figures are what users of it get.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{Criterion, criterion_group, criterion_main};
use lora::{DenseLinear, Linear, LoraLinear, LoraSpec, Mode, NdArray};
use lora_benches::{LORA_SHAPES, rand};

/// Per-sample `(frozen seconds, lora seconds)` of one paired benchmark.
type Samples = RefCell<Vec<(f64, f64)>>;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// `{"<op>/<shape>": {"ratio": r, "frozen_s": f, "lora_s": l}}`, medians per iteration.
fn write_paired(results: &BTreeMap<String, (f64, f64, f64)>) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).ok();
    let body: Vec<String> = results
        .iter()
        .map(|(k, (r, f, l))| {
            format!("  \"{k}\": {{\"ratio\": {r:.4}, \"frozen_s\": {f:.6e}, \"lora_s\": {l:.6e}}}")
        })
        .collect();
    std::fs::write(
        dir.join("paired.json"),
        format!("{{\n{}\n}}\n", body.join(",\n")),
    )
    .ok();
}

/// Times `frozen` and `lora` alternately; criterion sees the LoRA time.
fn paired(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    id: String,
    results: &mut BTreeMap<String, (f64, f64, f64)>,
    mut frozen: impl FnMut(),
    mut lora: impl FnMut(),
) {
    let samples: Samples = RefCell::new(Vec::new());
    g.bench_function(&id, |bch| {
        bch.iter_custom(|iters| {
            let (mut t_frozen, mut t_lora) = (Duration::ZERO, Duration::ZERO);
            for _ in 0..iters {
                let t0 = Instant::now();
                frozen();
                let t1 = Instant::now();
                lora();
                t_lora += t1.elapsed();
                t_frozen += t1 - t0;
            }
            let n = iters.max(1) as f64;
            samples
                .borrow_mut()
                .push((t_frozen.as_secs_f64() / n, t_lora.as_secs_f64() / n));
            t_lora
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

fn bench(c: &mut Criterion) {
    let b = NdArray::new();
    let mut results = BTreeMap::new();
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
        let lora = RefCell::new(lora);

        let big = t * inp * out >= 1 << 30;
        let mut g = c.benchmark_group("lora_linear");
        g.sample_size(if big || quick { 10 } else { 30 });
        g.warm_up_time(Duration::from_millis(if quick { 300 } else { 1000 }));
        g.measurement_time(Duration::from_secs(if quick {
            3
        } else if big {
            10
        } else {
            5
        }));
        paired(
            &mut g,
            format!("fwd_bwd/{shape}"),
            &mut results,
            || {
                black_box((
                    dense.forward(&b, &x).unwrap(),
                    dense.backward(&b, &dy).unwrap(),
                ));
            },
            || {
                let mut l = lora.borrow_mut();
                black_box(l.forward(&b, &x, Mode::Train).unwrap());
                black_box(l.backward(&b, &dy).unwrap());
            },
        );
        paired(
            &mut g,
            format!("fwd/{shape}"),
            &mut results,
            || {
                black_box(dense.forward(&b, &x).unwrap());
            },
            || {
                black_box(lora.borrow_mut().forward(&b, &x, Mode::Eval).unwrap());
            },
        );
        g.finish();
    }
    write_paired(&results);
}

criterion_group!(benches, bench);
criterion_main!(benches);
