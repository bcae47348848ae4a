//! Running commands with readable failures.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// The workspace root (the parent of `xtask/`).
pub fn root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(PathBuf::from).unwrap_or(here)
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` when set, else `<root>/target`. Build
/// outputs (binaries, criterion's estimates, test scratch space) live there; the benches'
/// own JSON always goes to `<root>/target/bench`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// `cargo` as invoked by the user (respects `$CARGO`). Under CI (a fresh clone, built
/// once) without incremental compilation: its caches only cost disk there (1.8 GB).
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    if std::env::var_os("CI").is_some() {
        c.env("CARGO_INCREMENTAL", "0");
    }
    c
}

/// The size of a directory tree in bytes (0 when absent), for the disk line of summaries.
pub fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

/// Runs a command to completion, failing with its description.
pub fn run(what: &str, cmd: &mut Command) -> Result<()> {
    println!("==> {what}");
    let status = cmd.status().with_context(|| format!("starting: {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// Runs a command, echoing its stdout, and returns the stdout lines.
pub fn run_capture(what: &str, cmd: &mut Command) -> Result<Vec<String>> {
    println!("==> {what}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting: {what}"))?;
    let mut lines = Vec::new();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line?;
            println!("{line}");
            lines.push(line);
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(lines)
}
