//! Every backend compiled in against the ndarray reference: each primitive, every optimizer
//! step, QLoRA layers over NF4/FP4/int8 bases, the transformer primitives and a tiny BERT
//! with a PEFT adapter (forward and adapter gradients), and a 20-step training run (forward, backward, AdamW, dropout on), f32 at rtol
//! 1e-4 / atol 1e-5. Every backend but the reference runs it through `backend_suite!`
//! (tests/common/backend_suite.rs), where a new backend joins with one line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lora_tests::backend_suite;
#[allow(unused_imports)]
use lora_tests::cross_backend::{
    check_every_optimizer, check_every_primitive, check_quantized_layers, check_transformer_ops,
    train_twenty_steps,
};
#[allow(unused_imports)]
use lora_tests::{assert_close, to64};

backend_suite! { against_reference:
    fn every_primitive_equals_the_reference(b) {
        check_every_primitive(b);
    }

    fn every_optimizer_step_equals_the_reference(b) {
        check_every_optimizer(b);
    }

    fn transformer_ops_and_bert_equal_the_reference(b) {
        check_transformer_ops(b);
    }

    fn quantized_layers_equal_the_reference(b) {
        check_quantized_layers(b);
    }

    fn twenty_step_training_run_equals_the_reference(b) {
        let (l_ref, p_ref) = train_twenty_steps(&lora::NdArray::new());
        let (l, p) = train_twenty_steps(b);
        assert!(l_ref[19] < l_ref[0], "training reduces the loss");
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
    fn dropout_mask_is_bit_identical_to_the_host(b) {
        use lora::Backend;
        let rng = lora::rng::RngState {
            seed: 42,
            stream: 7,
            offset: 12,
        };
        let dev = b.to_host(&b.dropout_mask(&[37, 19], 0.3, rng).unwrap()).unwrap();
        let reference = lora::NdArray::new();
        let host = reference
            .to_host(&reference.dropout_mask(&[37, 19], 0.3, rng).unwrap())
            .unwrap();
        assert_eq!(dev, host);
    }
}
