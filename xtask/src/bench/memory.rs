//! Per-process memory probes: peak RSS (via GNU time) of the training-memory binary and
//! of `lora demo`, and the wall time and peak RSS of one process run.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::cmd::{cargo, run as run_cmd};

/// Trainable parameters, optimizer state and peak RSS of full fine-tuning, LoRA and QLoRA
/// of one (512, 4096, 4096) layer, each in its own process (`benches/bin/memory.rs`), as
/// `target/bench/memory.json`.
pub(super) fn train_memory(target: &Path) -> Result<()> {
    let exe = build_bench_bin("lora-memory")?;
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

/// Builds one of `lora-benches`' binaries in release mode; returns its path.
fn build_bench_bin(name: &str) -> Result<std::path::PathBuf> {
    let mut build = cargo();
    build.args(["build", "--release", "-p", "lora-benches", "--bin", name]);
    run_cmd(&format!("cargo build --release --bin {name}"), &mut build)?;
    Ok(crate::cmd::target_dir().join("release").join(name))
}

/// Peak RSS of `lora demo` with an f32 base and with each quantized base (a wider MLP so
/// that the weights matter), as `target/bench/demo_memory.json`.
pub(super) fn demo_memory(target: &Path) -> Result<()> {
    let lora = crate::cmd::target_dir().join("release/lora");
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

/// Peak RSS of the decoder training step (the random Llama of `benches/decoder.rs`, three
/// AdamW steps per process): ours plain, with gradient checkpointing and with the frozen
/// weights loaded from a bf16 checkpoint and kept at 2 bytes
/// (`benches/bin/decoder_memory.rs`), and PyTorch + PEFT (`decoder_llama.py train-memory`),
/// as `target/bench/decoder_memory.json`.
pub(super) fn decoder_memory(target: &Path, quick: bool) -> Result<()> {
    let exe = build_bench_bin("lora-decoder-memory")?;
    let python = crate::venv::ensure_venv()?;
    let script = crate::cmd::root().join("benches/python/decoder_llama.py");
    // The bf16 checkpoint the `bf16` run loads, written by its own process first.
    let bf16_dir = target.join("bench/random-llama-bf16");
    let mut write = std::process::Command::new(&exe);
    write.arg("write-bf16").arg(&bf16_dir);
    write.envs(quick.then_some(("LORA_BENCH_QUICK", "1")));
    crate::cmd::run("writing the random Llama as a bf16 checkpoint", &mut write)?;
    let mut out = serde_json::Map::new();
    for (name, mut cmd) in [
        ("lora-rs", std::process::Command::new(&exe)),
        ("lora-rs, gradient checkpointing", {
            let mut c = std::process::Command::new(&exe);
            c.arg("checkpointing");
            c
        }),
        ("lora-rs, bf16 weights", {
            let mut c = std::process::Command::new(&exe);
            c.arg("bf16").arg(&bf16_dir);
            c
        }),
        ("pytorch+peft", {
            let mut c = std::process::Command::new(&python);
            c.arg(&script).arg("train-memory");
            c
        }),
    ] {
        cmd.envs(quick.then_some(("LORA_BENCH_QUICK", "1")));
        let (secs, rss) = timed(&mut cmd)?;
        println!("decoder training memory, {name}: {secs:.1} s, peak RSS {rss:?} bytes");
        out.insert(name.into(), json!({"seconds": secs, "peak_rss_bytes": rss}));
    }
    let _ = std::fs::remove_dir_all(&bf16_dir);
    std::fs::write(
        target.join("bench/decoder_memory.json"),
        serde_json::to_string_pretty(&Value::Object(out))? + "\n",
    )?;
    Ok(())
}

/// Peak RSS of the all-MiniLM-L6-v2 LoRA training step (three steps per process): ours
/// (`benches/bin/bert_memory.rs`) and PyTorch + PEFT's (`bert_minilm.py train-memory`), as
/// `target/bench/bert_memory.json`.
pub(super) fn bert_memory(target: &Path) -> Result<()> {
    let exe = build_bench_bin("lora-bert-memory")?;
    let python = crate::venv::ensure_venv()?;
    let model = crate::venv::fetch_minilm()?;
    let script = crate::cmd::root().join("benches/python/bert_minilm.py");
    let mut out = serde_json::Map::new();
    for (name, mut cmd) in [
        ("lora-rs", std::process::Command::new(&exe)),
        ("pytorch+peft", {
            let mut c = std::process::Command::new(&python);
            c.arg(&script).arg(&model).arg("train-memory");
            c
        }),
    ] {
        cmd.env("LORA_RS_MINILM", &model);
        let (secs, rss) = timed(&mut cmd)?;
        println!("MiniLM training memory, {name}: {secs:.1} s, peak RSS {rss:?} bytes");
        out.insert(name.into(), json!({"seconds": secs, "peak_rss_bytes": rss}));
    }
    std::fs::write(
        target.join("bench/bert_memory.json"),
        serde_json::to_string_pretty(&Value::Object(out))? + "\n",
    )?;
    Ok(())
}

/// Wall time and peak RSS (bytes) of one process run, via GNU time when present (the
/// command's own environment variables are passed on).
pub(super) fn timed(cmd: &mut std::process::Command) -> Result<(f64, Option<u64>)> {
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
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => wrapped.env(k, v),
                None => wrapped.env_remove(k),
            };
        }
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
