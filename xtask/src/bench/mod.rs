//! `cargo xtask bench`: runs the criterion benches and turns their medians into
//! `target/bench/report.json`, `docs/benchmarks.md` and `docs/benchmarks.png`
//! (`-avx2` capped, `-amd` on an AMD CPU: [`IsaCap::suffix`]).
//!
//! This file holds the entry points and the runs of the criterion benches and the Python
//! baselines; `memory` measures peak RSS per process, `report` turns the measurements into
//! rows and `markdown` writes them up.

mod bracket;
mod markdown;
mod memory;
mod models;
mod report;

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde_json::json;

use crate::cmd::{cargo, root, run as run_cmd};

/// `--isa`: the widest instruction set the benchmarked code may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IsaCap {
    /// AVX2 + FMA on a CPU that has AVX-512: our kernels (`LORA_NDARRAY_ISA`), the FMA
    /// peak, and PyTorch's own kernels, MKL and oneDNN all kept to AVX2, so an Intel
    /// machine measures the code paths an AMD EPYC runs against the same baseline.
    Avx2,
}

impl IsaCap {
    /// The variables that cap our benches and the Python baselines alike.
    fn env(cap: Option<Self>) -> Vec<(&'static str, &'static str)> {
        match cap {
            None => Vec::new(),
            Some(Self::Avx2) => vec![
                ("LORA_NDARRAY_ISA", "avx2"),
                ("ATEN_CPU_CAPABILITY", "avx2"),
                ("MKL_ENABLE_INSTRUCTIONS", "AVX2"),
                ("ONEDNN_MAX_CPU_ISA", "AVX2"),
            ],
        }
    }

    /// The suffix of the report's own files (`target/bench/report.json`,
    /// `docs/benchmarks.md` and `.png`): `-avx2` with the cap; uncapped, `-amd` on an AMD
    /// CPU (AVX2 only in our fleet), so that its run and the Xeon's AVX-512 one each keep
    /// their own page; else none. The measurements it is made from (`target/bench/*.json`,
    /// criterion's estimates) are the last run's either way; `report` checks they match
    /// the cap.
    pub(super) fn suffix(cap: Option<Self>) -> &'static str {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Self::suffix_on(cap, &cpuinfo)
    }

    /// [`suffix`](Self::suffix) on a CPU described by `cpuinfo` (`/proc/cpuinfo`'s text).
    fn suffix_on(cap: Option<Self>, cpuinfo: &str) -> &'static str {
        let amd = cpuinfo_field(cpuinfo, "vendor_id") == Some("AuthenticAMD");
        match cap {
            Some(Self::Avx2) => "-avx2",
            None if amd => "-amd",
            None => "",
        }
    }
}

/// The value of `key` in `/proc/cpuinfo`'s text (its first processor's line).
pub(super) fn cpuinfo_field<'a>(cpuinfo: &'a str, key: &str) -> Option<&'a str> {
    cpuinfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == key).then(|| v.trim())
    })
}

/// Runs the benches and writes the report.
pub fn run(backends: &[&str], quick: bool, cap: Option<IsaCap>) -> Result<()> {
    let cap_env = IsaCap::env(cap);
    for (name, missing) in crate::BACKENDS {
        if let (true, Some(why)) = (backends.contains(&name), missing) {
            println!("backend {name}: skipped ({why})");
        }
    }
    if !backends.contains(&"ndarray") {
        println!("nothing to run");
        return Ok(());
    }
    // The benches' JSON goes to <root>/target/bench; criterion's estimates to the target dir.
    let target = root().join("target");
    let _ = std::fs::remove_dir_all(crate::cmd::target_dir().join("criterion"));
    // The MiniLM benches read the model from the cache: fetch it first, or a fresh
    // machine's report has no ndarray MiniLM rows.
    crate::venv::fetch_minilm()?;
    // PyTorch's workloads run before and after ours; the report compares with the mean of
    // the two (`bracket.rs`). The last run's figures after ours go first, so that a run
    // stopped in between never averages this run's figures with the last one's.
    for name in ["pytorch", "bert_pytorch", "decoder_pytorch"] {
        let _ = std::fs::remove_file(target.join(format!("bench/{name}.json")));
    }
    peft_linear(&target, quick, &cap_env, BEFORE)?;
    model_baselines(&target, quick, &cap_env, BEFORE)?;
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
    cmd.envs(cap_env.iter().copied());
    run_cmd(
        &format!(
            "cargo bench -p lora-benches{}",
            if quick { " (quick)" } else { "" }
        ),
        &mut cmd,
    )?;
    python_baselines(&target, quick, &cap_env)?;
    merge_bench(&target, quick)?;
    memory::demo_memory(&target)?;
    memory::train_memory(&target)?;
    memory::decoder_memory(&target, quick)?;
    memory::bert_memory(&target)?;
    report::report(&target, quick, cap)
}

/// The suffix of the PyTorch baselines' files from the run before our benches
/// (`pytorch_before.json`, `bert_pytorch_before.json`, `decoder_pytorch_before.json`).
pub(super) const BEFORE: &str = "_before";

/// How a baseline's progress line names its run: the one before ours, or (no suffix) after.
fn which_run(suffix: &str) -> &'static str {
    match suffix == BEFORE {
        true => ", before ours",
        false => "",
    }
}

/// A Python baseline script under benches/python with the run length, the run's
/// instruction-set cap, its leading arguments, and its output (`target/bench/<out>`) last;
/// the output is removed first, so that a failed run leaves no stale figures.
fn baseline_script(
    (target, quick, cap_env): (&Path, bool, &[(&str, &str)]),
    name: &str,
    lead: &[PathBuf],
    out: &str,
) -> Result<std::process::Command> {
    // The scripts do not create the folder, and on a fresh clone the first of them runs
    // before any bench of ours has.
    let dir = target.join("bench");
    std::fs::create_dir_all(&dir)?;
    let out = dir.join(out);
    let _ = std::fs::remove_file(&out);
    let mut cmd = std::process::Command::new(crate::venv::ensure_venv()?);
    cmd.arg(root().join("benches/python").join(name))
        .args(lead)
        .arg(out)
        .env("LORA_BENCH_SECONDS", if quick { "3" } else { "8" })
        .envs(cap_env.iter().copied());
    if quick {
        cmd.env("LORA_BENCH_QUICK", "1");
    }
    Ok(cmd)
}

/// PyTorch + PEFT on the two models: `bert_pytorch<suffix>.json` (all-MiniLM-L6-v2's
/// encoder forward and LoRA training step) and `decoder_pytorch<suffix>.json` (the random
/// Llama's training step and generation).
///
/// Why twice, once before our benches and once after: on the shared VM, PyTorch's MiniLM
/// step read 1.075-1.182 s across four AVX2-capped runs of the same build and ours
/// 1.010-1.050 s (docs/performance/stops-32-35.md), so one baseline minutes away from our
/// figure decided whether a 0.9x goal read met. The mean of a run on each side cancels a
/// drift that is steady over the bench, and the two figures show how far it moved.
fn model_baselines(
    target: &Path,
    quick: bool,
    cap_env: &[(&str, &str)],
    suffix: &str,
) -> Result<()> {
    let (run, when) = ((target, quick, cap_env), which_run(suffix));
    run_cmd(
        &format!("PyTorch + PEFT on all-MiniLM-L6-v2 (benches/python/bert_minilm.py){when}"),
        &mut baseline_script(
            run,
            "bert_minilm.py",
            &[crate::venv::fetch_minilm()?],
            &format!("bert_pytorch{suffix}.json"),
        )?,
    )?;
    run_cmd(
        &format!("PyTorch + PEFT on a random Llama (benches/python/decoder_llama.py){when}"),
        &mut baseline_script(
            run,
            "decoder_llama.py",
            &[],
            &format!("decoder_pytorch{suffix}.json"),
        )?,
    )
}

/// PyTorch + PEFT's LoRA layers (frozen and LoRA interleaved, as ours) and `torch.mm` on
/// the GEMM bench's products: `pytorch<suffix>.json`.
fn peft_linear(target: &Path, quick: bool, cap_env: &[(&str, &str)], suffix: &str) -> Result<()> {
    let when = which_run(suffix);
    run_cmd(
        &format!("PyTorch + PEFT baseline (benches/python/peft_linear.py){when}"),
        &mut baseline_script(
            (target, quick, cap_env),
            "peft_linear.py",
            &[],
            &format!("pytorch{suffix}.json"),
        )?,
    )
}

/// The Python baselines after our benches, minutes apart from them on the same machine:
/// `target/bench/pytorch.json`, `bert_pytorch.json`, `decoder_pytorch.json` and `bnb.json`.
fn python_baselines(target: &Path, quick: bool, cap_env: &[(&str, &str)]) -> Result<()> {
    let run = (target, quick, cap_env);
    peft_linear(target, quick, cap_env, "")?;
    model_baselines(target, quick, cap_env, "")?;
    // bitsandbytes + PEFT for the quantized-base workloads.
    run_cmd(
        "bitsandbytes + PEFT baseline (benches/python/bnb_quant.py)",
        &mut baseline_script(run, "bnb_quant.py", &[], "bnb.json")?,
    )
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
    let lora = crate::cmd::target_dir().join("release/lora");
    let work = target.join("bench/merge");
    std::fs::create_dir_all(&work)?;
    let runs = if quick { 3 } else { 5 };
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    println!(
        "==> merge benchmark: lora merge vs PEFT merge_and_unload + save_pretrained ({runs} runs each, alternating)"
    );
    for _ in 0..runs {
        ours.push(memory::timed(
            std::process::Command::new(&lora)
                .arg("merge")
                .arg("--base")
                .arg(&model)
                .arg("--adapter")
                .arg(&adapter)
                .arg("--out")
                .arg(work.join("lora-merged.safetensors")),
        )?);
        theirs.push(memory::timed(
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
pub fn report_only(quick: bool, cap: Option<IsaCap>) -> Result<()> {
    report::report(&root().join("target"), quick, cap)
}

#[cfg(test)]
mod tests {
    use super::IsaCap;

    #[test]
    fn each_kind_of_run_keeps_its_own_report() {
        let amd = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n";
        let intel = "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n";
        assert_eq!(IsaCap::suffix_on(None, intel), "");
        assert_eq!(IsaCap::suffix_on(None, amd), "-amd");
        assert_eq!(IsaCap::suffix_on(Some(IsaCap::Avx2), intel), "-avx2");
        assert_eq!(IsaCap::suffix_on(Some(IsaCap::Avx2), amd), "-avx2");
        assert_eq!(IsaCap::suffix_on(None, ""), "");
        assert_eq!(super::cpuinfo_field(amd, "cpu family"), Some("25"));
        assert_eq!(super::cpuinfo_field(amd, "family"), None);
    }
}
