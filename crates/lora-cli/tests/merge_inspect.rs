//! `lora merge` and `lora inspect`, run as a user runs them, on the adapter written by
//! real PEFT (`tests/fixtures/peft_mlp`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use lora::io::MappedFile;
use lora::models::Mlp;
use lora::{Backend, HostTensor, Mode, Model, UnaryOp};

mod common;

use common::{file_names, fixture, floats, lora, read_json, s, tempdir, text};

/// The merged checkpoint, loaded into the MLP, must compute what PEFT's merge_and_unload did.
fn assert_matches_peft_merge(merged: &Path, tol: f32) {
    let b = lora::NdArray::new();
    let mut m = Mlp::new(&b, &[3, 8, 8, 2], UnaryOp::Relu, 0).unwrap();
    m.load_state_dict(&b, &lora::io::read_safetensors(merged).unwrap())
        .unwrap();
    let io = read_json(&fixture("peft_mlp").join("io.json"));
    let x = b.from_host(&floats(&io["x"]), &[4, 3]).unwrap();
    let y = b.to_host(&m.forward(&b, &x, Mode::Eval).unwrap()).unwrap();
    for (g, w) in y.iter().zip(floats(&io["y_merged"])) {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{g} vs PEFT {w}");
    }
}

fn no_leftovers(dir: &Path) {
    let names: Vec<String> = file_names(dir);
    assert!(
        names
            .iter()
            .all(|n| !n.contains("tmp") && !n.starts_with("out")),
        "left behind: {names:?}"
    );
}

#[test]
fn merge_matches_peft_and_copies_untouched_tensors_byte_for_byte() {
    let tmp = tempdir();
    let out = tmp.path().join("merged.safetensors");
    let base = fixture("peft_mlp").join("base_model.safetensors");
    let run = lora(&[
        "merge",
        "--base",
        s(&base),
        "--adapter",
        s(&fixture("peft_mlp")),
        "--out",
        s(&out),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_matches_peft_merge(&out, 1e-5);

    let (bf, of) = (
        MappedFile::open(&base).unwrap(),
        MappedFile::open(&out).unwrap(),
    );
    let (bt, ot) = (bf.tensors().unwrap(), of.tensors().unwrap());
    let mut names: Vec<&str> = bt.names();
    names.sort();
    let mut onames: Vec<&str> = ot.names();
    onames.sort();
    assert_eq!(names, onames, "exactly the base's tensor names");
    for n in names {
        let (a, c) = (bt.tensor(n).unwrap(), ot.tensor(n).unwrap());
        assert_eq!((a.dtype(), a.shape()), (c.dtype(), c.shape()), "{n}");
        let touched = n == "layers.2.weight" || n == "layers.4.weight";
        assert_eq!(
            a.data() == c.data(),
            !touched,
            "{n}: untouched tensors are byte-identical, merged ones differ"
        );
    }
    assert_eq!(of.metadata().unwrap().unwrap()["format"], "pt");
}

#[test]
fn merge_reads_sharded_checkpoints_and_converts_dtypes() {
    let tmp = tempdir();
    let all =
        lora::io::read_safetensors(&fixture("peft_mlp").join("base_model.safetensors")).unwrap();
    let (first, second): (Vec<_>, Vec<_>) = all
        .into_iter()
        .partition(|(k, _)| k.starts_with("layers.0") || k.starts_with("layers.2"));
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    let f1 = "model-00001-of-00002.safetensors";
    let f2 = "model-00002-of-00002.safetensors";
    lora::io::write_safetensors(&model.join(f1), &first).unwrap();
    lora::io::write_safetensors(&model.join(f2), &second).unwrap();
    let mut map = serde_json::Map::new();
    for (k, _) in &first {
        map.insert(k.clone(), f1.into());
    }
    for (k, _) in &second {
        map.insert(k.clone(), f2.into());
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(
        model.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();

    let out = tmp.path().join("merged.safetensors");
    let run = lora(&[
        "merge",
        "--base",
        s(&model),
        "--adapter",
        s(&fixture("peft_mlp")),
        "--out",
        s(&out),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_matches_peft_merge(&out, 1e-5);

    let out16 = tmp.path().join("merged-bf16.safetensors");
    let run = lora(&[
        "merge",
        "--base",
        s(&model),
        "--adapter",
        s(&fixture("peft_mlp")),
        "--out",
        s(&out16),
        "--dtype",
        "bf16",
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let f = MappedFile::open(&out16).unwrap();
    assert!(
        f.tensors()
            .unwrap()
            .tensors()
            .iter()
            .all(|(_, v)| v.dtype() == safetensors_dtype_bf16())
    );
    assert_matches_peft_merge(&out16, 1e-2);
}

fn safetensors_dtype_bf16() -> lora::io::SafetensorsDtype {
    lora::io::SafetensorsDtype::BF16
}

fn expect_failure(args: &[&str], out: &Path, needles: &[&str]) {
    let run = lora(args);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "expected failure for {args:?}");
    for n in needles {
        assert!(err.contains(n), "error should mention {n:?}: {err}");
    }
    assert!(!out.exists(), "no output file after a failed merge");
    no_leftovers(out.parent().unwrap());
}

#[test]
fn merge_errors_name_the_problem_and_leave_no_file() {
    let tmp = tempdir();
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let out = work.join("out.safetensors");
    let base = fixture("peft_mlp").join("base_model.safetensors");

    // A module the base lacks: merge the adapter into a checkpoint without layers.4.
    let mut sd = lora::io::read_safetensors(&base).unwrap();
    sd.remove("layers.4.weight");
    let small = tmp.path().join("small.safetensors");
    lora::io::write_safetensors(&small, &sd.into_iter().collect::<Vec<_>>()).unwrap();
    expect_failure(
        &[
            "merge",
            "--base",
            s(&small),
            "--adapter",
            s(&fixture("peft_mlp")),
            "--out",
            s(&out),
        ],
        &out,
        &["layers.4", "small.safetensors"],
    );

    // Shape mismatch between adapter and base.
    let bad = tmp.path().join("bad_adapter");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::copy(
        fixture("peft_mlp").join("adapter_config.json"),
        bad.join("adapter_config.json"),
    )
    .unwrap();
    let mut t =
        lora::io::read_safetensors(&fixture("peft_mlp").join("adapter_model.safetensors")).unwrap();
    t.insert(
        "base_model.model.layers.2.lora_A.weight".into(),
        HostTensor {
            shape: vec![2, 5],
            data: vec![0.0; 10],
        },
    );
    lora::io::write_safetensors(
        &bad.join("adapter_model.safetensors"),
        &t.into_iter().collect::<Vec<_>>(),
    )
    .unwrap();
    expect_failure(
        &[
            "merge",
            "--base",
            s(&base),
            "--adapter",
            s(&bad),
            "--out",
            s(&out),
        ],
        &out,
        &["layers.2", "[2, 5]"],
    );

    // A truncated base.
    let bytes = std::fs::read(&base).unwrap();
    let cut = tmp.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 40]).unwrap();
    expect_failure(
        &[
            "merge",
            "--base",
            s(&cut),
            "--adapter",
            s(&fixture("peft_mlp")),
            "--out",
            s(&out),
        ],
        &out,
        &["cut.safetensors"],
    );

    // A malformed adapter_config.json.
    let broken = tmp.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("adapter_config.json"), "{\"r\": 2,").unwrap();
    std::fs::copy(
        fixture("peft_mlp").join("adapter_model.safetensors"),
        broken.join("adapter_model.safetensors"),
    )
    .unwrap();
    expect_failure(
        &[
            "merge",
            "--base",
            s(&base),
            "--adapter",
            s(&broken),
            "--out",
            s(&out),
        ],
        &out,
        &["adapter_config.json"],
    );

    // An existing output is not clobbered by a failed merge.
    std::fs::write(&out, b"keep me").unwrap();
    let run = lora(&[
        "merge",
        "--base",
        s(&cut),
        "--adapter",
        s(&fixture("peft_mlp")),
        "--out",
        s(&out),
    ]);
    assert!(!run.status.success());
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
}

#[test]
fn inspect_reports_modules_ranks_and_scalings() {
    let run = lora(&["inspect", s(&fixture("peft_mlp")), "--json"]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&run.stdout).expect("--json prints JSON only");
    assert_eq!(v["total_parameters"], 2 * 8 + 8 * 2 + 2 * 8 + 2 * 2);
    let mods = v["modules"].as_array().unwrap();
    assert_eq!(mods.len(), 2);
    assert_eq!(mods[0]["module"], "layers.2");
    assert_eq!(mods[0]["scaling"], 3.0);
    assert_eq!(mods[1]["out_features"], 2);
    let text = lora(&["inspect", s(&fixture("peft_mlp"))]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("layers.4"));
    let missing = lora(&["inspect", "/nonexistent/adapter"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/adapter"));
}

/// `lora inspect` and `lora merge` on PEFT adapters with LoRA on `embed_tokens` and with
/// trainable tokens (tests/fixtures/decoder/peft_embedding): inspect lists the embedding
/// and the trained token ids; merge writes PEFT's merged table.
#[test]
fn inspect_and_merge_handle_embedding_and_token_adapters() {
    let tmp = tempdir();
    for (case, model, kind) in [
        ("embed_lora", "llama", "lora_embedding"),
        ("tokens_tied", "qwen2", "trainable_tokens"),
    ] {
        let adapter = fixture("decoder/peft_embedding").join(case).join("adapter");
        let o = lora(&["inspect", "--json", s(&adapter)]);
        assert!(o.status.success(), "{}", text(&o));
        let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let row = doc["modules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["module"] == "model.embed_tokens")
            .unwrap_or_else(|| panic!("{case}: no embed_tokens row in {doc}"));
        assert_eq!(row["kind"], kind, "{case}");
        if kind == "trainable_tokens" {
            assert_eq!(row["tokens"], serde_json::json!([285, 301, 3, 15, 399]));
        }
        let out = tmp.path().join(format!("{case}.safetensors"));
        let o = lora(&[
            "merge",
            "--base",
            s(&fixture("decoder").join(model)),
            "--adapter",
            s(&adapter),
            "--out",
            s(&out),
        ]);
        assert!(o.status.success(), "{}", text(&o));
        let merged = lora::io::read_safetensors(&out).unwrap();
        let want = lora::io::read_safetensors(
            &fixture("decoder/peft_embedding")
                .join(case)
                .join("expected.safetensors"),
        )
        .unwrap();
        let (got, want) = (
            &merged["model.embed_tokens.weight"].data,
            &want["merged.model.embed_tokens.weight"].data,
        );
        for (g, w) in got.iter().zip(want) {
            assert!(
                (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                "{case}: {g} vs {w}"
            );
        }
    }
}

/// A config whose rank disagrees with its tensors, whose numbers are out of range, or whose
/// field has the wrong type is refused naming the field (and the module and both ranks),
/// and no output is written.
#[test]
fn bad_adapter_configs_are_refused_by_field() {
    let tmp = tempdir();
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let out = work.join("out.safetensors");
    let base = fixture("peft_mlp").join("base_model.safetensors");
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("peft_mlp").join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    let r = config["r"].as_u64().unwrap();
    let tensor_rank = format!("rank {r} of its tensors");
    for (i, (field, value, needles)) in [
        ("r", serde_json::json!(0), vec!["field r", "at least 1"]),
        (
            "r",
            serde_json::json!(1_000_000_000u64),
            vec!["rank 1000000000", "disagrees", tensor_rank.as_str()],
        ),
        (
            "lora_alpha",
            serde_json::json!("big"),
            vec!["field lora_alpha"],
        ),
        (
            "target_modules",
            serde_json::json!(5),
            vec!["field target_modules"],
        ),
        (
            "lora_dropout",
            serde_json::json!(1.5),
            vec!["field lora_dropout"],
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let dir = tmp.path().join(format!("adapter{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(
            fixture("peft_mlp").join("adapter_model.safetensors"),
            dir.join("adapter_model.safetensors"),
        )
        .unwrap();
        let mut c = config.clone();
        c[field] = value;
        std::fs::write(dir.join("adapter_config.json"), c.to_string()).unwrap();
        let mut all: Vec<&str> = needles.clone();
        all.push("adapter_config.json");
        if field == "r" && i == 1 {
            all.pop(); // the rank mismatch is found in the weights file, which it names
            all.push("adapter_model.safetensors");
        }
        expect_failure(
            &[
                "merge",
                "--base",
                s(&base),
                "--adapter",
                s(&dir),
                "--out",
                s(&out),
            ],
            &out,
            &all,
        );
    }
}

/// Issue 17: `lora merge` killed while writing (here by a file-size limit: SIGXFSZ at the
/// first byte, as a full quota or a SIGKILL would stop it) leaves nothing in the output
/// directory, and a temporary file a crashed run left there is removed by the next run.
#[cfg(target_os = "linux")]
#[test]
fn a_merge_killed_while_writing_leaves_nothing() {
    let tmp = tempdir();
    let dir = tmp.path().join("out");
    std::fs::create_dir(&dir).unwrap();
    let out = dir.join("merged.safetensors");
    let (base, adapter) = (
        fixture("peft_mlp").join("base_model.safetensors"),
        fixture("peft_mlp"),
    );
    let args = [
        "merge",
        "--base",
        s(&base),
        "--adapter",
        s(&adapter),
        "--out",
        s(&out),
    ];
    let killed = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -f 0; exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_lora"))
        .args(args)
        .output()
        .unwrap();
    assert!(!killed.status.success(), "{}", text(&killed));
    assert_eq!(file_names(&dir), Vec::<String>::new(), "{}", text(&killed));

    // What a crash of a run without O_TMPFILE support leaves: a recognisable name.
    let stale = dir.join(".lora-tmp-4294967-0.merged.safetensors");
    std::fs::write(&stale, b"partial").unwrap();
    let run = lora(&args);
    assert!(run.status.success(), "{}", text(&run));
    assert_eq!(file_names(&dir), ["merged.safetensors"]);
    assert_matches_peft_merge(&out, 1e-5);
}
