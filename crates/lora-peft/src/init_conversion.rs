//! PiSSA / OLoRA adapters turned into plain LoRA adapters against the original base (PEFT's
//! `save_pretrained(.., path_initial_model_for_weight_conversion=..)`).
//!
//! PiSSA and OLoRA move `s·B₀A₀` out of the base (`W_res = W - s·B₀A₀`), so the trained
//! adapter `(A, B)` only works on `W_res`. Since `W_res + s·BA = W + s·(BA - B₀A₀)`, the
//! same model is `W` plus the rank-`2r` adapter `A' = [A; A₀]`, `B' = [B, -B₀]` with
//! `r' = 2r` and `lora_alpha' = 2α` (`√2·α` with rsLoRA), which keeps the scaling. That
//! adapter applies to the published base like any other LoRA adapter.

use std::path::Path;

use lora_core::HostTensor;
use lora_io::read_safetensors;

use crate::adapter_file::{
    CONFIG_FILE, KEY_PREFIX, WEIGHTS_FILE, check_rank, lora_modules, write_adapter_dir,
};
use crate::config::{InitLoraWeights, LoraConfig};
use crate::error::{PeftError, Result};

/// Rows of `top` then rows of `bottom` (`[r₁ + r₂, cols]`).
fn stack_rows(top: &HostTensor, bottom: &HostTensor) -> HostTensor {
    let mut data = top.data.clone();
    data.extend_from_slice(&bottom.data);
    HostTensor {
        shape: vec![top.shape[0] + bottom.shape[0], top.shape[1]],
        data,
    }
}

/// Columns of `left` then the negated columns of `right` (`[rows, c₁ + c₂]`).
fn join_cols_negated(left: &HostTensor, right: &HostTensor) -> HostTensor {
    let (rows, c1, c2) = (left.shape[0], left.shape[1], right.shape[1]);
    let mut data = Vec::with_capacity(rows * (c1 + c2));
    for i in 0..rows {
        data.extend_from_slice(&left.data[i * c1..(i + 1) * c1]);
        data.extend(right.data[i * c2..(i + 1) * c2].iter().map(|v| -v));
    }
    HostTensor {
        shape: vec![rows, c1 + c2],
        data,
    }
}

/// Writes to `out` the plain LoRA adapter equivalent to the PiSSA/OLoRA adapter `trained`
/// (a PEFT adapter directory) given the same adapter as it was initialised (`initial`,
/// saved before training); returns the new config. Both must adapt the same modules with
/// the same ranks; errors name the file and module. Both files are written atomically.
pub fn convert_to_lora(trained: &Path, initial: &Path, out: &Path) -> Result<LoraConfig> {
    let config = LoraConfig::from_file(&trained.join(CONFIG_FILE))?;
    config.check_supported()?;
    if config.use_rslora && (!config.rank_pattern.is_empty() || !config.alpha_pattern.is_empty()) {
        return Err(PeftError::Unsupported {
            field: "use_rslora",
            value: "true".into(),
            reason: "converting with rank_pattern or alpha_pattern under rsLoRA is not supported (PEFT refuses it too)".into(),
        });
    }
    let (trained_w, initial_w) = (trained.join(WEIGHTS_FILE), initial.join(WEIGHTS_FILE));
    let now = lora_modules(&read_safetensors(&trained_w)?, &trained_w, "default")?;
    for (module, t) in &now {
        check_rank(&config, module, t, &trained_w)?;
    }
    let mut start = lora_modules(&read_safetensors(&initial_w)?, &initial_w, "default")?;
    let mismatch = |reason: String| PeftError::Format {
        path: initial_w.display().to_string(),
        reason,
    };
    let mut tensors = Vec::new();
    for (module, t) in &now {
        let t0 = start.remove(module).ok_or_else(|| {
            mismatch(format!(
                "has no adapter for module {module}, which {} adapts",
                trained_w.display()
            ))
        })?;
        if t.embedding
            || t.magnitude.is_some()
            || t0.a.shape != t.a.shape
            || t0.b.shape != t.b.shape
        {
            return Err(mismatch(format!(
                "module {module}: lora_A {:?} / lora_B {:?} do not match the trained adapter's {:?} / {:?} (or it is not a plain LoRA on a linear layer)",
                t0.a.shape, t0.b.shape, t.a.shape, t.b.shape
            )));
        }
        tensors.push((
            format!("{KEY_PREFIX}{module}.lora_A.weight"),
            stack_rows(&t.a, &t0.a),
        ));
        tensors.push((
            format!("{KEY_PREFIX}{module}.lora_B.weight"),
            join_cols_negated(&t.b, &t0.b),
        ));
    }
    if let Some(module) = start.keys().next() {
        return Err(mismatch(format!(
            "adapts module {module}, which the trained adapter does not"
        )));
    }
    let alpha_factor = if config.use_rslora { 2f64.sqrt() } else { 2.0 };
    let converted = LoraConfig {
        init_lora_weights: InitLoraWeights::Bool(true),
        r: config.r * 2,
        lora_alpha: config.lora_alpha * alpha_factor,
        rank_pattern: config
            .rank_pattern
            .iter()
            .map(|(k, v)| (k.clone(), v * 2))
            .collect(),
        alpha_pattern: config
            .alpha_pattern
            .iter()
            .map(|(k, v)| (k.clone(), v * 2.0))
            .collect(),
        ..config
    };
    write_adapter_dir(out, &tensors, &converted)?;
    Ok(converted)
}
