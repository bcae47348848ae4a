//! LoRA, DoRA and trainable tokens on BERT's word embeddings against transformers + PEFT
//! (issue 15), on a tiny random BERT (`fixtures/make_bert_embedding_fixtures.py`): the last
//! hidden state with PEFT's adapter and the gradient of every trainable tensor of
//! `Σ hidden · proj`, through the embeddings' LayerNorm into the word table's adapter.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lora::Mode;
use lora::models::bert::BertModel;
use lora_tests::decoder_fixtures::{adapter_grads_of, assert_grads_match, batch, io_at};
use lora_tests::{assert_close_scaled, backend_suite, fixtures_dir, to64};

fn check_case<B: lora::FullBackend>(b: &B, case: &str) {
    let dir = fixtures_dir().join("bert_tiny");
    let mut model = BertModel::from_pretrained(b, &dir).unwrap();
    lora::peft::load_pretrained(&dir.join(case).join("adapter"), &mut model, b).unwrap();
    let io = io_at(&dir.join("io.safetensors"));
    let want = lora::io::read_safetensors(&dir.join(case).join("expected.safetensors")).unwrap();
    let tb = batch(&io, "input_ids", Some("attention_mask"));
    let hidden = model.forward_batch(b, &tb, Mode::Train).unwrap();
    assert_close_scaled(
        &format!("{case} hidden"),
        &b.to_host(&hidden).unwrap(),
        &to64(&want["hidden"].data),
        1e-4,
        1e-5,
    );
    let proj = &io.floats["proj"];
    model
        .backward_batch(b, &b.from_host(&proj.1, &proj.0).unwrap())
        .unwrap();
    let got = adapter_grads_of(b, &mut model);
    assert_grads_match(case, &got, &want);
}

backend_suite! { all:
    fn lora_on_word_embeddings_equals_peft(b) {
        check_case(b, "word_lora");
    }

    fn dora_on_word_embeddings_equals_peft(b) {
        check_case(b, "word_dora");
    }

    fn trainable_tokens_on_word_embeddings_equal_peft(b) {
        check_case(b, "word_tokens");
    }
}
