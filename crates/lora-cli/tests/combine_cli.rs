//! `lora combine` as a user runs it: two PEFT adapters combined by TIES give PEFT's own
//! `add_weighted_adapter` factors (tests/fixtures/peft_combine), `cat` is exactly the
//! weighted sum of the deltas, `ties_svd` gives PEFT's merged delta, and bad input gets an
//! error naming the problem.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{fixture, lora, s, tempdir, text};

fn adapters() -> (std::path::PathBuf, std::path::PathBuf) {
    let d = fixture("peft_combine");
    (d.join("first"), d.join("second"))
}

#[test]
fn ties_equals_peft_and_bad_input_is_refused() {
    let tmp = tempdir();
    let (first, second) = adapters();
    let out = tmp.path().join("ties");
    let o = lora(&[
        "combine",
        "--adapter",
        s(&first),
        "--adapter",
        s(&second),
        "--weights",
        "0.7,-0.4",
        "--combination-type",
        "ties",
        "--density",
        "0.5",
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let got = lora::io::read_safetensors(&out.join("adapter_model.safetensors")).unwrap();
    let want =
        lora::io::read_safetensors(&fixture("peft_combine").join("combined.safetensors")).unwrap();
    for module in ["layers.0", "layers.2"] {
        for t in ["lora_A", "lora_B"] {
            let g = &got[&format!("base_model.model.{module}.{t}.weight")].data;
            let w = &want[&format!("ties_total.{module}.{t}")].data;
            for (a, b) in g.iter().zip(w) {
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                    "{module} {t}: {a} vs {b}"
                );
            }
        }
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        (config["r"].as_u64(), config["lora_alpha"].as_f64()),
        (Some(4), Some(4.0))
    );
    let bad_out = tmp.path().join("bad");
    for (args, expect) in [
        (vec!["--weights", "1.0"], "--weights has 1 values for 2"),
        (
            vec![
                "--weights",
                "1,1",
                "--combination-type",
                "ties",
                "--svd-rank",
                "2",
            ],
            "--svd-rank",
        ),
        (
            vec![
                "--weights",
                "1,1",
                "--combination-type",
                "svd",
                "--svd-rank",
                "9",
            ],
            "svd_rank",
        ),
        (
            vec![
                "--weights",
                "1,1",
                "--combination-type",
                "ties",
                "--density",
                "1.5",
            ],
            "density",
        ),
    ] {
        let mut all = vec!["combine", "--adapter", s(&first), "--adapter", s(&second)];
        all.extend(args);
        all.extend(["--out", s(&bad_out)]);
        let o = lora(&all);
        assert!(!o.status.success());
        assert!(
            text(&o).contains(expect) && !text(&o).contains("panicked"),
            "{}",
            text(&o)
        );
    }
    assert!(
        !tmp.path()
            .join("bad")
            .join("adapter_model.safetensors")
            .exists()
    );
    // A DoRA adapter is refused by name.
    let dora = fixture("peft_dora").join("adapter");
    let o = lora(&[
        "combine",
        "--adapter",
        s(&dora),
        "--adapter",
        s(&first),
        "--weights",
        "1,1",
        "--out",
        s(&tmp.path().join("dora")),
    ]);
    assert!(
        !o.status.success() && text(&o).contains("use_dora"),
        "{}",
        text(&o)
    );
}

/// `--combination-type ties_svd` writes PEFT's merged delta (`lora_B @ lora_A`) at the
/// largest source rank, with `r = lora_alpha` as PEFT's config has it.
#[test]
fn ties_svd_gives_peft_delta() {
    let tmp = tempdir();
    let (first, second) = adapters();
    let out = tmp.path().join("ties_svd");
    let o = lora(&[
        "combine",
        "--adapter",
        s(&first),
        "--adapter",
        s(&second),
        "--weights",
        "0.7,-0.4",
        "--combination-type",
        "ties_svd",
        "--density",
        "0.5",
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let got = lora::io::read_safetensors(&out.join("adapter_model.safetensors")).unwrap();
    let want =
        lora::io::read_safetensors(&fixture("peft_combine").join("svd.safetensors")).unwrap();
    for module in ["layers.0", "layers.2"] {
        let a = &got[&format!("base_model.model.{module}.lora_A.weight")];
        let b = &got[&format!("base_model.model.{module}.lora_B.weight")];
        let (r, inp, out_f) = (a.shape[0], a.shape[1], b.shape[0]);
        assert_eq!(r, 4);
        let w = &want[&format!("ties_svd.{module}.delta")].data;
        for i in 0..out_f {
            for j in 0..inp {
                let d: f32 = (0..r)
                    .map(|k| b.data[i * r + k] * a.data[k * inp + j])
                    .sum();
                let e = w[i * inp + j];
                assert!(
                    (d - e).abs() <= 1e-5 * e.abs().max(1.0),
                    "{module} ({i}, {j}): {d} vs {e}"
                );
            }
        }
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        (config["r"].as_u64(), config["lora_alpha"].as_f64()),
        (Some(4), Some(4.0))
    );
}
