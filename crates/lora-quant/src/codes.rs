//! The code tables of bitsandbytes' 4-bit and 8-bit blockwise formats, and its nearest-code
//! rule. Values are bit-for-bit the f32 tables bitsandbytes uses (checked against its own
//! tensors in `tests/quantization.rs`).

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

/// The two 4-bit data types of bitsandbytes / QLoRA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FourBitType {
    /// NormalFloat4: the 16 quantiles of a standard normal, scaled to [-1, 1] (QLoRA).
    Nf4,
    /// A 4-bit float (1 sign, 2 exponent, 1 mantissa bits), scaled to [-1, 1].
    Fp4,
}

impl FourBitType {
    /// `nf4` or `fp4`, as bitsandbytes and transformers spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            FourBitType::Nf4 => "nf4",
            FourBitType::Fp4 => "fp4",
        }
    }

    /// The 16 code values, indexed by the 4-bit code.
    pub fn code(self) -> &'static [f32; 16] {
        match self {
            FourBitType::Nf4 => &NF4,
            FourBitType::Fp4 => fp4(),
        }
    }

    /// The nearest-code quantizer for this type.
    pub(crate) fn quantizer(self) -> &'static Quantizer {
        static NF4_Q: OnceLock<Quantizer> = OnceLock::new();
        static FP4_Q: OnceLock<Quantizer> = OnceLock::new();
        match self {
            FourBitType::Nf4 => NF4_Q.get_or_init(|| Quantizer::new(&NF4)),
            FourBitType::Fp4 => FP4_Q.get_or_init(|| Quantizer::new(fp4())),
        }
    }
}

impl fmt::Display for FourBitType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FourBitType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "nf4" => Ok(FourBitType::Nf4),
            "fp4" => Ok(FourBitType::Fp4),
            other => Err(format!(
                "unknown 4-bit type {other:?} (expected nf4 or fp4)"
            )),
        }
    }
}

/// NF4, index 0..15 (bitsandbytes `get_4bit_type("nf4")`).
pub const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// FP4 in bit-pattern order (the sign is the top bit), divided by its largest magnitude
/// (12) in f32 exactly as bitsandbytes does. bitsandbytes writes the negative zero as the
/// integer `-0`, so code 8 is `+0.0` too.
fn fp4() -> &'static [f32; 16] {
    static FP4: OnceLock<[f32; 16]> = OnceLock::new();
    FP4.get_or_init(|| {
        const RAW: [f32; 16] = [
            0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0,
            -2.0, -3.0,
        ];
        RAW.map(|v| v / 12.0)
    })
}

/// bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map(signed=True)`), used for
/// the double-quantized absmax: 256 sorted values in [-1, 1].
///
/// The values are bitsandbytes' own f32 table, copied verbatim: it is built from
/// `torch.linspace`, whose vectorized CPU kernel rounds differently from any scalar formula
/// in the last bit. `tests/quantization.rs` checks every entry bit for bit against the
/// table bitsandbytes writes into files (`nested_quant_map`).
pub fn dynamic_map() -> &'static [f32; 256] {
    &DYNAMIC_MAP
}

#[rustfmt::skip]
#[allow(clippy::excessive_precision, clippy::unreadable_literal)]
const DYNAMIC_MAP: [f32; 256] = [
    -0.99296874, -0.9789063, -0.96484375, -0.9507812, -0.93671876, -0.92265624,
    -0.9085938, -0.89453125, -0.8804687, -0.86640626, -0.85234374, -0.8382813,
    -0.82421875, -0.8101562, -0.79609376, -0.78203124, -0.7679688, -0.75390625,
    -0.7398437, -0.72578126, -0.7117188, -0.6976563, -0.68359375, -0.6695312,
    -0.65546876, -0.6414063, -0.6273438, -0.61328125, -0.5992187, -0.58515626,
    -0.5710938, -0.5570313, -0.54296875, -0.5289062, -0.5148437, -0.50078124,
    -0.4867187, -0.47265625, -0.45859373, -0.44453126, -0.43046874, -0.41640624,
    -0.40234375, -0.38828123, -0.37421876, -0.36015624, -0.34609374, -0.33203125,
    -0.31796873, -0.30390626, -0.28984374, -0.27578127, -0.26171875, -0.24765624,
    -0.23359375, -0.21953125, -0.20546874, -0.19140625, -0.17734376, -0.16328125,
    -0.14921875, -0.13515624, -0.12109375, -0.107031256, -0.09859375, -0.09578126,
    -0.092968754, -0.09015625, -0.08734375, -0.08453125, -0.08171876, -0.07890625,
    -0.07609375, -0.07328125, -0.070468746, -0.067656256, -0.06484375, -0.06203125,
    -0.059218753, -0.05640625, -0.05359375, -0.05078125, -0.04796875, -0.04515625,
    -0.042343747, -0.03953125, -0.036718752, -0.03390625, -0.03109375, -0.028281251,
    -0.02546875, -0.02265625, -0.019843752, -0.01703125, -0.01421875, -0.01140625,
    -0.00971875, -0.009156249, -0.00859375, -0.00803125, -0.00746875, -0.00690625,
    -0.00634375, -0.00578125, -0.0052187503, -0.0046562497, -0.00409375, -0.0035312497,
    -0.00296875, -0.00240625, -0.00184375, -0.0012812499, -0.0009437501, -0.00083125,
    -0.00071875006, -0.0006062501, -0.00049375003, -0.00038125002, -0.00026875004, -0.00015625001,
    -8.875e-05, -6.625e-05, -4.375e-05, -2.1249998e-05, -7.75e-06, -3.2500002e-06,
    -5.5000004e-07, 0.0, 5.5000004e-07, 3.2500002e-06, 7.75e-06, 2.1249998e-05,
    4.375e-05, 6.625e-05, 8.875e-05, 0.00015625001, 0.00026875004, 0.00038125002,
    0.00049375003, 0.0006062501, 0.00071875006, 0.00083125, 0.0009437501, 0.0012812499,
    0.00184375, 0.00240625, 0.00296875, 0.0035312497, 0.00409375, 0.0046562497,
    0.0052187503, 0.00578125, 0.00634375, 0.00690625, 0.00746875, 0.00803125,
    0.00859375, 0.009156249, 0.00971875, 0.01140625, 0.01421875, 0.01703125,
    0.019843752, 0.02265625, 0.02546875, 0.028281251, 0.03109375, 0.03390625,
    0.036718752, 0.03953125, 0.042343747, 0.04515625, 0.04796875, 0.05078125,
    0.05359375, 0.05640625, 0.059218753, 0.06203125, 0.06484375, 0.067656256,
    0.070468746, 0.07328125, 0.07609375, 0.07890625, 0.08171876, 0.08453125,
    0.08734375, 0.09015625, 0.092968754, 0.09578126, 0.09859375, 0.107031256,
    0.12109375, 0.13515624, 0.14921875, 0.16328125, 0.17734376, 0.19140625,
    0.20546874, 0.21953125, 0.23359375, 0.24765624, 0.26171875, 0.27578127,
    0.28984374, 0.30390626, 0.31796873, 0.33203125, 0.34609374, 0.36015624,
    0.37421876, 0.38828123, 0.40234375, 0.41640624, 0.43046874, 0.44453126,
    0.45859373, 0.47265625, 0.4867187, 0.50078124, 0.5148437, 0.5289062,
    0.54296875, 0.5570313, 0.5710938, 0.58515626, 0.5992187, 0.61328125,
    0.6273438, 0.6414063, 0.65546876, 0.6695312, 0.68359375, 0.6976563,
    0.7117188, 0.72578126, 0.7398437, 0.75390625, 0.7679688, 0.78203124,
    0.79609376, 0.8101562, 0.82421875, 0.8382813, 0.85234374, 0.86640626,
    0.8804687, 0.89453125, 0.9085938, 0.92265624, 0.93671876, 0.9507812,
    0.96484375, 0.9789063, 0.99296874, 1.0,
];

/// Maps a value in [-1, 1] to the index of its nearest code, exactly as bitsandbytes does
/// on CPU: `torch.bucketize` against the f32 midpoints of the sorted codes, so a value on a
/// midpoint goes to the lower code.
#[derive(Debug)]
pub(crate) struct Quantizer {
    /// Midpoints between consecutive sorted codes.
    bounds: Vec<f32>,
    /// Sorted position -> code index.
    order: Vec<u8>,
}

impl Quantizer {
    pub(crate) fn new(code: &[f32]) -> Quantizer {
        let mut order: Vec<u8> = (0..code.len()).map(|i| i as u8).collect();
        // A stable sort, as torch.argsort on these 16 values: FP4's two zeros (indices 0
        // and 8, both +0.0) keep their order, so values in (-0.0026, 0] get code 0 and
        // values in (0, 0.0026] code 8, as in bitsandbytes.
        order.sort_by(|&a, &b| code[a as usize].total_cmp(&code[b as usize]));
        let bounds = order
            .windows(2)
            .map(|w| (code[w[0] as usize] + code[w[1] as usize]) / 2.0)
            .collect();
        Quantizer { bounds, order }
    }

    /// The code index for `x` (already scaled into [-1, 1]).
    #[inline]
    pub(crate) fn index(&self, x: f32) -> u8 {
        // bucketize(right=False): the first bound >= x.
        let pos = self.bounds.partition_point(|&b| b < x);
        self.order[pos]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nf4_and_fp4_are_in_range_and_quantize_to_themselves() {
        for t in [FourBitType::Nf4, FourBitType::Fp4] {
            let q = t.quantizer();
            for (i, &c) in t.code().iter().enumerate() {
                assert!((-1.0..=1.0).contains(&c));
                let j = q.index(c) as usize;
                assert_eq!(t.code()[j], c, "{t} code {i}");
            }
        }
        assert_eq!(fp4()[3], 1.0);
        assert_eq!(fp4()[1], 0.0625 / 12.0);
    }

    #[test]
    fn dynamic_map_is_sorted_signed_and_has_256_entries() {
        let m = dynamic_map();
        assert!(m.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(m[255], 1.0);
        assert!(m.contains(&0.0));
        assert!(m[0] < -0.99);
    }
}
