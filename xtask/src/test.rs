//! `cargo xtask test`: everything CI checks, in the order a failure is cheapest to find.

use anyhow::Result;

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

/// Runs fmt, clippy, the tests of every selected backend, and the docs.
pub fn run(backends: &[&str]) -> Result<()> {
    let ci = std::env::var_os("CI").is_some();
    run_cmd(
        "cargo fmt --check",
        cargo().args(["fmt", "--all", "--", "--check"]),
    )?;
    run_cmd(
        "cargo clippy (all targets, warnings are errors)",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    let mut report = Vec::new();
    let mut total = Counts::default();
    for (name, missing) in crate::BACKENDS {
        if !backends.contains(&name) {
            continue;
        }
        if let Some(why) = missing {
            report.push(format!("backend {name:<8} skipped: {why}"));
            continue;
        }
        // The ndarray backend is the workspace default: the whole workspace runs on it.
        let lines = run_capture(
            &format!("cargo test --workspace (backend {name})"),
            cargo()
                .args(["test", "--workspace", "--no-fail-fast"])
                .env("LORA_TEST_BACKEND", name),
        )?;
        let c = count(&lines);
        total.passed += c.passed;
        total.failed += c.failed;
        total.ignored += c.ignored;
        report.push(format!(
            "backend {name:<8} {} passed, {} failed, {} ignored",
            c.passed, c.failed, c.ignored
        ));
    }
    if backends.contains(&"ndarray") {
        // The lora-rs -> PEFT direction: real PEFT loads what tests/peft_interop_export.rs
        // wrote and must compute the same outputs and merged weights.
        let python = crate::venv::ensure_venv()?;
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| crate::cmd::root().join("target"));
        let lines = run_capture(
            "PEFT loads adapters written by lora-rs (tests/fixtures/check_in_peft.py)",
            std::process::Command::new(python)
                .arg(crate::cmd::root().join("tests/fixtures/check_in_peft.py"))
                .arg(target.join("tmp/peft-interop")),
        )?;
        let ok = lines.iter().filter(|l| l.starts_with("ok ")).count();
        let bad = lines.iter().filter(|l| l.starts_with("FAIL")).count();
        total.passed += ok;
        total.failed += bad;
        report.push(format!(
            "peft interop     {ok} passed, {bad} failed (PyTorch + PEFT in the cached venv)"
        ));
    }
    run_cmd(
        "cargo doc (warnings are errors)",
        cargo()
            .args(["doc", "--workspace", "--no-deps"])
            .env("RUSTDOCFLAGS", "-D warnings"),
    )?;
    println!("\n==> summary{}", if ci { " (CI)" } else { "" });
    for line in &report {
        println!("  {line}");
    }
    println!(
        "{} passed, {} failed, {} skipped",
        total.passed, total.failed, total.ignored
    );
    Ok(())
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
