//! `--dtype f32|bf16|f16|auto`: how the frozen weights are stored. bf16/f16 keep them at 2
//! bytes per parameter and widen a block at a time inside each product (compute and
//! adapters stay f32, as PEFT's `autocast_adapter_dtype`); `auto` takes the checkpoint's
//! dtype from its `config.json` (`dtype`, or `torch_dtype` in older files).

use std::path::Path;

use anyhow::{Context, Result, bail};
use lora::quant::HalfType;

/// `--dtype` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DtypeArg {
    /// 4 bytes per weight (the default).
    #[default]
    F32,
    /// bfloat16 storage.
    Bf16,
    /// IEEE half storage.
    F16,
    /// The checkpoint's own dtype (config.json).
    Auto,
}

impl DtypeArg {
    /// As written on the command line.
    pub fn name(self) -> &'static str {
        match self {
            DtypeArg::F32 => "f32",
            DtypeArg::Bf16 => "bf16",
            DtypeArg::F16 => "f16",
            DtypeArg::Auto => "auto",
        }
    }

    /// The half type to store frozen weights in (`None`: f32), reading `model_dir`'s
    /// config.json for `auto`.
    pub fn half(self, model_dir: &Path) -> Result<Option<HalfType>> {
        Ok(match self {
            DtypeArg::F32 => None,
            DtypeArg::Bf16 => Some(HalfType::Bf16),
            DtypeArg::F16 => Some(HalfType::F16),
            DtypeArg::Auto => checkpoint_dtype(&model_dir.join("config.json"))?,
        })
    }
}

/// The `dtype` (transformers 5) or `torch_dtype` field of a config.json.
fn checkpoint_dtype(path: &Path) -> Result<Option<HalfType>> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "{}: --dtype auto reads the checkpoint's dtype here",
            path.display()
        )
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    let field = ["dtype", "torch_dtype"]
        .into_iter()
        .find_map(|k| v.get(k).map(|d| (k, d)));
    Ok(match field {
        None => None,
        Some((k, d)) => match d.as_str() {
            Some("float32" | "float") => None,
            Some("bfloat16") => Some(HalfType::Bf16),
            Some("float16" | "half") => Some(HalfType::F16),
            _ => bail!(
                "{}: field `{k}` is {d}; --dtype auto knows float32, bfloat16 and float16",
                path.display()
            ),
        },
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn auto_reads_either_field_and_names_an_unknown_one() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config.json");
        for (text, want) in [
            (r#"{"dtype": "bfloat16"}"#, Some(HalfType::Bf16)),
            (r#"{"torch_dtype": "float16"}"#, Some(HalfType::F16)),
            (r#"{"torch_dtype": "float32"}"#, None),
            ("{}", None),
        ] {
            std::fs::write(&cfg, text).unwrap();
            assert_eq!(DtypeArg::Auto.half(dir.path()).unwrap(), want, "{text}");
        }
        std::fs::write(&cfg, r#"{"dtype": "int4"}"#).unwrap();
        let e = DtypeArg::Auto.half(dir.path()).unwrap_err().to_string();
        assert!(e.contains("`dtype`") && e.contains("config.json"), "{e}");
    }
}
