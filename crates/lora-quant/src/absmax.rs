//! Absmax scaling of one block, shared by the blockwise 4-bit and 8-bit quantizers.

/// Scales the block `values` into [-1, 1] the way bitsandbytes does and hands each scaled
/// value to `emit`. Returns the block's absmax as stored.
///
/// bitsandbytes multiplies full blocks by `1 / max(absmax, 1e-38)` but divides the last,
/// partial block by its clamped absmax; the two differ in the last bit, so both are kept.
#[inline]
pub(crate) fn scale_block(values: &[f32], full: bool, mut emit: impl FnMut(f32)) -> f32 {
    let absmax = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let clamped = absmax.max(1e-38);
    if full {
        let inv = 1.0 / clamped;
        values
            .iter()
            .for_each(|&v| emit((v * inv).clamp(-1.0, 1.0)));
        absmax
    } else {
        values
            .iter()
            .for_each(|&v| emit((v / clamped).clamp(-1.0, 1.0)));
        clamped
    }
}
