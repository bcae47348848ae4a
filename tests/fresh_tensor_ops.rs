//! `Backend::matmul` (a product into a fresh tensor), `Backend::matmul_plus` (a product plus
//! a low-depth one, which ndarray runs as one product over the concatenated depth) and `LoraOps::scale_features` (DoRA's
//! per-feature scale) on every backend, the reference included, against the host: both
//! have fused overrides (ndarray writes the product without a zero-fill).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(unused_imports)]
use lora_tests::backend_suite;
#[allow(unused_imports)]
use lora_tests::matmul_check::{check_matmul, check_matmul_plus, check_scale_features};

backend_suite! { all:
    fn matmul_equals_the_host_product(b) {
        check_matmul(b);
    }

    fn matmul_plus_equals_the_host_products(b) {
        check_matmul_plus(b);
    }

    fn scale_features_equals_the_host(b) {
        check_scale_features(b);
    }
}
