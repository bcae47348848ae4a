//! Step 6: reload base + adapter from disk, check they reproduce the trained model, merge,
//! and check the merged model (within the format's rounding when the base is quantized or
//! stored in bf16/f16).

use anyhow::{Result, ensure};
use lora::models::Mlp;
use lora::peft;
use lora::prelude::*;
use lora::{UnaryOp, WeightRounding};

use super::freeze::{FrozenBase, frozen_half, quantize_base};
use super::{DemoArgs, max_abs_diff};

/// The result of the reload and merge checks.
pub(super) struct MergeCheck {
    /// Max `|diff|` of the reloaded model against the trained one (zero when it passes).
    pub(super) reload_diff: f32,
    /// Max `|diff|` of the merged model against the unmerged one.
    pub(super) merge_diff: f32,
    /// The weight rounding of merging into a quantized base; `None` in f32.
    pub(super) rounding: Option<WeightRounding>,
}

/// Builds a fresh model from the saved files, checks it reproduces the trained model,
/// merges, and checks the merged model; returns both max differences.
pub(super) fn reload_and_merge<B: QuantBackend>(
    b: &B,
    args: &DemoArgs,
    sizes: &[usize],
    base: &FrozenBase,
    x: &B::Tensor,
    trained_pred: &[f32],
) -> Result<MergeCheck> {
    let mut reloaded = Mlp::new(b, sizes, UnaryOp::Relu, args.seed.wrapping_add(1))?;
    reloaded.load_state_dict(b, &lora::io::read_safetensors(&base.path)?)?;
    if let (Some(q), Some(qp)) = (args.quant, &base.quantized_path) {
        quantize_base(&mut reloaded, &base.path, qp, q)?;
    }
    let half = frozen_half(args)?;
    if let Some(h) = half {
        lora::quant::store_frozen_as(b, reloaded.linears_mut(), h)?;
    }
    peft::load_pretrained(&args.out, &mut reloaded, b)?;
    let unmerged = b.to_host(&reloaded.forward(b, x, Mode::Eval)?)?;
    let reload_diff = max_abs_diff(&unmerged, trained_pred);
    ensure!(
        reload_diff == 0.0,
        "the adapter reloaded from {} does not reproduce the trained model (max |diff| {reload_diff})",
        args.out.display()
    );
    let mut rounding = WeightRounding::EXACT;
    for layer in reloaded.linears_mut() {
        if layer.adapter().is_some() {
            rounding = rounding.max(layer.merge(b, true)?);
        }
    }
    let merged = b.to_host(&reloaded.forward(b, x, Mode::Eval)?)?;
    let merge_diff = max_abs_diff(&merged, &unmerged);
    let scale = unmerged.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    if args.quant.is_none() && half.is_none() {
        ensure!(
            merge_diff <= 1e-5 * scale,
            "merged output differs from unmerged by {merge_diff} (tolerance {})",
            1e-5 * scale
        );
        return Ok(MergeCheck {
            reload_diff,
            merge_diff,
            rounding: None,
        });
    }
    // Re-quantizing (or rounding to bf16/f16) rounds: the check is that it stays within
    // the format's resolution.
    ensure!(
        merge_diff.is_finite() && rounding.max_rel <= 0.2,
        "merging into the quantized base rounded by {rounding:?}, output max |diff| {merge_diff}"
    );
    Ok(MergeCheck {
        reload_diff,
        merge_diff,
        rounding: Some(rounding),
    })
}
