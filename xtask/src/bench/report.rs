//! Building the rows of `target/bench/report.json` from the measurement files under
//! `target/` (criterion's estimates and the JSON the benches and baselines wrote).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::bracket::bracketed;
use super::models::{ModelFamily, model_row, torch_rows};
use crate::cmd::root;

/// One measured figure.
#[derive(Debug, Clone)]
pub(super) struct Row {
    pub(super) backend: String,
    pub(super) op: String,
    pub(super) shape: String,
    pub(super) median_s: f64,
    pub(super) extra: BTreeMap<&'static str, Value>,
}

/// The measured f32 FMA peak (`target/bench/fma_peak.json`) and the vector ISA it ran on.
#[derive(Debug, Clone, Default)]
pub(super) struct FmaPeak {
    /// GFLOP/s over all threads.
    pub(super) gflops: Option<f64>,
    /// `"avx512f"`, `"avx2+fma"` or `"none"`; absent in files from before it was recorded.
    pub(super) isa: Option<String>,
}

pub(super) fn read_json(p: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()
}

/// Every `<dir>/new/benchmark.json` under `target/criterion`.
fn criterion_results(dir: &Path, out: &mut Vec<(Value, Value)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n == "new") {
                if let (Some(b), Some(est)) = (
                    read_json(&p.join("benchmark.json")),
                    read_json(&p.join("estimates.json")),
                ) {
                    out.push((b, est));
                }
            } else {
                criterion_results(&p, out);
            }
        }
    }
}

/// The machine in one line: CPU model, hardware threads, RAM.
pub(super) fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = super::cpuinfo_field(&cpuinfo, "model name").unwrap_or("unknown CPU");
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map_or("?".into(), |kib| {
            format!("{:.0} GiB", kib / 1024.0 / 1024.0)
        });
    format!("{cpu}, {threads} hardware threads, {mem} RAM")
}

/// Reads every measurement under `target/`, writes `target/bench/report.json`, then
/// `docs/benchmarks.md` and `docs/benchmarks.png` (with `cap`: `report-avx2.json`,
/// `benchmarks-avx2.md` and `.png`).
pub(super) fn report(target: &Path, quick: bool, cap: Option<super::IsaCap>) -> Result<()> {
    let fma = read_json(&target.join("bench/fma_peak.json"))
        .map(|v| FmaPeak {
            gflops: v["fma_peak_gflops"].as_f64(),
            isa: v["isa"].as_str().map(String::from),
        })
        .unwrap_or_default();
    check_cap(&fma, cap)?;
    let bert_torch = bracketed(target, "bert_pytorch");
    let decoder_torch = bracketed(target, "decoder_pytorch");
    let families = [
        ModelFamily {
            group: "bert_",
            op_prefix: "minilm_",
            torch: &bert_torch,
        },
        ModelFamily {
            group: "decoder_",
            op_prefix: "llama_",
            torch: &decoder_torch,
        },
    ];
    let mut rows: Vec<Row> = families.iter().flat_map(torch_rows).collect();
    criterion_rows(fma.gflops, &families, &mut rows);
    torch_gemm_rows(target, fma.gflops, &mut rows);
    paired_rows(target, &mut rows);
    merge_rows(target, &mut rows);
    quant_rows(target, &mut rows);
    memory_rows(target, &mut rows);
    rows.sort_by(|a, b| (&a.op, &a.shape, &a.backend).cmp(&(&b.op, &b.shape, &b.backend)));
    write_report(target, &rows, &fma, quick, cap)
}

/// Refuses to label the last run's measurements with the wrong instruction set: a run
/// capped at AVX2 on a CPU with AVX-512 took its FMA peak with 8 lanes (`avx2+fma`), an
/// uncapped one there with 16.
fn check_cap(fma: &FmaPeak, cap: Option<super::IsaCap>) -> Result<()> {
    #[cfg(target_arch = "x86_64")]
    let avx512 = std::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    let avx512 = false;
    let Some(isa) = fma.isa.as_deref().filter(|_| avx512) else {
        return Ok(());
    };
    match (cap.is_some(), isa == "avx2+fma") {
        (true, false) => anyhow::bail!(
            "the measurements under target/bench come from a run that was not capped at AVX2 \
             (FMA peak on {isa}): run `cargo xtask bench --isa avx2`, or drop --isa"
        ),
        (false, true) => anyhow::bail!(
            "the measurements under target/bench come from a run capped at AVX2: add \
             --isa avx2, or run `cargo xtask bench` again"
        ),
        _ => Ok(()),
    }
}

/// `target/bench/report.json`, `docs/benchmarks.md` and `docs/benchmarks.png` from the rows
/// (suffixed `-avx2` with a cap).
fn write_report(
    target: &Path,
    rows: &[Row],
    fma: &FmaPeak,
    quick: bool,
    cap: Option<super::IsaCap>,
) -> Result<()> {
    let suffix = super::IsaCap::suffix(cap);
    let json_rows: Vec<Value> = rows
        .iter()
        .map(|r| {
            let mut o =
                json!({"backend": r.backend, "op": r.op, "shape": r.shape, "median_s": r.median_s});
            for (k, v) in &r.extra {
                o[*k] = v.clone();
            }
            o
        })
        .collect();
    let report = json!({
        "machine": machine(),
        "quick": quick,
        "isa_cap": cap.map(|c| format!("{c:?}")),
        "fma_peak_gflops": fma.gflops,
        "fma_isa": fma.isa,
        "rows": json_rows,
    });
    let dir = target.join("bench");
    std::fs::create_dir_all(&dir)?;
    let json = dir.join(format!("report{suffix}.json"));
    std::fs::write(&json, serde_json::to_string_pretty(&report)? + "\n")?;
    println!("wrote {}", json.display());
    let docs = root().join("docs");
    let (md, png) = (
        format!("benchmarks{suffix}.md"),
        format!("benchmarks{suffix}.png"),
    );
    super::markdown::write_markdown(&docs.join(&md), rows, fma, (quick, cap), &png)?;
    crate::chart::draw(&docs.join(&png), &rows_for_chart(rows))
        .with_context(|| format!("drawing docs/{png}"))?;
    println!("wrote docs/{md} and docs/{png}");
    Ok(())
}

/// Rows from criterion's medians: GEMM (GFLOP/s, fraction of the FMA peak), whole models
/// (against PyTorch + PEFT) and the rest as measured. The LoRA-linear and
/// quantized groups come from `paired.json` / `quant.json` instead.
fn criterion_rows(peak: Option<f64>, families: &[ModelFamily<'_>], rows: &mut Vec<Row>) {
    let mut results = Vec::new();
    criterion_results(&crate::cmd::target_dir().join("criterion"), &mut results);
    for (b, est) in &results {
        let group = b["group_id"].as_str().unwrap_or_default();
        let function = b["function_id"].as_str().unwrap_or_default();
        let Some(median_ns) = est["median"]["point_estimate"].as_f64() else {
            continue;
        };
        let (op, shape) = function.split_once('/').unwrap_or((function, ""));
        let backend = match (group, op) {
            ("gemm", "matrixmultiply") => "matrixmultiply (its threading)",
            ("gemm", "gemm_crate") => "gemm crate (its rayon threading)",
            ("gemm", "gemm_crate_xWt") => "gemm crate (its rayon threading), x·Wᵀ",
            ("gemm", "ndarray_backend_xWt") => "ndarray, x·Wᵀ",
            _ => "ndarray",
        };
        let extra = match group {
            "gemm" => gemm_rate(shape, median_ns, peak),
            _ => BTreeMap::new(),
        };
        if group.starts_with("lora_linear") || group.starts_with("quant_") {
            continue; // from paired.json / quant.json: the interleaved figures
        }
        if let Some(f) = families.iter().find(|f| group.starts_with(f.group)) {
            rows.extend(model_row(function, median_ns, f));
            continue;
        }
        let op_name = if group == "gemm" {
            "gemm".to_string()
        } else {
            op.to_string()
        };
        rows.push(Row {
            backend: backend.into(),
            op: op_name,
            shape: shape.into(),
            median_s: median_ns * 1e-9,
            extra,
        });
    }
}

/// PyTorch's `torch.mm` on the GEMM bench's products (`pytorch.json`'s `"matmul"`), as
/// GFLOP/s and the fraction of the FMA peak, like ours.
fn torch_gemm_rows(target: &Path, peak: Option<f64>, rows: &mut Vec<Row>) {
    let torch = bracketed(target, "pytorch");
    for (key, v) in torch["matmul"].as_object().into_iter().flatten() {
        let Some(median_s) = v["median_s"].as_f64() else {
            continue;
        };
        let (shape, backend) = match key.strip_suffix("_xWt") {
            Some(shape) => (shape, "PyTorch torch.mm (its BLAS and threading), x·Wᵀ"),
            None => (key.as_str(), "PyTorch torch.mm (its BLAS and threading)"),
        };
        rows.push(Row {
            backend: backend.into(),
            op: "gemm".into(),
            shape: shape.into(),
            median_s,
            extra: gemm_rate(shape, median_s * 1e9, peak),
        });
    }
}

/// GFLOP/s of an `m x n x k` product taking `median_ns`, and its fraction of `peak`.
fn gemm_rate(shape: &str, median_ns: f64, peak: Option<f64>) -> BTreeMap<&'static str, Value> {
    let mut extra = BTreeMap::new();
    let dims: Vec<f64> = shape.split('x').filter_map(|d| d.parse().ok()).collect();
    let gflops = 2.0 * dims.iter().product::<f64>() / median_ns;
    extra.insert("gflops", json!((gflops * 10.0).round() / 10.0));
    if let Some(p) = peak {
        extra.insert(
            "fraction_of_fma_peak",
            json!((gflops / p * 1000.0).round() / 1000.0),
        );
    }
    extra
}

/// LoRA over frozen, interleaved, for us (`paired.json`) and for PyTorch + PEFT
/// (`pytorch.json`).
fn paired_rows(target: &Path, rows: &mut Vec<Row>) {
    let paired = read_json(&target.join("bench/paired.json")).unwrap_or(json!({}));
    let torch = bracketed(target, "pytorch");
    // Ours: "<backend>/<op>/<shape>"; PyTorch's: "<op>/<shape>".
    let ours = paired
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| {
            let (backend, key) = k.split_once('/')?;
            Some((backend.to_string(), key.to_string(), v))
        });
    let theirs = torch
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| ("pytorch+peft".to_string(), k.clone(), v));
    for (backend, key, v) in ours.chain(theirs) {
        let backend = backend.as_str();
        let Some((op, shape)) = key.split_once('/') else {
            continue;
        };
        let (Some(ratio), Some(f), Some(l)) = (
            v["ratio"].as_f64(),
            v["frozen_s"].as_f64(),
            v["lora_s"].as_f64(),
        ) else {
            continue;
        };
        let mut extra = BTreeMap::new();
        extra.insert("lora_over_base", json!((ratio * 1e4).round() / 1e4));
        if backend != "pytorch+peft"
            && let Some(tl) = torch[key.as_str()]["lora_s"].as_f64()
        {
            extra.insert("vs_pytorch", json!(((l / tl) * 1e4).round() / 1e4));
        }
        for (kind, secs, extra) in [("frozen", f, BTreeMap::new()), ("lora", l, extra)] {
            rows.push(Row {
                backend: backend.into(),
                op: format!("{kind}_{op}"),
                shape: shape.into(),
                median_s: secs,
                extra,
            });
        }
    }
}

/// `lora merge` against PyTorch + PEFT on all-MiniLM-L6-v2 (`merge.json`).
fn merge_rows(target: &Path, rows: &mut Vec<Row>) {
    let Some(m) = read_json(&target.join("bench/merge.json")) else {
        return;
    };
    let theirs = m["pytorch+peft"]["median_s"].as_f64();
    for (backend, key) in [("ndarray", "lora"), ("pytorch+peft", "pytorch+peft")] {
        let Some(t) = m[key]["median_s"].as_f64() else {
            continue;
        };
        let mut extra = BTreeMap::new();
        if let Some(rss) = m[key]["peak_rss_bytes"].as_u64() {
            extra.insert("peak_rss_bytes", json!(rss));
        }
        if backend == "ndarray"
            && let Some(p) = theirs
        {
            extra.insert("vs_pytorch", json!(((t / p) * 1e4).round() / 1e4));
        }
        rows.push(Row {
            backend: backend.into(),
            op: "merge_checkpoint".into(),
            shape: "all-MiniLM-L6-v2 r16".into(),
            median_s: t,
            extra,
        });
    }
}

/// Rows of the quantized-base benchmarks (`quant.json`, `quant_bytes.json`, `bnb.json`).
fn quant_rows(target: &Path, rows: &mut Vec<Row>) {
    let round = |v: f64| (v * 1e4).round() / 1e4;
    let quant = read_json(&target.join("bench/quant.json")).unwrap_or(json!({}));
    let bytes = read_json(&target.join("bench/quant_bytes.json")).unwrap_or(json!({}));
    let bnb = read_json(&target.join("bench/bnb.json")).unwrap_or(json!({}));
    let ours = quant
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| {
            let (backend, key) = k.split_once('/')?;
            Some((backend.to_string(), key.to_string(), k.clone(), v.clone()))
        });
    let theirs = bnb
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.contains('/'))
        .map(|(k, v)| {
            (
                "pytorch+peft+bnb".to_string(),
                k.clone(),
                String::new(),
                v.clone(),
            )
        });
    for (backend, key, full_key, v) in ours.chain(theirs) {
        let Some((op, shape)) = key.split_once('/') else {
            continue;
        };
        let (Some(ratio), Some(base), Some(t)) = (
            v["ratio"].as_f64(),
            v["frozen_s"].as_f64(),
            v["lora_s"].as_f64(),
        ) else {
            continue;
        };
        let mut extra = BTreeMap::new();
        if backend != "pytorch+peft+bnb"
            && let Some(p) = bnb[key.as_str()]["lora_s"].as_f64()
        {
            extra.insert("vs_pytorch", json!(round(t / p)));
        }
        if op == "qlora_fwd_bwd" {
            extra.insert("qlora_over_f32_lora", json!(round(ratio)));
            extra.insert("f32_lora_s", json!(base));
            let b = &bytes[full_key.as_str()];
            if let (Some(f), Some(q)) = (b["f32_bytes"].as_u64(), b["quant_bytes"].as_u64()) {
                extra.insert("f32_weight_bytes", json!(f));
                extra.insert("quant_weight_bytes", json!(q));
                extra.insert("weight_memory_ratio", json!(round(q as f64 / f as f64)));
            }
        } else {
            let dims: Vec<f64> = shape.split('x').filter_map(|d| d.parse().ok()).collect();
            let out_bytes = 4.0 * dims.iter().product::<f64>();
            extra.insert("output_gb_per_s", json!(round(out_bytes / t / 1e9)));
            extra.insert("copy_gb_per_s", json!(round(out_bytes / base / 1e9)));
            extra.insert("fraction_of_copy_bandwidth", json!(round(base / t)));
        }
        rows.push(Row {
            backend,
            op: op.to_string(),
            shape: shape.to_string(),
            median_s: t,
            extra,
        });
    }
}

/// Rows of the memory measurements: training memory of one layer (`memory.json`), the
/// peak RSS of `lora demo` (`demo_memory.json`) and of the decoder and MiniLM training
/// steps (`decoder_memory.json`, `bert_memory.json`).
fn memory_rows(target: &Path, rows: &mut Vec<Row>) {
    peak_rss_rows(target, "decoder_memory.json", rows, |name| {
        (name.to_string(), "decoder_train_peak_rss", String::new())
    });
    peak_rss_rows(target, "bert_memory.json", rows, |name| {
        (name.to_string(), "bert_train_peak_rss", "32x128".into())
    });
    if let Some(m) = read_json(&target.join("bench/memory.json")) {
        for v in m.as_array().into_iter().flatten() {
            let mut extra = BTreeMap::new();
            for k in [
                "trainable_parameters",
                "optimizer_state_bytes",
                "frozen_weight_bytes",
                "peak_rss_bytes",
            ] {
                if let Some(x) = v[k].as_u64() {
                    extra.insert(k, json!(x));
                }
            }
            rows.push(Row {
                backend: "ndarray".into(),
                op: format!("train_memory_{}", v["mode"].as_str().unwrap_or("?")),
                shape: v["shape"].as_str().unwrap_or("").into(),
                median_s: 0.0,
                extra,
            });
        }
    }
    peak_rss_rows(target, "demo_memory.json", rows, |quant| {
        (
            "ndarray".to_string(),
            "demo_peak_rss",
            format!("MLP 1-1024-1024-1024-1, {quant} base"),
        )
    });
}

/// One row per entry `{"<key>": {"seconds", "peak_rss_bytes"}}` of `target/bench/<file>`,
/// with `(backend, op, shape)` from the key.
fn peak_rss_rows(
    target: &Path,
    file: &str,
    rows: &mut Vec<Row>,
    label: impl Fn(&str) -> (String, &'static str, String),
) {
    let Some(m) = read_json(&target.join("bench").join(file)) else {
        return;
    };
    for (key, v) in m.as_object().into_iter().flatten() {
        let (Some(secs), Some(rss)) = (v["seconds"].as_f64(), v["peak_rss_bytes"].as_u64()) else {
            continue;
        };
        let (backend, op, shape) = label(key);
        let mut extra = BTreeMap::new();
        extra.insert("peak_rss_bytes", json!(rss));
        rows.push(Row {
            backend,
            op: op.into(),
            shape,
            median_s: secs,
            extra,
        });
    }
}

/// `(shape, [(backend, LoRA/frozen fwd+bwd)])` for the chart.
fn rows_for_chart(rows: &[Row]) -> Vec<(String, Vec<(String, f64)>)> {
    let mut by_shape: BTreeMap<String, Vec<(String, f64)>> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.op == "lora_fwd_bwd") {
        if let Some(v) = r.extra.get("lora_over_base").and_then(Value::as_f64) {
            by_shape
                .entry(r.shape.clone())
                .or_default()
                .push((r.backend.clone(), v));
        }
    }
    by_shape.into_iter().collect()
}
