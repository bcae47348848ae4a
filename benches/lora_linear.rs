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
//! * `fwd_bwd_step`: the same, the LoRA side also taking its AdamW step.
//! * `fwd`: inference forward of both.
//! * `dora_step`: DoRA's training step (forward, backward, AdamW) against LoRA's on the
//!   same layer (issue 15's goal: at most 1.15x; PEFT's own table shows DoRA 26% slower).
//!
//! Without `--quick`, (4096, 4096, 11008, 16) joins the shapes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

// The same allocator as the `lora` binary, so the figures are what users of it get.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{Criterion, criterion_group, criterion_main};
use lora::{
    Adam, DenseLinear, FullBackend, Linear, LoraLinear, LoraSpec, Mode, NdArray, Optimizer,
};
use lora_benches::{GPU_SHAPES, lora_shapes, paired, write_paired};

/// One backend's LoRA-vs-frozen benchmarks at every shape.
fn bench_backend<B: FullBackend>(
    c: &mut Criterion,
    b: &B,
    results: &mut BTreeMap<String, (f64, f64, f64)>,
) {
    let quick = std::env::var_os("LORA_BENCH_QUICK").is_some();
    let name = b.name();
    let shapes = if name == "cuda" {
        GPU_SHAPES.to_vec()
    } else {
        lora_shapes()
    };
    for (t, inp, out, r) in shapes {
        let shape = format!("{t}x{inp}x{out}r{r}");
        let host = lora_benches::rand_host;
        let x = b.from_host(&host(t * inp, 1), &[t, inp]).unwrap();
        let dy = b.from_host(&host(t * out, 2), &[t, out]).unwrap();
        let dense = DenseLinear::<B>::new(
            b.from_host(&host(out * inp, 3), &[out, inp]).unwrap(),
            Some(b.from_host(&host(out, 4), &[out]).unwrap()),
        )
        .unwrap();
        let mut lora = LoraLinear::new("layer", Box::new(dense.clone()));
        lora.inject_lora(
            b,
            &LoraSpec {
                r,
                alpha: 2.0 * r as f32,
                ..LoraSpec::default()
            },
        )
        .unwrap();
        let lora = RefCell::new(lora);
        let mut dora = LoraLinear::new("layer", Box::new(dense.clone()));
        dora.add_dora(
            b,
            lora::DEFAULT_ADAPTER,
            &LoraSpec {
                r,
                alpha: 2.0 * r as f32,
                ..LoraSpec::default()
            },
        )
        .unwrap();
        let dora = RefCell::new(dora);

        let big = t * inp * out >= 1 << 30;
        let mut g = c.benchmark_group(format!("lora_linear_{name}"));
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
            format!("{name}/fwd_bwd/{shape}"),
            results,
            || {
                black_box((
                    dense.forward(b, &x).unwrap(),
                    dense.backward(b, &dy).unwrap(),
                ));
                b.synchronize().unwrap();
            },
            || {
                let mut l = lora.borrow_mut();
                black_box(l.forward(b, &x, Mode::Train).unwrap());
                black_box(l.backward(b, &dy).unwrap());
                b.synchronize().unwrap();
            },
        );
        // Training as users run it: the LoRA step includes AdamW on the adapters.
        let opt = RefCell::new(Adam::<B>::adamw(1e-4).unwrap());
        // Forward, backward and AdamW of a LoRA (or DoRA) layer.
        let train_step = |layer: &RefCell<LoraLinear<B>>, opt: &RefCell<Adam<B>>| {
            let mut l = layer.borrow_mut();
            black_box(l.forward(b, &x, Mode::Train).unwrap());
            black_box(l.backward(b, &dy).unwrap());
            opt.borrow_mut().step(b, &mut l.params_and_grads()).unwrap();
            b.synchronize().unwrap();
        };
        paired(
            &mut g,
            format!("{name}/fwd_bwd_step/{shape}"),
            results,
            || {
                black_box((
                    dense.forward(b, &x).unwrap(),
                    dense.backward(b, &dy).unwrap(),
                ));
                b.synchronize().unwrap();
            },
            || train_step(&lora, &opt),
        );
        let dora_opt = RefCell::new(Adam::<B>::adamw(1e-4).unwrap());
        paired(
            &mut g,
            format!("{name}/dora_step/{shape}"),
            results,
            || train_step(&lora, &opt),
            || train_step(&dora, &dora_opt),
        );
        paired(
            &mut g,
            format!("{name}/fwd/{shape}"),
            results,
            || {
                black_box(dense.forward(b, &x).unwrap());
                b.synchronize().unwrap();
            },
            || {
                black_box(lora.borrow_mut().forward(b, &x, Mode::Eval).unwrap());
                b.synchronize().unwrap();
            },
        );
        g.finish();
    }
}

fn bench(c: &mut Criterion) {
    lora_benches::keep_freed_memory();
    let mut results = BTreeMap::new();
    bench_backend(c, &NdArray::new(), &mut results);
    #[cfg(feature = "tch")]
    bench_backend(
        c,
        &lora::Tch::cuda(0).unwrap_or_else(|_| lora::Tch::cpu()),
        &mut results,
    );
    #[cfg(feature = "cuda")]
    match lora::Cuda::new(0) {
        Ok(b) => bench_backend(c, &b, &mut results),
        Err(e) => eprintln!("cuda benchmarks skipped: {e}"),
    }
    write_paired("paired.json", &results);
}

criterion_group!(benches, bench);
criterion_main!(benches);
