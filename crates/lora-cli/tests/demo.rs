//! The main job, shortened, run as a user runs it: the real `lora` binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

#[test]
fn short_demo_trains_saves_reloads_and_merges() {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_lora"))
        .args([
            "demo",
            "--steps",
            "150",
            "--pretrain-steps",
            "300",
            "--hidden",
            "32",
            "--seed",
            "3",
            "--out",
        ])
        .arg(out.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "demo failed:\n{stdout}\n{stderr}");
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "base_model.safetensors",
        "loss.png",
        "predictions.png",
    ] {
        let p = out.path().join(f);
        assert!(
            p.metadata().map(|m| m.len() > 0).unwrap_or(false),
            "{f} missing"
        );
    }
    let png = std::fs::read(out.path().join("loss.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    // Only the final files: no temporary file left behind.
    let names: Vec<String> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 5, "{names:?}");

    // The summary reports a real improvement on the new task.
    let number_after = |label: &str| -> f64 {
        let line = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(label))
            .unwrap_or_else(|| panic!("no {label} line in\n{stdout}"));
        line.split_whitespace().nth(2).unwrap().parse().unwrap()
    };
    let before = number_after("loss before");
    let after = number_after("loss after");
    assert!(
        after < before / 20.0,
        "LoRA fine-tuning must cut the loss at least 20x: {before} -> {after}\n{stdout}"
    );
    assert!(stdout.contains("merge check"), "{stdout}");
    assert!(stdout.contains("trainable"), "{stdout}");
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["layers.2", "layers.4"])
    );
}

#[test]
fn unknown_backend_and_zero_steps_fail_cleanly() {
    let run = Command::new(env!("CARGO_BIN_EXE_lora"))
        .args(["demo", "--steps", "0"])
        .output()
        .unwrap();
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("--steps"));
    let run = Command::new(env!("CARGO_BIN_EXE_lora"))
        .args(["demo", "--backend", "cuda"])
        .output()
        .unwrap();
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("not compiled") && err.contains("--features cuda"),
        "{err}"
    );
}
