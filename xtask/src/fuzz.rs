//! `cargo xtask fuzz [--seconds N] [--target NAME]` (issue 17): coverage-guided fuzzing of
//! every loader with AFL++ through `cargo-afl`, which works with the pinned stable
//! toolchain.
//!
//! Installs `cargo-afl` and builds AFL++ when they are missing, builds the harness in
//! `fuzz/` with AFL's instrumentation (into `target/fuzz`), then runs each target of
//! `crates/lora-fuzz` for N seconds (default 60) from `fuzz/corpus/<target>/`. Reports
//! executions, coverage (AFL's bitmap) and crashes per target in `target/fuzz/report.json`;
//! every crash input is copied to `fuzz/crashes/<target>/`, where `tests/fuzz_corpus.rs`
//! replays it, and the command fails.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::cmd::{root, target_dir};

/// The fuzz targets, as the harness lists them (`lora-fuzz --list`).
fn targets(harness: &Path) -> Result<Vec<String>> {
    let out = Command::new(harness)
        .arg("--list")
        .output()
        .with_context(|| format!("{} --list", harness.display()))?;
    let names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    if names.is_empty() {
        bail!("{} --list named no fuzz target", harness.display());
    }
    Ok(names)
}

/// `cargo afl` ready to run: installed from crates.io and AFL++ built, when missing.
pub fn ensure_cargo_afl() -> Result<()> {
    let has = |args: &[&str]| {
        Command::new("cargo")
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !has(&["afl", "--version"]) {
        let mut install = Command::new("cargo");
        install.args(["install", "cargo-afl", "--locked", "--version", "0.18.2"]);
        crate::cmd::run("cargo install cargo-afl", &mut install)?;
    }
    // `config --build` refuses when AFL++ is already built for this toolchain: that is fine.
    let out = Command::new("cargo")
        .args(["afl", "config", "--build"])
        .output()
        .context("cargo afl config --build")?;
    let text = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && !text.contains("already built") {
        bail!("cargo afl config --build failed:\n{text}");
    }
    Ok(())
}

/// The instrumented harness, built with `cargo afl build --release` into `target/fuzz`.
fn build_harness() -> Result<PathBuf> {
    let dir = target_dir().join("fuzz");
    let mut build = Command::new("cargo");
    build
        .args(["afl", "build", "--release", "--manifest-path"])
        .arg(root().join("fuzz/Cargo.toml"))
        .env("CARGO_TARGET_DIR", &dir);
    crate::cmd::run("cargo afl build --release (fuzz/)", &mut build)?;
    Ok(dir.join("release/lora-fuzz"))
}

/// One target's AFL statistics (`fuzzer_stats`).
fn stats(out: &Path) -> Value {
    let text = std::fs::read_to_string(out.join("default/fuzzer_stats")).unwrap_or_default();
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.split_once(':').filter(|(k, _)| k.trim() == key))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    json!({
        "execs_done": get("execs_done").parse::<u64>().unwrap_or(0),
        "execs_per_sec": get("execs_per_sec").parse::<f64>().unwrap_or(0.0),
        "corpus_count": get("corpus_count").parse::<u64>().unwrap_or(0),
        "bitmap_cvg": get("bitmap_cvg"),
        "edges_found": get("edges_found").parse::<u64>().unwrap_or(0),
        "total_edges": get("total_edges").parse::<u64>().unwrap_or(0),
        "saved_crashes": get("saved_crashes").parse::<u64>().unwrap_or(0),
        "saved_hangs": get("saved_hangs").parse::<u64>().unwrap_or(0),
        "run_time": get("run_time").parse::<u64>().unwrap_or(0),
    })
}

/// Copies AFL's crash inputs of `target` into `fuzz/crashes/<target>/`; returns how many.
fn keep_crashes(out: &Path, target: &str) -> Result<usize> {
    let found = out.join("default/crashes");
    let keep = root().join("fuzz/crashes").join(target);
    let mut n = 0;
    for e in std::fs::read_dir(&found).into_iter().flatten().flatten() {
        let p = e.path();
        if p.file_name().is_some_and(|f| f != "README.txt") {
            // Named by content, so that repeated runs add inputs instead of overwriting.
            let data = std::fs::read(&p)?;
            let hash = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
            std::fs::create_dir_all(&keep)?;
            std::fs::write(keep.join(format!("crash-{hash:016x}")), data)?;
            n += 1;
        }
    }
    Ok(n)
}

/// `cargo xtask fuzz`: every target (or `only`) for `seconds` each; fails when any
/// found a crash.
pub fn run(seconds: u64, only: Option<&str>) -> Result<()> {
    let crashes = fuzz_targets(seconds, only)?;
    if crashes > 0 {
        bail!("{crashes} crash inputs, copied to fuzz/crashes/ (replayed by tests/fuzz_corpus.rs)");
    }
    Ok(())
}

/// Runs every target (or `only`) for `seconds` each and returns how many crash inputs
/// they found (copied to `fuzz/crashes/`). An error means the fuzzer could not run.
pub fn fuzz_targets(seconds: u64, only: Option<&str>) -> Result<usize> {
    ensure_cargo_afl()?;
    let harness = build_harness()?;
    let report_path = target_dir().join("fuzz/report.json");
    let mut crashes = 0;
    let all = targets(&harness)?;
    if let Some(o) = only.filter(|o| !all.iter().any(|t| t == o)) {
        bail!("unknown fuzz target {o:?}; targets: {}", all.join(", "));
    }
    for target in all {
        if only.is_some_and(|o| o != target) {
            continue;
        }
        let out = target_dir().join("fuzz/out").join(&target);
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(target_dir().join("fuzz/out"))?;
        let log_path = target_dir().join(format!("fuzz/out/{target}.log"));
        let log = std::fs::File::create(&log_path)?;
        let log_err = log.try_clone()?;
        let mut afl = Command::new("cargo");
        afl.args(["afl", "fuzz", "-V", &seconds.to_string(), "-i"])
            .arg(root().join("fuzz/corpus").join(&target))
            .arg("-o")
            .arg(&out)
            .arg("--")
            .arg(&harness)
            .arg(&target)
            // Unattended runs: no UI, no CPU-governor or core-pattern checks (CI machines
            // cannot change them), inputs larger than AFL's default are fine.
            .env("AFL_NO_UI", "1")
            .env("AFL_SKIP_CPUFREQ", "1")
            .env("AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES", "1")
            .env("AFL_NO_AFFINITY", "1")
            .stdout(log)
            .stderr(log_err);
        let what = format!("cargo afl fuzz {target} ({seconds} s)");
        if let Err(e) = crate::cmd::run(&what, &mut afl) {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "{e:#}\n{}\n(full output: {})",
                tail.join("\n"),
                log_path.display()
            );
        }
        let s = stats(&out);
        let found = keep_crashes(&out, &target)?;
        crashes += found;
        println!(
            "fuzz {target:<18} {:>10} execs ({:>6.0}/s), {:>6} edges ({:>6} of the map), corpus {:>4}, crashes {found}",
            s["execs_done"],
            s["execs_per_sec"].as_f64().unwrap_or(0.0),
            s["edges_found"],
            s["bitmap_cvg"].as_str().unwrap_or("?"),
            s["corpus_count"],
        );
        let mut s = s;
        s["seconds"] = json!(seconds);
        record(&report_path, &target, s)?;
    }
    Ok(crashes)
}

/// Sets `target`'s entry of the report file, keeping the others (runs of single targets,
/// possibly in parallel, each update their own).
fn record(path: &Path, target: &str, stats: Value) -> Result<()> {
    let mut report: serde_json::Map<String, Value> = std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    report.insert(target.to_string(), stats);
    std::fs::write(
        path,
        serde_json::to_string_pretty(&Value::Object(report))? + "\n",
    )?;
    Ok(())
}
