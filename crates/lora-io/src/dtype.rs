//! Conversions between the stored float dtypes (f32, f16, bf16) and the f32 lora-rs
//! computes in.

use safetensors::Dtype;

/// Whether lora-rs computes in this dtype (decodes it to f32).
pub fn is_float(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16)
}

/// Decodes little-endian f32, f16 or bf16 bytes to f32; `None` for other dtypes.
pub fn decode_f32(dtype: Dtype, raw: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => raw
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => raw
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

/// Encodes f32 values as little-endian f32, f16 or bf16 (round to nearest even);
/// `None` for other dtypes.
pub fn encode_f32(dtype: Dtype, v: &[f32]) -> Option<Vec<u8>> {
    Some(match dtype {
        Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Dtype::F16 => v
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
        Dtype::BF16 => v
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect(),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_types_round_trip_exactly_representable_values() {
        let v = [0.0f32, -1.5, 0.25, 1024.0];
        for dt in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            let bytes = encode_f32(dt, &v).unwrap_or_default();
            assert_eq!(bytes.len(), v.len() * dt.bitsize() / 8, "{dt:?}");
            assert_eq!(decode_f32(dt, &bytes).as_deref(), Some(&v[..]), "{dt:?}");
        }
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 lies halfway between bf16 neighbours 1 and 1 + 2^-7: ties go to even (1).
        let bytes = encode_f32(Dtype::BF16, &[1.0 + 1.0 / 256.0]).unwrap_or_default();
        assert_eq!(decode_f32(Dtype::BF16, &bytes), Some(vec![1.0]));
    }

    #[test]
    fn integer_dtypes_are_not_decoded() {
        assert!(decode_f32(Dtype::I64, &[0; 8]).is_none());
        assert!(!is_float(Dtype::U8));
    }
}
