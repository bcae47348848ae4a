//! The main job, shortened, run as a user runs it: the real `lora` binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{file_names, lora, number_after, read_json, s, tempdir};

#[test]
fn short_demo_trains_saves_reloads_and_merges() {
    let out = tempdir();
    let run = lora(&[
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
        s(out.path()),
    ]);
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
    let names: Vec<String> = file_names(out.path());
    assert_eq!(names.len(), 5, "{names:?}");

    // The summary reports a real improvement on the new task.
    let before = number_after(&stdout, "loss before");
    let after = number_after(&stdout, "loss after");
    assert!(
        after < before / 20.0,
        "LoRA fine-tuning must cut the loss at least 20x: {before} -> {after}\n{stdout}"
    );
    assert!(stdout.contains("merge check"), "{stdout}");
    assert!(stdout.contains("trainable"), "{stdout}");
    let cfg = read_json(&out.path().join("adapter_config.json"));
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["layers.2", "layers.4"])
    );
}

#[test]
fn unknown_backend_and_zero_steps_fail_cleanly() {
    let run = lora(&["demo", "--steps", "0"]);
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("--steps"));
    let run = lora(&["demo", "--backend", "cuda"]);
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("not compiled") && err.contains("--features cuda"),
        "{err}"
    );
}
