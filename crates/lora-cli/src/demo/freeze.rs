//! Step 2: freeze the pretrained base and save it as a plain checkpoint; with `--quant`,
//! quantize it (bitsandbytes' layout) and swap in the quantized layers (QLoRA); with
//! `--dtype bf16|f16`, keep every frozen layer at 2 bytes per weight.

use std::path::{Path, PathBuf};

use anyhow::Result;
use lora::models::Mlp;
use lora::peft::{self, TargetModules};
use lora::prelude::*;

use super::{DemoArgs, QuantArg};
use crate::dtype_arg::DtypeArg;

/// Layers whose weights `--quant` stores quantized: all but the output head.
pub(super) const QUANTIZED: [&str; 3] = ["layers.0", "layers.2", "layers.4"];

/// The saved base and what its frozen layers keep resident.
pub(super) struct FrozenBase {
    /// `base_model.safetensors`.
    pub(super) path: PathBuf,
    /// `base_model.<format>.safetensors` with `--quant`.
    pub(super) quantized_path: Option<PathBuf>,
    /// Bytes of the frozen layers in f32.
    pub(super) f32_bytes: usize,
    /// Bytes of the frozen layers as the model now holds them (quantized with `--quant`).
    pub(super) bytes: usize,
}

/// Writes the base checkpoint and, with `--quant`, quantizes the model's frozen layers.
pub(super) fn freeze_and_save<B: QuantBackend>(
    b: &B,
    args: &DemoArgs,
    model: &mut Mlp<B>,
) -> Result<FrozenBase> {
    let base_path = args.out.join("base_model.safetensors");
    lora::io::write_safetensors(&base_path, &model.state_dict(b)?)?;
    let f32_frozen = frozen_bytes(model);
    let quantized_path = args.quant.map(|q| {
        args.out
            .join(format!("base_model.{}.safetensors", q.config().format))
    });
    if let (Some(q), Some(qp)) = (args.quant, &quantized_path) {
        // A fresh file each run: the base was just retrained.
        let _ = std::fs::remove_file(qp);
        quantize_base(model, &base_path, qp, q)?;
    }
    if let Some(h) = frozen_half(args)? {
        lora::quant::store_frozen_as(b, model.linears_mut(), h)?;
    }
    let frozen = frozen_bytes(model);
    Ok(FrozenBase {
        path: base_path,
        quantized_path,
        f32_bytes: f32_frozen,
        bytes: frozen,
    })
}

/// The half type of `--dtype` (`None`: f32).
pub(super) fn frozen_half(args: &DemoArgs) -> Result<Option<lora::quant::HalfType>> {
    match args.dtype {
        DtypeArg::Auto => anyhow::bail!(
            "--dtype auto takes a checkpoint's dtype; the demo trains its own f32 base (use f32, bf16 or f16)"
        ),
        // f32, bf16 and f16 read no file.
        d => d.half(&args.out),
    }
}

/// Quantizes the base checkpoint into `out` (bitsandbytes layout) and swaps the model's
/// frozen layers for quantized ones read back from that file.
pub(super) fn quantize_base<B: QuantBackend>(
    model: &mut Mlp<B>,
    base_path: &Path,
    quantized_path: &Path,
    quant: QuantArg,
) -> Result<()> {
    if !quantized_path.exists() {
        let targets = peft::quant_targets(TargetModules::List(
            QUANTIZED.iter().map(|s| s.to_string()).collect(),
        ));
        lora::io::quantize_checkpoint(
            base_path,
            quantized_path,
            &quant.config(),
            &targets,
            &|_, _| {},
        )?;
    }
    let ck = lora::io::Checkpoint::open(quantized_path)?;
    let tensors = ck.tensors()?;
    let path = quantized_path.display().to_string();
    for layer in model.linears_mut() {
        if !QUANTIZED.contains(&layer.name()) {
            continue;
        }
        let q = lora::io::bnb_format::decode(layer.name(), &tensors, &path)?;
        let bias = layer.base().bias().cloned();
        layer.replace_base(Box::new(QuantLinear::new(q, bias)?))?;
    }
    Ok(())
}

/// Bytes the frozen base layers keep resident.
fn frozen_bytes<B: QuantBackend>(model: &Mlp<B>) -> usize {
    model
        .linears()
        .iter()
        .map(|l| l.base().resident_bytes())
        .sum()
}
