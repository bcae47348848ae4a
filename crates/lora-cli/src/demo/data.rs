//! The demo's data: `sin(x)` to pretrain on and `sin(x + shift)` to adapt to.

use anyhow::Result;
use lora::prelude::*;

use super::POINTS;

/// The sample points and both targets, on the host (for the charts) and on the backend.
pub(super) struct SineData<B: Backend> {
    /// `POINTS` evenly spaced inputs on `[-π, π]`.
    pub(super) xs: Vec<f32>,
    /// The fine-tuning target `sin(x + shift)` on the host.
    pub(super) new_task: Vec<f32>,
    /// `xs` as a `[POINTS, 1]` tensor.
    pub(super) x: B::Tensor,
    /// The pretraining target `sin(x)`.
    pub(super) y_base: B::Tensor,
    /// The fine-tuning target `sin(x + shift)`.
    pub(super) y_new: B::Tensor,
}

impl<B: Backend> SineData<B> {
    /// Samples both tasks and uploads them.
    pub(super) fn new(b: &B, shift: f32) -> Result<Self> {
        let xs: Vec<f32> = (0..POINTS)
            .map(|i| {
                -std::f32::consts::PI + 2.0 * std::f32::consts::PI * i as f32 / (POINTS - 1) as f32
            })
            .collect();
        let base_task: Vec<f32> = xs.iter().map(|x| x.sin()).collect();
        let new_task: Vec<f32> = xs.iter().map(|x| (x + shift).sin()).collect();
        let x = b.from_host(&xs, &[POINTS, 1])?;
        let y_base = b.from_host(&base_task, &[POINTS, 1])?;
        let y_new = b.from_host(&new_task, &[POINTS, 1])?;
        Ok(Self {
            xs,
            new_task,
            x,
            y_base,
            y_new,
        })
    }
}
