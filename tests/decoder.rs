//! Decoder LLMs against transformers + PEFT on tiny random checkpoints that transformers
//! itself built (`fixtures/make_decoder_fixtures.py`): Llama (GQA, llama3 rope), Mistral,
//! Qwen2 (q/k/v biases, tied embeddings), Qwen3 (q/k norm, explicit head_dim) and Llamas
//! with `linear` and `dynamic` rope scaling; logits of a left-padded batch and of a single
//! sequence, the causal-LM loss, and the same with a PEFT adapter on every projection.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use lora::models::TokenBatch;
use lora::models::decoder::{DecoderModel, GenerationConfig, causal_lm_loss, generate};
use lora::{Backend, Mode, Tensor};
use lora_tests::decoder_fixtures::{
    adapter_grads, assert_logits_close, batch, case, dir, ids, io, train_backward, train_five_steps,
};
use lora_tests::{assert_close_scaled, backend_suite, to64};

/// The model's logits and loss on the fixture batch and single sequence; `prefix` is ""
/// for the base model and "lora_" with the PEFT adapter.
fn check_model<B: lora::FullBackend>(b: &B, name: &str, with_adapter: bool) {
    let mut model = DecoderModel::from_pretrained(b, &dir(name)).unwrap();
    let prefix = if with_adapter {
        lora::peft::load_pretrained(&dir(name).join("adapter"), &mut model, b).unwrap();
        "lora_"
    } else {
        ""
    };
    let io = io(name);
    let vocab = model.config().vocab_size;
    let tb = batch(&io, "input_ids", Some("attention_mask"));
    let logits_t = model.logits(b, &tb, Mode::Eval).unwrap();
    let logits = b.to_host(&logits_t).unwrap();
    let want = &io.floats[&format!("{prefix}logits")].1;
    assert_logits_close(
        &format!("{name} {prefix}logits"),
        &logits,
        want,
        &tb.attention_mask,
        vocab,
        1e-4,
    );

    let labels = &io.ints["labels"].1;
    let (loss, counted) = causal_lm_loss(b, &logits_t, labels, tb.batch, tb.seq_len).unwrap();
    let want_loss = io.floats[&format!("{prefix}loss")].1[0] as f64;
    assert!(counted > 0);
    assert!(
        (loss - want_loss).abs() <= 1e-4 * want_loss.abs(),
        "{name} {prefix}loss {loss} vs {want_loss}"
    );

    if !with_adapter {
        let single = batch(&io, "single_input_ids", None);
        let got = b
            .to_host(&model.logits(b, &single, Mode::Eval).unwrap())
            .unwrap();
        let want = &io.floats["single_logits"].1;
        assert_logits_close(
            &format!("{name} single"),
            &got,
            want,
            &single.attention_mask,
            vocab,
            1e-4,
        );
    }
}

/// The gradients of the causal-LM loss with respect to every adapter tensor equal
/// PyTorch autograd's through the whole model (PEFT adapter on every projection).
fn check_adapter_gradients<B: lora::FullBackend>(b: &B, name: &str) {
    let mut model = DecoderModel::from_pretrained(b, &dir(name)).unwrap();
    lora::peft::load_pretrained(&dir(name).join("adapter"), &mut model, b).unwrap();
    model.set_embedding_grad(true);
    let io = io(name);
    let tb = batch(&io, "input_ids", Some("attention_mask"));
    let loss = train_backward(b, &mut model, &tb, &io.ints["labels"].1);
    // The embedding table's gradient (with qwen2's tied embeddings, the head's share too).
    let want = lora::io::read_safetensors(&dir(name).join("embed_grad.safetensors")).unwrap();
    let want = &want["model.embed_tokens.weight"];
    let got = model
        .embedding_grad()
        .expect("embedding gradient asked for");
    assert_eq!(got.shape().dims(), want.shape.as_slice());
    assert_close_scaled(
        &format!("{name} embed_tokens gradient"),
        &b.to_host(got).unwrap(),
        &to64(&want.data),
        1e-4,
        1e-5,
    );
    let want_loss = io.floats["lora_loss"].1[0] as f64;
    assert!(
        (loss - want_loss).abs() <= 1e-4 * want_loss,
        "{name} loss {loss} vs {want_loss}"
    );
    let want = lora::io::read_safetensors(&dir(name).join("adapter_grads.safetensors")).unwrap();
    let check = |grads: Vec<(String, &str, Vec<f32>)>, path: &str| {
        for (module, tensor, g) in &grads {
            let key = format!("base_model.model.{module}.{tensor}.weight");
            let w = want
                .get(&key)
                .unwrap_or_else(|| panic!("fixture has no {key}"));
            assert_close_scaled(
                &format!("{name} {path} {key}"),
                g,
                &to64(&w.data),
                1e-4,
                1e-5,
            );
        }
        assert_eq!(
            grads.len(),
            want.len(),
            "{name}: every adapter tensor checked"
        );
    };
    check(adapter_grads(b, &mut model), "");
    // Without the table's gradient the first layer skips its input gradient
    // (`LoraLinear::backward_params`): the adapters' gradients stay autograd's.
    let mut model = DecoderModel::from_pretrained(b, &dir(name)).unwrap();
    lora::peft::load_pretrained(&dir(name).join("adapter"), &mut model, b).unwrap();
    train_backward(b, &mut model, &tb, &io.ints["labels"].1);
    assert!(model.embedding_grad().is_none());
    check(
        adapter_grads(b, &mut model),
        "(first layer's input gradient skipped)",
    );
}

/// Greedy generation with the KV cache gives transformers' `generate(do_sample=False)`
/// token for token, and the cached logits equal a full forward over the same tokens.
fn check_greedy_generation<B: lora::FullBackend>(b: &B, name: &str) {
    let mut model = DecoderModel::from_pretrained(b, &dir(name)).unwrap();
    let g = &case(name)["generation"];
    let prompt = ids(&g["prompt_ids"]);
    let want: Vec<u32> = ids(&g["generated_ids"])[prompt.len()..].to_vec();
    let cfg = GenerationConfig {
        max_new_tokens: want.len(),
        ..GenerationConfig::default()
    };
    let mut streamed = Vec::new();
    let got = generate(&mut model, b, &prompt, &cfg, |id| {
        streamed.push(id);
        Ok(())
    })
    .unwrap();
    assert_eq!(got, want, "{name}: greedy generation");
    assert_eq!(streamed, want, "{name}: streamed tokens");

    // Incremental logits for the last token equal the full forward's.
    let all: Vec<u32> = prompt.iter().chain(&got).copied().collect();
    let vocab = model.config().vocab_size;
    let full = TokenBatch::new(all.clone(), vec![1; all.len()], 1).unwrap();
    let full = b
        .to_host(&model.logits(b, &full, Mode::Eval).unwrap())
        .unwrap();
    let mut cache = model.new_cache(1, all.len());
    let n = all.len() - 1;
    let positions: Vec<usize> = (0..n).collect();
    model
        .forward_cached(b, &all[..n], &vec![1; n], &positions, &mut cache)
        .unwrap();
    let last = model
        .forward_cached(b, &all[n..], &vec![1; n + 1], &[n], &mut cache)
        .unwrap();
    let last = b.to_host(&last).unwrap();
    assert_logits_close(
        &format!("{name} cached step"),
        &last,
        &full[n * vocab..],
        &[1],
        vocab,
        1e-5,
    );
}

backend_suite! { all:
    fn greedy_generation_with_the_kv_cache_equals_transformers(b) {
        check_greedy_generation(b, "llama");
        check_greedy_generation(b, "qwen3");
    }

    fn adapter_gradients_equal_pytorch_autograd(b) {
        check_adapter_gradients(b, "llama");
        check_adapter_gradients(b, "qwen2");
    }

    fn llama_gqa_llama3_rope_equals_transformers(b) {
        check_model(b, "llama", false);
    }

    fn mistral_equals_transformers(b) {
        check_model(b, "mistral", false);
    }

    fn qwen2_biases_and_tied_embeddings_equal_transformers(b) {
        check_model(b, "qwen2", false);
    }

    fn qwen3_qk_norm_equals_transformers(b) {
        check_model(b, "qwen3", false);
    }

    fn linear_and_dynamic_rope_scaling_equal_transformers(b) {
        check_model(b, "llama_linear", false);
        check_model(b, "llama_dynamic", false);
    }

    fn peft_adapters_on_every_projection_give_peft_logits(b) {
        check_model(b, "llama", true);
        check_model(b, "qwen2", true);
    }
}

/// Trains a fresh adapter on every projection for a few AdamW steps (the causal-LM loss on
/// the fixture batch), saves it, and writes our logits with it to
/// `<target>/tmp/decoder-interop/<model>/`, where `cargo xtask test` hands it to
/// `fixtures/check_decoder_in_peft.py`: PEFT must load it and compute the same logits.
/// Also checks that training lowered the loss.
#[test]
fn export_trained_decoder_adapters_for_peft() {
    use lora::peft::{LoraConfig, TargetModules};
    let b = lora::NdArray::new();
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("decoder-interop");
    let _ = std::fs::remove_dir_all(&root);
    for name in ["llama", "qwen2", "qwen3"] {
        let mut model = DecoderModel::from_pretrained(&b, &dir(name)).unwrap();
        let config = LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            target_modules: Some(TargetModules::List(
                [
                    "q_proj",
                    "k_proj",
                    "v_proj",
                    "o_proj",
                    "gate_proj",
                    "up_proj",
                    "down_proj",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            )),
            task_type: Some("CAUSAL_LM".into()),
            ..LoraConfig::default()
        };
        lora::peft::inject_adapters(&mut model, &b, &config, 5).unwrap();
        let io = io(name);
        let tb = batch(&io, "input_ids", Some("attention_mask"));
        let vocab = model.config().vocab_size;
        train_five_steps(&b, &mut model, &tb, &io.ints["labels"].1, name);
        let out = root.join(name);
        lora::peft::save_pretrained(&out.join("adapter"), &model, &b, &config).unwrap();
        let logits = b
            .to_host(&model.logits(&b, &tb, Mode::Eval).unwrap())
            .unwrap();
        lora::io::write_safetensors(
            &out.join("ours.safetensors"),
            &[(
                "logits".to_string(),
                lora::HostTensor {
                    shape: vec![tb.batch, tb.seq_len, vocab],
                    data: logits,
                },
            )],
        )
        .unwrap();
        std::fs::write(out.join("model_dir.txt"), dir(name).display().to_string()).unwrap();
    }
}

/// QLoRA on a decoder: with NF4 (double quantization) bases, the model computes what the
/// same model with the dequantized weights computes, and adapters train on it.
#[test]
fn qlora_decoder_equals_its_dequantized_model_and_trains() {
    use lora::quant::QuantConfig;
    let b = lora::NdArray::new();
    let mut q = DecoderModel::from_pretrained(&b, &dir("llama")).unwrap();
    let (bytes, dense) = q.quantize_base(&b, &QuantConfig::qlora()).unwrap();
    assert!(
        bytes * 7 < dense,
        "NF4 + double quant: {bytes} bytes vs {dense} in f32"
    );
    // The reference: plain dense layers holding the dequantized values.
    let mut reference = DecoderModel::from_pretrained(&b, &dir("llama")).unwrap();
    let deq: Vec<_> = lora::Model::linears(&q)
        .iter()
        .map(|l| (l.name().to_string(), l.base().weight(&b).unwrap()))
        .collect();
    for layer in lora::Model::linears_mut(&mut reference) {
        if let Some((_, w)) = deq.iter().find(|(n, _)| n == layer.name())
            && layer.name() != "lm_head"
        {
            let bias = layer.base().bias().cloned();
            layer
                .replace_base(Box::new(lora::DenseLinear::new(w.clone(), bias).unwrap()))
                .unwrap();
        }
    }
    let io = io("llama");
    let tb = batch(&io, "input_ids", Some("attention_mask"));
    let vocab = q.config().vocab_size;
    let got = b.to_host(&q.logits(&b, &tb, Mode::Eval).unwrap()).unwrap();
    let want = b
        .to_host(&reference.logits(&b, &tb, Mode::Eval).unwrap())
        .unwrap();
    assert_logits_close("NF4 llama", &got, &want, &tb.attention_mask, vocab, 1e-5);
    // LoRA on the 4-bit base: five AdamW steps lower the loss.
    let config = lora::peft::LoraConfig {
        target_modules: Some(lora::peft::TargetModules::Pattern("all-linear".into())),
        ..lora::peft::LoraConfig::default()
    };
    lora::peft::inject_adapters(&mut q, &b, &config, 1).unwrap();
    let mut opt = lora::Adam::<lora::NdArray>::adamw(1e-2).unwrap();
    let mut losses = Vec::new();
    for _ in 0..5 {
        losses.push(train_backward(&b, &mut q, &tb, &io.ints["labels"].1));
        lora::Optimizer::step(&mut opt, &b, &mut lora::Model::params_and_grads(&mut q)).unwrap();
    }
    assert!(
        losses[4] < losses[0],
        "QLoRA training lowers the loss: {losses:?}"
    );
    let head = lora::Model::linears(&q)
        .into_iter()
        .find(|l| l.name() == "lm_head");
    assert!(
        head.is_some_and(|l| l.adapter().is_none()),
        "all-linear leaves lm_head out"
    );
}

/// Gradient checkpointing (each layer recomputed in the backward) gives the same adapter
/// gradients, bit for bit, and refuses adapters with dropout.
#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    let b = lora::NdArray::new();
    let io = io("qwen3");
    let tb = batch(&io, "input_ids", Some("attention_mask"));
    let grads = |checkpoint: bool| {
        let mut model = DecoderModel::from_pretrained(&b, &dir("qwen3")).unwrap();
        let config = lora::peft::LoraConfig {
            target_modules: Some(lora::peft::TargetModules::Pattern("all-linear".into())),
            init_lora_weights: lora::peft::InitLoraWeights::Bool(false),
            ..lora::peft::LoraConfig::default()
        };
        lora::peft::inject_adapters(&mut model, &b, &config, 3).unwrap();
        model.set_gradient_checkpointing(checkpoint);
        train_backward(&b, &mut model, &tb, &io.ints["labels"].1);
        lora::Model::params_and_grads(&mut model)
            .iter()
            .map(|p| b.to_host(p.grad).unwrap())
            .collect::<Vec<_>>()
    };
    let (plain, recomputed) = (grads(false), grads(true));
    assert!(!plain.is_empty());
    assert_eq!(plain, recomputed);

    let mut model = DecoderModel::from_pretrained(&b, &dir("qwen3")).unwrap();
    let config = lora::peft::LoraConfig {
        lora_dropout: 0.1,
        target_modules: Some(lora::peft::TargetModules::List(vec!["q_proj".into()])),
        ..lora::peft::LoraConfig::default()
    };
    lora::peft::inject_adapters(&mut model, &b, &config, 3).unwrap();
    model.set_gradient_checkpointing(true);
    let e = model
        .logits(&b, &tb, Mode::Train)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("gradient checkpointing") && e.contains("dropout"),
        "{e}"
    );
}
