//! `lora quantize` / `lora dequantize` / `lora merge` into a quantized base: whole
//! checkpoints in transformers' bitsandbytes layout ([`crate::bnb_format`]).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use lora_core::WeightRounding;
use lora_quant::QuantConfig;
use safetensors::Dtype;

use crate::bnb_format::{self, is_quant_aux, quantized_modules};
use crate::checkpoint::Checkpoint;
use crate::dtype::{decode_f32, encode_f32, is_float};
use crate::error::{Error, Result};
use crate::fs::write_atomic;
use crate::safetensors_file::{RawTensor, write_raw};

/// Module names never quantized by default (as transformers' `llm_int8_skip_modules`
/// defaults): embeddings and output heads stay in full precision.
const SKIP_BY_DEFAULT: [&str; 8] = [
    "embed",
    "wte",
    "wpe",
    "lm_head",
    "classifier",
    "score",
    "decoder",
    "qa_outputs",
];

/// Decides whether a module (the `.weight` name without the suffix) is selected; an
/// error message names what is wrong with the rule.
pub type ModuleSelector = Box<dyn Fn(&str) -> std::result::Result<bool, String> + Send + Sync>;

/// Which 2-D `.weight` tensors `lora quantize` converts.
#[derive(Default)]
pub enum QuantTargets {
    /// Every 2-D `.weight` except embeddings and output heads.
    #[default]
    AllLinear,
    /// The modules a rule selects (for PEFT's `target_modules` rules, see
    /// `lora_peft::quant_targets`); each selected tensor must be a 2-D float weight.
    Matching(ModuleSelector),
}

impl std::fmt::Debug for QuantTargets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QuantTargets::AllLinear => f.write_str("AllLinear"),
            QuantTargets::Matching(_) => f.write_str("Matching(..)"),
        }
    }
}

/// What a quantization pass did.
#[derive(Clone, Debug, Default)]
pub struct QuantizeReport {
    /// Quantized modules.
    pub quantized: Vec<String>,
    /// Tensors copied unchanged.
    pub copied: usize,
    /// Values in the quantized weights.
    pub quantized_values: usize,
    /// Bytes those weights took before (as stored in the input).
    pub bytes_before: usize,
    /// Bytes they take quantized.
    pub bytes_after: usize,
}

impl QuantizeReport {
    /// Storage bits per quantized weight value.
    pub fn bits_per_parameter(&self) -> f64 {
        if self.quantized_values == 0 {
            0.0
        } else {
            self.bytes_after as f64 * 8.0 / self.quantized_values as f64
        }
    }
}

fn bad(path: &str, reason: String) -> Error {
    Error::Format {
        path: path.to_string(),
        reason,
    }
}

fn decode(path: &str, name: &str, t: &RawTensor<'_>) -> Result<Vec<f32>> {
    decode_f32(t.dtype, &t.data).ok_or_else(|| {
        bad(
            path,
            format!(
                "tensor {name} has dtype {:?}; expected F32, F16 or BF16",
                t.dtype
            ),
        )
    })
}

/// Quantizes the checkpoint at `input` into one safetensors file `out` in transformers'
/// bitsandbytes layout; other tensors are copied. Nothing is written unless every
/// selected tensor quantizes.
pub fn quantize_checkpoint(
    input: &Path,
    out: &Path,
    config: &QuantConfig,
    targets: &QuantTargets,
    progress: &dyn Fn(u64, u64),
) -> Result<QuantizeReport> {
    config.validate()?;
    let ck = Checkpoint::open(input)?;
    let path = ck.path();
    let tensors = ck.tensors()?;
    let already = quantized_modules(tensors.keys());
    if !already.is_empty() {
        return Err(bad(
            &path,
            format!(
                "already quantized ({} modules, e.g. {}); dequantize it first",
                already.len(),
                already.keys().next().map(String::as_str).unwrap_or("")
            ),
        ));
    }
    let mut selected = Vec::new();
    for (name, t) in &tensors {
        let Some(module) = name.strip_suffix(".weight") else {
            continue;
        };
        let chosen = match targets {
            QuantTargets::AllLinear => {
                t.shape.len() == 2
                    && is_float(t.dtype)
                    && !SKIP_BY_DEFAULT.iter().any(|s| module.contains(s))
            }
            QuantTargets::Matching(select) => {
                let m = select(module).map_err(|reason| bad(&path, reason))?;
                if m && (t.shape.len() != 2 || !is_float(t.dtype)) {
                    return Err(bad(
                        &path,
                        format!(
                            "--target-modules selects {name}, a {:?} tensor of shape {:?}; only 2-D float linear weights can be quantized",
                            t.dtype, t.shape
                        ),
                    ));
                }
                m
            }
        };
        if chosen {
            selected.push(module.to_string());
        }
    }
    if selected.is_empty() {
        return Err(bad(
            &path,
            "no 2-D linear .weight tensor selected for quantization".into(),
        ));
    }

    let mut report = QuantizeReport::default();
    let mut outputs: BTreeMap<String, RawTensor<'_>> = BTreeMap::new();
    let total = selected.len() as u64;
    for (i, module) in selected.iter().enumerate() {
        let name = format!("{module}.weight");
        let t = &tensors[&name];
        let values = decode(&path, &name, t)?;
        let q = config
            .quantize(&values, &t.shape)
            .map_err(|e| bad(&path, format!("tensor {name}: {e}")))?;
        report.quantized_values += values.len();
        report.bytes_before += t.data.len();
        report.bytes_after += q.storage_bytes();
        outputs.extend(bnb_format::encode(module, &q));
        report.quantized.push(module.clone());
        progress(i as u64 + 1, total);
    }
    for (name, t) in &tensors {
        if !outputs.contains_key(name) {
            outputs.insert(name.clone(), t.clone());
            report.copied += 1;
        }
    }
    let mut metadata = ck.metadata()?;
    metadata.insert("quantized_by".into(), "lora-rs".into());
    write_raw(out, &outputs, metadata)?;
    write_model_config(input, out, config)?;
    Ok(report)
}

/// When quantizing a model directory into another directory as `model.safetensors`,
/// writes its `config.json` with transformers' `quantization_config`, so that
/// `from_pretrained` loads the result with bitsandbytes.
fn write_model_config(input: &Path, out: &Path, config: &QuantConfig) -> Result<()> {
    let src = input.join("config.json");
    let Some(out_dir) = out.parent() else {
        return Ok(());
    };
    let same_dir = std::fs::canonicalize(input).ok() == std::fs::canonicalize(out_dir).ok();
    if !input.is_dir()
        || !src.is_file()
        || same_dir
        || out.file_name() != Some("model.safetensors".as_ref())
    {
        return Ok(());
    }
    let text = std::fs::read_to_string(&src).map_err(|e| Error::Io {
        path: src.display().to_string(),
        source: e,
    })?;
    let mut v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| bad(&src.display().to_string(), format!("invalid JSON: {e}")))?;
    let qc = match config.format.four_bit() {
        Some(t) => serde_json::json!({
            "quant_method": "bitsandbytes",
            "load_in_4bit": true,
            "load_in_8bit": false,
            "bnb_4bit_quant_type": t.as_str(),
            "bnb_4bit_use_double_quant": config.double_quant,
            "bnb_4bit_compute_dtype": "float32",
            "bnb_4bit_quant_storage": "uint8",
        }),
        None => serde_json::json!({
            "quant_method": "bitsandbytes",
            "load_in_4bit": false,
            "load_in_8bit": true,
            "llm_int8_threshold": 6.0,
        }),
    };
    if let Some(obj) = v.as_object_mut() {
        obj.insert("quantization_config".into(), qc);
    }
    let json = serde_json::to_string_pretty(&v).unwrap_or_default();
    write_atomic(&out_dir.join("config.json"), json.as_bytes())?;
    Ok(())
}

/// Dequantizes every quantized module of `input` into plain `.weight` tensors (in the
/// dtype the quant state records, f32 for int8) and drops the auxiliary tensors.
pub fn dequantize_checkpoint(input: &Path, out: &Path) -> Result<QuantizeReport> {
    let ck = Checkpoint::open(input)?;
    let path = ck.path();
    let tensors = ck.tensors()?;
    let modules = quantized_modules(tensors.keys());
    if modules.is_empty() {
        return Err(bad(
            &path,
            "no quantized module (no quant_state or SCB tensor) to dequantize".into(),
        ));
    }
    let mut report = QuantizeReport::default();
    let mut outputs: BTreeMap<String, RawTensor<'_>> = BTreeMap::new();
    for module in modules.keys() {
        let q = bnb_format::decode(module, &tensors, &path)?;
        let (o, i) = q.dims();
        let dtype = bnb_format::recorded_dtype(module, &tensors).unwrap_or(Dtype::F32);
        let values = q.dequantize();
        let data = encode_f32(dtype, &values).unwrap_or_default();
        report.quantized_values += values.len();
        report.bytes_before += q.storage_bytes();
        report.bytes_after += data.len();
        outputs.insert(
            format!("{module}.weight"),
            RawTensor {
                dtype,
                shape: vec![o, i],
                data: Cow::Owned(data),
            },
        );
        report.quantized.push(module.clone());
    }
    for (name, t) in &tensors {
        if !outputs.contains_key(name) && !is_quant_aux(name, &modules) {
            outputs.insert(name.clone(), t.clone());
            report.copied += 1;
        }
    }
    let mut metadata = ck.metadata()?;
    metadata.remove("quantized_by");
    write_raw(out, &outputs, metadata)?;
    Ok(report)
}

/// Whether the checkpoint at `path` holds bitsandbytes-quantized modules.
pub fn is_quantized_checkpoint(path: &Path) -> Result<bool> {
    Checkpoint::open(path)?.is_quantized()
}

/// A summary of a checkpoint's quantization for `lora inspect`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QuantSummary {
    /// `(module, format, blocksize, double quant, bits per parameter)`.
    pub modules: Vec<(String, String, usize, bool, f64)>,
    /// Values in quantized weights.
    pub values: usize,
    /// Their storage bytes.
    pub bytes: usize,
}

/// Reads every quantized module's layout (sizes checked) for `lora inspect`.
pub fn quant_summary(path: &Path) -> Result<QuantSummary> {
    let ck = Checkpoint::open(path)?;
    let p = ck.path();
    let tensors = ck.tensors()?;
    let mut s = QuantSummary::default();
    for module in quantized_modules(tensors.keys()).keys() {
        let q = bnb_format::decode(module, &tensors, &p)?;
        let c = q.config();
        let (o, i) = q.dims();
        s.values += o * i;
        s.bytes += q.storage_bytes();
        let bs = if c.format.four_bit().is_some() {
            c.blocksize
        } else {
            0
        };
        s.modules.push((
            module.clone(),
            c.format.to_string(),
            bs,
            c.double_quant,
            q.bits_per_parameter(),
        ));
    }
    Ok(s)
}

/// The rounding of a merge into a quantized base, per module.
#[derive(Clone, Debug, Default)]
pub struct QuantMergeReport {
    /// Modules that received a delta, with the rounding of each.
    pub merged: Vec<(String, WeightRounding)>,
    /// Tensors copied unchanged.
    pub copied: usize,
}

impl QuantMergeReport {
    /// The worst module's rounding.
    pub fn worst(&self) -> WeightRounding {
        self.merged
            .iter()
            .fold(WeightRounding::EXACT, |acc, (_, r)| acc.max(*r))
    }
}

/// One module's weight as a merge into a quantized checkpoint sees it.
#[derive(Clone, Copy, Debug)]
pub struct MergeTarget<'a> {
    /// The module (the tensor name without `.weight`).
    pub module: &'a str,
    /// The weight's logical shape: `[out, in]` for a quantized module, the stored shape
    /// of a float `.weight` (an embedding table, a layer left unquantized).
    pub shape: &'a [usize],
    /// Whether the module is stored quantized (and will be quantized again).
    pub quantized: bool,
}

/// Merges into a quantized checkpoint: every module in `targets` has its weight in f32
/// (dequantized, or decoded for float `.weight` tensors such as embeddings) handed to
/// `edit`, which returns the merged weight; quantized modules are quantized again with
/// their own settings and their rounding reported, float ones are stored exactly. Every
/// module is edited before a byte is written, so an error from `edit` leaves no output.
pub fn merge_into_quantized<E: From<Error>>(
    ck: &Checkpoint,
    targets: &BTreeSet<String>,
    mut edit: impl FnMut(MergeTarget<'_>, Vec<f32>) -> std::result::Result<Vec<f32>, E>,
    out: &Path,
) -> std::result::Result<QuantMergeReport, E> {
    let path = ck.path();
    let tensors = ck.tensors()?;
    let modules = quantized_modules(tensors.keys());
    let mut report = QuantMergeReport::default();
    let mut outputs: BTreeMap<String, RawTensor<'_>> = BTreeMap::new();
    for module in targets {
        if modules.contains_key(module) {
            let q = bnb_format::decode(module, &tensors, &path)?;
            let (o, i) = q.dims();
            let target = MergeTarget {
                module,
                shape: &[o, i],
                quantized: true,
            };
            let exact = edit(target, q.dequantize())?;
            check_len(&path, module, exact.len(), o * i)?;
            let merged = q.config().quantize(&exact, &[o, i]).map_err(Error::from)?;
            let rounding = WeightRounding::between(&merged.dequantize(), &exact);
            outputs.extend(bnb_format::encode(module, &merged));
            report.merged.push((module.clone(), rounding));
        } else {
            let name = format!("{module}.weight");
            let t = tensors.get(&name).ok_or_else(|| {
                bad(
                    &path,
                    format!(
                        "the adapter targets module {module}, but the base has no tensor {name}"
                    ),
                )
            })?;
            if !is_float(t.dtype) {
                return Err(bad(
                    &path,
                    format!(
                        "module {module}: {name} is {:?}, neither a float weight nor a bitsandbytes-quantized one",
                        t.dtype
                    ),
                )
                .into());
            }
            let target = MergeTarget {
                module,
                shape: &t.shape,
                quantized: false,
            };
            let w = edit(target, decode(&path, &name, t)?)?;
            check_len(&path, module, w.len(), t.shape.iter().product())?;
            let data = encode_f32(t.dtype, &w).unwrap_or_default();
            outputs.insert(
                name,
                RawTensor {
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    data: Cow::Owned(data),
                },
            );
            report.merged.push((module.clone(), WeightRounding::EXACT));
        }
    }
    for (name, t) in &tensors {
        // A re-quantized module re-emits all of its tensors under the same names.
        if !outputs.contains_key(name) {
            outputs.insert(name.clone(), t.clone());
            report.copied += 1;
        }
    }
    write_raw(out, &outputs, ck.metadata()?)?;
    Ok(report)
}

/// A merged weight must keep its element count (the edit changes values, not shapes).
fn check_len(path: &str, module: &str, got: usize, want: usize) -> Result<()> {
    match got == want {
        true => Ok(()),
        false => Err(bad(
            path,
            format!("module {module}: the merged weight has {got} values, the base {want}"),
        )),
    }
}
