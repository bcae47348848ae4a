//! Issue 17 item 5, as a user runs it on the real all-MiniLM-L6-v2: `lora train
//! --save-every` writes checkpoints without changing the result, `--resume` continues to
//! the same adapter bit for bit, Ctrl-C writes a checkpoint and exits cleanly, and a
//! resume with other arguments is refused with the argument named.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{lora, minilm, tempdir, text, vader_lexicon};

const STEPS: &str = "8";

/// `lora train` on MiniLM for [`STEPS`] small steps into `out`, with `extra` arguments.
fn train_args(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--steps",
        STEPS,
        "--batch-size",
        "8",
        "--eval-every",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn run(args: &[String]) -> std::process::Output {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = lora(&refs);
    assert!(o.status.success(), "{}", text(&o));
    o
}

/// The trained files whose bytes must agree between runs.
fn outputs(dir: &Path) -> Vec<(String, Vec<u8>)> {
    ["adapter_model.safetensors", "head.safetensors"]
        .iter()
        .map(|f| (f.to_string(), std::fs::read(dir.join(f)).unwrap()))
        .collect()
}

fn data() -> Option<(PathBuf, PathBuf)> {
    Some((minilm()?, vader_lexicon()?))
}

#[test]
fn checkpoints_and_resume_give_the_uninterrupted_result_bit_for_bit() {
    let Some((model, data)) = data() else { return };
    let tmp = tempdir();
    let (plain, saving, resumed) = (
        tmp.path().join("plain"),
        tmp.path().join("saving"),
        tmp.path().join("resumed"),
    );
    run(&train_args(&model, &data, &plain, &[]));
    run(&train_args(&model, &data, &saving, &["--save-every", "3"]));
    // Saving checkpoints does not change the result.
    assert_eq!(outputs(&plain), outputs(&saving));
    let ckpt = saving.join("checkpoint-3");
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "head.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        assert!(ckpt.join(f).is_file(), "{f} missing in {}", ckpt.display());
    }
    assert!(saving.join("checkpoint-6").is_dir());
    // Resuming from step 3 ends where the uninterrupted run ended.
    let o = run(&train_args(
        &model,
        &data,
        &resumed,
        &["--resume", ckpt.to_str().unwrap()],
    ));
    assert!(text(&o).contains("resumed"), "{}", text(&o));
    assert_eq!(outputs(&plain), outputs(&resumed));

    // Other arguments than the checkpoint's are refused, naming the argument.
    let mut other = train_args(
        &model,
        &data,
        &resumed,
        &["--resume", ckpt.to_str().unwrap()],
    );
    other.extend(["--lr".to_string(), "0.002".to_string()]);
    let refs: Vec<&str> = other.iter().map(String::as_str).collect();
    let o = lora(&refs);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("--lr 0.001") && text(&o).contains("--lr 0.002"),
        "{}",
        text(&o)
    );
    // A directory that is not a checkpoint names the missing file.
    let o = lora(
        &train_args(
            &model,
            &data,
            &resumed,
            &["--resume", tmp.path().to_str().unwrap()],
        )
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>(),
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("trainer_state.json"), "{}", text(&o));
}

#[cfg(unix)]
#[test]
fn ctrl_c_writes_a_checkpoint_that_resumes_to_the_same_result() {
    let Some((model, data)) = data() else { return };
    let tmp = tempdir();
    let (plain, stopped, resumed) = (
        tmp.path().join("plain"),
        tmp.path().join("stopped"),
        tmp.path().join("resumed"),
    );
    run(&train_args(&model, &data, &plain, &[]));
    // Checkpoints every step tell when training is under way; SIGINT then.
    let mut child = Command::new(env!("CARGO_BIN_EXE_lora"))
        .args(train_args(&model, &data, &stopped, &["--save-every", "1"]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !stopped.join("checkpoint-1").is_dir() && start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    assert!(status.success(), "exit {status}: {out}");
    // Interrupted before the end: the message names the checkpoint to resume from.
    // (Finished first on a very fast machine: then there is nothing to resume.)
    let Some(line) = out.lines().find(|l| l.contains("interrupted after step")) else {
        assert!(stopped.join("adapter_model.safetensors").is_file(), "{out}");
        return;
    };
    let ckpt = line
        .split("--resume ")
        .nth(1)
        .and_then(|s| s.strip_suffix(')'))
        .map(PathBuf::from)
        .unwrap();
    assert!(ckpt.join("trainer_state.json").is_file(), "{line}");
    assert!(!stopped.join("adapter_model.safetensors").exists());
    run(&train_args(
        &model,
        &data,
        &resumed,
        &["--resume", ckpt.to_str().unwrap()],
    ));
    assert_eq!(outputs(&plain), outputs(&resumed));
}
