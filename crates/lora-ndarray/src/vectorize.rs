//! Elementwise kernels compiled for the CPU at hand. The crate builds for baseline x86-64
//! (SSE2), where LLVM calls libm per exponential and vectorizes 4 lanes at best; each
//! kernel here is also compiled with AVX2 and FMA enabled and picked at run time when the
//! CPU has them (`vectorized_kernel!`). Both builds run the same operations in the same
//! order (Rust never contracts a multiply and an add into an FMA on its own), so results
//! do not depend on the CPU. The kernels are the exponential-heavy loops of softmax, SiLU
//! and cross-entropy, as plain loops over [`exp`] for the vectorizer.
#![allow(unsafe_code)]

use crate::fast_exp::exp;

/// Defines `pub(crate) fn $name` twice, plain and with AVX2+FMA, and calls the second when
/// the CPU supports it.
macro_rules! vectorized_kernel {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty $body:block) => {
        $(#[$doc])*
        pub(crate) fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) -> $ret $body
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body
        }
    };
}

/// Elements summed in f32 lanes before the f64 total: each lane adds at most 32 terms.
const BLOCK: usize = 256;

/// `Σ v` over eight f32 lanes, in f64. A loop free of branches, so that it vectorizes (the
/// exponentials are taken in a separate loop for the same reason).
#[inline(always)]
fn lane_sum(v: &[f32]) -> f64 {
    let mut acc = [0.0f32; 8];
    let mut lanes = v.chunks_exact(8);
    for c in &mut lanes {
        for j in 0..8 {
            acc[j] += c[j];
        }
    }
    let tail: f32 = lanes.remainder().iter().sum();
    f64::from(acc.iter().sum::<f32>() + tail)
}

vectorized_kernel! {
    /// `Σ e^(x[i] - shift)`: eight f32 lanes per block of 256, blocks summed in f64.
    fn sum_exp(x: &[f32], shift: f32) -> f64 {
        let mut buf = [0.0f32; BLOCK];
        let mut total = 0.0f64;
        for block in x.chunks(BLOCK) {
            let e = &mut buf[..block.len()];
            e.iter_mut().zip(block).for_each(|(e, &v)| *e = exp(v - shift));
            total += lane_sum(e);
        }
        total
    }
}

vectorized_kernel! {
    /// In place `x[i] = e^(x[i] - shift)`; returns their sum as [`sum_exp`] adds it.
    fn exp_in_place_sum(x: &mut [f32], shift: f32) -> f64 {
        let mut total = 0.0f64;
        for block in x.chunks_mut(BLOCK) {
            block.iter_mut().for_each(|v| *v = exp(*v - shift));
            total += lane_sum(block);
        }
        total
    }
}

vectorized_kernel! {
    /// In place `x[i] = e^(x[i] - shift) · scale`.
    fn exp_scale_in_place(x: &mut [f32], shift: f32, scale: f32) -> () {
        x.iter_mut().for_each(|v| *v = exp(*v - shift) * scale);
    }
}

/// `1 / (1 + e^-x)`.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

vectorized_kernel! {
    /// `out[i] = x[i] · sigmoid(x[i])` (the second input is unused: the kernels share a
    /// signature).
    fn silu(x: &[f32], _unused: &[f32], out: &mut [f32]) -> () {
        out.iter_mut().zip(x).for_each(|(o, &v)| *o = v * sigmoid(v));
    }
}

vectorized_kernel! {
    /// `out[i] = dy[i] · s·(1 + x·(1 - s))` with `s = sigmoid(x[i])`.
    fn silu_backward(x: &[f32], dy: &[f32], out: &mut [f32]) -> () {
        out.iter_mut().zip(x.iter().zip(dy)).for_each(|(o, (&x, &g))| {
            let s = sigmoid(x);
            *o = g * s * (1.0 + x * (1.0 - s));
        });
    }
}
