//! Elementwise kernels compiled for the CPU at hand. The crate builds for baseline x86-64
//! (SSE2), where LLVM calls libm per exponential and vectorizes 4 lanes at best; each
//! kernel here is also compiled with AVX2 and FMA, and with AVX-512, and the widest the
//! CPU has is picked at run time (`vectorized_kernel!`, through `sgemm::isa`). Every build
//! runs the same operations in the same order, so results do not depend on the CPU: Rust
//! never contracts a multiply and an add into an FMA on its own, and where the kernels
//! fuse them (`mul_add`, in `exp` and GELU's polynomial) the builds without the FMA
//! instruction call libm's `fmaf`, which rounds once as the instruction does (correct but
//! slow: only CPUs without AVX2 take that path). The kernels are the exponential-heavy
//! loops of softmax, SiLU, GELU and cross-entropy, as plain loops over [`exp`] for the
//! vectorizer.
#![allow(unsafe_code)]

use crate::fast_exp::exp;

/// Defines `pub(crate) fn $name` three times, plain, with AVX2+FMA and with AVX-512, and
/// calls the widest the CPU supports.
macro_rules! vectorized_kernel {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty $body:block) => {
        $(#[$doc])*
        pub(crate) fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                fn avx512($($arg: $ty),*) -> $ret $body
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) -> $ret $body
                match crate::sgemm::isa() {
                    // SAFETY: `isa` found AVX-512 F/BW/DQ/VL with AVX2 and FMA.
                    Some(crate::sgemm::Isa::Avx512) => return unsafe { avx512($($arg),*) },
                    // SAFETY: `isa` found AVX2 and FMA.
                    Some(crate::sgemm::Isa::Avx2) => return unsafe { avx2($($arg),*) },
                    None => {}
                }
            }
            $body
        }

        /// Each build of the kernel on its own, for the tests that check they agree.
        #[cfg(test)]
        #[allow(dead_code)]
        pub(crate) mod $name {
            #[allow(unused_imports)]
            use super::*;

            pub(crate) fn plain($($arg: $ty),*) -> $ret $body

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            pub(crate) fn avx2($($arg: $ty),*) -> $ret $body

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
            pub(crate) fn avx512($($arg: $ty),*) -> $ret $body
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

vectorized_kernel! {
    /// In place: `x[i] = -∞` where `keep[i] == 0`; returns the largest value kept (`-∞`
    /// when none is). One branch-free pass in eight lanes (`f32::max`'s NaN rule kept the
    /// loop scalar; a NaN is never the maximum here either).
    fn mask_and_max(x: &mut [f32], keep: &[u32]) -> f32 {
        let n = x.len().min(keep.len());
        let (x, keep) = (&mut x[..n], &keep[..n]);
        let mut acc = [f32::NEG_INFINITY; 8];
        let masked = |v: f32, k: u32| if k != 0 { v } else { f32::NEG_INFINITY };
        let larger = |a: f32, b: f32| if b > a { b } else { a };
        let mut xs = x.chunks_exact_mut(8);
        let mut ks = keep.chunks_exact(8);
        for (c, k) in (&mut xs).zip(&mut ks) {
            for j in 0..8 {
                c[j] = masked(c[j], k[j]);
                acc[j] = larger(acc[j], c[j]);
            }
        }
        let mut max = acc.into_iter().fold(f32::NEG_INFINITY, larger);
        for (v, &k) in xs.into_remainder().iter_mut().zip(ks.remainder()) {
            *v = masked(*v, k);
            max = larger(max, *v);
        }
        max
    }
}

/// Adding 2^23 to an exponent field carries into the sign bit only when the field is all
/// ones: a NaN or an infinity.
#[inline(always)]
fn non_finite_bit(v: f32) -> u32 {
    (v.to_bits() & 0x7f80_0000).wrapping_add(0x0080_0000)
}

vectorized_kernel! {
    /// Whether every value is finite: [`non_finite_bit`] OR-ed over sixteen lanes, with no
    /// branch, so that the loop vectorizes. Over memory it runs at the bandwidth, as a
    /// plain loop does; over values a kernel has just written (in L1 or L2) it is several
    /// times faster.
    fn all_finite(x: &[f32]) -> bool {
        let mut acc = [0u32; 16];
        let mut chunks = x.chunks_exact(16);
        for c in &mut chunks {
            for j in 0..16 {
                acc[j] |= non_finite_bit(c[j]);
            }
        }
        let tail = chunks.remainder().iter().fold(0, |a, &v| a | non_finite_bit(v));
        acc.iter().fold(tail, |a, &v| a | v) & 0x8000_0000 == 0
    }
}

vectorized_kernel! {
    /// Softmax's backward on one row, in place: `g[j] = p[j]·(g[j] - Σ p·g)`, the sum over
    /// sixteen f32 lanes (one sequential f32 sum is a chain of dependent adds).
    fn softmax_backward_row(p: &[f32], g: &mut [f32]) -> () {
        let n = p.len().min(g.len());
        let (p, g) = (&p[..n], &mut g[..n]);
        let mut acc = [0.0f32; 16];
        let (mut ps, mut gs) = (p.chunks_exact(16), g.chunks_exact(16));
        for (pc, gc) in (&mut ps).zip(&mut gs) {
            for j in 0..16 {
                acc[j] += pc[j] * gc[j];
            }
        }
        let tail: f32 = ps.remainder().iter().zip(gs.remainder()).map(|(a, b)| a * b).sum();
        let dot = acc.iter().sum::<f32>() + tail;
        g.iter_mut().zip(p).for_each(|(g, &p)| *g = p * (*g - dot));
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

/// `erf(x)` by Abramowitz & Stegun 7.1.26: absolute error below 1.5e-7 (about one f32 ulp
/// of values near 1), one `exp` and no branches on the value, so that loops over it
/// vectorize (libm's `erff` branches per interval; as a scalar call per element, GELU was a
/// sixth of a BERT forward).
#[inline(always)]
fn erf(x: f32) -> f32 {
    erf_with_exp(x, exp(-x.abs() * x.abs()))
}

/// [`erf`] given `e = exp(-x²)` (computed as `exp(-|x|·|x|)`), for a caller that needs the
/// same exponential itself (GELU's backward: the normal density is `e` at `x / √2`).
#[inline(always)]
fn erf_with_exp(x: f32, e: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_7,
        -1.453_152,
        1.061_405_4,
    ];
    let a = x.abs();
    let t = 1.0 / P.mul_add(a, 1.0);
    let poly = t * t.mul_add(
        t.mul_add(t.mul_add(t.mul_add(A[4], A[3]), A[2]), A[1]),
        A[0],
    );
    let y = (-poly).mul_add(e, 1.0);
    y.copysign(x)
}

/// The standard normal CDF `Φ(x) = (1 + erf(x / √2)) / 2`.
#[inline(always)]
fn normal_cdf(x: f32) -> f32 {
    erf(x * std::f32::consts::FRAC_1_SQRT_2).mul_add(0.5, 0.5)
}

vectorized_kernel! {
    /// `out[i] = x[i] · Φ(x[i])`, the exact (erf) GELU of BERT (the second input is unused:
    /// the kernels share a signature).
    fn gelu(x: &[f32], _unused: &[f32], out: &mut [f32]) -> () {
        out.iter_mut().zip(x).for_each(|(o, &v)| *o = v * normal_cdf(v));
    }
}

vectorized_kernel! {
    /// `out[i] = dy[i] · (Φ(x) + x·φ(x))`, `φ` the standard normal density.
    fn gelu_backward(x: &[f32], dy: &[f32], out: &mut [f32]) -> () {
        // 1/√(2π)
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        out.iter_mut().zip(x.iter().zip(dy)).for_each(|(o, (&x, &g))| {
            // One exponential for both terms: e^(-x²/2) is erf's e^(-a²) at a = x/√2.
            let a = x * std::f32::consts::FRAC_1_SQRT_2;
            let e = exp(-a.abs() * a.abs());
            let cdf = erf_with_exp(a, e).mul_add(0.5, 0.5);
            *o = g * x.mul_add(e * INV_SQRT_2PI, cdf);
        });
    }
}

/// `Σ f(v)` over `v`, in eight f64 lanes (a fixed order on every CPU).
#[inline(always)]
fn lanes_f64(v: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut acc = [0.0f64; 8];
    let mut chunks = v.chunks_exact(8);
    for c in &mut chunks {
        for j in 0..8 {
            acc[j] += f(c[j]);
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&v| f(v)).sum();
    acc.iter().sum::<f64>() + tail
}

/// LayerNorm of one row into `out`; returns `(mean, 1/sqrt(var + eps))`. Two passes in
/// f64 (no cancellation in the variance), each over eight lanes: a single f64 sum is a
/// chain of dependent adds, four cycles an element.
#[inline(always)]
fn layer_norm_row_body(row: &[f32], g: &[f32], b: &[f32], eps: f32, out: &mut [f32]) -> (f32, f32) {
    let n = row.len() as f64;
    let mean = lanes_f64(row, f64::from) / n;
    let var = lanes_f64(row, |v| (f64::from(v) - mean).powi(2)) / n;
    let rstd = 1.0 / (var + f64::from(eps)).sqrt();
    let (mean, rstd) = (mean as f32, rstd as f32);
    for (((o, &v), &g), &b) in out.iter_mut().zip(row).zip(g).zip(b) {
        *o = (v - mean) * rstd * g + b;
    }
    (mean, rstd)
}

vectorized_kernel! {
    /// LayerNorm of one row (see [`layer_norm_row_body`]).
    fn layer_norm_row(row: &[f32], g: &[f32], b: &[f32], eps: f32, out: &mut [f32]) -> (f32, f32) {
        layer_norm_row_body(row, g, b, eps, out)
    }
}

vectorized_kernel! {
    /// `sum = x + residual`, then the LayerNorm of `sum` into `out`, while the row is in L1.
    fn add_layer_norm_row(
        x: &[f32],
        residual: &[f32],
        sum: &mut [f32],
        norm: (&[f32], &[f32], f32),
        out: &mut [f32],
    ) -> (f32, f32) {
        sum.iter_mut().zip(x.iter().zip(residual)).for_each(|(s, (&a, &r))| *s = a + r);
        layer_norm_row_body(sum, norm.0, norm.1, norm.2, out)
    }
}

vectorized_kernel! {
    /// `dx` of one LayerNorm row: `rstd·(g·dy - mean(g·dy) - x̂·mean(g·dy·x̂))`, the two
    /// means over sixteen f32 lanes.
    fn layer_norm_backward_row(row: &[f32], dy: &[f32], g: &[f32], stats: (f32, f32), out: &mut [f32]) -> () {
        let (mean, rstd) = stats;
        let (mut s1, mut s2) = ([0.0f32; 16], [0.0f32; 16]);
        let n = row.len();
        let (mut rows, mut dys, mut gs) = (row.chunks_exact(16), dy.chunks_exact(16), g.chunks_exact(16));
        for ((r, d), gm) in (&mut rows).zip(&mut dys).zip(&mut gs) {
            for j in 0..16 {
                let gd = gm[j] * d[j];
                s1[j] += gd;
                s2[j] += gd * (r[j] - mean) * rstd;
            }
        }
        for ((&v, &d), &gm) in rows.remainder().iter().zip(dys.remainder()).zip(gs.remainder()) {
            let gd = gm * d;
            s1[0] += gd;
            s2[0] += gd * (v - mean) * rstd;
        }
        let m1 = s1.iter().sum::<f32>() / n as f32;
        let m2 = s2.iter().sum::<f32>() / n as f32;
        for (((o, &v), &d), &gm) in out.iter_mut().zip(row).zip(dy).zip(g) {
            let xhat = (v - mean) * rstd;
            *o = rstd * (gm * d - m1 - xhat * m2);
        }
    }
}

/// `kernel(a, b, out)` over equal-length slices into a new buffer, in chunks on several
/// threads when large.
pub(crate) fn par_kernel(
    a: &[f32],
    b: &[f32],
    kernel: impl Fn(&[f32], &[f32], &mut [f32]) + Sync + Send,
) -> Vec<f32> {
    use rayon::prelude::*;

    use crate::backend::{PAR_CHUNK, PAR_MIN_ELEMS};
    let mut out = crate::pool::take_for_overwrite(a.len());
    if a.len() < PAR_MIN_ELEMS {
        kernel(a, b, &mut out);
    } else {
        out.par_chunks_mut(PAR_CHUNK)
            .zip(a.par_chunks(PAR_CHUNK).zip(b.par_chunks(PAR_CHUNK)))
            .for_each(|(o, (x, y))| kernel(x, y, o));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `erf` in f64 by its Taylor series (converges everywhere; on `|x| <= 4` the largest
    /// term is below 1e7, so the sum keeps 1e-9), and `±1` beyond (`erfc(4) < 2e-8`).
    fn erf64(x: f64) -> f64 {
        if x.abs() > 4.0 {
            return x.signum();
        }
        let (mut term, mut sum) = (x, x);
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn gelu_and_its_derivative_equal_f64_references() {
        let x: Vec<f32> = (0..=24_000).map(|i| -12.0 + i as f32 * 1e-3).collect();
        let ones = vec![1.0f32; x.len()];
        let (mut y, mut dy) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        gelu(&x, &x, &mut y);
        gelu_backward(&x, &ones, &mut dy);
        for ((&x, &y), &dy) in x.iter().zip(&y).zip(&dy) {
            let v = f64::from(x);
            let cdf = 0.5 * (1.0 + erf64(v / 2f64.sqrt()));
            let pdf = (-0.5 * v * v).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let tol = 3e-7 * (1.0 + v.abs());
            assert!((f64::from(y) - v * cdf).abs() <= tol, "gelu({x}) = {y}");
            assert!(
                (f64::from(dy) - (cdf + v * pdf)).abs() <= tol,
                "gelu'({x}) = {dy}"
            );
        }
        // NaN propagates.
        gelu(&[f32::NAN], &[0.0], &mut y[..1]);
        assert!(y[0].is_nan());
    }

    /// The plain, AVX2 and AVX-512 builds of the exponential-based kernels give the same
    /// bits (the fused multiply-adds round once in each), on values across `exp`'s range,
    /// at lengths that leave vector tails.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn every_build_of_the_exponential_kernels_gives_the_same_bits() {
        let x: Vec<f32> = (0..4099)
            .map(|i| ((i as f32) * 0.618_034).sin() * 12.0 + (i % 7) as f32 * 1e-3)
            .collect();
        let dy: Vec<f32> = x.iter().map(|v| 1.0 - v * 0.1).collect();
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        type Pair = fn(&[f32], &[f32], &mut [f32]);
        let run = |f: Pair| {
            let mut out = vec![0.0; x.len()];
            f(&x, &dy, &mut out);
            bits(&out)
        };
        let have_avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        let have_avx512 = have_avx2
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx512vl");
        // SAFETY (each build's call in `builds!`): only made below where the CPU has the
        // build's features (`have_avx2`, `have_avx512`).
        macro_rules! builds {
            ($k:ident) => {
                (
                    stringify!($k),
                    $k::plain as Pair,
                    (|a, b, c| unsafe { $k::avx2(a, b, c) }) as Pair,
                    (|a, b, c| unsafe { $k::avx512(a, b, c) }) as Pair,
                )
            };
        }
        let kernels = [
            builds!(gelu),
            builds!(gelu_backward),
            builds!(silu),
            builds!(silu_backward),
        ];
        for (name, plain, avx2, avx512) in kernels {
            let want = run(plain);
            if have_avx2 {
                assert_eq!(run(avx2), want, "{name}: AVX2 build");
            }
            if have_avx512 {
                assert_eq!(run(avx512), want, "{name}: AVX-512 build");
            }
        }
        let exps = |f: fn(&mut [f32], f32, f32)| {
            let mut v = x.clone();
            f(&mut v, 0.5, 0.25);
            bits(&v)
        };
        let want = exps(exp_scale_in_place::plain);
        if have_avx2 {
            assert_eq!(
                // SAFETY: the CPU has AVX2 and FMA (checked above).
                exps(|v, s, k| unsafe { exp_scale_in_place::avx2(v, s, k) }),
                want
            );
        }
        if have_avx512 {
            assert_eq!(
                // SAFETY: the CPU has the AVX-512 subsets and AVX2 (checked above).
                exps(|v, s, k| unsafe { exp_scale_in_place::avx512(v, s, k) }),
                want
            );
        }
    }

    #[test]
    fn mask_and_max_masks_and_finds_the_largest_kept_value() {
        // 19 values: two full lanes of eight and a remainder; the largest value is masked.
        let x: Vec<f32> = (0..19).map(|i| ((i * 7) % 19) as f32 - 9.0).collect();
        let keep: Vec<u32> = (0..19).map(|i| u32::from(i % 4 != 0)).collect();
        let mut got = x.clone();
        let max = mask_and_max(&mut got, &keep);
        let want = x
            .iter()
            .zip(&keep)
            .filter(|&(_, &k)| k != 0)
            .map(|(&v, _)| v)
            .fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(max, want);
        assert!(x.iter().zip(&keep).any(|(&v, &k)| k == 0 && v > want));
        for ((&g, &v), &k) in got.iter().zip(&x).zip(&keep) {
            assert_eq!(g, if k != 0 { v } else { f32::NEG_INFINITY });
        }
        // Nothing kept: -inf.
        let mut none = vec![1.0f32; 10];
        assert_eq!(mask_and_max(&mut none, &[0; 10]), f32::NEG_INFINITY);
    }

    /// Every non-finite value (NaN, ±inf) at every position of slices of every length up to
    /// 40 (whole 16-lane chunks and tails) is found; the largest finite values, subnormals
    /// and zeros are not mistaken for one.
    #[test]
    fn all_finite_finds_every_non_finite_value() {
        let finite = [f32::MAX, f32::MIN, f32::MIN_POSITIVE / 2.0, -0.0, 1.5];
        for len in 0..=40 {
            let mut x: Vec<f32> = (0..len).map(|i| finite[i % finite.len()]).collect();
            assert!(all_finite(&x), "len {len}");
            for at in 0..len {
                for bad in [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    let keep = x[at];
                    x[at] = bad;
                    assert!(!all_finite(&x), "{bad} at {at} of {len}");
                    x[at] = keep;
                }
            }
        }
    }
}
