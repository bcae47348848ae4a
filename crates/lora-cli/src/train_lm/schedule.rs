//! The learning-rate schedule of `lora train --task causal-lm`: linear warm-up to the
//! peak, then cosine decay to zero (transformers' `get_cosine_schedule_with_warmup`).

/// The learning rate before optimizer step `step` (0-based) of `total`.
pub fn lr_at(step: usize, total: usize, warmup: usize, peak: f32) -> f32 {
    if step < warmup {
        return peak * step as f32 / warmup as f32;
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = (step - warmup) as f32 / span as f32;
    peak * 0.5 * (1.0 + (std::f32::consts::PI * progress.min(1.0)).cos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_linearly_then_decays_by_cosine() {
        assert_eq!(lr_at(0, 100, 10, 1.0), 0.0);
        assert_eq!(lr_at(5, 100, 10, 1.0), 0.5);
        assert_eq!(lr_at(10, 100, 10, 1.0), 1.0);
        assert!((lr_at(55, 100, 10, 1.0) - 0.5).abs() < 1e-6);
        assert!(lr_at(99, 100, 10, 1.0) < 0.01);
        assert_eq!(
            lr_at(5, 100, 0, 2.0),
            2.0 * 0.5 * (1.0 + (std::f32::consts::PI * 0.05).cos())
        );
    }
}
