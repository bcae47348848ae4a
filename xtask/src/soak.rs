//! `cargo xtask soak [--quick]` (issue 17, item 6): long runs that show whether memory grows.
//!
//! * In one process (`benches/bin/soak.rs`): 3000 LoRA training steps of the tiny Llama of
//!   the tests (batch 8 x 128, the adapter saved every 500 steps), then 300 `lora merge`s
//!   of that adapter, the resident set sampled after each.
//! * The `lora` binary as a user runs it: `lora train` on all-MiniLM-L6-v2 and the VADER
//!   lexicon for 2000 steps with `--save-every 500`, its resident set read from
//!   `/proc/<pid>/status` every 100 ms.
//!
//! Each phase reports its largest RSS during the first tenth (warm-up) and after it; the
//! difference is the growth. `--quick` runs a tenth of the iterations. Figures go to
//! `target/bench/soak.json` and the terminal; they are reported, not asserted.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::cmd::{cargo, root, run, target_dir};

pub fn run_soak(quick: bool) -> Result<()> {
    let scale = if quick { 10 } else { 1 };
    let (steps, merges, cli_steps) = (3000 / scale, 300 / scale, 2000 / scale);
    let mut build = cargo();
    build.args([
        "build",
        "--release",
        "-p",
        "lora-benches",
        "--bin",
        "lora-soak",
        "-p",
        "lora-cli",
    ]);
    run("cargo build --release (lora-soak, lora)", &mut build)?;
    let release = target_dir().join("release");
    let work = target_dir().join("soak");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;

    let output = std::process::Command::new(release.join("lora-soak"))
        .arg(root().join("tests/fixtures/decoder/llama"))
        .arg(steps.to_string())
        .arg(merges.to_string())
        .arg(work.join("decoder-adapter"))
        .output()
        .context("running lora-soak")?;
    if !output.status.success() {
        bail!(
            "lora-soak failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let mut report: Value = serde_json::from_slice(&output.stdout).context("lora-soak output")?;

    let minilm = crate::venv::fetch_minilm()?;
    let vader = crate::venv::fetch_vader()?;
    let mut cli = std::process::Command::new(release.join("lora"));
    cli.args(["train", "--task", "classify", "--model"])
        .arg(&minilm)
        .arg("--data")
        .arg(&vader)
        .arg("--out")
        .arg(work.join("classify"))
        .args(["--steps", &cli_steps.to_string(), "--save-every", "500"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    report["cli_train"] = sample_process(&mut cli, cli_steps)?;
    std::fs::create_dir_all(target_dir().join("bench"))?;
    std::fs::write(
        target_dir().join("bench/soak.json"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    println!("\nsoak (RSS in MiB; growth = largest after warm-up - largest during warm-up)");
    println!(
        "{:<44} {:>8} {:>10} {:>10} {:>8}",
        "phase", "count", "warm-up", "after", "growth"
    );
    for (key, label) in [
        ("train", "training steps (tiny Llama, 8 x 128, in-process)"),
        ("merge", "lora merge (in-process, same output path)"),
        ("cli_train", "lora train --task classify (MiniLM)"),
    ] {
        let p = &report[key];
        let mib = |k: &str| p[k].as_f64().unwrap_or(0.0) / 1024.0;
        println!(
            "{label:<44} {:>8} {:>10.1} {:>10.1} {:>8.2}",
            p["iterations"],
            mib("warmup_max_rss_kib"),
            mib("after_warmup_max_rss_kib"),
            mib("growth_kib")
        );
    }
    println!("wrote {}", target_dir().join("bench/soak.json").display());
    Ok(())
}

/// Runs `cmd`, reading its `VmRSS` every 100 ms until it exits; the warm-up is the first
/// tenth of its run time.
fn sample_process(cmd: &mut std::process::Command, iterations: usize) -> Result<Value> {
    let start = Instant::now();
    let mut child = cmd.spawn().context("starting lora train")?;
    let status_path = format!("/proc/{}/status", child.id());
    let mut samples: Vec<(f64, u64)> = Vec::new();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if let Some(kib) = vm_rss_kib(Path::new(&status_path)) {
            samples.push((start.elapsed().as_secs_f64(), kib));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if !status.success() {
        bail!("lora train (soak) failed: {status}");
    }
    let total = start.elapsed().as_secs_f64();
    let warm = total / 10.0;
    let max_where = |f: &dyn Fn(f64) -> bool| {
        samples
            .iter()
            .filter(|(t, _)| f(*t))
            .map(|s| s.1)
            .max()
            .unwrap_or(0)
    };
    let (warm_max, after_max) = (max_where(&|t| t <= warm), max_where(&|t| t > warm));
    Ok(json!({
        "iterations": iterations,
        "seconds": total,
        "warmup_seconds": warm,
        "warmup_max_rss_kib": warm_max,
        "after_warmup_max_rss_kib": after_max,
        "last_rss_kib": samples.last().map_or(0, |s| s.1),
        "growth_kib": after_max as i64 - warm_max as i64,
        "samples": samples.iter().map(|(t, r)| json!([t, r])).collect::<Vec<_>>(),
    }))
}

/// `VmRSS` in KiB from a `/proc/<pid>/status` file (`None` once the process is gone).
fn vm_rss_kib(status: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(status).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
