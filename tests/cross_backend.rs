//! Every backend compiled in against the ndarray reference: each primitive, every optimizer
//! step, QLoRA layers over NF4/FP4/int8 bases, the transformer primitives and a tiny BERT
//! with a PEFT adapter (forward and adapter gradients), and a 20-step training run (forward, backward, AdamW, dropout on), f32 at rtol
//! 1e-4 / atol 1e-5. A new backend joins with one line in `backends!`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(unused_imports)]
use lora_tests::cross_backend::{
    check_every_optimizer, check_every_primitive, check_quantized_layers, check_transformer_ops,
    train_twenty_steps,
};
#[allow(unused_imports)]
use lora_tests::{assert_close, to64};

#[allow(unused_macros)]
macro_rules! backends {
    ($($name:ident => $make:expr),* $(,)?) => {
        $(
            mod $name {
                use super::*;

                #[test]
                fn every_primitive_equals_the_reference() {
                    check_every_primitive(&$make);
                }

                #[test]
                fn every_optimizer_step_equals_the_reference() {
                    check_every_optimizer(&$make);
                }

                #[test]
                fn transformer_ops_and_bert_equal_the_reference() {
                    check_transformer_ops(&$make);
                }

                #[test]
                fn quantized_layers_equal_the_reference() {
                    check_quantized_layers(&$make);
                }

                #[test]
                fn twenty_step_training_run_equals_the_reference() {
                    let (l_ref, p_ref) = train_twenty_steps(&lora::NdArray::new());
                    let (l, p) = train_twenty_steps(&$make);
                    assert!(l_ref[19] < l_ref[0], "training reduces the loss");
                    assert_close("losses", &l.iter().map(|v| *v as f32).collect::<Vec<_>>(), &l_ref, 1e-4, 1e-5);
                    assert_close("adapter parameters after 20 steps", &p, &to64(&p_ref), 1e-4, 1e-5);
                }
            }
        )*
    };
}

#[cfg(feature = "tch")]
backends! {
    tch => lora::Tch::cpu(),
}

/// CUDA joins when the crate is built with `--features cuda`; without a driver or a
/// device every test prints why and returns.
#[cfg(feature = "cuda")]
mod cuda {
    use super::*;

    fn backend() -> Option<lora::Cuda> {
        match lora::Cuda::new(0) {
            Ok(b) => Some(b),
            Err(e) => {
                // stdout, so that `cargo xtask test` sees the reason (it reads stdout).
                println!("skipped: CUDA backend unavailable: {e}");
                None
            }
        }
    }

    #[test]
    fn every_primitive_equals_the_reference() {
        let Some(b) = backend() else { return };
        check_every_primitive(&b);
    }

    #[test]
    fn every_optimizer_step_equals_the_reference() {
        let Some(b) = backend() else { return };
        check_every_optimizer(&b);
    }

    #[test]
    fn transformer_ops_and_bert_equal_the_reference() {
        let Some(b) = backend() else { return };
        check_transformer_ops(&b);
    }

    #[test]
    fn quantized_layers_equal_the_reference() {
        let Some(b) = backend() else { return };
        check_quantized_layers(&b);
    }

    #[test]
    fn twenty_step_training_run_equals_the_reference() {
        let Some(b) = backend() else { return };
        let (l_ref, p_ref) = train_twenty_steps(&lora::NdArray::new());
        let (l, p) = train_twenty_steps(&b);
        assert_close(
            "losses",
            &l.iter().map(|v| *v as f32).collect::<Vec<_>>(),
            &l_ref,
            1e-4,
            1e-5,
        );
        assert_close(
            "adapter parameters after 20 steps",
            &p,
            &to64(&p_ref),
            1e-4,
            1e-5,
        );
    }

    /// The dropout mask is generated on the device from the same Philox stream: bit for
    /// bit the host's.
    #[test]
    fn dropout_mask_is_bit_identical_to_the_host() {
        let Some(b) = backend() else { return };
        use lora::Backend;
        let rng = lora::rng::RngState {
            seed: 42,
            stream: 7,
            offset: 12,
        };
        let dev = b
            .to_host(&b.dropout_mask(&[37, 19], 0.3, rng).unwrap())
            .unwrap();
        let host = lora::NdArray::new()
            .to_host(
                &lora::NdArray::new()
                    .dropout_mask(&[37, 19], 0.3, rng)
                    .unwrap(),
            )
            .unwrap();
        assert_eq!(dev, host);
    }
}
