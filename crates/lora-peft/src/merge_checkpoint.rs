//! `lora merge`: fold a PEFT adapter into a plain Hugging Face checkpoint, streaming tensor
//! by tensor so that peak memory is about the largest merged tensor, not the model.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use lora_core::{DEFAULT_ADAPTER, HostTensor, LoraOps, WeightRounding};
use lora_io::fs::PendingFile;
use lora_io::serialize_to_writer;
use lora_io::{
    Checkpoint, MappedFile, MergeTarget, decode_f32, encode_f32, is_float, merge_into_quantized,
};
use safetensors::{Dtype, View};

use crate::adapter_file::{
    CONFIG_FILE, ModuleTensors, WEIGHTS_FILE, check_rank, lora_modules, token_rows,
};
use crate::config::LoraConfig;
use crate::error::{PeftError, Result};
use crate::merge_token_rows::{TokenRows, checked_token_rows};

/// The dtype of the merged checkpoint's floating-point tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutDtype {
    /// Each tensor keeps the base's dtype (untouched tensors are copied byte for byte).
    Keep,
    /// All f32/f16/bf16 tensors stored as f32.
    F32,
    /// ... as f16.
    F16,
    /// ... as bf16.
    BF16,
}

impl OutDtype {
    fn resolve(self, base: Dtype) -> Dtype {
        match (self, is_float(base)) {
            (_, false) | (OutDtype::Keep, true) => base,
            (OutDtype::F32, true) => Dtype::F32,
            (OutDtype::F16, true) => Dtype::F16,
            (OutDtype::BF16, true) => Dtype::BF16,
        }
    }
}

/// What `lora merge` did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MergeReport {
    /// Base tensors that received a LoRA delta.
    pub merged: Vec<String>,
    /// Tensors copied byte for byte.
    pub copied: usize,
    /// Tensors converted to another dtype without a delta.
    pub converted: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
    /// Largest |ΔW| element added (a sanity figure for the user).
    pub max_abs_delta: f32,
    /// For a quantized base: the worst module's rounding of the re-quantized result against
    /// the exact f32 merge.
    pub rounding: Option<WeightRounding>,
}

/// The adapter's LoRA factors for one module, on the host.
struct Factors {
    a: HostTensor,
    b: HostTensor,
    scaling: f32,
    /// DoRA's magnitude: the merged weight is `(m / ‖W + s·BA‖) ⊙ (W + s·BA)` by rows.
    magnitude: Option<HostTensor>,
    /// The magnitude scales columns instead (`fan_in_fan_out`, or an embedding table,
    /// whose magnitude has one value per dimension).
    magnitude_per_column: bool,
}

/// One output tensor; its bytes are produced only when the writer asks for them.
struct OutTensor<'a, B: LoraOps> {
    dtype: Dtype,
    shape: Vec<usize>,
    src_dtype: Dtype,
    /// Where the base tensor's bytes are: read with `pread` when the writer asks, so the
    /// process holds one tensor at a time (a memory map would keep every page it touched
    /// resident).
    src: Source<'a>,
    merge: Option<&'a Factors>,
    /// Rows replaced by trained token rows (after the LoRA delta, if both).
    rows: Option<&'a TokenRows>,
    transpose_delta: bool,
    backend: &'a B,
    state: &'a RefCell<WriteState<'a>>,
    name: String,
}

/// A byte range of a mapped file, read with `pread` when the writer asks for it.
struct Source<'a> {
    file: &'a MappedFile,
    offset: u64,
    len: usize,
}

impl Source<'_> {
    fn read(&self) -> std::io::Result<Vec<u8>> {
        self.file.read_at(self.offset, self.len)
    }
}

struct WriteState<'a> {
    error: Option<PeftError>,
    done: u64,
    total: u64,
    max_abs_delta: f32,
    progress: &'a dyn Fn(u64, u64),
}

impl<B: LoraOps> OutTensor<'_, B> {
    /// The merged tensor in f32; the largest change is recorded for the report.
    fn merged(&self, src: &[u8]) -> lora_core::Result<Vec<f32>> {
        let base = decode_f32(self.src_dtype, src).unwrap_or_default();
        let (w, max) = merged_weight(
            self.backend,
            self.merge,
            self.rows,
            self.transpose_delta,
            base,
        )?;
        let mut st = self.state.borrow_mut();
        st.max_abs_delta = st.max_abs_delta.max(max);
        Ok(w)
    }
}

/// `W + s·B·A` (the delta transposed for `fan_in_fan_out` and embedding tables), DoRA's
/// rescaling by `m / ‖W + s·BA‖`, then the trained token rows in place, all in f32 over the
/// decoded (or dequantized) base `w`. Returns the merged weight and its largest change.
fn merged_weight<B: LoraOps>(
    backend: &B,
    factors: Option<&Factors>,
    rows: Option<&TokenRows>,
    transpose_delta: bool,
    mut w: Vec<f32>,
) -> lora_core::Result<(Vec<f32>, f32)> {
    let mut max = 0.0f32;
    if let Some(f) = factors {
        let a = f.a.to_backend(backend)?;
        let b = f.b.to_backend(backend)?;
        let delta = backend.lora_delta_weight(&a, &b, f.scaling, transpose_delta)?;
        let delta = backend.to_host(&delta)?;
        let base = f.magnitude.as_ref().map(|_| w.clone());
        for (w, d) in w.iter_mut().zip(&delta) {
            *w += d;
            max = max.max(d.abs());
        }
        if let (Some(m), Some(base)) = (&f.magnitude, base) {
            dora_rescale(&mut w, &m.data, f.magnitude_per_column);
            max = w
                .iter()
                .zip(&base)
                .fold(max, |acc, (n, o)| acc.max((n - o).abs()));
        }
    }
    if let Some(t) = rows {
        let dim = t.rows.shape[1];
        for (&i, row) in t.indices.iter().zip(t.rows.data.chunks_exact(dim)) {
            let dst = &mut w[i * dim..(i + 1) * dim];
            max = dst
                .iter()
                .zip(row)
                .fold(max, |m, (a, b)| m.max((a - b).abs()));
            dst.copy_from_slice(row);
        }
    }
    Ok((w, max))
}

impl<B: LoraOps> View for &OutTensor<'_, B> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let result: std::result::Result<Vec<u8>, String> = match self.src.read() {
            Err(e) => Err(format!("reading {}: {e}", self.src.file.path.display())),
            Ok(src) => match (self.merge, self.rows) {
                (None, None) if self.dtype == self.src_dtype => Ok(src),
                (None, None) => {
                    let v = decode_f32(self.src_dtype, &src).unwrap_or_default();
                    Ok(encode_f32(self.dtype, &v).unwrap_or_default())
                }
                _ => self
                    .merged(&src)
                    .map(|w| encode_f32(self.dtype, &w).unwrap_or_default())
                    .map_err(|e| e.to_string()),
            },
        };
        let mut st = self.state.borrow_mut();
        st.done += 1;
        (st.progress)(st.done, st.total);
        match result {
            Ok(bytes) => Cow::Owned(bytes),
            Err(reason) => {
                // The writer cannot fail from here: remember the error, write zeros of the
                // right length, and let the caller delete the file.
                st.error.get_or_insert(PeftError::Format {
                    path: self.name.clone(),
                    reason: format!("tensor {}: {reason}", self.name),
                });
                Cow::Owned(vec![0u8; self.data_len()])
            }
        }
    }

    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// The adapter directory for `adapter_name`: `dir` itself for `default` (or when `dir`
/// holds the adapter directly), else `dir/<adapter_name>`.
pub fn adapter_dir_for(dir: &Path, adapter_name: &str) -> PathBuf {
    let sub = dir.join(adapter_name);
    if adapter_name != DEFAULT_ADAPTER && sub.join(CONFIG_FILE).is_file() {
        sub
    } else {
        dir.to_path_buf()
    }
}

/// Merges the adapter at `adapter_dir` (`adapter_name` selects a subfolder adapter) into
/// the checkpoint at `base` and writes one safetensors file `out` with exactly the base's
/// tensor names and shapes. Everything is validated before a byte is written; the output
/// is written to a temporary file and renamed, so an error leaves no output behind. The
/// base is opened (mapped) once.
pub fn merge_checkpoint<B: LoraOps>(
    backend: &B,
    base: &Path,
    adapter_dir: &Path,
    adapter_name: &str,
    out: &Path,
    dtype: OutDtype,
    progress: &dyn Fn(u64, u64),
) -> Result<MergeReport> {
    let dir = adapter_dir_for(adapter_dir, adapter_name);
    let config = LoraConfig::from_file(&dir.join(CONFIG_FILE))?;
    config.check_supported()?;
    let weights_path = dir.join(WEIGHTS_FILE);
    let adapter_tensors = lora_io::read_safetensors(&weights_path)?;
    let modules = lora_modules(&adapter_tensors, &weights_path, adapter_name)?;
    for (module, t) in &modules {
        check_rank(&config, module, t, &weights_path)?;
    }
    let ckpt = Checkpoint::open(base)?;
    let token_merges = checked_token_rows(
        &ckpt,
        &weights_path,
        &config,
        token_rows(&adapter_tensors, adapter_name),
    )?;
    if ckpt.is_quantized()? {
        return merge_quantized(
            backend,
            &ckpt,
            &config,
            modules,
            token_merges,
            &weights_path,
            out,
        );
    }
    let factors = checked_factors(&ckpt, base, &weights_path, &config, modules)?;
    let locations = ckpt.locations()?;
    let parsed: Vec<_> = ckpt
        .files()
        .iter()
        .map(MappedFile::tensors)
        .collect::<std::result::Result<_, _>>()?;
    let progress_state = RefCell::new(WriteState {
        error: None,
        done: 0,
        total: locations.len() as u64,
        max_abs_delta: 0.0,
        progress,
    });
    let mut report = MergeReport::default();
    let mut outs: Vec<(String, OutTensor<'_, B>)> = Vec::with_capacity(locations.len());
    for (name, &fi) in &locations {
        let file = &ckpt.files()[fi];
        let view = parsed[fi].tensor(name).map_err(|e| PeftError::Format {
            path: file.path.display().to_string(),
            reason: format!("tensor {name}: {e}"),
        })?;
        let merge = factors.get(name);
        let rows = token_merges.get(name);
        let out_dtype = dtype.resolve(view.dtype());
        match (merge.is_some() || rows.is_some(), out_dtype == view.dtype()) {
            (true, _) => report.merged.push(name.clone()),
            (false, true) => report.copied += 1,
            (false, false) => report.converted += 1,
        }
        let t = OutTensor {
            dtype: out_dtype,
            shape: view.shape().to_vec(),
            src_dtype: view.dtype(),
            src: Source {
                file,
                offset: file.offset_of(view.data()),
                len: view.data().len(),
            },
            merge,
            rows,
            transpose_delta: config.fan_in_fan_out,
            backend,
            state: &progress_state,
            name: name.clone(),
        };
        report.bytes += View::data_len(&&t) as u64;
        outs.push((name.clone(), t));
    }
    let metadata: HashMap<String, String> = ckpt.files()[0]
        .metadata()?
        .unwrap_or_else(|| HashMap::from([("format".to_string(), "pt".to_string())]));
    write_streamed(out, &outs, metadata, &progress_state)?;
    report.max_abs_delta = progress_state.borrow().max_abs_delta;
    Ok(report)
}

/// Checks every adapter module against the base (tensor present, float, 2-D, factor
/// shapes) before anything is written, and returns the factors by base tensor name.
fn checked_factors(
    ckpt: &Checkpoint,
    base: &Path,
    weights_path: &Path,
    config: &LoraConfig,
    modules: BTreeMap<String, ModuleTensors>,
) -> Result<BTreeMap<String, Factors>> {
    let tensors = ckpt.tensors()?;
    let mut factors: BTreeMap<String, Factors> = BTreeMap::new();
    for (module, t) in modules {
        let key = format!("{module}.weight");
        let view = tensors.get(&key).ok_or_else(|| PeftError::Format {
            path: base.display().to_string(),
            reason: format!(
                "the adapter targets module {module}, but the base has no tensor {key}"
            ),
        })?;
        if !is_float(view.dtype) {
            return Err(PeftError::Format {
                path: weights_path.display().to_string(),
                reason: format!(
                    "base tensor {key} has dtype {:?}; only F32, F16 and BF16 weights can be merged",
                    view.dtype
                ),
            });
        }
        let f = module_factors(&module, t, &view.shape, config, weights_path)?;
        factors.insert(key, f);
    }
    Ok(factors)
}

/// One module's factors checked against its base weight's shape (`[out, in]`, `[in, out]`
/// for `fan_in_fan_out`, `[vocab, dim]` for an embedding table).
fn module_factors(
    module: &str,
    tensors: ModuleTensors,
    wshape: &[usize],
    config: &LoraConfig,
    weights_path: &Path,
) -> Result<Factors> {
    let ModuleTensors {
        a,
        b,
        magnitude,
        embedding,
    } = tensors;
    let key = format!("{module}.weight");
    let bad = |reason: String| PeftError::Format {
        path: weights_path.display().to_string(),
        reason,
    };
    let (out_f, in_f) = match (wshape, config.fan_in_fan_out) {
        ([o, i], false) => (*o, *i),
        ([i, o], true) => (*o, *i),
        _ => {
            return Err(bad(format!(
                "base tensor {key} has shape {wshape:?}; a linear weight is 2-D"
            )));
        }
    };
    if a.shape.len() != 2 || a.shape[1] != in_f || b.shape != [out_f, a.shape[0]] {
        return Err(bad(format!(
            "module {module}: lora_A {:?} and lora_B {:?} do not fit base {key} {wshape:?} (expected lora_A [r, {in_f}], lora_B [{out_f}, r])",
            a.shape, b.shape
        )));
    }
    let magnitude_len = if embedding { in_f } else { out_f };
    if let Some(m) = &magnitude
        && m.shape != [magnitude_len]
    {
        return Err(bad(format!(
            "module {module}: lora_magnitude_vector {:?} does not fit base {key} {wshape:?} (expected [{magnitude_len}])",
            m.shape
        )));
    }
    Ok(Factors {
        a,
        b,
        scaling: config.spec_for(module, 0)?.scaling(),
        magnitude,
        magnitude_per_column: config.fan_in_fan_out || embedding,
    })
}

/// Serializes the planned tensors into a pending output for `out` (each tensor's bytes
/// produced when the writer reaches it), committed only when all of them were written:
/// on an error, a kill or a full disk nothing is left (`lora_io::fs::PendingFile`).
fn write_streamed<B: LoraOps>(
    out: &Path,
    outs: &[(String, OutTensor<'_, B>)],
    metadata: HashMap<String, String>,
    state: &RefCell<WriteState<'_>>,
) -> Result<()> {
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| PeftError::Io {
            path: parent.display().to_string(),
            source: e,
        })?;
    }
    let mut pending = PendingFile::create(out)?;
    let written = serialize_to_writer(
        outs.iter().map(|(n, t)| (n.as_str(), t)),
        Some(metadata),
        pending.file(),
    );
    let error = state.borrow_mut().error.take();
    match (written, error) {
        (Err(e), _) => Err(PeftError::Format {
            path: out.display().to_string(),
            reason: format!("writing: {e}"),
        }),
        (Ok(()), Some(e)) => Err(e),
        (Ok(()), None) => Ok(pending.commit()?),
    }
}

/// `lora merge` into a bitsandbytes-quantized base: each targeted module is dequantized,
/// merged in f32 (LoRA, DoRA's rescaling from the dequantized weight's norm, as PEFT's
/// `bnb.Linear4bit.merge`) and quantized again with its own settings; float tables
/// (embeddings) take their LoRA delta and token rows exactly. The report carries the
/// rounding against the exact merge.
fn merge_quantized<B: LoraOps>(
    backend: &B,
    base: &Checkpoint,
    config: &LoraConfig,
    mut modules: BTreeMap<String, ModuleTensors>,
    token_merges: BTreeMap<String, TokenRows>,
    weights_path: &Path,
    out: &Path,
) -> Result<MergeReport> {
    let rows_of = |module: &str| token_merges.get(&format!("{module}.weight"));
    let targets: BTreeSet<String> = modules
        .keys()
        .cloned()
        .chain(
            token_merges
                .keys()
                .map(|k| k.strip_suffix(".weight").unwrap_or(k).to_string()),
        )
        .collect();
    let mut max_abs_delta = 0.0f32;
    let q = merge_into_quantized(
        base,
        &targets,
        |target: MergeTarget<'_>, w: Vec<f32>| -> Result<Vec<f32>> {
            let module = target.module;
            if target.quantized && config.fan_in_fan_out {
                return Err(PeftError::Unsupported {
                    field: "fan_in_fan_out",
                    value: "true".into(),
                    reason: format!(
                        "module {module}: bitsandbytes-quantized layers are nn.Linear ([out, in]); Conv1D bases are not quantized"
                    ),
                });
            }
            let factors = match modules.remove(module) {
                Some(t) => Some(module_factors(
                    module,
                    t,
                    target.shape,
                    config,
                    weights_path,
                )?),
                None => None,
            };
            let (merged, max) = merged_weight(
                backend,
                factors.as_ref(),
                rows_of(module),
                config.fan_in_fan_out,
                w,
            )?;
            max_abs_delta = max_abs_delta.max(max);
            Ok(merged)
        },
        out,
    )?;
    Ok(MergeReport {
        merged: q
            .merged
            .iter()
            .map(|(m, _)| format!("{m}.weight"))
            .collect(),
        copied: q.copied,
        converted: 0,
        bytes: std::fs::metadata(out).map(|m| m.len()).unwrap_or(0),
        max_abs_delta,
        rounding: Some(q.worst()),
    })
}

/// DoRA's merge on the host: `w` holds `W + s·BA`; each output feature `j` (a row of
/// `[out, in]`, or a column when `fan_in_fan_out` or for an embedding table) is scaled by
/// `m_j / ‖W_j + s·(BA)_j‖`.
fn dora_rescale(w: &mut [f32], m: &[f32], per_column: bool) {
    let out_f = m.len().max(1);
    let in_f = w.len() / out_f;
    let at = |j: usize, k: usize| match per_column {
        false => j * in_f + k,
        true => k * out_f + j,
    };
    for (j, &mj) in m.iter().enumerate() {
        let norm = (0..in_f)
            .map(|k| f64::from(w[at(j, k)]).powi(2))
            .sum::<f64>()
            .sqrt();
        let factor = (f64::from(mj) / norm) as f32;
        for k in 0..in_f {
            w[at(j, k)] *= factor;
        }
    }
}
