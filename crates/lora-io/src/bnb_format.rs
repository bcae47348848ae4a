//! How transformers serializes bitsandbytes layers into safetensors, so that a checkpoint
//! quantized here loads in Python and the other way round.
//!
//! 4-bit (`Linear4bit`), for a module `m`:
//! * `m.weight`: uint8 `[ceil(n/2), 1]`, two codes per byte, first value in the high nibble;
//! * `m.weight.absmax`: f32 `[blocks]`, or uint8 `[blocks]` with double quantization;
//! * `m.weight.quant_map`: f32 `[16]`;
//! * with double quantization `m.weight.nested_absmax` f32 and `m.weight.nested_quant_map`
//!   f32 `[256]`;
//! * `m.weight.quant_state.bitsandbytes__nf4` (or `__fp4`): uint8 bytes of a JSON object with
//!   `quant_type`, `blocksize`, `dtype`, `shape` and with double quantization
//!   `nested_blocksize`, `nested_dtype`, `nested_offset`.
//!
//! 8-bit (`Linear8bitLt`): `m.weight` int8 `[out, in]`, `m.SCB` f32 `[out]`,
//! `m.weight_format` uint8 scalar `0` (row-wise).

use std::borrow::Cow;
use std::collections::BTreeMap;

use lora_quant::{
    Absmax, BlockwiseU8, FourBitType, FourBitWeight, Int8Weight, NESTED_BLOCKSIZE, QuantizedWeight,
};
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::safetensors_file::RawTensor;

/// The suffix of the JSON quant-state tensor, before `nf4` / `fp4`.
pub const QUANT_STATE_PREFIX: &str = "quant_state.bitsandbytes__";

/// The JSON in `<m>.weight.quant_state.bitsandbytes__<type>`.
#[derive(Debug, Serialize, Deserialize)]
struct QuantStateJson {
    quant_type: String,
    blocksize: usize,
    dtype: String,
    shape: Vec<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nested_blocksize: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nested_dtype: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nested_offset: Option<f32>,
}

/// Which modules of a checkpoint are stored quantized, by module name (the key without
/// `.weight`), with their format name.
pub fn quantized_modules(
    names: impl IntoIterator<Item = impl AsRef<str>>,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for name in names {
        let name = name.as_ref();
        if let Some((m, t)) = name.split_once(&format!(".weight.{QUANT_STATE_PREFIX}")) {
            out.insert(m.to_string(), t.to_string());
        } else if let Some(m) = name.strip_suffix(".SCB") {
            out.insert(m.to_string(), "int8".to_string());
        }
    }
    out
}

/// Whether `name` is one of the auxiliary tensors of a quantized module (everything but
/// `<m>.weight` itself).
pub fn is_quant_aux(name: &str, modules: &BTreeMap<String, String>) -> bool {
    let aux4 = [
        ".weight.absmax",
        ".weight.quant_map",
        ".weight.nested_absmax",
        ".weight.nested_quant_map",
    ];
    modules.keys().any(|m| {
        name.strip_prefix(m.as_str()).is_some_and(|rest| {
            aux4.contains(&rest)
                || rest.starts_with(&format!(".weight.{QUANT_STATE_PREFIX}"))
                || rest == ".SCB"
                || rest == ".weight_format"
        })
    })
}

/// The tensors transformers writes for module `module` holding `w`.
pub fn encode(module: &str, w: &QuantizedWeight) -> Vec<(String, RawTensor<'static>)> {
    let key = |s: &str| format!("{module}.{s}");
    match w {
        QuantizedWeight::FourBit(q) => {
            let mut out = vec![
                (
                    key("weight"),
                    RawTensor::u8(vec![q.packed.len(), 1], q.packed.clone()),
                ),
                (key("weight.quant_map"), RawTensor::f32(vec![16], &q.code)),
            ];
            let mut state = QuantStateJson {
                quant_type: q.quant_type.as_str().into(),
                blocksize: q.blocksize,
                dtype: "float32".into(),
                shape: q.shape.clone(),
                nested_blocksize: None,
                nested_dtype: None,
                nested_offset: None,
            };
            match &q.absmax {
                Absmax::F32(a) => {
                    out.push((key("weight.absmax"), RawTensor::f32(vec![a.len()], a)))
                }
                Absmax::Double { scales, offset } => {
                    out.push((
                        key("weight.absmax"),
                        RawTensor::u8(vec![scales.codes.len()], scales.codes.clone()),
                    ));
                    out.push((
                        key("weight.nested_absmax"),
                        RawTensor::f32(vec![scales.absmax.len()], &scales.absmax),
                    ));
                    out.push((
                        key("weight.nested_quant_map"),
                        RawTensor::f32(vec![scales.code.len()], &scales.code),
                    ));
                    state.nested_blocksize = Some(scales.blocksize);
                    state.nested_dtype = Some("float32".into());
                    state.nested_offset = Some(*offset);
                }
            }
            // serde_json cannot fail on this plain struct.
            let json = serde_json::to_vec(&state).unwrap_or_default();
            out.push((
                key(&format!("weight.{QUANT_STATE_PREFIX}{}", q.quant_type)),
                RawTensor::u8(vec![json.len()], json),
            ));
            out
        }
        // A 2-byte float weight is an ordinary tensor of that dtype, as in a bf16 checkpoint.
        QuantizedWeight::Half(h) => vec![(
            key("weight"),
            RawTensor {
                dtype: match h.half_type {
                    lora_quant::HalfType::F16 => Dtype::F16,
                    lora_quant::HalfType::Bf16 => Dtype::BF16,
                },
                shape: h.shape.to_vec(),
                data: Cow::Owned(h.bits.iter().flat_map(|b| b.to_le_bytes()).collect()),
            },
        )],
        QuantizedWeight::Int8(q) => vec![
            (
                key("weight"),
                RawTensor {
                    dtype: Dtype::I8,
                    shape: q.shape.to_vec(),
                    data: Cow::Owned(q.cb.iter().map(|&c| c as u8).collect()),
                },
            ),
            (key("SCB"), RawTensor::f32(vec![q.scb.len()], &q.scb)),
            (key("weight_format"), RawTensor::u8(vec![], vec![0])),
        ],
    }
}

fn f32s(path: &str, name: &str, t: &RawTensor<'_>) -> Result<Vec<f32>> {
    if t.dtype != Dtype::F32 {
        return Err(bad(
            path,
            format!("tensor {name} has dtype {:?}; expected F32", t.dtype),
        ));
    }
    Ok(t.data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

fn bad(path: &str, reason: String) -> Error {
    Error::Format {
        path: path.to_string(),
        reason,
    }
}

/// The tensors of one module, with the file named in errors.
struct ModuleTensors<'t, 'a> {
    module: &'t str,
    tensors: &'t BTreeMap<String, RawTensor<'a>>,
    path: &'t str,
}

impl<'t, 'a> ModuleTensors<'t, 'a> {
    /// `<module>.<suffix>`, or an error naming it.
    fn get(&self, suffix: &str) -> Result<(String, &'t RawTensor<'a>)> {
        let (module, path) = (self.module, self.path);
        let name = format!("{module}.{suffix}");
        self.tensors
            .get(&name)
            .map(|t| (name.clone(), t))
            .ok_or_else(|| {
                bad(
                    path,
                    format!("quantized module {module}: tensor {name} is missing"),
                )
            })
    }
}

/// Reads the quantized weight of `module` back from its tensors, checking every size
/// against the shape its state records (errors name the tensor).
pub fn decode(
    module: &str,
    tensors: &BTreeMap<String, RawTensor<'_>>,
    path: &str,
) -> Result<QuantizedWeight> {
    let m = ModuleTensors {
        module,
        tensors,
        path,
    };
    let (wname, weight) = m.get("weight")?;
    if tensors.contains_key(&format!("{module}.SCB")) {
        decode_int8(&m, &wname, weight)
    } else {
        decode_four_bit(&m, &wname, weight)
    }
}

/// LLM.int8: `<m>.weight` int8 `[out, in]` with `<m>.SCB` row scales.
fn decode_int8(
    m: &ModuleTensors<'_, '_>,
    wname: &str,
    weight: &RawTensor<'_>,
) -> Result<QuantizedWeight> {
    let (module, path) = (m.module, m.path);
    let (sname, scb) = m.get("SCB")?;
    let scb = f32s(path, &sname, scb)?;
    if weight.dtype != Dtype::I8 || weight.shape.len() != 2 || weight.shape[0] != scb.len() {
        return Err(bad(
            path,
            format!(
                "int8 module {module}: {wname} must be I8 [out, in] with out = len(SCB) = {}, got {:?} {:?}",
                scb.len(),
                weight.dtype,
                weight.shape
            ),
        ));
    }
    if let Some(fmt) = m.tensors.get(&format!("{module}.weight_format"))
        && fmt.data.first().copied().unwrap_or(0) != 0
    {
        return Err(bad(
            path,
            format!(
                "int8 module {module}: weight_format {:?} is not row-wise (0)",
                fmt.data
            ),
        ));
    }
    Ok(QuantizedWeight::Int8(Int8Weight {
        shape: [weight.shape[0], weight.shape[1]],
        cb: weight.data.iter().map(|&b| b as i8).collect(),
        scb,
    }))
}

/// NF4/FP4: packed codes, the JSON quant state, the code table and the block scales.
fn decode_four_bit(
    m: &ModuleTensors<'_, '_>,
    wname: &str,
    weight: &RawTensor<'_>,
) -> Result<QuantizedWeight> {
    let (module, path) = (m.module, m.path);
    let (state_name, state) = quant_state(module, m.tensors).ok_or_else(|| {
        bad(
            path,
            format!("module {module} has no quant_state or SCB tensor"),
        )
    })?;
    let json: QuantStateJson = serde_json::from_slice(&state.data).map_err(|e| {
        bad(
            path,
            format!("tensor {state_name}: corrupt quant_state JSON: {e}"),
        )
    })?;
    let quant_type: FourBitType = json
        .quant_type
        .parse()
        .map_err(|e| bad(path, format!("tensor {state_name}: {e}")))?;
    if !state_name.ends_with(quant_type.as_str()) {
        return Err(bad(
            path,
            format!("tensor {state_name}: its JSON says quant_type {quant_type}"),
        ));
    }
    lora_quant::four_bit::check_blocksize(json.blocksize)
        .map_err(|e| bad(path, format!("tensor {state_name}: {e}")))?;
    if !["float32", "float16", "bfloat16"].contains(&json.dtype.as_str()) {
        return Err(bad(
            path,
            format!(
                "tensor {state_name}: dtype {:?} is not a bitsandbytes compute dtype (float32, float16, bfloat16)",
                json.dtype
            ),
        ));
    }
    if json.nested_blocksize == Some(0) {
        return Err(bad(
            path,
            format!("tensor {state_name}: nested_blocksize must be at least 1"),
        ));
    }
    // A shape is a claim: its product may overflow (checked before anything is sized by it).
    let n = json
        .shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .unwrap_or(0);
    if json.shape.len() != 2 || n == 0 {
        return Err(bad(
            path,
            format!(
                "tensor {state_name}: shape {:?} is not a 2-D linear weight of representable size",
                json.shape
            ),
        ));
    }
    let blocks = n.div_ceil(json.blocksize);
    if weight.dtype != Dtype::U8 || weight.numel() != n.div_ceil(2) {
        return Err(bad(
            path,
            format!(
                "tensor {wname}: expected U8 with {} bytes for shape {:?}, got {:?} {:?}",
                n.div_ceil(2),
                json.shape,
                weight.dtype,
                weight.shape
            ),
        ));
    }
    let (qname, qmap) = m.get("weight.quant_map")?;
    let code: [f32; 16] = f32s(path, &qname, qmap)?
        .try_into()
        .map_err(|v: Vec<f32>| {
            bad(
                path,
                format!("tensor {qname}: {} values, expected 16", v.len()),
            )
        })?;
    let absmax = decode_absmax(m, &json, blocks)?;
    Ok(QuantizedWeight::FourBit(FourBitWeight {
        quant_type,
        blocksize: json.blocksize,
        shape: json.shape,
        packed: weight.data.to_vec(),
        code,
        absmax,
    }))
}

/// The block scales: f32, or with double quantization 8-bit codes with their nested
/// scales, code table and offset.
fn decode_absmax(
    m: &ModuleTensors<'_, '_>,
    json: &QuantStateJson,
    blocks: usize,
) -> Result<Absmax> {
    let path = m.path;
    let (aname, absmax) = m.get("weight.absmax")?;
    match json.nested_offset {
        None => {
            let a = f32s(path, &aname, absmax)?;
            if a.len() != blocks {
                return Err(bad(
                    path,
                    format!("tensor {aname}: {} values, expected {blocks}", a.len()),
                ));
            }
            Ok(Absmax::F32(a))
        }
        Some(offset) => {
            let nested_bs = json.nested_blocksize.unwrap_or(NESTED_BLOCKSIZE);
            if absmax.dtype != Dtype::U8 || absmax.numel() != blocks || nested_bs == 0 {
                return Err(bad(
                    path,
                    format!(
                        "tensor {aname}: expected U8 [{blocks}] with double quantization (nested_blocksize {nested_bs}), got {:?} {:?}",
                        absmax.dtype, absmax.shape
                    ),
                ));
            }
            let (nname, nested) = m.get("weight.nested_absmax")?;
            let nested = f32s(path, &nname, nested)?;
            if nested.len() != blocks.div_ceil(nested_bs) {
                return Err(bad(
                    path,
                    format!(
                        "tensor {nname}: {} values, expected {}",
                        nested.len(),
                        blocks.div_ceil(nested_bs)
                    ),
                ));
            }
            let (mname, nmap) = m.get("weight.nested_quant_map")?;
            let nmap = f32s(path, &mname, nmap)?;
            if nmap.len() != 256 {
                return Err(bad(
                    path,
                    format!("tensor {mname}: {} values, expected 256", nmap.len()),
                ));
            }
            Ok(Absmax::Double {
                scales: BlockwiseU8 {
                    codes: absmax.data.to_vec(),
                    absmax: nested,
                    code: nmap,
                    blocksize: nested_bs,
                },
                offset,
            })
        }
    }
}

/// Module `module`'s quant-state tensor (`<m>.weight.quant_state.bitsandbytes__nf4` or
/// `__fp4`) with its name: a direct lookup, not a scan of the file's tensors.
fn quant_state<'t, 'a>(
    module: &str,
    tensors: &'t BTreeMap<String, RawTensor<'a>>,
) -> Option<(String, &'t RawTensor<'a>)> {
    ["nf4", "fp4"].iter().find_map(|t| {
        let name = format!("{module}.weight.{QUANT_STATE_PREFIX}{t}");
        tensors.get(&name).map(|v| (name, v))
    })
}

/// The compute dtype a 4-bit module's quant state records (`float32`, `float16`,
/// `bfloat16`), used when dequantizing to a file.
pub fn recorded_dtype(module: &str, tensors: &BTreeMap<String, RawTensor<'_>>) -> Option<Dtype> {
    let (_, state) = quant_state(module, tensors)?;
    let json: QuantStateJson = serde_json::from_slice(&state.data).ok()?;
    match json.dtype.as_str() {
        "float16" => Some(Dtype::F16),
        "bfloat16" => Some(Dtype::BF16),
        _ => Some(Dtype::F32),
    }
}
