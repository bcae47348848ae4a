//! `cargo xtask gpu-bundle <DIR>`: the CUDA test and benchmark binaries (release), the
//! `lora` binary built with `--features cuda`, the fixtures they read, the PyTorch + PEFT
//! GPU baseline script and a `run.sh`, so that a GPU machine without a Rust toolchain can
//! run them (they load libcuda, cuBLAS and NVRTC at run time).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cmd::{cargo, root, run as run_cmd};

/// The test and bench executables a `cargo ... --message-format=json` build produced, by
/// target name (the benches package's memory and soak binaries are left out: the bundle
/// has to fit the 64 MiB a GPU machine is sent).
fn executables(cmd: &mut Command, what: &str) -> Result<Vec<(String, PathBuf)>> {
    println!("==> {what}");
    let out = cmd
        .arg("--message-format=json")
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what} failed ({})", out.status);
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let kind = &v["target"]["kind"];
        let wanted = ["test", "bench"]
            .iter()
            .any(|k| kind[0].as_str() == Some(*k));
        if let (Some(exe), Some(name), true) = (
            v["executable"].as_str(),
            v["target"]["name"].as_str(),
            wanted,
        ) {
            found.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    Ok(found)
}

fn copy_dir(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst)?;
    for e in std::fs::read_dir(src)? {
        let e = e?;
        let to = dst.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &to)?;
        } else {
            std::fs::copy(e.path(), &to)?;
        }
    }
    Ok(())
}

const RUN_SH: &str = r#"#!/usr/bin/env bash
# Runs the lora-rs CUDA suite on a GPU machine (no Rust toolchain needed).
#   ./run.sh test       the cross-backend suites on CUDA (@SUITES@)
#   ./run.sh sanitize   the same under compute-sanitizer (memcheck)
#   ./run.sh bench      LoRA linear and QLoRA benchmarks, then PyTorch + PEFT on the GPU
#   ./run.sh demo       lora demo --backend cuda (f32, then --dtype bf16)
#   ./run.sh all        all of the above in one call, then a one-line-per-check summary
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export LORA_RS_FIXTURES="$here/fixtures"
export LORA_BENCH_OUT="${LORA_BENCH_OUT:-$here/results}"
mkdir -p "$LORA_BENCH_OUT"
suites="@SUITES@"
summary=()
check() { # name, command...: runs it, records PASS/FAIL with the time it took
  local name="$1"; shift
  local t0=$SECONDS
  if "$@"; then summary+=("PASS $name ($((SECONDS - t0)) s)"); else summary+=("FAIL $name ($((SECONDS - t0)) s)"); fi
}
run_tests() { for t in $suites; do check "test $t" "$here/bin/$t" cuda:: --test-threads=1 --nocapture; done; }
run_sanitize() { for t in $suites; do check "memcheck $t" compute-sanitizer --tool memcheck --error-exitcode 1 "$here/bin/$t" cuda:: --test-threads=1; done; }
run_bench() {
  check "bench lora_linear" "$here/bin/lora_linear" --bench
  check "bench quant" "$here/bin/quant" --bench
  check "bench pytorch+peft" env LORA_BENCH_DEVICE=cuda python3 "$here/python/peft_linear.py" "$LORA_BENCH_OUT/pytorch_gpu.json"
}
run_demo() {
  check "demo f32" "$here/bin/lora" demo --backend cuda --out "$LORA_BENCH_OUT/demo"
  check "demo bf16" "$here/bin/lora" demo --backend cuda --dtype bf16 --out "$LORA_BENCH_OUT/demo-bf16"
}
case "${1:-test}" in
  test) run_tests ;;
  sanitize) run_sanitize ;;
  bench) run_bench ;;
  demo) run_demo ;;
  all) run_tests; run_sanitize; run_bench; run_demo ;;
  *) echo "usage: run.sh test|sanitize|bench|demo|all" >&2; exit 2 ;;
esac
echo "== summary =="
printf '%s\n' "${summary[@]}"
for line in "${summary[@]}"; do [[ $line == FAIL* ]] && exit 1; done
exit 0
"#;

/// Builds and fills the bundle directory.
pub fn run(dir: &Path) -> Result<()> {
    let mut tests = cargo();
    tests.args([
        "test",
        "--release",
        "--no-run",
        "-p",
        "lora-tests",
        "--features",
        "cuda",
    ]);
    for t in crate::test::CROSS_BACKEND_SUITES {
        tests.args(["--test", t]);
    }
    let tests = executables(
        &mut tests,
        "cargo test --release --no-run (cuda cross-backend suite)",
    )?;
    let mut benches = cargo();
    benches.args([
        "bench",
        "--no-run",
        "-p",
        "lora-benches",
        "--features",
        "cuda",
        "--bench",
        "lora_linear",
        "--bench",
        "quant",
    ]);
    let benches = executables(&mut benches, "cargo bench --no-run (cuda benches)")?;
    let mut cli = cargo();
    cli.args(["build", "--release", "-p", "lora-cli", "--features", "cuda"]);
    run_cmd(
        "cargo build --release -p lora-cli --features cuda",
        &mut cli,
    )?;

    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
    for (name, exe) in tests.iter().chain(&benches) {
        std::fs::copy(exe, bin.join(name)).with_context(|| format!("copying {}", exe.display()))?;
    }
    std::fs::copy(
        crate::cmd::target_dir().join("release/lora"),
        bin.join("lora"),
    )?;
    // Every fixture directory (about 6 MiB): a hand-kept list of what the bundled suites
    // read fell behind them once (`bert_tiny`, `peft_dora_nf4` missing on an H200 run).
    let fixtures = root().join("tests/fixtures");
    for e in
        std::fs::read_dir(&fixtures).with_context(|| format!("reading {}", fixtures.display()))?
    {
        let e = e?;
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &dir.join("fixtures").join(e.file_name()))?;
        }
    }
    std::fs::create_dir_all(dir.join("python"))?;
    std::fs::copy(
        root().join("benches/python/peft_linear.py"),
        dir.join("python/peft_linear.py"),
    )?;
    let run_sh = dir.join("run.sh");
    std::fs::write(
        &run_sh,
        RUN_SH.replace("@SUITES@", &crate::test::CROSS_BACKEND_SUITES.join(" ")),
    )?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&run_sh, std::fs::Permissions::from_mode(0o755))?;
    }
    // Strip debug info to keep the bundle small (the tool may be missing: then keep it).
    for e in std::fs::read_dir(&bin)? {
        let _ = Command::new("strip").arg(e?.path()).status();
    }
    let mut total = 0u64;
    for e in walk(dir)? {
        total += std::fs::metadata(&e)?.len();
    }
    println!(
        "wrote {} ({:.1} MiB): bin/{{{}, lora_linear, quant, lora}}, fixtures/, python/, run.sh",
        dir.display(),
        total as f64 / 1048576.0,
        crate::test::CROSS_BACKEND_SUITES.join(", ")
    );
    archive(dir)
}

/// Writes `<DIR>.tar.gz` beside the bundle: the binaries alone are over the 64 MiB a GPU
/// machine is sent, compressed about 35 MiB. On the machine: `tar -xzf <DIR>.tar.gz`.
fn archive(dir: &Path) -> Result<()> {
    let dir = std::path::absolute(dir)?;
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        bail!("{}: not a directory to archive", dir.display());
    };
    let mut file_name = name.to_os_string();
    file_name.push(".tar.gz");
    let tarball = parent.join(file_name);
    let mut tar = Command::new("tar");
    tar.arg("-czf")
        .arg(&tarball)
        .arg("-C")
        .arg(parent)
        .arg(name);
    run_cmd("tar -czf (the bundle, for sending)", &mut tar)?;
    println!(
        "wrote {} ({:.1} MiB)",
        tarball.display(),
        std::fs::metadata(&tarball)?.len() as f64 / 1048576.0
    );
    Ok(())
}

fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            out.extend(walk(&e.path())?);
        } else {
            out.push(e.path());
        }
    }
    Ok(out)
}
