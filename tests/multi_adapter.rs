//! Several named adapters on one model: active sets add up, disable, delete, weighted
//! combinations, mixed-adapter batches, merge/unmerge of several, save/load with PEFT's
//! subfolder layout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lora::models::Mlp;
use lora::peft::{Combination, LoraConfig, PeftModel, TargetModules};
use lora::{Mode, Model, NdArray, NdTensor, RowAdapter, UnaryOp};
use lora_tests::{assert_close, backend, host, rand_tensor, to64};

fn config(r: usize, alpha: f64, targets: &[&str]) -> LoraConfig {
    LoraConfig {
        r,
        lora_alpha: alpha,
        target_modules: Some(TargetModules::List(
            targets.iter().map(|s| s.to_string()).collect(),
        )),
        init_lora_weights: lora::peft::InitLoraWeights::Bool(false),
        ..LoraConfig::default()
    }
}

/// A 5-6-6-3 MLP with adapters `a` (layers.2, r 2) and `b` (layers.2 and layers.4, r 3).
fn two_adapters(b: &NdArray) -> PeftModel<NdArray, Mlp<NdArray>> {
    let m = Mlp::new(b, &[5, 6, 6, 3], UnaryOp::Gelu, 1).unwrap();
    let mut pm = PeftModel::with_adapter(m, b, config(2, 4.0, &["layers.2"]), 10).unwrap();
    pm.add_adapter(b, "b", config(3, 3.0, &["layers.2", "layers.4"]), 20)
        .unwrap();
    pm
}

fn out(b: &NdArray, pm: &mut PeftModel<NdArray, Mlp<NdArray>>, x: &NdTensor) -> Vec<f32> {
    host(b, &pm.model_mut().forward(b, x, Mode::Eval).unwrap())
}

#[test]
fn active_adapters_add_up_and_disable_gives_the_base() {
    let b = backend();
    let mut pm = two_adapters(&b);
    let x = rand_tensor(&[4, 5], 1, 1);
    // A single layer makes additivity exact: check layers.2 alone.
    let l2 = |pm: &mut PeftModel<NdArray, Mlp<NdArray>>| {
        let h = rand_tensor(&[4, 6], 2, 2);
        let layer = pm
            .model_mut()
            .linears_mut()
            .into_iter()
            .find(|l| l.name() == "layers.2")
            .unwrap();
        host(&b, &layer.forward(&b, &h, Mode::Eval).unwrap())
    };
    pm.disable_adapters().unwrap();
    let base = l2(&mut pm);
    let base_full = out(&b, &mut pm, &x);
    pm.enable_adapters();
    assert_eq!(
        pm.model().linears()[1].active_adapters(),
        ["default"],
        "the first adapter is active, b is not"
    );
    let with_a = l2(&mut pm);
    pm.set_adapter(&["b"]).unwrap();
    let with_b = l2(&mut pm);
    pm.set_adapter(&["default", "b"]).unwrap();
    let with_ab = l2(&mut pm);
    let want: Vec<f64> = (0..base.len())
        .map(|i| f64::from(with_a[i]) + f64::from(with_b[i]) - f64::from(base[i]))
        .collect();
    assert_close("a + b adds up", &with_ab, &want, 1e-5, 1e-6);
    assert_ne!(with_a, base);
    pm.disable_adapters().unwrap();
    assert_eq!(
        out(&b, &mut pm, &x),
        base_full,
        "disabled = base, bit for bit"
    );
    pm.enable_adapters();
    assert!(
        pm.set_adapter(&["nope"])
            .unwrap_err()
            .to_string()
            .contains("no adapter named \"nope\"")
    );
}

#[test]
fn delete_adapter_removes_it_everywhere() {
    let b = backend();
    let mut pm = two_adapters(&b);
    pm.set_adapter(&["b"]).unwrap();
    pm.delete_adapter("b").unwrap();
    assert_eq!(pm.adapter_names(), ["default"]);
    assert!(
        pm.model()
            .linears()
            .iter()
            .all(|l| l.adapter_named("b").is_none())
    );
    assert!(pm.delete_adapter("b").is_err());
}

#[test]
fn mixed_batch_rows_equal_single_adapter_runs() {
    let b = backend();
    let mut pm = two_adapters(&b);
    let x = rand_tensor(&[5, 5], 3, 3);
    let rows = [
        RowAdapter::Named("b".into()),
        RowAdapter::Base,
        RowAdapter::Named("default".into()),
        RowAdapter::Named("b".into()),
        RowAdapter::Base,
    ];
    let mixed = host(&b, &pm.forward_mixed(&b, &x, &rows).unwrap());
    let per = |pm: &mut PeftModel<NdArray, Mlp<NdArray>>, which: Option<&str>| {
        match which {
            Some(n) => {
                pm.enable_adapters();
                pm.set_adapter(&[n]).unwrap();
            }
            None => pm.disable_adapters().unwrap(),
        }
        let y = out(&b, pm, &x);
        pm.enable_adapters();
        y
    };
    let ya = per(&mut pm, Some("default"));
    let yb = per(&mut pm, Some("b"));
    let y0 = per(&mut pm, None);
    for (i, r) in rows.iter().enumerate() {
        let src = match r {
            RowAdapter::Base => &y0,
            RowAdapter::Named(n) if n == "b" => &yb,
            RowAdapter::Named(_) => &ya,
        };
        assert_close(
            &format!("mixed row {i}"),
            &mixed[i * 3..i * 3 + 3],
            &to64(&src[i * 3..i * 3 + 3]),
            1e-5,
            1e-6,
        );
    }
    // Wrong row count, unknown adapter, and merged state are errors.
    assert!(pm.forward_mixed(&b, &x, &rows[..2]).is_err());
    assert!(
        pm.forward_mixed(&b, &x, &vec![RowAdapter::Named("zzz".into()); 5])
            .is_err()
    );
    pm.merge(&b, true).unwrap();
    let err = pm.forward_mixed(&b, &x, &rows).unwrap_err().to_string();
    assert!(err.contains("merged"), "{err}");
}

#[test]
fn cat_combination_is_exactly_the_weighted_sum_of_deltas() {
    let b = backend();
    let mut pm = two_adapters(&b);
    pm.add_weighted_adapter(
        &b,
        &[("default", 0.7), ("b", -1.3)],
        "mix",
        Combination::Cat,
    )
    .unwrap();
    let cfg = pm.config("mix").unwrap().clone();
    assert_eq!(cfg.r, 5);
    assert_eq!(cfg.lora_alpha, 5.0);
    assert_eq!(
        cfg.target_modules,
        Some(TargetModules::List(vec![
            "layers.2".into(),
            "layers.4".into()
        ]))
    );
    let layer = pm
        .model()
        .linears()
        .into_iter()
        .find(|l| l.name() == "layers.2")
        .unwrap();
    let delta = |n: &str| {
        to64(&host(
            &b,
            &layer.adapter_named(n).unwrap().delta_weight(&b).unwrap(),
        ))
    };
    let (da, db, dm) = (delta("default"), delta("b"), delta("mix"));
    let want: Vec<f64> = da
        .iter()
        .zip(&db)
        .map(|(a, bb)| 0.7 * a - 1.3 * bb)
        .collect();
    assert_close(
        "cat delta",
        &dm.iter().map(|v| *v as f32).collect::<Vec<_>>(),
        &want,
        1e-5,
        1e-6,
    );
    // layers.4 only has adapter b: the new adapter is b's part, zero-padded to rank 5.
    let l4 = pm
        .model()
        .linears()
        .into_iter()
        .find(|l| l.name() == "layers.4")
        .unwrap();
    let d4 = to64(&host(
        &b,
        &l4.adapter_named("mix").unwrap().delta_weight(&b).unwrap(),
    ));
    let b4: Vec<f64> = to64(&host(
        &b,
        &l4.adapter_named("b").unwrap().delta_weight(&b).unwrap(),
    ))
    .iter()
    .map(|v| -1.3 * v)
    .collect();
    assert_close(
        "cat delta, one source",
        &d4.iter().map(|v| *v as f32).collect::<Vec<_>>(),
        &b4,
        1e-5,
        1e-6,
    );
}

#[test]
fn linear_combination_follows_peft_formula() {
    let b = backend();
    let m = Mlp::new(&b, &[4, 4, 2], UnaryOp::Relu, 1).unwrap();
    let mut pm = PeftModel::with_adapter(m, &b, config(2, 4.0, &["layers.0"]), 1).unwrap();
    pm.add_adapter(&b, "b", config(2, 1.0, &["layers.0"]), 2)
        .unwrap();
    assert!(
        pm.add_weighted_adapter(&b, &[("default", 1.0)], "default", Combination::Linear)
            .is_err()
    );
    pm.add_weighted_adapter(
        &b,
        &[("default", 0.5), ("b", -2.0)],
        "lin",
        Combination::Linear,
    )
    .unwrap();
    let l = &pm.model().linears()[0];
    let t = |n: &str, i: usize| to64(&host(&b, l.adapter_named(n).unwrap().tensors()[i].1));
    // w*s: default 0.5*2 = 1 -> sqrt 1; b: -2*0.5 = -1 -> sign -1 on A, sqrt 1.
    let want_a: Vec<f64> = t("default", 0)
        .iter()
        .zip(t("b", 0))
        .map(|(x, y)| x - y)
        .collect();
    let want_b: Vec<f64> = t("default", 1)
        .iter()
        .zip(t("b", 1))
        .map(|(x, y)| x + y)
        .collect();
    assert_close(
        "linear A",
        &host(&b, l.adapter_named("lin").unwrap().tensors()[0].1),
        &want_a,
        1e-6,
        1e-7,
    );
    assert_close(
        "linear B",
        &host(&b, l.adapter_named("lin").unwrap().tensors()[1].1),
        &want_b,
        1e-6,
        1e-7,
    );
    // Different ranks cannot be combined linearly.
    pm.add_adapter(&b, "c", config(1, 1.0, &["layers.0"]), 3)
        .unwrap();
    assert!(
        pm.add_weighted_adapter(
            &b,
            &[("default", 1.0), ("c", 1.0)],
            "x",
            Combination::Linear
        )
        .is_err()
    );
}

#[test]
fn merging_several_then_unmerging_restores_and_merge_and_unload_keeps_outputs() {
    let b = backend();
    let mut pm = two_adapters(&b);
    pm.set_adapter(&["default", "b"]).unwrap();
    let x = rand_tensor(&[3, 5], 4, 4);
    let before = out(&b, &mut pm, &x);
    let w0: Vec<Vec<f32>> = pm
        .model()
        .linears()
        .iter()
        .map(|l| host(&b, &l.base().weight(&b).unwrap()))
        .collect();
    pm.merge(&b, true).unwrap();
    assert_eq!(pm.model().linears()[1].merged_adapters(), ["default", "b"]);
    assert_close(
        "merged output",
        &out(&b, &mut pm, &x),
        &to64(&before),
        1e-5,
        1e-6,
    );
    assert!(
        pm.set_adapter(&["b"]).is_err(),
        "changing adapters while merged is refused"
    );
    pm.unmerge(&b).unwrap();
    for (l, w) in pm.model().linears().iter().zip(&w0) {
        assert_close(
            &format!("{} restored", l.name()),
            &host(&b, &l.base().weight(&b).unwrap()),
            &to64(w),
            1e-6,
            1e-6,
        );
    }
    let (plain, rounding) = pm.merge_and_unload(&b, true).unwrap();
    assert_eq!(
        rounding,
        lora::WeightRounding::EXACT,
        "dense bases merge exactly"
    );
    assert!(plain.linears().iter().all(|l| l.adapter_names().is_empty()));
    let mut plain = plain;
    assert_close(
        "merge_and_unload output",
        &host(&b, &plain.forward(&b, &x, Mode::Eval).unwrap()),
        &to64(&before),
        1e-5,
        1e-6,
    );
}

#[test]
fn save_pretrained_puts_named_adapters_in_subfolders_and_reloads() {
    let b = backend();
    let mut pm = two_adapters(&b);
    let tmp = tempfile::tempdir().unwrap();
    pm.save_pretrained(tmp.path(), &b).unwrap();
    assert!(tmp.path().join("adapter_config.json").exists());
    assert!(tmp.path().join("b/adapter_model.safetensors").exists());
    let x = rand_tensor(&[2, 5], 5, 5);
    pm.set_adapter(&["b"]).unwrap();
    let want_b = out(&b, &mut pm, &x);

    let m = Mlp::new(&b, &[5, 6, 6, 3], UnaryOp::Gelu, 1).unwrap();
    let mut re = PeftModel::from_pretrained(m, tmp.path(), &b).unwrap();
    re.load_adapter(&tmp.path().join("b"), "b", &b).unwrap();
    re.set_adapter(&["b"]).unwrap();
    assert_eq!(out(&b, &mut re, &x), want_b);
    assert!(
        re.load_adapter(&tmp.path().join("b"), "b", &b).is_err(),
        "a name is used once"
    );
}

/// A model whose last layer is its output head.
#[derive(Debug)]
struct WithHead(Mlp<NdArray>);

impl Model<NdArray> for WithHead {
    fn forward(&mut self, b: &NdArray, x: &NdTensor, mode: Mode) -> lora::Result<NdTensor> {
        self.0.forward(b, x, mode)
    }
    fn backward(&mut self, b: &NdArray, dy: &NdTensor) -> lora::Result<()> {
        self.0.backward(b, dy)
    }
    fn linears(&self) -> Vec<&lora::LoraLinear<NdArray>> {
        self.0.linears()
    }
    fn linears_mut(&mut self) -> Vec<&mut lora::LoraLinear<NdArray>> {
        self.0.linears_mut()
    }
    fn output_head(&self) -> Option<String> {
        Some("layers.4".into())
    }
}

#[test]
fn all_linear_targets_every_linear_but_the_output_head() {
    let b = backend();
    let cfg = LoraConfig {
        target_modules: Some(TargetModules::Pattern("all-linear".into())),
        ..config(1, 1.0, &[])
    };
    let mut plain = Mlp::new(&b, &[3, 4, 4, 2], UnaryOp::Relu, 1).unwrap();
    assert_eq!(
        lora::peft::inject_adapters(&mut plain, &b, &cfg, 0).unwrap(),
        ["layers.0", "layers.2", "layers.4"]
    );
    let mut headed = WithHead(Mlp::new(&b, &[3, 4, 4, 2], UnaryOp::Relu, 1).unwrap());
    assert_eq!(
        lora::peft::inject_adapters(&mut headed, &b, &cfg, 0).unwrap(),
        ["layers.0", "layers.2"]
    );
}
