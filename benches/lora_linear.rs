//! LoRA linear layer against the frozen layer alone, at the shapes.
//!
//! * `frozen_fwd_bwd`: `y = x Wᵀ + b`, `dx = dy W` (the frozen layer's own cost).
//! * `lora_fwd_bwd`: the same plus the LoRA forward, `dA`, `dB` and the LoRA part of `dx`.
//! * `frozen_fwd` / `lora_fwd`: inference only.
//!
//! `cargo xtask bench` turns the medians into `lora_over_base` ratios.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

// The same allocator as the `lora` binary, so the figures are what users of it get.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{Criterion, criterion_group, criterion_main};
use lora::{DenseLinear, Linear, LoraLinear, LoraSpec, Mode, NdArray};
use lora_benches::{LORA_SHAPES, rand};

fn bench(c: &mut Criterion) {
    let b = NdArray::new();
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
        g.bench_function(format!("frozen_fwd/{shape}"), |bch| {
            bch.iter(|| dense.forward(&b, &x).unwrap())
        });
        g.bench_function(format!("lora_fwd/{shape}"), |bch| {
            bch.iter(|| lora.forward(&b, &x, Mode::Eval).unwrap())
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
