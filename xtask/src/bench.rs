//! `cargo xtask bench`: runs the criterion benches and turns their medians into
//! `target/bench/report.json`, `docs/benchmarks.md` and `docs/benchmarks.png`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::cmd::{cargo, root, run as run_cmd};

/// One measured figure.
#[derive(Debug, Clone)]
struct Row {
    backend: String,
    op: String,
    shape: String,
    median_s: f64,
    extra: BTreeMap<&'static str, Value>,
}

fn read_json(p: &Path) -> Option<Value> {
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

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
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

/// Runs the benches and writes the report.
pub fn run(backends: &[&str], quick: bool) -> Result<()> {
    for (name, missing) in crate::BACKENDS {
        if let (true, Some(why)) = (backends.contains(&name), missing) {
            println!("backend {name}: skipped ({why})");
        }
    }
    if !backends.contains(&"ndarray") {
        println!("nothing to run");
        return Ok(());
    }
    let target = root().join("target");
    let _ = std::fs::remove_dir_all(target.join("criterion"));
    let mut cmd = cargo();
    cmd.args(["bench", "-p", "lora-benches"]);
    if quick {
        cmd.env("LORA_BENCH_QUICK", "1");
    }
    run_cmd(
        &format!(
            "cargo bench -p lora-benches{}",
            if quick { " (quick)" } else { "" }
        ),
        &mut cmd,
    )?;
    // The PyTorch + PEFT baseline, minutes apart on the same machine.
    let python = crate::venv::ensure_venv()?;
    let _ = std::fs::remove_file(target.join("bench/pytorch.json"));
    run_cmd(
        "PyTorch + PEFT baseline (benches/python/peft_linear.py)",
        std::process::Command::new(python)
            .arg(root().join("benches/python/peft_linear.py"))
            .arg(target.join("bench/pytorch.json"))
            .env("LORA_BENCH_SECONDS", if quick { "3" } else { "8" }),
    )?;
    report(&target, quick)
}

/// Rebuilds the report and chart from the last run's files under `target/`.
pub fn report_only(quick: bool) -> Result<()> {
    report(&root().join("target"), quick)
}

fn report(target: &Path, quick: bool) -> Result<()> {
    let mut results = Vec::new();
    criterion_results(&target.join("criterion"), &mut results);
    let peak =
        read_json(&target.join("bench/fma_peak.json")).and_then(|v| v["fma_peak_gflops"].as_f64());
    let paired = read_json(&target.join("bench/paired.json")).unwrap_or(json!({}));

    let mut rows: Vec<Row> = Vec::new();
    for (b, est) in &results {
        let group = b["group_id"].as_str().unwrap_or_default();
        let function = b["function_id"].as_str().unwrap_or_default();
        let Some(median_ns) = est["median"]["point_estimate"].as_f64() else {
            continue;
        };
        let (op, shape) = function.split_once('/').unwrap_or((function, ""));
        let mut extra = BTreeMap::new();
        let backend = match (group, op) {
            ("gemm", "matrixmultiply") => "ndarray (matrixmultiply)",
            _ => "ndarray",
        };
        if group == "gemm" {
            let dims: Vec<f64> = shape.split('x').filter_map(|d| d.parse().ok()).collect();
            let gflops = 2.0 * dims.iter().product::<f64>() / median_ns;
            extra.insert("gflops", json!((gflops * 10.0).round() / 10.0));
            if let Some(p) = peak {
                extra.insert(
                    "fraction_of_fma_peak",
                    json!((gflops / p * 1000.0).round() / 1000.0),
                );
            }
        }
        if group == "lora_linear" {
            continue; // from paired.json below: the interleaved frozen/LoRA figures
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
    // LoRA over frozen, interleaved, for us and for PyTorch + PEFT.
    let torch = read_json(&target.join("bench/pytorch.json")).unwrap_or(json!({}));
    for (backend, src) in [("ndarray", &paired), ("pytorch+peft", &torch)] {
        let Some(obj) = src.as_object() else { continue };
        for (key, v) in obj {
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
            if backend == "ndarray"
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
    rows.sort_by(|a, b| (&a.op, &a.shape, &a.backend).cmp(&(&b.op, &b.shape, &b.backend)));

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
        "fma_peak_gflops": peak,
        "rows": json_rows,
    });
    let dir = target.join("bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    println!("wrote {}", dir.join("report.json").display());
    let docs = root().join("docs");
    write_markdown(&docs.join("benchmarks.md"), &rows, peak, quick)?;
    crate::chart::draw(&docs.join("benchmarks.png"), &rows_for_chart(&rows))
        .context("drawing docs/benchmarks.png")?;
    println!("wrote docs/benchmarks.md and docs/benchmarks.png");
    Ok(())
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

/// FLOP floor of LoRA fwd+bwd over the frozen layer: six rank-r products of `2 n r d`
/// against the frozen forward and input-gradient products of `2 n in out` each.
fn flop_floor(shape: &str) -> Option<f64> {
    let (dims, r) = shape.split_once('r')?;
    let d: Vec<f64> = dims.split('x').filter_map(|v| v.parse().ok()).collect();
    let r: f64 = r.parse().ok()?;
    let (inp, out) = (*d.get(1)?, *d.get(2)?);
    Some(1.0 + 6.0 * r * (inp + out) / (4.0 * inp * out))
}

fn write_markdown(path: &PathBuf, rows: &[Row], peak: Option<f64>, quick: bool) -> Result<()> {
    let mut md = String::new();
    md.push_str("# Benchmarks\n\n");
    md.push_str("Generated by `cargo xtask bench` from `target/bench/report.json`; do not edit by hand.\n\n");
    md.push_str(&format!("- Machine: {}\n", machine()));
    md.push_str(&format!(
        "- Measured f32 FMA peak: {}\n",
        peak.map_or("not measured".into(), |p| format!(
            "{p:.1} GFLOP/s (all threads, 8 independent AVX2 FMA chains each)"
        ))
    ));
    md.push_str(&format!(
        "- Mode: {}\n",
        if quick {
            "`--quick` (fewer, shorter samples)"
        } else {
            "full"
        }
    ));
    md.push_str("- Allocator: mimalloc (as in the `lora` binary)\n\n");
    md.push_str(
        "![LoRA fwd+bwd over frozen fwd+bwd, ndarray and PyTorch+PEFT](benchmarks.png)\n\n",
    );

    md.push_str("## LoRA linear layer against the frozen layer\n\n");
    md.push_str("Each ratio is the median over samples of interleaved runs (frozen layer, then LoRA layer, in one timed loop), so machine drift cancels; PyTorch + PEFT is measured the same way (`benches/python/peft_linear.py`) in the same `cargo xtask bench` run. `fwd_bwd` is training (forward, then backward with `dx`; LoRA adds `dA`, `dB`), `fwd` is inference. Goals: LoRA fwd+bwd at most 1.05x the frozen layer, and at most 0.9x PyTorch + PEFT's LoRA time. The FLOP floor counts the six rank-r products LoRA adds: `1 + 6 r (in + out) / (4 in out)`.\n\n");
    md.push_str("| op | tokens x in x out, rank | backend | frozen | LoRA | LoRA / frozen | FLOP floor | vs PyTorch+PEFT | goals |\n|---|---|---|---|---|---|---|---|---|\n");
    let frozen: BTreeMap<(String, String, String), f64> = rows
        .iter()
        .filter(|r| r.op.starts_with("frozen_"))
        .map(|r| {
            (
                (
                    r.backend.clone(),
                    r.op.replacen("frozen_", "", 1),
                    r.shape.clone(),
                ),
                r.median_s,
            )
        })
        .collect();
    for r in rows.iter().filter(|r| r.op.starts_with("lora_")) {
        let op = r.op.replacen("lora_", "", 1);
        let ratio = r.extra.get("lora_over_base").and_then(Value::as_f64);
        let vs = r.extra.get("vs_pytorch").and_then(Value::as_f64);
        let floor = if op == "fwd_bwd" {
            flop_floor(&r.shape)
        } else {
            None
        };
        let mut goals = Vec::new();
        if r.backend == "ndarray" && op == "fwd_bwd" {
            if let Some(v) = ratio {
                goals.push(if v <= 1.05 {
                    "1.05x met".to_string()
                } else {
                    format!("1.05x missed by {:.1}%", (v / 1.05 - 1.0) * 100.0)
                });
            }
            if let Some(v) = vs {
                goals.push(if v <= 0.9 {
                    "0.9x PyTorch met".to_string()
                } else {
                    format!("0.9x PyTorch missed by {:.1}%", (v / 0.9 - 1.0) * 100.0)
                });
            }
        }
        md.push_str(&format!(
            "| {op} | {} | {} | {} | {:.3} ms | {} | {} | {} | {} |\n",
            r.shape,
            r.backend,
            frozen
                .get(&(r.backend.clone(), op.clone(), r.shape.clone()))
                .map_or(String::new(), |f| format!("{:.3} ms", f * 1e3)),
            r.median_s * 1e3,
            ratio.map_or(String::new(), |v| format!("{v:.3}x")),
            floor.map_or(String::new(), |v| format!("{v:.3}x")),
            vs.map_or(String::new(), |v| format!("{v:.3}x")),
            goals.join("; "),
        ));
    }
    md.push_str("\n## Matrix multiplication\n\n");
    md.push_str("`ndarray` is our backend (the `gemm` crate, our panel threading for skinny shapes); `matrixmultiply` is ndarray's own `dot` with its threading feature, the alternative we measured against. Goal: 85% of the measured FMA peak on large shapes.\n\n");
    md.push_str("| engine | m x n x k | median | GFLOP/s | of FMA peak |\n|---|---|---|---|---|\n");
    for r in rows.iter().filter(|r| r.op == "gemm") {
        md.push_str(&format!(
            "| {} | {} | {:.3} ms | {} | {} |\n",
            r.backend,
            r.shape,
            r.median_s * 1e3,
            r.extra
                .get("gflops")
                .map_or(String::new(), |v| v.to_string()),
            r.extra
                .get("fraction_of_fma_peak")
                .and_then(Value::as_f64)
                .map_or(String::new(), |v| format!("{:.0}%", v * 100.0)),
        ));
    }
    std::fs::write(path, md).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flop_floor_matches_hand_count() {
        let f = flop_floor("2048x384x384r8").unwrap_or(0.0);
        assert!((f - 1.0625).abs() < 1e-9, "{f}");
        let f = flop_floor("512x4096x4096r16").unwrap_or(0.0);
        assert!((f - (1.0 + 96.0 / 8192.0)).abs() < 1e-9, "{f}");
    }
}
