//! A Hugging Face checkpoint on disk: one `.safetensors` file, or a model directory with
//! `model.safetensors` or shards listed in `model.safetensors.index.json`. Opened (every
//! shard mapped) once, then handed to whatever reads it.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use lora_core::HostTensor;

use crate::bnb_format::quantized_modules;
use crate::dtype::decode_f32;
use crate::error::{Error, Result};
use crate::safetensors_file::{MappedFile, RawTensor};

/// Where one tensor of a [`Checkpoint`] is stored ([`Checkpoint::entries`]).
#[derive(Clone, Debug)]
pub struct TensorEntry {
    /// Storage type.
    pub dtype: safetensors::Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Index into [`Checkpoint::files`].
    file: usize,
    /// Byte offset of the data in that file, and its length.
    offset: u64,
    len: usize,
}

/// Every shard of a checkpoint, mapped.
#[derive(Debug)]
pub struct Checkpoint {
    files: Vec<MappedFile>,
}

/// The shard files of the checkpoint at `path`, in a stable order.
fn shard_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    if !path.is_dir() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        ));
    }
    let index = path.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(index.display(), format!("invalid JSON: {e}")))?;
        let map = v["weight_map"]
            .as_object()
            .ok_or_else(|| Error::format(index.display(), "no \"weight_map\" object"))?;
        let mut files: Vec<PathBuf> = Vec::new();
        for (tensor, f) in map {
            let f = f.as_str().ok_or_else(|| {
                Error::format(
                    index.display(),
                    format!("weight_map[{tensor:?}] is not a file name"),
                )
            })?;
            let p = path.join(f);
            if !files.contains(&p) {
                files.push(p);
            }
        }
        files.sort();
        return Ok(files);
    }
    let single = path.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(Error::format(
        path.display(),
        "neither model.safetensors nor model.safetensors.index.json found",
    ))
}

impl Checkpoint {
    /// Finds and maps the files of the checkpoint at `path` (a file, a model directory or
    /// a sharded index).
    pub fn open(path: &Path) -> Result<Self> {
        let files = shard_files(path)?
            .iter()
            .map(|p| MappedFile::open(p))
            .collect::<Result<_>>()?;
        Ok(Checkpoint { files })
    }

    /// The mapped shard files.
    pub fn files(&self) -> &[MappedFile] {
        &self.files
    }

    /// The first file (named in errors).
    pub fn path(&self) -> String {
        self.files
            .first()
            .map(|f| f.path.display().to_string())
            .unwrap_or_default()
    }

    /// Every tensor by name, borrowed from the maps. A name in two shards is an error.
    pub fn tensors(&self) -> Result<BTreeMap<String, RawTensor<'_>>> {
        let mut out = BTreeMap::new();
        for f in &self.files {
            for (name, view) in f.tensors()?.tensors() {
                let t = RawTensor {
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    data: Cow::Borrowed(view.data()),
                };
                if out.insert(name.clone(), t).is_some() {
                    return Err(Error::format(
                        f.path.display(),
                        format!("tensor {name} appears in two shards"),
                    ));
                }
            }
        }
        Ok(out)
    }

    /// Every tensor's dtype, shape and place, without reading any data: for loaders that
    /// read one tensor at a time ([`Checkpoint::read`]) and keep at most that one besides
    /// what they built. A name in two shards is an error.
    pub fn entries(&self) -> Result<BTreeMap<String, TensorEntry>> {
        let mut out = BTreeMap::new();
        for (file, f) in self.files.iter().enumerate() {
            for (name, view) in f.tensors()?.tensors() {
                let e = TensorEntry {
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    file,
                    offset: f.offset_of(view.data()),
                    len: view.data().len(),
                };
                if out.insert(name.clone(), e).is_some() {
                    return Err(Error::format(
                        f.path.display(),
                        format!("tensor {name} appears in two shards"),
                    ));
                }
            }
        }
        Ok(out)
    }

    /// One tensor's bytes, by a positioned read rather than through the map (a map keeps
    /// every page it touched resident, so reading a whole checkpoint through it would hold
    /// the file's size in memory on top of the model).
    pub fn read(&self, entry: &TensorEntry) -> Result<RawTensor<'static>> {
        let f = self.files.get(entry.file).ok_or_else(|| {
            Error::format(
                self.path(),
                "tensor entry of another checkpoint".to_string(),
            )
        })?;
        let data = f
            .read_at(entry.offset, entry.len)
            .map_err(|e| Error::io(&f.path, e))?;
        Ok(RawTensor {
            dtype: entry.dtype,
            shape: entry.shape.clone(),
            data: Cow::Owned(data),
        })
    }

    /// Where each tensor lives: name -> index into [`Checkpoint::files`].
    pub fn locations(&self) -> Result<BTreeMap<String, usize>> {
        let mut out = BTreeMap::new();
        for (i, f) in self.files.iter().enumerate() {
            for name in f.tensors()?.names() {
                if let Some(prev) = out.insert(name.to_string(), i) {
                    return Err(Error::format(
                        f.path.display(),
                        format!(
                            "tensor {name} also appears in {}",
                            self.files[prev].path.display()
                        ),
                    ));
                }
            }
        }
        Ok(out)
    }

    /// The first file's `__metadata__`, with PyTorch's `"format": "pt"` when absent.
    pub fn metadata(&self) -> Result<HashMap<String, String>> {
        let mut m = match self.files.first() {
            Some(f) => f.metadata()?.unwrap_or_default(),
            None => HashMap::new(),
        };
        m.entry("format".into()).or_insert_with(|| "pt".into());
        Ok(m)
    }

    /// Whether the checkpoint holds bitsandbytes-quantized modules.
    pub fn is_quantized(&self) -> Result<bool> {
        let mut names: Vec<String> = Vec::new();
        for f in &self.files {
            names.extend(f.tensors()?.names().into_iter().map(str::to_owned));
        }
        Ok(!quantized_modules(&names).is_empty())
    }

    /// Every floating-point tensor as f32, for loading a model. Integer buffers such as
    /// BERT's `position_ids` are skipped; a bitsandbytes-quantized checkpoint is an error
    /// (dequantize it first).
    pub fn read_f32(&self) -> Result<BTreeMap<String, HostTensor>> {
        let mut out = BTreeMap::new();
        for file in &self.files {
            let st = file.tensors()?;
            for (name, view) in st.tensors() {
                if name.contains(".weight.quant_state.") || name.ends_with(".SCB") {
                    return Err(Error::format(
                        file.path.display(),
                        format!(
                            "tensor {name}: the checkpoint is bitsandbytes-quantized; run `lora dequantize` first"
                        ),
                    ));
                }
                if let Some(data) = decode_f32(view.dtype(), view.data()) {
                    out.insert(
                        name,
                        HostTensor {
                            shape: view.shape().to_vec(),
                            data,
                        },
                    );
                }
            }
        }
        Ok(out)
    }
}

/// Reads every floating-point tensor of the checkpoint at `path` as f32
/// ([`Checkpoint::read_f32`]).
pub fn read_checkpoint_f32(path: &Path) -> Result<BTreeMap<String, HostTensor>> {
    Checkpoint::open(path)?.read_f32()
}
