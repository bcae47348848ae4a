//! PiSSA and OLoRA initialisation (`init_lora_weights`, issue 15) against PEFT
//! (`fixtures/make_init_fixtures.py`): the base weights after the residual is moved out,
//! the adapters' deltas `s·B A` (free of the singular/QR vectors' signs, which differ
//! between LAPACK and faer), and the unchanged output at step 0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lora::models::Mlp;
use lora::{Backend, Mode, Model, NdArray, UnaryOp};
use lora_tests::{assert_close, fixtures_dir, to64};

#[test]
fn pissa_and_olora_equal_peft() {
    let dir = fixtures_dir().join("peft_init");
    let io = lora::io::read_safetensors(&dir.join("init.safetensors")).unwrap();
    let b = NdArray::new();
    for method in ["pissa", "olora"] {
        let mut m = Mlp::new(&b, &[6, 16, 16, 3], UnaryOp::Relu, 0).unwrap();
        m.load_state_dict(
            &b,
            &lora::io::read_safetensors(&dir.join("base_model.safetensors")).unwrap(),
        )
        .unwrap();
        let config =
            lora::peft::LoraConfig::from_file(&dir.join(method).join("adapter_config.json"))
                .unwrap();
        lora::peft::inject_adapters(&mut m, &b, &config, 0).unwrap();
        let mut checked = 0;
        for layer in m.linears() {
            let Some(adapter) = layer.adapter() else {
                continue;
            };
            let module = layer.name();
            let w = b.to_host(&layer.base().weight(&b).unwrap()).unwrap();
            let want = &io[&format!("{method}.{module}.weight")];
            assert_close(
                &format!("{method} {module} base"),
                &w,
                &to64(&want.data),
                1e-5,
                1e-6,
            );
            let delta = b.to_host(&adapter.delta_weight(&b).unwrap()).unwrap();
            let want = &io[&format!("{method}.{module}.delta")];
            assert_close(
                &format!("{method} {module} delta"),
                &delta,
                &to64(&want.data),
                1e-5,
                1e-6,
            );
            checked += 1;
        }
        assert_eq!(checked, 2);
        let x = io["x"].to_backend(&b).unwrap();
        let y = b.to_host(&m.forward(&b, &x, Mode::Eval).unwrap()).unwrap();
        assert_close(
            &format!("{method} output"),
            &y,
            &to64(&io[&format!("{method}.y")].data),
            1e-5,
            1e-6,
        );
        assert_close(
            &format!("{method} output vs base"),
            &y,
            &to64(&io["y_base"].data),
            1e-5,
            1e-6,
        );
    }
}
