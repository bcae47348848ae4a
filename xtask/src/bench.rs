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
    if backends.contains(&"tch") {
        crate::venv::torch_env(&mut cmd)?;
        cmd.args(["--features", "tch"]);
    }
    if backends.contains(&"cuda") {
        // Runs the CUDA benches when a GPU is present; prints why not otherwise.
        cmd.args(["--features", "cuda"]);
    }
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
            .env("LORA_BENCH_SECONDS", if quick { "3" } else { "8" })
            .envs(quick.then_some(("LORA_BENCH_QUICK", "1"))),
    )?;
    // PyTorch + PEFT on all-MiniLM-L6-v2 (encoder forward, LoRA training step).
    let _ = std::fs::remove_file(target.join("bench/bert_pytorch.json"));
    run_cmd(
        "PyTorch + PEFT on all-MiniLM-L6-v2 (benches/python/bert_minilm.py)",
        std::process::Command::new(crate::venv::ensure_venv()?)
            .arg(root().join("benches/python/bert_minilm.py"))
            .arg(crate::venv::fetch_minilm()?)
            .arg(target.join("bench/bert_pytorch.json"))
            .env("LORA_BENCH_SECONDS", if quick { "3" } else { "8" }),
    )?;
    // bitsandbytes + PEFT for the quantized-base workloads.
    let _ = std::fs::remove_file(target.join("bench/bnb.json"));
    run_cmd(
        "bitsandbytes + PEFT baseline (benches/python/bnb_quant.py)",
        std::process::Command::new(crate::venv::ensure_venv()?)
            .arg(root().join("benches/python/bnb_quant.py"))
            .arg(target.join("bench/bnb.json"))
            .env("LORA_BENCH_SECONDS", if quick { "3" } else { "8" }),
    )?;
    merge_bench(&target, quick)?;
    demo_memory(&target)?;
    train_memory(&target)?;
    report(&target, quick)
}

/// Trainable parameters, optimizer state and peak RSS of full fine-tuning, LoRA and QLoRA
/// of one (512, 4096, 4096) layer, each in its own process (`benches/bin/memory.rs`), as
/// `target/bench/memory.json`.
fn train_memory(target: &Path) -> Result<()> {
    let mut build = cargo();
    build.args([
        "build",
        "--release",
        "-p",
        "lora-benches",
        "--bin",
        "lora-memory",
    ]);
    run_cmd("cargo build --release --bin lora-memory", &mut build)?;
    let exe = target.join("release/lora-memory");
    let mut out = Vec::new();
    for mode in ["full", "lora", "qlora"] {
        let rss_file =
            std::env::temp_dir().join(format!("lora-memory-{}-{mode}", std::process::id()));
        let o = std::process::Command::new("/usr/bin/time")
            .args(["-f", "%M", "-o"])
            .arg(&rss_file)
            .arg(&exe)
            .arg(mode)
            .output()
            .context("running lora-memory under /usr/bin/time")?;
        anyhow::ensure!(o.status.success(), "lora-memory {mode} failed");
        let mut v: Value = serde_json::from_slice(&o.stdout).context("lora-memory output")?;
        let rss = std::fs::read_to_string(&rss_file)
            .ok()
            .and_then(|s| s.trim().lines().last()?.trim().parse::<u64>().ok())
            .map(|kib| kib * 1024);
        let _ = std::fs::remove_file(&rss_file);
        v["peak_rss_bytes"] = json!(rss);
        println!("lora-memory {mode}: {v}");
        out.push(v);
    }
    std::fs::write(
        target.join("bench/memory.json"),
        serde_json::to_string_pretty(&Value::Array(out))? + "\n",
    )?;
    Ok(())
}

/// Peak RSS of `lora demo` with an f32 base and with each quantized base (a wider MLP so
/// that the weights matter), as `target/bench/demo_memory.json`.
fn demo_memory(target: &Path) -> Result<()> {
    let lora = target.join("release/lora");
    let mut build = cargo();
    build.args(["build", "--release", "-p", "lora-cli"]);
    run_cmd("cargo build --release -p lora-cli", &mut build)?;
    let mut out = serde_json::Map::new();
    for quant in ["f32", "nf4", "int8"] {
        let mut cmd = std::process::Command::new(&lora);
        cmd.args([
            "demo",
            "--hidden",
            "1024",
            "--pretrain-steps",
            "20",
            "--steps",
            "20",
            "--out",
        ])
        .arg(target.join(format!("tmp/demo-memory-{quant}")));
        if quant != "f32" {
            cmd.args(["--quant", quant]);
        }
        let (secs, rss) = timed(&mut cmd)?;
        println!("lora demo --hidden 1024 ({quant} base): {secs:.2} s, peak RSS {rss:?} bytes");
        out.insert(
            quant.into(),
            json!({"seconds": secs, "peak_rss_bytes": rss}),
        );
    }
    std::fs::write(
        target.join("bench/demo_memory.json"),
        serde_json::to_string_pretty(&Value::Object(out))? + "\n",
    )?;
    Ok(())
}

/// Wall time and peak RSS (bytes) of one process run, via GNU time when present.
fn timed(cmd: &mut std::process::Command) -> Result<(f64, Option<u64>)> {
    let gnu_time = Path::new("/usr/bin/time");
    let rss_file = std::env::temp_dir().join(format!("lora-xtask-time-{}", std::process::id()));
    let started = std::time::Instant::now();
    let status = if gnu_time.exists() {
        let mut wrapped = std::process::Command::new(gnu_time);
        wrapped
            .arg("-f")
            .arg("%M")
            .arg("-o")
            .arg(&rss_file)
            .arg(cmd.get_program())
            .args(cmd.get_args());
        wrapped
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()?
    } else {
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()?
    };
    let secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        status.success(),
        "{:?} failed ({status})",
        cmd.get_program()
    );
    let rss = std::fs::read_to_string(&rss_file)
        .ok()
        .and_then(|s| s.trim().lines().last()?.trim().parse::<u64>().ok())
        .map(|kib| kib * 1024);
    let _ = std::fs::remove_file(&rss_file);
    Ok((secs, rss))
}

/// `lora merge` against PEFT's merge_and_unload + save_pretrained on the real
/// all-MiniLM-L6-v2 checkpoint, end to end (process start to exit), alternating runs.
fn merge_bench(target: &Path, quick: bool) -> Result<()> {
    let model = crate::venv::fetch_minilm()?;
    let python = crate::venv::ensure_venv()?;
    let adapter = crate::venv::cache_dir().join("models/minilm-adapter-r16");
    let script = root().join("benches/python/peft_merge.py");
    if !adapter.join("adapter_model.safetensors").is_file() {
        run_cmd(
            "make a PEFT adapter for all-MiniLM-L6-v2 (r 16, query/key/value/dense)",
            std::process::Command::new(&python)
                .arg(&script)
                .arg("make-adapter")
                .arg(&model)
                .arg(&adapter),
        )?;
    }
    run_cmd(
        "cargo build --release -p lora-cli",
        cargo().args(["build", "--release", "-p", "lora-cli"]),
    )?;
    let lora = target.join("release/lora");
    let work = target.join("bench/merge");
    std::fs::create_dir_all(&work)?;
    let runs = if quick { 3 } else { 5 };
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    println!(
        "==> merge benchmark: lora merge vs PEFT merge_and_unload + save_pretrained ({runs} runs each, alternating)"
    );
    for _ in 0..runs {
        ours.push(timed(
            std::process::Command::new(&lora)
                .arg("merge")
                .arg("--base")
                .arg(&model)
                .arg("--adapter")
                .arg(&adapter)
                .arg("--out")
                .arg(work.join("lora-merged.safetensors")),
        )?);
        theirs.push(timed(
            std::process::Command::new(&python)
                .arg(&script)
                .arg("merge")
                .arg(&model)
                .arg(&adapter)
                .arg(work.join("peft-merged")),
        )?);
    }
    let median = |v: &[(f64, Option<u64>)]| {
        let mut t: Vec<f64> = v.iter().map(|x| x.0).collect();
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    };
    let peak = |v: &[(f64, Option<u64>)]| v.iter().filter_map(|x| x.1).max();
    let out = json!({
        "model": "all-MiniLM-L6-v2 (86.6 MiB f32), adapter r 16 on query/key/value/dense (36 modules)",
        "lora": {"median_s": median(&ours), "peak_rss_bytes": peak(&ours)},
        "pytorch+peft": {"median_s": median(&theirs), "peak_rss_bytes": peak(&theirs)},
    });
    std::fs::write(
        target.join("bench/merge.json"),
        serde_json::to_string_pretty(&out)? + "\n",
    )?;
    println!("{out}");
    Ok(())
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
    let mut rows_torch_bert: Vec<Row> = Vec::new();

    let bert_torch = read_json(&target.join("bench/bert_pytorch.json")).unwrap_or(json!({}));
    for (op, v) in bert_torch.as_object().into_iter().flatten() {
        let Some((op, shape)) = op.split_once('/') else {
            continue;
        };
        if let Some(t) = v["median_s"].as_f64() {
            rows_torch_bert.push(Row {
                backend: "pytorch+peft".into(),
                op: format!("minilm_{op}"),
                shape: shape.into(),
                median_s: t,
                extra: BTreeMap::new(),
            });
        }
    }
    let mut rows: Vec<Row> = std::mem::take(&mut rows_torch_bert);
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
        if group.starts_with("lora_linear") || group.starts_with("quant_") {
            continue; // from paired.json / quant.json: the interleaved figures
        }
        if group.starts_with("bert_") {
            // "<backend>/<op>/<shape>", against PyTorch + PEFT's time for the same op.
            let mut parts = function.splitn(3, '/');
            let (Some(be), Some(op), Some(shape)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let mut extra = BTreeMap::new();
            if let Some(t) = bert_torch[format!("{op}/{shape}").as_str()]["median_s"].as_f64() {
                extra.insert(
                    "vs_pytorch",
                    json!((median_ns * 1e-9 / t * 1e4).round() / 1e4),
                );
            }
            rows.push(Row {
                backend: be.into(),
                op: format!("minilm_{op}"),
                shape: shape.into(),
                median_s: median_ns * 1e-9,
                extra,
            });
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
    // LoRA over frozen, interleaved, for us and for PyTorch + PEFT.
    let torch = read_json(&target.join("bench/pytorch.json")).unwrap_or(json!({}));
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
        {
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
    if let Some(m) = read_json(&target.join("bench/merge.json")) {
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
    quant_rows(target, &mut rows);
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

/// Rows of the quantized-base benchmarks (`quant.json`, `quant_bytes.json`, `bnb.json`,
/// `demo_memory.json`).
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
    if let Some(m) = read_json(&target.join("bench/demo_memory.json")) {
        for (quant, v) in m.as_object().into_iter().flatten() {
            let (Some(secs), Some(rss)) = (v["seconds"].as_f64(), v["peak_rss_bytes"].as_u64())
            else {
                continue;
            };
            let mut extra = BTreeMap::new();
            extra.insert("peak_rss_bytes", json!(rss));
            rows.push(Row {
                backend: "ndarray".into(),
                op: "demo_peak_rss".into(),
                shape: format!("MLP 1-1024-1024-1024-1, {quant} base"),
                median_s: secs,
                extra,
            });
        }
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
        if r.backend != "pytorch+peft" && op == "fwd_bwd" {
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
    md.push_str("\n## Merging an adapter into a checkpoint\n\n");
    md.push_str("`lora merge --base all-MiniLM-L6-v2 --adapter A --out F` against what a PEFT user runs (`BertModel.from_pretrained`, `PeftModel.from_pretrained`, `merge_and_unload`, `save_pretrained`), each timed end to end as a process (imports included), runs alternating. Goal: 10x faster. `lora merge` reads each base tensor with `pread` when the writer needs it, so its peak RSS is about the largest tensor (here the 46.9 MiB word embeddings) plus the program, not the 86.6 MiB model.\n\n");
    md.push_str("| tool | wall time (median) | peak RSS | time vs PEFT |\n|---|---|---|---|\n");
    for r in rows.iter().filter(|r| r.op == "merge_checkpoint") {
        let vs = r.extra.get("vs_pytorch").and_then(Value::as_f64);
        md.push_str(&format!(
            "| {} | {:.3} s | {} | {} |\n",
            if r.backend == "ndarray" {
                "lora merge"
            } else {
                "PyTorch + PEFT"
            },
            r.median_s,
            r.extra
                .get("peak_rss_bytes")
                .and_then(Value::as_u64)
                .map_or("?".into(), |b| format!("{:.0} MiB", b as f64 / 1048576.0)),
            vs.map_or(String::new(), |v| format!(
                "{:.3}x ({:.0}x faster; goal 10x {})",
                v,
                1.0 / v,
                if 1.0 / v >= 10.0 { "met" } else { "missed" }
            )),
        ));
    }
    md.push_str("\n## all-MiniLM-L6-v2 (BERT encoder)\n\n");
    md.push_str("Batch 32 x 128 tokens, every token attended. `encoder_fwd`: inference forward (last hidden state). `lora_train_step`: LoRA r=8 on query and value, mean pooling, a linear head, cross-entropy, backward through the whole encoder, AdamW. PyTorch + PEFT (`benches/python/bert_minilm.py`) runs the same workloads on the same CPU in the same `cargo xtask bench` run. Goal: faster than PyTorch on CPU.\n\n| op | backend | median | vs PyTorch+PEFT | goal |\n|---|---|---|---|---|\n");
    for r in rows.iter().filter(|r| r.op.starts_with("minilm_")) {
        let vs = r.extra.get("vs_pytorch").and_then(Value::as_f64);
        md.push_str(&format!(
            "| {} | {} | {:.3} s | {} | {} |\n",
            r.op.trim_start_matches("minilm_"),
            r.backend,
            r.median_s,
            vs.map_or(String::new(), |v| format!("{v:.3}x")),
            vs.map_or(String::new(), |v| if v < 1.0 {
                "met".to_string()
            } else {
                format!("missed: {:.0}% slower", (v - 1.0) * 100.0)
            }),
        ));
    }
    md.push_str("\n## Quantized bases (QLoRA)\n\n");
    md.push_str("`qlora_fwd_bwd`: LoRA forward+backward on an NF4 base (blocksize 64, double quantization; dequantized a block of rows at a time next to the GEMM) against the same LoRA on the f32 base, interleaved in one timed loop. Goal: 1.25x or less at a quarter of the weight memory or less. bitsandbytes + PEFT (`benches/python/bnb_quant.py`: PEFT on `Linear4bit`, f32 compute, on this CPU) is measured the same way in the same run. `dequantize_nf4`: the whole 4096x4096 weight to f32, against copying the same f32 output (the copy bandwidth).\n\n");
    md.push_str("| op | shape | backend | baseline | quantized | ratio | weight memory | vs bitsandbytes+PEFT | goal |\n|---|---|---|---|---|---|---|---|---|\n");
    for r in rows
        .iter()
        .filter(|r| r.op == "qlora_fwd_bwd" || r.op == "dequantize_nf4")
    {
        let g = |k: &str| r.extra.get(k).and_then(Value::as_f64);
        let (ratio, baseline, memory, goal) = if r.op == "qlora_fwd_bwd" {
            let ratio = g("qlora_over_f32_lora");
            let base = g("f32_lora_s").map(|s| format!("f32 LoRA {:.1} ms", s * 1e3));
            let mem = g("weight_memory_ratio");
            let goal = match (ratio, mem) {
                (Some(v), Some(m)) => format!(
                    "1.25x {} ({:.3}x); 1/4 memory {} ({:.3})",
                    if v <= 1.25 { "met" } else { "missed" },
                    v,
                    if m <= 0.25 { "met" } else { "missed" },
                    m
                ),
                _ => String::new(),
            };
            (
                ratio.map(|v| format!("{v:.3}x")),
                base,
                mem.map(|m| format!("{:.1}% of f32", m * 100.0)),
                goal,
            )
        } else {
            let frac = g("fraction_of_copy_bandwidth");
            let base = g("copy_gb_per_s").map(|v| format!("copy {v:.1} GB/s"));
            let ratio = match (g("output_gb_per_s"), frac) {
                (Some(gb), Some(f)) => Some(format!("{gb:.1} GB/s out, {:.0}% of copy", f * 100.0)),
                _ => None,
            };
            (ratio, base, None, String::new())
        };
        md.push_str(&format!(
            "| {} | {} | {} | {} | {:.2} ms | {} | {} | {} | {} |\n",
            r.op,
            r.shape,
            r.backend,
            baseline.unwrap_or_default(),
            r.median_s * 1e3,
            ratio.unwrap_or_default(),
            memory.unwrap_or_default(),
            g("vs_pytorch").map_or(String::new(), |v| format!("{v:.3}x")),
            goal,
        ));
    }
    let train_rows: Vec<&Row> = rows
        .iter()
        .filter(|r| r.op.starts_with("train_memory_"))
        .collect();
    if !train_rows.is_empty() {
        md.push_str("\n## Memory: full fine-tuning, LoRA and QLoRA of one layer\n\nOne (512, 4096, 4096) linear layer, three AdamW training steps, each configuration in its own process (`benches/bin/memory.rs`), peak RSS from GNU time. LoRA is r=16.\n\n| training | trainable parameters | optimizer state | frozen weight resident | peak RSS |\n|---|---|---|---|---|\n");
        let mib = |b: Option<u64>| {
            b.map_or("?".to_string(), |b| {
                format!("{:.1} MiB", b as f64 / 1048576.0)
            })
        };
        for r in train_rows {
            let g = |k: &str| r.extra.get(k).and_then(Value::as_u64);
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                match r.op.trim_start_matches("train_memory_") {
                    "full" => "full fine-tuning (f32)",
                    "lora" => "LoRA on the f32 layer",
                    "qlora" => "QLoRA (NF4 base, double quantization)",
                    other => other,
                },
                g("trainable_parameters").map_or("?".into(), |v| v.to_string()),
                mib(g("optimizer_state_bytes")),
                if r.op.ends_with("full") {
                    "(trains)".to_string()
                } else {
                    mib(g("frozen_weight_bytes"))
                },
                mib(g("peak_rss_bytes")),
            ));
        }
    }
    let mem_rows: Vec<&Row> = rows.iter().filter(|r| r.op == "demo_peak_rss").collect();
    if !mem_rows.is_empty() {
        md.push_str("\nPeak RSS of the whole `lora demo --hidden 1024` process (it pretrains the f32 MLP first, with Adam state, so the f32 phase sets the peak; the frozen-base bytes the demo prints are the per-layer figure):\n\n| run | wall time | peak RSS |\n|---|---|---|\n");
        for r in mem_rows {
            md.push_str(&format!(
                "| {} | {:.2} s | {} |\n",
                r.shape,
                r.median_s,
                r.extra
                    .get("peak_rss_bytes")
                    .and_then(Value::as_u64)
                    .map_or("?".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0)),
            ));
        }
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
