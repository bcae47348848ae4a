//! bitsandbytes' blockwise 4-bit format (NF4 / FP4), optionally with double quantization of
//! the per-block scales. This is the frozen-base storage of QLoRA.

use lora_core::{Error, Result};
use rayon::prelude::*;

use crate::absmax::scale_block;
use crate::blockwise8::{BlockwiseU8, quantize_blockwise_u8};
use crate::codes::{FourBitType, dynamic_map};

/// The blocksizes bitsandbytes accepts for 4-bit quantization.
pub const FOUR_BIT_BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// The blocksize of the second (8-bit) quantization of the absmax values.
pub const NESTED_BLOCKSIZE: usize = 256;

/// Values per parallel work item when (de)quantizing; a multiple of every blocksize.
const PAR_CHUNK: usize = 1 << 16;

/// The per-block scales of a 4-bit weight.
#[derive(Clone, Debug, PartialEq)]
pub enum Absmax {
    /// One f32 per block.
    F32(Vec<f32>),
    /// Double quantization: `absmax - offset` stored blockwise in 8 bits.
    Double {
        /// `absmax - offset`, quantized with the signed dynamic map.
        scales: BlockwiseU8,
        /// The mean of the absmax values, added back when dequantizing.
        offset: f32,
    },
}

/// A blockwise 4-bit weight, laid out as bitsandbytes' `Params4bit`: the flattened
/// row-major weight split into blocks of `blocksize` values, one scale (absmax) per block,
/// two 4-bit codes per byte with the first value in the high nibble.
#[derive(Clone, Debug, PartialEq)]
pub struct FourBitWeight {
    /// NF4 or FP4.
    pub quant_type: FourBitType,
    /// Values per block.
    pub blocksize: usize,
    /// The original shape (row-major).
    pub shape: Vec<usize>,
    /// `ceil(n / 2)` bytes of packed codes.
    pub packed: Vec<u8>,
    /// The 16 code values (bitsandbytes' `quant_map`; files carry it).
    pub code: [f32; 16],
    /// The per-block scales.
    pub absmax: Absmax,
}

/// Checks a 4-bit blocksize.
pub fn check_blocksize(blocksize: usize) -> Result<()> {
    if FOUR_BIT_BLOCKSIZES.contains(&blocksize) {
        Ok(())
    } else {
        Err(Error::InvalidConfig {
            context: "4-bit quantization".into(),
            field: "blocksize",
            value: blocksize.to_string(),
            reason: format!("bitsandbytes accepts {FOUR_BIT_BLOCKSIZES:?}"),
        })
    }
}

impl FourBitWeight {
    /// Quantizes a row-major tensor. `double_quant` also quantizes the scales (QLoRA's
    /// double quantization). Non-finite values are refused.
    pub fn quantize(
        data: &[f32],
        shape: &[usize],
        quant_type: FourBitType,
        blocksize: usize,
        double_quant: bool,
    ) -> Result<FourBitWeight> {
        check_blocksize(blocksize)?;
        let n: usize = shape.iter().product();
        if n != data.len() || n == 0 {
            return Err(Error::InvalidConfig {
                context: "4-bit quantization".into(),
                field: "shape",
                value: format!("{shape:?}"),
                reason: format!("{} values given", data.len()),
            });
        }
        if data.iter().any(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                context: "4-bit quantization".into(),
                tensor: "weight".into(),
                shape: shape.into(),
            });
        }
        let quantizer = quant_type.quantizer();
        let blocks = n.div_ceil(blocksize);
        let mut absmax = vec![0.0f32; blocks];
        let mut packed = vec![0u8; n.div_ceil(2)];
        // PAR_CHUNK is a multiple of every blocksize and even, so chunks hold whole blocks
        // and whole bytes.
        let per_chunk_blocks = PAR_CHUNK / blocksize;
        packed
            .par_chunks_mut(PAR_CHUNK / 2)
            .zip(absmax.par_chunks_mut(per_chunk_blocks))
            .enumerate()
            .for_each(|(c, (bytes, scales))| {
                let start = c * PAR_CHUNK;
                let end = (start + PAR_CHUNK).min(n);
                let mut k = 0usize; // value index within the chunk
                for (b, block) in data[start..end].chunks(blocksize).enumerate() {
                    scales[b] = scale_block(block, block.len() == blocksize, |x| {
                        let q = quantizer.index(x);
                        let byte = &mut bytes[k / 2];
                        if k & 1 == 0 {
                            *byte = q << 4;
                        } else {
                            *byte |= q;
                        }
                        k += 1;
                    });
                }
            });
        let absmax = if double_quant {
            Absmax::double(&absmax)
        } else {
            Absmax::F32(absmax)
        };
        Ok(FourBitWeight {
            quant_type,
            blocksize,
            shape: shape.to_vec(),
            packed,
            code: *quant_type.code(),
            absmax,
        })
    }

    /// Number of values.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Number of blocks.
    pub fn blocks(&self) -> usize {
        self.numel().div_ceil(self.blocksize)
    }

    /// Whether the scales are double-quantized.
    pub fn double_quant(&self) -> bool {
        matches!(self.absmax, Absmax::Double { .. })
    }

    /// The f32 scale of every block (dequantizing double-quantized scales).
    pub fn absmax_f32(&self) -> Vec<f32> {
        match &self.absmax {
            Absmax::F32(v) => v.clone(),
            Absmax::Double { scales, offset } => {
                let mut v = scales.dequantize();
                v.iter_mut().for_each(|a| *a += offset);
                v
            }
        }
    }

    /// The f32 scale of one block.
    #[inline]
    fn block_scale(&self, block: usize) -> f32 {
        match &self.absmax {
            Absmax::F32(v) => v[block],
            Absmax::Double { scales, offset } => scales.value(block) + offset,
        }
    }

    /// Dequantizes values `start..start + out.len()` of the flattened weight into `out`
    /// (`code[index] * absmax[block]`, as bitsandbytes), in parallel for large ranges.
    pub fn dequantize_range(&self, start: usize, out: &mut [f32]) {
        if out.len() <= PAR_CHUNK {
            self.dequantize_serial(start, out);
        } else {
            out.par_chunks_mut(PAR_CHUNK)
                .enumerate()
                .for_each(|(c, chunk)| self.dequantize_serial(start + c * PAR_CHUNK, chunk));
        }
    }

    /// One thread's share of [`Self::dequantize_range`]: block by block, with the block's
    /// 16 scaled code values looked up a byte (two values) at a time.
    fn dequantize_serial(&self, start: usize, out: &mut [f32]) {
        let bs = self.blocksize;
        let mut e = start;
        let mut rest = out;
        while !rest.is_empty() {
            let block = e / bs;
            let take = ((block + 1) * bs - e).min(rest.len());
            let scale = self.block_scale(block);
            let table: [f32; 16] = self.code.map(|c| c * scale);
            let (mut seg, tail) = rest.split_at_mut(take);
            let mut v = e;
            if v & 1 == 1 {
                // An odd start: the low nibble of the byte the previous value used.
                seg[0] = table[(self.packed[v / 2] & 0x0f) as usize];
                seg = &mut seg[1..];
                v += 1;
            }
            let pairs = seg.len() / 2;
            let bytes = &self.packed[v / 2..v / 2 + pairs];
            let (even, last) = seg.split_at_mut(pairs * 2);
            for (o, &byte) in even.chunks_exact_mut(2).zip(bytes) {
                o[0] = table[(byte >> 4) as usize];
                o[1] = table[(byte & 0x0f) as usize];
            }
            if let Some(o) = last.first_mut() {
                *o = table[(self.packed[(v + pairs * 2) / 2] >> 4) as usize];
            }
            e += take;
            rest = tail;
        }
    }

    /// The whole weight in f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.numel()];
        self.dequantize_range(0, &mut out);
        out
    }

    /// Bytes of storage: packed codes plus scales (plus the nested scales and offset).
    pub fn storage_bytes(&self) -> usize {
        self.packed.len()
            + match &self.absmax {
                Absmax::F32(v) => v.len() * 4,
                Absmax::Double { scales, .. } => scales.storage_bytes() + 4,
            }
    }
}

impl Absmax {
    /// Double quantization as bitsandbytes: subtract the mean, quantize blockwise (256)
    /// with the signed dynamic map.
    pub fn double(absmax: &[f32]) -> Absmax {
        // torch's f32 mean; summed in f64 here, which can differ from torch's pairwise f32
        // sum in the last bit (see docs/formats.md, "ties").
        let offset =
            (absmax.iter().map(|&v| f64::from(v)).sum::<f64>() / absmax.len() as f64) as f32;
        let centred: Vec<f32> = absmax.iter().map(|&v| v - offset).collect();
        Absmax::Double {
            scales: quantize_blockwise_u8(&centred, dynamic_map(), NESTED_BLOCKSIZE),
            offset,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every sub-range (odd and even starts, block-straddling, partial last block)
    /// dequantizes to the same values as the whole weight.
    #[test]
    fn any_range_equals_the_slice_of_the_whole() {
        let data: Vec<f32> = (0..357)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        for (t, dq) in [(FourBitType::Nf4, true), (FourBitType::Fp4, false)] {
            let w = FourBitWeight::quantize(&data, &[7, 51], t, 32, dq)
                .unwrap_or_else(|e| panic!("{e}"));
            let full = w.dequantize();
            for start in [0, 1, 2, 31, 32, 33, 50, 51, 101] {
                for len in [1, 2, 3, 31, 64, 357 - start] {
                    if start + len > 357 {
                        continue;
                    }
                    let mut out = vec![0.0; len];
                    w.dequantize_range(start, &mut out);
                    assert_eq!(out, full[start..start + len], "{t} start {start} len {len}");
                }
            }
        }
    }

    #[test]
    fn bad_blocksize_and_non_finite_values_are_errors() {
        let e = FourBitWeight::quantize(&[1.0; 64], &[1, 64], FourBitType::Nf4, 48, false);
        assert!(e.is_err_and(|e| e.to_string().contains("blocksize")));
        let e = FourBitWeight::quantize(&[f32::NAN; 64], &[1, 64], FourBitType::Nf4, 64, false);
        assert!(e.is_err_and(|e| e.to_string().contains("non-finite")));
    }
}
