//! `e^x` for f32 written so that LLVM vectorizes loops over it (glibc's `expf` is a call
//! per element): Cody-Waite range reduction `x = n·ln2 + r` with `n` rounded by the 1.5·2²³
//! trick, Cephes' degree-5 polynomial for `e^r` on `|r| <= ln2/2`, and `2^n` built in the
//! exponent bits. Within 2 ulp of the exact value on the normal range (tested below against
//! f64); 0 below `ln(f32::MIN_POSITIVE)`, where the result would be subnormal, as masked
//! softmax entries need. The reduction and the polynomial are fused multiply-adds
//! (`mul_add`: one rounding each, the same bits with or without the FMA instruction; see
//! `vectorize.rs`): the MiniLM forward, whose GELU and softmax exponentials run through
//! here, went 319-339 → 315-324 ms in four alternating pairs on the Xeon VM
//! (docs/performance/stops-29-31.md, stop 30).

/// Below this, `e^x` is under the smallest normal f32.
const MIN_ARG: f32 = -87.336_54;
/// Above this, `e^x` overflows f32.
const MAX_ARG: f32 = 88.376_26;

/// `e^x` (see the module docs for its accuracy and range).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that `n · LN2_HI` is exact for the `n` that occur.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer (ties to even).
    const ROUND: f32 = 12_582_912.0;
    // max/min (not clamp) vectorize; they map NaN to MIN_ARG, handled at the end.
    #[allow(clippy::manual_clamp)]
    let xc = x.max(MIN_ARG).min(MAX_ARG);
    let big = xc * LOG2E + ROUND;
    let n = big - ROUND;
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, xc));
    let mut p = 1.987_569_1e-4_f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let er = p.mul_add(r * r, r) + 1.0;
    // `big`'s bits are those of 1.5·2²³ plus n: integer arithmetic on them gives 2ⁿ's
    // exponent field without a float-to-int conversion (which would not vectorize).
    let n_bits = big.to_bits().wrapping_sub(ROUND.to_bits());
    let two_n = f32::from_bits(n_bits.wrapping_add(127) << 23);
    if x < MIN_ARG {
        0.0
    } else if x.is_nan() {
        x
    } else {
        er * two_n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place between `got` and the correctly rounded value.
    fn ulps(got: f32, want: f64) -> f64 {
        let w = want as f32;
        let ulp = (f32::from_bits(w.to_bits() + 1) - w) as f64;
        ((got as f64) - want).abs() / ulp
    }

    #[test]
    fn within_two_ulp_of_f64_exp_on_the_normal_range() {
        let mut worst = (0.0f64, 0.0f32);
        let steps = 2_000_000;
        for i in 0..=steps {
            let x = MIN_ARG + (88.0 - MIN_ARG) * i as f32 / steps as f32;
            let u = ulps(exp(x), (x as f64).exp());
            if u > worst.0 {
                worst = (u, x);
            }
        }
        assert!(worst.0 <= 2.0, "{} ulp at x = {}", worst.0, worst.1);
    }

    #[test]
    fn edges_zero_nan_and_exact_points() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-1e30), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-88.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(88.0).is_finite() && exp(88.0) > 1e38);
        assert!(ulps(exp(1.0), 1f64.exp()) <= 1.0);
    }
}
