//! Issue 17: the fuzz corpus and every crash input found so far, replayed through the fuzz
//! targets (`crates/lora-fuzz`) as regression tests. Each input must be answered with a
//! result (an error is fine), never a panic. `cargo xtask fuzz` grows the corpus and
//! copies new crash inputs into `fuzz/crashes/<target>/`, where this test picks them up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The files of `dir`, sorted (none when it does not exist).
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|p| p.is_file() && !p.ends_with("README.txt"));
    files.sort();
    files
}

#[test]
fn every_target_has_a_seed_corpus() {
    for (target, _) in lora_fuzz::TARGETS {
        let seeds = inputs(&fuzz_dir().join("corpus").join(target));
        assert!(!seeds.is_empty(), "fuzz/corpus/{target} is empty");
    }
}

#[test]
fn corpus_and_crash_inputs_replay_without_panicking() {
    let mut replayed = 0;
    for (target, _) in lora_fuzz::TARGETS {
        for kind in ["corpus", "crashes"] {
            for input in inputs(&fuzz_dir().join(kind).join(target)) {
                let data = std::fs::read(&input).unwrap();
                let outcome = std::panic::catch_unwind(|| lora_fuzz::run(target, &data));
                match outcome {
                    Ok(Ok(())) => replayed += 1,
                    Ok(Err(e)) => panic!("{target}: {e}"),
                    Err(_) => panic!("{target} panicked on {}", input.display()),
                }
            }
        }
    }
    println!("replayed {replayed} inputs");
}

#[test]
fn an_unknown_target_is_an_error() {
    assert!(lora_fuzz::run("no-such-target", b"").is_err());
}
