//! PEFT's task-arithmetic combinations (`add_weighted_adapter`, issue 15) against PEFT
//! (`fixtures/make_combination_fixtures.py`): TIES with either sign election and magnitude
//! pruning give PEFT's factors; DARE's random masks come from our generator, so DARE is
//! checked for its structure (each value is a rescaled subset sum) and its statistics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lora::models::Mlp;
use lora::ops::{MajoritySign, TaskMerge, TaskMethod};
use lora::peft::{Combination, PeftModel, SvdCombination};
use lora::{Backend, Model, NdArray, UnaryOp};
use lora_tests::{assert_close, fixtures_dir, to64};

fn dir() -> std::path::PathBuf {
    fixtures_dir().join("peft_combine")
}

/// The fixture MLP with PEFT's two adapters, `first` and `second`.
fn two_adapters(b: &NdArray) -> PeftModel<NdArray, Mlp<NdArray>> {
    let mut m = Mlp::new(b, &[6, 16, 16, 3], UnaryOp::Relu, 0).unwrap();
    m.load_state_dict(
        b,
        &lora::io::read_safetensors(&dir().join("base_model.safetensors")).unwrap(),
    )
    .unwrap();
    let mut pm = PeftModel::new(m);
    for name in ["first", "second"] {
        pm.load_adapter(&dir().join(name), name, b).unwrap();
    }
    pm
}

fn task(method: TaskMethod, density: f32, majority_sign: MajoritySign) -> Combination {
    Combination::Task(TaskMerge {
        method,
        density,
        majority_sign,
        seed: 5,
    })
}

/// The factors of adapter `name` by module.
fn factors(
    b: &NdArray,
    pm: &PeftModel<NdArray, Mlp<NdArray>>,
    name: &str,
) -> Vec<(String, Vec<f32>, Vec<f32>)> {
    pm.model()
        .linears()
        .into_iter()
        .filter_map(|l| {
            let a = l.adapter_named(name)?;
            let t = a.tensors();
            Some((
                l.name().to_string(),
                b.to_host(t[0].1).unwrap(),
                b.to_host(t[1].1).unwrap(),
            ))
        })
        .collect()
}

#[test]
fn ties_and_magnitude_pruning_equal_peft() {
    let b = NdArray::new();
    let want = lora::io::read_safetensors(&dir().join("combined.safetensors")).unwrap();
    for (case, combination) in [
        (
            "ties_total",
            task(TaskMethod::Ties, 0.5, MajoritySign::Total),
        ),
        (
            "ties_frequency",
            task(TaskMethod::Ties, 0.6, MajoritySign::Frequency),
        ),
        (
            "magnitude_prune",
            task(TaskMethod::MagnitudePrune, 0.5, MajoritySign::Total),
        ),
    ] {
        let mut pm = two_adapters(&b);
        pm.add_weighted_adapter(&b, &[("first", 0.7), ("second", -0.4)], case, combination)
            .unwrap();
        let got = factors(&b, &pm, case);
        assert_eq!(got.len(), 2, "{case}: both targeted layers");
        for (module, a, bb) in got {
            for (tensor, g) in [("lora_A", a), ("lora_B", bb)] {
                let key = format!("{case}.{module}.{tensor}");
                assert_close(&key, &g, &to64(&want[&key].data), 1e-6, 1e-7);
            }
        }
        let cfg = pm.config(case).unwrap();
        assert_eq!(
            (cfg.r, cfg.lora_alpha),
            (4, 4.0),
            "{case}: PEFT's new config"
        );
    }
}

/// DARE keeps each source value with probability `density`, rescaled by `1 / density`:
/// every combined value is a weighted sum over a subset of the sources (`dare_linear`),
/// about `density` of each source survives, and a seed gives the same masks again.
#[test]
fn dare_is_a_rescaled_random_subset_of_the_sources() {
    let b = NdArray::new();
    let density = 0.4f32;
    let mut pm = two_adapters(&b);
    let dare = task(TaskMethod::DareLinear, density, MajoritySign::Total);
    pm.add_weighted_adapter(&b, &[("first", 0.7), ("second", -0.4)], "dare", dare)
        .unwrap();
    pm.add_weighted_adapter(&b, &[("first", 0.7), ("second", -0.4)], "again", dare)
        .unwrap();
    let (first, second, got) = (
        factors(&b, &pm, "first"),
        factors(&b, &pm, "second"),
        factors(&b, &pm, "dare"),
    );
    assert_eq!(got, factors(&b, &pm, "again"), "seeded");
    // lora_A weights: sign(w s)·sqrt|w s| with s = alpha / r (2 and 1).
    let (wa1, wa2) = ((0.7f32 * 2.0).sqrt(), -(0.4f32).sqrt());
    let (mut kept, mut total) = (0usize, 0usize);
    for ((_, a1, _), ((_, a2, _), (_, a, _))) in first.iter().zip(second.iter().zip(&got)) {
        for ((x1, x2), v) in a1.iter().zip(a2).zip(a) {
            let options = [
                0.0,
                wa1 * x1 / density,
                wa2 * x2 / density,
                (wa1 * x1 + wa2 * x2) / density,
            ];
            assert!(
                options
                    .iter()
                    .any(|o| (o - v).abs() <= 1e-5 * o.abs().max(1.0)),
                "{v} is no rescaled subset of {x1}, {x2}"
            );
            kept += usize::from((v - wa2 * x2 / density).abs() > 1e-6 && *v != 0.0);
            total += 1;
        }
    }
    let frac = kept as f64 / total as f64;
    assert!(
        (frac - f64::from(density)).abs() < 0.15,
        "first's values kept: {frac}"
    );
    let bad = task(TaskMethod::Ties, 1.5, MajoritySign::Total);
    let e = pm
        .add_weighted_adapter(&b, &[("first", 1.0), ("second", 1.0)], "bad", bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("density"), "{e}");
}

fn svd(merge: Option<TaskMerge>, rank: Option<usize>, clamp: Option<f32>) -> Combination {
    Combination::Svd(SvdCombination { merge, rank, clamp })
}

/// The SVD-based combinations give PEFT's merged delta `B A` (singular vectors carry a
/// sign, so the factors are compared through their product), PEFT's factor shapes and
/// config, and `A` with orthonormal rows (the singular values live in `B`).
#[test]
fn svd_combinations_equal_peft() {
    let b = NdArray::new();
    let want = lora::io::read_safetensors(&dir().join("svd.safetensors")).unwrap();
    let ties = |d| match task(TaskMethod::Ties, d, MajoritySign::Total) {
        Combination::Task(t) => t,
        _ => unreachable!(),
    };
    let prune = TaskMerge {
        method: TaskMethod::MagnitudePrune,
        ..ties(0.5)
    };
    for (case, combination, rank) in [
        ("svd", svd(None, None, None), 4),
        ("svd_rank2", svd(None, Some(2), None), 2),
        ("ties_svd", svd(Some(ties(0.5)), None, None), 4),
        ("magnitude_prune_svd", svd(Some(prune), None, None), 4),
    ] {
        let mut pm = two_adapters(&b);
        pm.add_weighted_adapter(&b, &[("first", 0.7), ("second", -0.4)], case, combination)
            .unwrap();
        let got = factors(&b, &pm, case);
        assert_eq!(got.len(), 2, "{case}: both targeted layers");
        for (module, a, bb) in got {
            let key = |t: &str| format!("{case}.{module}.{t}");
            let (a_shape, b_shape) = (&want[&key("lora_A")].shape, &want[&key("lora_B")].shape);
            assert_eq!((a_shape[0], b_shape[1]), (rank, rank), "{case} {module}");
            let (out, inp) = (b_shape[0], a_shape[1]);
            let delta: Vec<f32> = (0..out * inp)
                .map(|i| {
                    (0..rank)
                        .map(|k| bb[(i / inp) * rank + k] * a[k * inp + i % inp])
                        .sum()
                })
                .collect();
            assert_close(
                &key("delta"),
                &delta,
                &to64(&want[&key("delta")].data),
                1e-5,
                1e-6,
            );
            for i in 0..rank {
                let norm: f32 = a[i * inp..(i + 1) * inp].iter().map(|v| v * v).sum();
                assert!(
                    (norm - 1.0).abs() < 1e-5,
                    "{case} {module}: lora_A row {i} norm {norm}"
                );
            }
        }
        let cfg = pm.config(case).unwrap();
        assert_eq!(
            (cfg.r, cfg.lora_alpha),
            (rank, rank as f64),
            "{case}: PEFT's new config"
        );
    }
    // svd_clamp depends on the singular vectors' signs (LAPACK's and faer's differ), so it is
    // checked on PEFT's own factors: clamping PEFT's `svd` factors gives PEFT's `svd_clamp`.
    for module in ["layers.0", "layers.2"] {
        let t = |case: &str, f: &str| want[&format!("{case}.{module}.{f}")].data.clone();
        let (mut a, mut bb) = (t("svd", "lora_A"), t("svd", "lora_B"));
        lora::peft::svd_clamp(&mut a, &mut bb, 0.9);
        assert_close(
            "svd_clamp lora_A",
            &a,
            &to64(&t("svd_clamp", "lora_A")),
            1e-6,
            1e-7,
        );
        assert_close(
            "svd_clamp lora_B",
            &bb,
            &to64(&t("svd_clamp", "lora_B")),
            1e-6,
            1e-7,
        );
    }
    // End to end, the clamped combination is ours clamped.
    let mut pm = two_adapters(&b);
    for (name, clamp) in [("plain", None), ("clamped", Some(0.9))] {
        pm.add_weighted_adapter(
            &b,
            &[("first", 0.7), ("second", -0.4)],
            name,
            svd(None, None, clamp),
        )
        .unwrap();
    }
    for ((_, mut a, mut bb), (_, ca, cb)) in factors(&b, &pm, "plain")
        .into_iter()
        .zip(factors(&b, &pm, "clamped"))
    {
        lora::peft::svd_clamp(&mut a, &mut bb, 0.9);
        assert_eq!((a, bb), (ca, cb));
    }
    let e = pm
        .add_weighted_adapter(
            &b,
            &[("first", 0.7), ("second", -0.4)],
            "big",
            svd(None, Some(7), None),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("svd_rank") && e.contains("7"), "{e}");
    let e = pm
        .add_weighted_adapter(
            &b,
            &[("first", 0.7), ("second", -0.4)],
            "clamp",
            svd(None, None, Some(1.5)),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("svd_clamp"), "{e}");
}

/// `dare_linear_svd` and `dare_ties_svd` (DARE's masks come from our generator, so there is
/// no PEFT fixture): seeded, at the largest source rank with `r = lora_alpha`, `lora_A` with
/// orthonormal rows, and at density 1 (nothing dropped) `dare_linear_svd` is `svd`.
#[test]
fn dare_svd_combinations_are_seeded_rank_r_factorizations() {
    let b = NdArray::new();
    for method in [TaskMethod::DareLinear, TaskMethod::DareTies] {
        let merge = |density| TaskMerge {
            method,
            density,
            majority_sign: MajoritySign::Total,
            seed: 5,
        };
        let mut pm = two_adapters(&b);
        for name in ["one", "again"] {
            pm.add_weighted_adapter(
                &b,
                &[("first", 0.7), ("second", -0.4)],
                name,
                svd(Some(merge(0.5)), None, None),
            )
            .unwrap();
        }
        let (one, again) = (factors(&b, &pm, "one"), factors(&b, &pm, "again"));
        assert_eq!(one, again, "{method:?}: seeded");
        for (module, a, _) in &one {
            let r = 4;
            let inp = a.len() / r;
            for i in 0..r {
                let norm: f32 = a[i * inp..(i + 1) * inp].iter().map(|v| v * v).sum();
                assert!(
                    (norm - 1.0).abs() < 1e-4,
                    "{method:?} {module}: row {i} norm {norm}"
                );
            }
        }
        assert_eq!(
            pm.config("one").map(|c| (c.r, c.lora_alpha)),
            Some((4, 4.0))
        );
    }
    let mut pm = two_adapters(&b);
    let dense = TaskMerge {
        method: TaskMethod::DareLinear,
        density: 1.0,
        majority_sign: MajoritySign::Total,
        seed: 5,
    };
    pm.add_weighted_adapter(
        &b,
        &[("first", 0.7), ("second", -0.4)],
        "dare",
        svd(Some(dense), None, None),
    )
    .unwrap();
    pm.add_weighted_adapter(
        &b,
        &[("first", 0.7), ("second", -0.4)],
        "svd",
        svd(None, None, None),
    )
    .unwrap();
    let delta = |f: &(String, Vec<f32>, Vec<f32>)| -> Vec<f32> {
        let (a, bb) = (&f.1, &f.2);
        let inp = a.len() / 4;
        let out = bb.len() / 4;
        (0..out * inp)
            .map(|i| {
                (0..4)
                    .map(|k| bb[(i / inp) * 4 + k] * a[k * inp + i % inp])
                    .sum()
            })
            .collect()
    };
    for (d, s) in factors(&b, &pm, "dare")
        .iter()
        .zip(&factors(&b, &pm, "svd"))
    {
        assert_close(
            &format!("density 1 {}", d.0),
            &delta(d),
            &to64(&delta(s)),
            1e-5,
            1e-6,
        );
    }
}
