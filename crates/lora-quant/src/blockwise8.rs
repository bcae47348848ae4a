//! bitsandbytes' blockwise 8-bit quantization with a 256-entry code (its `quantize_blockwise`),
//! which double quantization uses for the 4-bit scales.

use crate::absmax::scale_block;
use crate::codes::Quantizer;

/// Values quantized blockwise to 8-bit indices into a 256-entry code.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockwiseU8 {
    /// One index per value.
    pub codes: Vec<u8>,
    /// One f32 absmax per block.
    pub absmax: Vec<f32>,
    /// The 256 code values (files carry them as `nested_quant_map`).
    pub code: Vec<f32>,
    /// Values per block.
    pub blocksize: usize,
}

impl BlockwiseU8 {
    /// The value at `i`: `code[codes[i]] * absmax[i / blocksize]`.
    #[inline]
    pub fn value(&self, i: usize) -> f32 {
        self.code[self.codes[i] as usize] * self.absmax[i / self.blocksize]
    }

    /// All values.
    pub fn dequantize(&self) -> Vec<f32> {
        (0..self.codes.len()).map(|i| self.value(i)).collect()
    }

    /// Bytes of storage (codes and absmax; the code table is a constant).
    pub fn storage_bytes(&self) -> usize {
        self.codes.len() + self.absmax.len() * 4
    }
}

/// Quantizes `values` blockwise to the nearest entries of a sorted 256-value `code`.
pub fn quantize_blockwise_u8(values: &[f32], code: &[f32; 256], blocksize: usize) -> BlockwiseU8 {
    let quantizer = Quantizer::new(code);
    let mut codes = Vec::with_capacity(values.len());
    let absmax = values
        .chunks(blocksize)
        .map(|block| {
            let absmax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            if absmax == 0.0 {
                // bitsandbytes' CPU kernel stores absmax 0 and code 0 for an all-zero block
                // (which happens when every absmax equals their mean); it dequantizes to 0.
                codes.extend(std::iter::repeat_n(0u8, block.len()));
                return 0.0;
            }
            scale_block(block, block.len() == blocksize, |x| {
                codes.push(quantizer.index(x));
            })
        })
        .collect();
    BlockwiseU8 {
        codes,
        absmax,
        code: code.to_vec(),
        blocksize,
    }
}
