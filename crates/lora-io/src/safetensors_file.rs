//! One safetensors file: memory-mapped reading, positioned (`pread`) reads of single
//! tensors, and crash-safe writing of f32 or raw tensors.
#![allow(unsafe_code)]

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use lora_core::HostTensor;
use safetensors::{Dtype, SafeTensors, View};

use crate::dtype::decode_f32;
use crate::error::{Error, Result};
use crate::fs::{PendingFile, write_atomic};

/// A safetensors file mapped read-only, with an open handle for positioned reads.
pub struct MappedFile {
    /// The file.
    pub path: PathBuf,
    file: std::fs::File,
    mmap: memmap2::Mmap,
}

impl std::fmt::Debug for MappedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedFile")
            .field("path", &self.path)
            .finish()
    }
}

impl MappedFile {
    /// Maps `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: a read-only map; as with every mmap-based loader (safetensors, PEFT),
        // another process truncating the file meanwhile is undefined behaviour we accept
        // for zero-copy reads.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Ok(MappedFile {
            path: path.to_path_buf(),
            file,
            mmap,
        })
    }

    /// Parses the header, naming the file on error.
    pub fn tensors(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.mmap).map_err(|e| {
            Error::format(
                self.path.display(),
                format!("not a valid safetensors file: {e}"),
            )
        })
    }

    /// The byte offset in the file of `slice`, a slice of this file's map (a tensor's data).
    pub fn offset_of(&self, slice: &[u8]) -> u64 {
        (slice.as_ptr() as usize).saturating_sub(self.mmap.as_ptr() as usize) as u64
    }

    /// The `__metadata__` of the file.
    pub fn metadata(&self) -> Result<Option<HashMap<String, String>>> {
        let (_, m) = SafeTensors::read_metadata(&self.mmap).map_err(|e| {
            Error::format(
                self.path.display(),
                format!("not a valid safetensors file: {e}"),
            )
        })?;
        Ok(m.metadata().clone())
    }

    /// Reads `len` bytes at `offset` with a positioned read (not through the map), so that
    /// a streaming writer holds one tensor at a time: a map keeps every page it touched
    /// resident.
    pub fn read_at(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        #[cfg(unix)]
        {
            use std::os::unix::fs::FileExt;
            self.file.read_exact_at(&mut buf, offset)?;
        }
        #[cfg(not(unix))]
        {
            use std::io::{Read, Seek, SeekFrom};
            let mut f = &self.file;
            f.seek(SeekFrom::Start(offset))?;
            f.read_exact(&mut buf)?;
        }
        Ok(buf)
    }
}

/// A tensor as stored: dtype, shape and little-endian bytes (borrowed from a memory map
/// where possible).
#[derive(Clone, Debug)]
pub struct RawTensor<'a> {
    /// Storage type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Bytes.
    pub data: Cow<'a, [u8]>,
}

impl RawTensor<'_> {
    /// An owned f32 tensor.
    pub fn f32(shape: Vec<usize>, values: &[f32]) -> RawTensor<'static> {
        RawTensor {
            dtype: Dtype::F32,
            shape,
            data: Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        }
    }

    /// An owned uint8 tensor.
    pub fn u8(shape: Vec<usize>, bytes: Vec<u8>) -> RawTensor<'static> {
        RawTensor {
            dtype: Dtype::U8,
            shape,
            data: Cow::Owned(bytes),
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

impl View for &RawTensor<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Writes f32 tensors to a safetensors file with PyTorch's `{"format": "pt"}` metadata,
/// atomically (temporary file, then rename).
pub fn write_safetensors(path: &Path, tensors: &[(String, HostTensor)]) -> Result<()> {
    let format_err = |reason: String| Error::format(path.display(), reason);
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, t)| t.data.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, t), b)| {
            safetensors::tensor::TensorView::new(Dtype::F32, t.shape.clone(), b)
                .map(|v| (name.clone(), v))
                .map_err(|e| format_err(format!("tensor {name}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let out =
        safetensors::serialize(views, Some(metadata)).map_err(|e| format_err(e.to_string()))?;
    write_atomic(path, &out)?;
    Ok(())
}

/// Reads every tensor of a safetensors file (memory-mapped), converting f32, f16 and
/// bf16 to f32.
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, HostTensor>> {
    let file = MappedFile::open(path)?;
    let st = file.tensors()?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let data = decode_f32(view.dtype(), view.data()).ok_or_else(|| {
            Error::format(
                path.display(),
                format!(
                    "tensor {name} has dtype {:?}; expected F32, F16 or BF16",
                    view.dtype()
                ),
            )
        })?;
        out.insert(
            name,
            HostTensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok(out)
}

/// Writes raw tensors to `out` crash-safely (`fs::PendingFile`: nothing at `out` until
/// complete, nothing left by a crash), creating its directory.
pub fn write_raw(
    out: &Path,
    tensors: &BTreeMap<String, RawTensor<'_>>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let mut pending = PendingFile::create(out)?;
    serialize_to_writer(tensors.iter(), Some(metadata), pending.file())
        .map_err(|e| Error::format(out.display(), format!("writing: {e}")))?;
    pending.commit()
}

/// Serializes tensors in the safetensors format to `out`, each tensor's bytes asked for
/// only when the writer reaches it (a merge produces them one at a time), in the layout
/// `safetensors::serialize` gives: tensors by descending dtype alignment, then by name,
/// the header padded with spaces to 8 bytes. Unlike `safetensors::serialize_to_file`
/// (which makes its own temporary file beside the path, left behind by a crash), it writes
/// where it is told: a [`PendingFile`].
pub fn serialize_to_writer<S, V, I, W>(
    tensors: I,
    metadata: Option<HashMap<String, String>>,
    out: W,
) -> std::result::Result<(), safetensors::SafeTensorError>
where
    S: AsRef<str> + Ord + std::fmt::Display,
    V: safetensors::View,
    I: IntoIterator<Item = (S, V)>,
    W: std::io::Write,
{
    use std::io::Write;

    use safetensors::tensor::{Metadata, TensorInfo};
    let mut tensors: Vec<(S, V)> = tensors.into_iter().collect();
    tensors.sort_by(|(ln, l), (rn, r)| r.dtype().cmp(&l.dtype()).then(ln.cmp(rn)));
    let mut offset = 0usize;
    let infos = tensors
        .iter()
        .map(|(name, t)| {
            let n = t.data_len();
            let info = TensorInfo {
                dtype: t.dtype(),
                shape: t.shape().to_vec(),
                data_offsets: (offset, offset + n),
            };
            offset += n;
            (name.to_string(), info)
        })
        .collect();
    let mut header = serde_json::to_string(&Metadata::new(metadata, infos)?)?.into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut w = std::io::BufWriter::with_capacity(1 << 20, out);
    w.write_all(&(header.len() as u64).to_le_bytes())?;
    w.write_all(&header)?;
    for (_, t) in &tensors {
        w.write_all(&t.data())?;
    }
    w.flush()?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use safetensors::tensor::TensorView;

    use super::*;

    #[test]
    fn streamed_files_equal_the_safetensors_crates_bytes() {
        let (f32s, f16s, u8s) = ([7u8; 24], [1u8; 12], [3u8; 5]);
        let views = || {
            [
                ("b.weight", TensorView::new(Dtype::F32, vec![2, 3], &f32s)),
                ("a.weight", TensorView::new(Dtype::F16, vec![6], &f16s)),
                ("c.absmax", TensorView::new(Dtype::U8, vec![5], &u8s)),
                ("a.bias", TensorView::new(Dtype::F32, vec![6], &f32s)),
            ]
            .map(|(n, v)| (n, v.unwrap()))
        };
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        let want = safetensors::serialize(views(), Some(meta.clone())).unwrap();
        let mut got = Vec::new();
        serialize_to_writer(views(), Some(meta), &mut got).unwrap();
        assert_eq!(got, want);
    }
}
