//! Quantized bases against bitsandbytes itself: codes, scales, double quantization,
//! dequantized values and layer outputs recorded by `fixtures/make_quant_fixtures.py`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use lora::io::Checkpoint;
use lora::io::{RawTensor, bnb_format};
use lora::quant::{
    Absmax, FourBitType, FourBitWeight, Int8Weight, QuantConfig, QuantFormat, QuantLinear,
    QuantOps, QuantizedWeight, dynamic_map,
};
use lora::{Backend, Linear, LoraLinear, LoraSpec, Mode};
use lora_tests::{assert_close, assert_close_scaled, backend, host, rand_vec, to64};

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/bnb")
}

struct Fixture {
    ck: Checkpoint,
    cases: Vec<serde_json::Value>,
}

impl Fixture {
    fn load() -> Fixture {
        let dir = fixture_dir();
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap())
                .unwrap();
        Fixture {
            ck: Checkpoint::open(&dir.join("cases.safetensors")).unwrap(),
            cases: meta["cases"].as_array().unwrap().clone(),
        }
    }

    fn tensors(&self) -> BTreeMap<String, RawTensor<'_>> {
        self.ck.tensors().unwrap()
    }
}

fn f32s(t: &RawTensor<'_>) -> Vec<f32> {
    lora::io::decode_f32(t.dtype, &t.data).unwrap()
}

#[test]
fn dynamic_map_is_bitsandbytes_map_bit_for_bit() {
    let f = Fixture::load();
    let t = f.tensors();
    let theirs = f32s(&t["dynamic_map"]);
    let ours = dynamic_map();
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        assert_eq!(
            a.to_bits(),
            b.to_bits(),
            "dynamic map entry {i}: {a} vs {b}"
        );
    }
}

/// Positions where our 4-bit code differs from bitsandbytes' must be ties: both codes
/// equally near the input value (within f32 rounding of the scaling).
fn check_ties(
    name: &str,
    input: &[f32],
    ours: &[f32],
    theirs: &[f32],
    scale: &[f32],
    bs: usize,
) -> usize {
    let mut differing = 0;
    for (i, ((x, a), b)) in input.iter().zip(ours).zip(theirs).enumerate() {
        if a.to_bits() != b.to_bits() {
            differing += 1;
            let tol = 4.0 * f32::EPSILON * scale[i / bs].abs();
            assert!(
                ((a - x).abs() - (b - x).abs()).abs() <= tol,
                "{name}: value {i} = {x}: ours {a}, bitsandbytes {b} is not a tie"
            );
        }
    }
    differing
}

#[test]
fn four_bit_quantization_matches_bitsandbytes() {
    let f = Fixture::load();
    let t = f.tensors();
    let mut checked = 0;
    for c in &f.cases {
        let fmt = c["format"].as_str().unwrap();
        let name = c["name"].as_str().unwrap();
        if fmt == "int8" || name.starts_with("linear") {
            continue;
        }
        let qt: FourBitType = fmt.parse().unwrap();
        let bs = c["blocksize"].as_u64().unwrap() as usize;
        let dq = c["double_quant"].as_bool().unwrap();
        let shape: Vec<usize> = serde_json::from_value(c["shape"].clone()).unwrap();
        let input = f32s(&t[c["input"].as_str().unwrap()]);

        let theirs = bnb_format::decode(name, &t, "cases.safetensors").unwrap();
        let ours = FourBitWeight::quantize(&input, &shape, qt, bs, dq).unwrap();
        let QuantizedWeight::FourBit(theirs) = theirs else {
            panic!("{name}: not 4-bit")
        };
        assert_eq!(ours.code, theirs.code, "{name}: quant_map");
        assert_eq!(
            ours.packed.len(),
            theirs.packed.len(),
            "{name}: packed length"
        );
        match (&ours.absmax, &theirs.absmax) {
            (Absmax::F32(a), Absmax::F32(b)) => assert_eq!(a, b, "{name}: absmax"),
            (
                Absmax::Double {
                    scales: a,
                    offset: oa,
                },
                Absmax::Double {
                    scales: b,
                    offset: ob,
                },
            ) => {
                // The offset is a mean: torch sums pairwise in f32, we in f64.
                assert!(
                    (oa - ob).abs() <= 2.0 * f32::EPSILON * ob.abs(),
                    "{name}: offset {oa} vs {ob}"
                );
                assert_close(
                    &format!("{name}: nested_absmax"),
                    &a.absmax,
                    &to64(&b.absmax),
                    1e-6,
                    0.0,
                );
                assert_eq!(a.code, b.code, "{name}: nested_quant_map");
                let diff = a.codes.iter().zip(&b.codes).filter(|(x, y)| x != y).count();
                assert!(
                    diff <= a.codes.len() / 100,
                    "{name}: {diff} nested codes differ"
                );
                eprintln!("{name}: {diff} of {} absmax codes differ", a.codes.len());
            }
            _ => panic!("{name}: double quantization differs"),
        }
        // Codes: equal except ties. Compare through the dequantized values with the same
        // (bitsandbytes') scales so that only the code choice matters.
        let scales = theirs.absmax_f32();
        let mut ours_same_scale = ours.clone();
        ours_same_scale.absmax = theirs.absmax.clone();
        let n_diff = check_ties(
            name,
            &input,
            &ours_same_scale.dequantize(),
            &theirs.dequantize(),
            &scales,
            bs,
        );
        assert!(
            n_diff * 1000 <= input.len(),
            "{name}: {n_diff} of {} codes differ",
            input.len()
        );
        eprintln!(
            "{name}: {n_diff} of {} codes differ from bitsandbytes (ties)",
            input.len()
        );

        // Dequantizing bitsandbytes' own state gives bitsandbytes' values exactly.
        let want = f32s(&t[&format!("{name}.dequant")]);
        let got = theirs.dequantize();
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            // (bitsandbytes' C kernel writes -0.0 where the code is zero and the table +0.0.)
            assert!(a == b, "{name}: dequantized value {i}: {a} vs {b}");
        }
        checked += 1;
    }
    assert_eq!(checked, 14, "every 4-bit case was checked");
}

#[test]
fn bits_per_parameter_nf4_double_quant_is_qlora_figure() {
    let w = rand_vec(4096 * 256, 1, 0);
    let q = QuantConfig::qlora().quantize(&w, &[4096, 256]).unwrap();
    let bits = q.bits_per_parameter();
    assert!((bits - 4.127).abs() < 0.001, "{bits}");
    let plain = QuantConfig {
        double_quant: false,
        ..QuantConfig::qlora()
    }
    .quantize(&w, &[4096, 256])
    .unwrap();
    assert!((plain.bits_per_parameter() - 4.5).abs() < 1e-9);
    let int8 = QuantConfig::new(QuantFormat::Int8)
        .quantize(&w, &[4096, 256])
        .unwrap();
    assert!((int8.bits_per_parameter() - (8.0 + 32.0 / 256.0)).abs() < 1e-9);
}

#[test]
fn int8_rowwise_matches_bitsandbytes() {
    let f = Fixture::load();
    let t = f.tensors();
    let input = f32s(&t["int8.input"]);
    let ours = Int8Weight::quantize(&input, &[40, 96]).unwrap();
    let QuantizedWeight::Int8(theirs) =
        bnb_format::decode("int8", &t, "cases.safetensors").unwrap()
    else {
        panic!("not int8")
    };
    assert_eq!(ours.scb, theirs.scb, "SCB");
    assert_eq!(ours.cb, theirs.cb, "CB");
    let want = f32s(&t["int8.dequant"]);
    assert_close(
        "int8 dequantized",
        &ours.dequantize(),
        &to64(&want),
        1e-6,
        0.0,
    );
}

#[test]
fn linear4bit_forward_matches_bitsandbytes() {
    let f = Fixture::load();
    let t = f.tensors();
    let b = backend();
    let q = bnb_format::decode("linear_nf4", &t, "cases.safetensors").unwrap();
    let bias = b.from_host(&f32s(&t["linear_nf4.bias"]), &[48]).unwrap();
    let layer = QuantLinear::new(q, Some(bias)).unwrap();
    let x = b.from_host(&f32s(&t["linear_nf4.x"]), &[6, 128]).unwrap();
    let y = layer.forward(&b, &x).unwrap();
    assert_close(
        "Linear4bit output",
        &host(&b, &y),
        &to64(&f32s(&t["linear_nf4.y"])),
        1e-5,
        1e-6,
    );
    // The weight we quantize ourselves from the same f32 weight gives the same layer.
    let ours = QuantConfig::qlora()
        .quantize(&f32s(&t["linear_nf4.input"]), &[48, 128])
        .unwrap();
    let bias = b.from_host(&f32s(&t["linear_nf4.bias"]), &[48]).unwrap();
    let y2 = QuantLinear::new(ours, Some(bias))
        .unwrap()
        .forward(&b, &x)
        .unwrap();
    assert_close(
        "Linear4bit output (our codes)",
        &host(&b, &y2),
        &to64(&f32s(&t["linear_nf4.y"])),
        1e-5,
        1e-6,
    );
}

#[test]
fn llm_int8_forward_matches_bitsandbytes_with_and_without_outliers() {
    let f = Fixture::load();
    let t = f.tensors();
    let b = backend();
    for threshold in [0.0f32, 6.0] {
        let n = format!("int8_linear_t{}", threshold as i32);
        // The layer's own codes: bitsandbytes rounds the weight to f16 before quantizing it.
        let q = bnb_format::decode(&n, &t, "cases.safetensors").unwrap();
        let bias = b.from_host(&f32s(&t[&format!("{n}.bias")]), &[40]).unwrap();
        let layer = QuantLinear::new(q, Some(bias))
            .unwrap()
            .with_outlier_threshold(Some(threshold))
            .unwrap();
        let x = b.from_host(&f32s(&t[&format!("{n}.x")]), &[7, 96]).unwrap();
        let y = layer.forward(&b, &x).unwrap();
        assert_close(
            &n,
            &host(&b, &y),
            &to64(&f32s(&t[&format!("{n}.y")])),
            1e-4,
            1e-5,
        );
    }
}

/// A block of rows outside the weight is an error naming the range, before any buffer
/// for it is allocated (a huge claimed block must not be allocated first).
#[test]
fn dequantizing_rows_outside_the_weight_is_an_error_naming_the_range() {
    let b = backend();
    let q = QuantConfig::qlora()
        .quantize(&rand_vec(4 * 64, 5, 0), &[4, 64])
        .unwrap();
    let rows = b.dequantize_rows(&q, 1, 3).unwrap();
    assert_eq!(host(&b, &rows), q.dequantize()[64..]);
    for (row0, rows) in [(2, 3), (5, 0), (1, usize::MAX / 64)] {
        let err = b
            .dequantize_rows(&q, row0, rows)
            .err()
            .map(|e| e.to_string());
        let err = err.unwrap_or_else(|| panic!("rows {row0}+{rows}: no error"));
        assert!(
            err.contains("out of range") && err.contains("[4, 64]"),
            "{err}"
        );
    }
}

/// QLoRA: LoRA on a 4-bit base trains exactly as on the dense layer holding the
/// dequantized weight (forward, backward and adapter gradients).
#[test]
fn qlora_layer_equals_lora_on_the_dequantized_weight() {
    let b = backend();
    // in = 2048: 512 rows per dequantized block, so three blocks of output rows.
    let (o, i, n) = (1100, 2048, 7);
    let w = rand_vec(o * i, 3, 0);
    for cfg in [
        QuantConfig::qlora(),
        QuantConfig::new(QuantFormat::Fp4),
        QuantConfig::new(QuantFormat::Int8),
    ] {
        let q = cfg.quantize(&w, &[o, i]).unwrap();
        let deq = b.from_host(&q.dequantize(), &[o, i]).unwrap();
        let spec = LoraSpec {
            r: 4,
            alpha: 8.0,
            ..LoraSpec::default()
        };
        let mut ql = LoraLinear::new(
            "m",
            Box::new(QuantLinear::<lora::NdArray>::new(q, None).unwrap()),
        );
        let mut dl = LoraLinear::new("m", Box::new(lora::DenseLinear::new(deq, None).unwrap()));
        ql.inject_lora(&b, &spec).unwrap();
        dl.inject_lora(&b, &spec).unwrap();
        // Give B non-zero values so the LoRA path matters.
        for l in [&mut ql, &mut dl] {
            let bt = b.from_host(&rand_vec(o * 4, 9, 1), &[o, 4]).unwrap();
            l.adapter_mut().unwrap().set_tensor("lora_B", bt).unwrap();
        }
        let x = b.from_host(&rand_vec(n * i, 5, 2), &[n, i]).unwrap();
        let dy = b.from_host(&rand_vec(n * o, 6, 3), &[n, o]).unwrap();
        let yq = ql.forward(&b, &x, Mode::Train).unwrap();
        let yd = dl.forward(&b, &x, Mode::Train).unwrap();
        assert_close_scaled(
            &format!("{} forward", cfg.format),
            &host(&b, &yq),
            &to64(&host(&b, &yd)),
            1e-5,
            1e-6,
        );
        let dxq = ql.backward(&b, &dy).unwrap();
        let dxd = dl.backward(&b, &dy).unwrap();
        assert_close_scaled(
            &format!("{} dx", cfg.format),
            &host(&b, &dxq),
            &to64(&host(&b, &dxd)),
            1e-5,
            1e-6,
        );
        let gq: Vec<Vec<f32>> = ql
            .params_and_grads()
            .iter()
            .map(|p| host(&b, p.grad))
            .collect();
        let gd: Vec<Vec<f32>> = dl
            .params_and_grads()
            .iter()
            .map(|p| host(&b, p.grad))
            .collect();
        for (a, d) in gq.iter().zip(&gd) {
            assert_close_scaled(
                &format!("{} adapter grads", cfg.format),
                a,
                &to64(d),
                1e-5,
                1e-6,
            );
        }
        // The resident base is the quantized data.
        let resident = ql.base().resident_bytes();
        assert!(
            resident * 3 < o * i * 4,
            "{}: {resident} bytes resident",
            cfg.format
        );
    }
}

/// Merging into a 4-bit base re-quantizes and reports the rounding against the exact
/// f32 merge; unmerging rounds again and reports it too.
#[test]
fn merge_into_quantized_base_reports_rounding() {
    let b = backend();
    let (o, i) = (64, 128);
    let w = rand_vec(o * i, 4, 0);
    let q = QuantConfig::qlora().quantize(&w, &[o, i]).unwrap();
    let before = q.dequantize();
    let mut l = LoraLinear::new(
        "m",
        Box::new(QuantLinear::<lora::NdArray>::new(q, None).unwrap()),
    );
    l.inject_lora(
        &b,
        &LoraSpec {
            r: 2,
            alpha: 4.0,
            ..LoraSpec::default()
        },
    )
    .unwrap();
    let bt = b.from_host(&rand_vec(o * 2, 7, 1), &[o, 2]).unwrap();
    l.adapter_mut().unwrap().set_tensor("lora_B", bt).unwrap();
    let delta = host(&b, &l.adapter().unwrap().delta_weight(&b).unwrap());
    let r = l.merge(&b, true).unwrap();
    let exact: Vec<f32> = before.iter().zip(&delta).map(|(w, d)| w + d).collect();
    let merged = host(&b, &l.base().weight(&b).unwrap());
    let max_abs = merged
        .iter()
        .zip(&exact)
        .fold(0.0f32, |m, (a, e)| m.max((a - e).abs()));
    assert!(r.max_abs > 0.0, "4-bit merging rounds");
    assert_eq!(r.max_abs, max_abs, "the report is the measured rounding");
    // NF4's largest gap is about 0.28 of a block's absmax: half of it bounds the rounding.
    let scale = exact.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(r.max_rel <= 0.15 && r.max_abs <= 0.15 * scale, "{r:?}");
    let u = l.unmerge(&b).unwrap();
    assert!(u.max_abs > 0.0);
}
