//! One training configuration per process, so that its peak RSS can be measured from
//! outside (`cargo xtask bench` runs it under GNU time): a (512, 4096, 4096) linear layer
//! trained for three AdamW steps as
//!
//! * `full`: full fine-tuning of the f32 layer (weight and bias train),
//! * `lora`: LoRA r=16 on the frozen f32 layer,
//! * `qlora`: LoRA r=16 on the frozen NF4 (double-quantized) layer.
//!
//! Prints one JSON object: trainable parameters, optimizer state bytes, resident weight
//! bytes of the frozen base.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lora::quant::{QuantConfig, QuantLinear};
use lora::{
    Adam, Backend, DenseLinear, Linear, LoraLinear, LoraSpec, Mode, NdArray, Optimizer, ParamGrad,
};
use lora_benches::rand_host;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    let (t, inp, out, r) = (512, 4096, 4096, 16);
    let b = NdArray::new();
    let x = b.from_host(&rand_host(t * inp, 1), &[t, inp]).unwrap();
    let dy = b.from_host(&rand_host(t * out, 2), &[t, out]).unwrap();
    let mut opt = Adam::<NdArray>::adamw(1e-4).unwrap();
    let (trainable, frozen_bytes) = match mode.as_str() {
        "full" => {
            let mut layer = DenseLinear::<NdArray>::new(
                b.from_host(&rand_host(out * inp, 3), &[out, inp]).unwrap(),
                Some(b.from_host(&rand_host(out, 4), &[out]).unwrap()),
            )
            .unwrap();
            for _ in 0..3 {
                std::hint::black_box(layer.forward(&b, &x).unwrap());
                std::hint::black_box(layer.backward(&b, &dy).unwrap());
                let (dw, db) = layer.param_grads(&b, &x, &dy).unwrap();
                let (w, bias) = layer.params_mut();
                let mut params = vec![ParamGrad {
                    param: w,
                    grad: &dw,
                }];
                if let (Some(bias), Some(db)) = (bias, db.as_ref()) {
                    params.push(ParamGrad {
                        param: bias,
                        grad: db,
                    });
                }
                opt.step(&b, &mut params).unwrap();
            }
            (layer.num_parameters(), 0)
        }
        "lora" | "qlora" => {
            let w = rand_host(out * inp, 3);
            let bias = Some(b.from_host(&rand_host(out, 4), &[out]).unwrap());
            let base: Box<dyn Linear<NdArray>> = if mode == "lora" {
                Box::new(DenseLinear::new(b.from_host(&w, &[out, inp]).unwrap(), bias).unwrap())
            } else {
                let q = QuantConfig::qlora().quantize(&w, &[out, inp]).unwrap();
                drop(w);
                Box::new(QuantLinear::new(q, bias).unwrap())
            };
            let frozen = base.resident_bytes();
            let mut layer = LoraLinear::new("layer", base);
            layer
                .inject_lora(
                    &b,
                    &LoraSpec {
                        r,
                        alpha: 32.0,
                        ..LoraSpec::default()
                    },
                )
                .unwrap();
            for _ in 0..3 {
                std::hint::black_box(layer.forward(&b, &x, Mode::Train).unwrap());
                std::hint::black_box(layer.backward(&b, &dy).unwrap());
                opt.step(&b, &mut layer.params_and_grads()).unwrap();
            }
            (layer.num_trainable(), frozen)
        }
        other => {
            eprintln!("usage: lora-memory full|lora|qlora (got {other:?})");
            std::process::exit(2);
        }
    };
    println!(
        "{{\"mode\": \"{mode}\", \"shape\": \"{t}x{inp}x{out}r{r}\", \"trainable_parameters\": {trainable}, \"optimizer_state_bytes\": {}, \"frozen_weight_bytes\": {frozen_bytes}}}",
        opt.state_bytes()
    );
}
