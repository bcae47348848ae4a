//! Hugging Face checkpoints on disk: one `.safetensors` file, or a directory with
//! `model.safetensors` or shards listed in `model.safetensors.index.json`. Tensors are
//! read through memory maps; conversions between f32, f16 and bf16 live here.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::error::{PeftError, Result};

/// The shard files of a checkpoint, in a stable order.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// `model.safetensors`, or each shard.
    pub files: Vec<PathBuf>,
}

fn format_err(path: &Path, reason: impl Into<String>) -> PeftError {
    PeftError::Format {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn io_err(path: &Path, source: std::io::Error) -> PeftError {
    PeftError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl Checkpoint {
    /// Finds the files of the checkpoint at `path` (a file or a model directory).
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_file() {
            return Ok(Checkpoint {
                files: vec![path.to_path_buf()],
            });
        }
        if !path.is_dir() {
            return Err(io_err(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
            ));
        }
        let index = path.join("model.safetensors.index.json");
        if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| io_err(&index, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| format_err(&index, format!("invalid JSON: {e}")))?;
            let map = v["weight_map"]
                .as_object()
                .ok_or_else(|| format_err(&index, "no \"weight_map\" object"))?;
            let mut files: Vec<PathBuf> = Vec::new();
            for (tensor, f) in map {
                let f = f.as_str().ok_or_else(|| {
                    format_err(&index, format!("weight_map[{tensor:?}] is not a file name"))
                })?;
                let p = path.join(f);
                if !files.contains(&p) {
                    files.push(p);
                }
            }
            files.sort();
            return Ok(Checkpoint { files });
        }
        let single = path.join("model.safetensors");
        if single.is_file() {
            return Ok(Checkpoint {
                files: vec![single],
            });
        }
        Err(format_err(
            path,
            "neither model.safetensors nor model.safetensors.index.json found",
        ))
    }
}

/// A read-only memory map of one safetensors file.
#[derive(Debug)]
pub struct MappedFile {
    /// The file.
    pub path: PathBuf,
    mmap: memmap2::Mmap,
}

impl MappedFile {
    /// Maps `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
        // SAFETY: a read-only map; as with every mmap-based loader (safetensors, PEFT),
        // another process truncating the file meanwhile is undefined behaviour we accept
        // for zero-copy reads.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io_err(path, e))?;
        Ok(MappedFile {
            path: path.to_path_buf(),
            mmap,
        })
    }

    /// Parses the header, naming the file on error.
    pub fn tensors(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.mmap)
            .map_err(|e| format_err(&self.path, format!("not a valid safetensors file: {e}")))
    }

    /// The byte offset in the file of `slice`, a slice of this file's map (a tensor's data).
    pub fn offset_of(&self, slice: &[u8]) -> u64 {
        (slice.as_ptr() as usize).saturating_sub(self.mmap.as_ptr() as usize) as u64
    }

    /// The `__metadata__` of the file.
    pub fn metadata(&self) -> Result<Option<std::collections::HashMap<String, String>>> {
        let (_, m) = SafeTensors::read_metadata(&self.mmap)
            .map_err(|e| format_err(&self.path, format!("not a valid safetensors file: {e}")))?;
        Ok(m.metadata().clone())
    }
}

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

/// Where each tensor of a checkpoint lives: name -> index into the mapped files.
pub fn tensor_locations(files: &[MappedFile]) -> Result<BTreeMap<String, usize>> {
    let mut out = BTreeMap::new();
    for (i, f) in files.iter().enumerate() {
        for name in f.tensors()?.names() {
            if let Some(prev) = out.insert(name.to_string(), i) {
                return Err(format_err(
                    &f.path,
                    format!(
                        "tensor {name} also appears in {}",
                        files[prev].path.display()
                    ),
                ));
            }
        }
    }
    Ok(out)
}

/// Reads every floating-point tensor of a checkpoint (a file, a model directory or shards)
/// as f32, for loading a model. Integer buffers such as BERT's `position_ids` are
/// skipped; a bitsandbytes-quantized checkpoint is an error (dequantize it first).
pub fn read_checkpoint_f32(path: &Path) -> Result<BTreeMap<String, lora_core::HostTensor>> {
    let ck = Checkpoint::open(path)?;
    let mut out = BTreeMap::new();
    for p in &ck.files {
        let file = MappedFile::open(p)?;
        let st = file.tensors()?;
        for (name, view) in st.tensors() {
            if name.contains(".weight.quant_state.") || name.ends_with(".SCB") {
                return Err(format_err(
                    p,
                    format!(
                        "tensor {name}: the checkpoint is bitsandbytes-quantized; run `lora dequantize` first"
                    ),
                ));
            }
            if let Some(data) = decode_f32(view.dtype(), view.data()) {
                out.insert(
                    name,
                    lora_core::HostTensor {
                        shape: view.shape().to_vec(),
                        data,
                    },
                );
            }
        }
    }
    Ok(out)
}
