//! A decoder LLM of the Llama family (`llama`, `mistral`, `qwen2`, `qwen3`) as
//! transformers computes it, generic over the backend. Linear layers are [`LoraLinear`]s
//! named as in PyTorch (`model.layers.0.self_attn.q_proj`), so PEFT's targeting and
//! adapter files apply unchanged; `lm_head` is the output head that `all-linear` leaves
//! out.

use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::path::Path;

use lora_core::{
    DecoderOps, DenseLinear, Error, HostTensor, LoraEmbedding, LoraLinear, LoraOps, Mode, Model,
    Tensor, Transpose,
};

use super::config::DecoderConfig;
use super::kv_cache::KvCache;
use super::layer::{AttentionInputs, DecoderLayer};
use super::rope;
use super::step::{Step, check_step};
use super::weights::{LinearWeight, MakeBase, Weights};
use crate::error::{ModelError, Result};
use crate::token_batch::TokenBatch;

/// A decoder LLM with LoRA-capable linear layers.
#[derive(Debug)]
pub struct DecoderModel<B: LoraOps> {
    config: DecoderConfig,
    /// `model.embed_tokens`: the frozen table, and LoRA or trainable tokens when targeted.
    embed_tokens: LoraEmbedding<B>,
    layers: Vec<DecoderLayer<B>>,
    norm: B::Tensor,
    /// `None` when `tie_word_embeddings`: the logits then use `embed_tokens`.
    lm_head: Option<LoraLinear<B>>,
    /// What the last training forward kept for the backward outside the layers.
    train_state: Option<TrainState<B::Tensor>>,
    /// Keep only each layer's input in training and recompute the layer in the backward.
    gradient_checkpointing: bool,
    /// Compute the gradient of `embed_tokens` in the backward.
    embedding_grad: bool,
    /// That gradient after the last backward (`[vocab, hidden]`).
    embed_tokens_grad: Option<B::Tensor>,
    /// The rotary tables of the last forward, reused while the positions repeat.
    rope_cache: rope::RopeCache<B::Tensor>,
}

/// The batch-level state of a training forward.
#[derive(Debug)]
struct TrainState<T> {
    att: AttentionInputs<T>,
    /// With gradient checkpointing, each layer's input (the layers kept nothing else).
    layer_inputs: Option<Vec<T>>,
    /// The last layer's output (the final norm's input) and the norm's `1/rms`.
    h_last: T,
    inv_rms: T,
    /// With the embedding gradient asked for: the token ids, and (tied embeddings) the
    /// final norm's output, which the output head multiplied by `embed_tokens`.
    embedding: Option<(Vec<usize>, Option<T>)>,
}

impl<B: LoraOps + DecoderOps> DecoderModel<B> {
    /// Loads `config.json` and the safetensors weights (`model.safetensors` or shards with
    /// an index; f32, f16 or bf16, converted to f32) from a Hugging Face model directory,
    /// one tensor at a time. [`DecoderModel::from_pretrained_as`] keeps bf16/f16 weights
    /// at 2 bytes.
    pub fn from_pretrained(backend: &B, dir: &Path) -> Result<Self> {
        let config = DecoderConfig::from_file(&dir.join("config.json"))?;
        let checkpoint = lora_io::Checkpoint::open(dir)?;
        let path = dir.display().to_string();
        let weights = Weights::from_checkpoint(&checkpoint, &path, None)?;
        Self::build(backend, config, weights, &dense_base::<B>)
    }

    /// Builds the model from a checked config and a state dict (`path` names the source).
    /// The tensors are moved into the model (ndarray keeps their buffers).
    pub fn from_state_dict(
        backend: &B,
        config: DecoderConfig,
        tensors: BTreeMap<String, HostTensor>,
        path: &str,
    ) -> Result<Self> {
        Self::build(
            backend,
            config,
            Weights::from_host(tensors, path),
            &dense_base::<B>,
        )
    }

    /// The model from its weights, each linear layer's frozen base made by `make_base`.
    pub(crate) fn build(
        backend: &B,
        config: DecoderConfig,
        mut w: Weights<'_>,
        make_base: &MakeBase<'_, B>,
    ) -> Result<Self> {
        let (v, h) = (config.vocab_size, config.hidden_size);
        let embed_tokens = LoraEmbedding::new(
            "model.embed_tokens",
            w.get(backend, "model.embed_tokens.weight", &[v, h])?,
            config.pad_token_id.map(|p| p as usize),
        );
        let layers = (0..config.num_hidden_layers)
            .map(|l| w.layer(backend, make_base, &config, l))
            .collect::<Result<Vec<_>>>()?;
        let norm = w.get(backend, "model.norm.weight", &[h])?;
        let lm_head = match config.tie_word_embeddings {
            true => None,
            false => Some(w.linear(backend, make_base, ("lm_head", v, h, false))?),
        };
        Ok(DecoderModel {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            train_state: None,
            gradient_checkpointing: false,
            embedding_grad: false,
            embed_tokens_grad: None,
            rope_cache: rope::RopeCache::new(),
        })
    }

    /// Gradient checkpointing: a training forward keeps only each layer's input (no
    /// activations), and the backward recomputes each layer before differentiating it,
    /// trading one more forward for the activation memory. Adapters with dropout are
    /// refused at the next training forward (recomputing would draw other masks).
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.gradient_checkpointing = on;
    }

    /// Whether the backward also computes the gradient of the token embedding table
    /// (`model.embed_tokens.weight`, `[vocab, hidden]`): each row the sum over the tokens
    /// with that id, plus, with tied embeddings, the output head's share. The table stays
    /// frozen; the gradient is read with [`DecoderModel::embedding_grad`].
    pub fn set_embedding_grad(&mut self, on: bool) {
        self.embedding_grad = on;
        if !on {
            self.embed_tokens_grad = None;
        }
    }

    /// The gradient of `embed_tokens` from the last backward, when asked for with
    /// [`DecoderModel::set_embedding_grad`].
    pub fn embedding_grad(&self) -> Option<&B::Tensor> {
        self.embed_tokens_grad.as_ref()
    }

    /// The configuration.
    pub fn config(&self) -> &DecoderConfig {
        &self.config
    }

    /// Logits `[batch, seq, vocab]` for a padded batch with positions `0..seq` on every
    /// row, padding included: what transformers' forward computes when given no
    /// `position_ids`, and so what its `labels` loss is taken over.
    pub fn logits(&mut self, b: &B, batch: &TokenBatch, mode: Mode) -> Result<B::Tensor> {
        let positions: Vec<usize> = (0..batch.ids.len())
            .map(|i| i % batch.seq_len.max(1))
            .collect();
        self.logits_at(b, batch, &positions, mode)
    }

    /// Logits for explicit per-token positions (e.g. [`positions`](super::positions), which count only the
    /// real tokens of each row, as transformers' `generate` does with left padding).
    pub fn logits_at(
        &mut self,
        b: &B,
        batch: &TokenBatch,
        positions: &[usize],
        mode: Mode,
    ) -> Result<B::Tensor> {
        let step = Step {
            batch: batch.batch,
            seq: batch.seq_len,
            ids: &batch.ids,
            keep: &batch.attention_mask,
            positions,
            past: 0,
        };
        self.run(b, &step, None, mode)
    }

    /// A KV cache for `batch` sequences of up to `capacity` tokens in all.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> KvCache<B::Tensor> {
        KvCache::new(self.config.num_hidden_layers, batch, capacity)
    }

    /// Incremental decoding: logits `[batch, new, vocab]` for `ids` (`batch * new` tokens
    /// that follow the `cache.len()` tokens already in `cache`), at `positions`; `keep`
    /// is the attention mask of all `cache.len() + new` tokens of each row. The new keys
    /// and values are appended to the cache.
    pub fn forward_cached(
        &mut self,
        b: &B,
        ids: &[u32],
        keep: &[u32],
        positions: &[usize],
        cache: &mut KvCache<B::Tensor>,
    ) -> Result<B::Tensor> {
        let bs = cache.batch;
        let step = Step {
            batch: bs,
            seq: ids.len() / bs.max(1),
            ids,
            keep,
            positions,
            past: cache.len,
        };
        if step.past + step.seq > cache.capacity || keep.len() != bs * (step.past + step.seq) {
            return Err(ModelError::Input(format!(
                "KV cache: {} cached + {} new tokens per row (mask of {} values) exceed its capacity {} or disagree with the mask",
                step.past,
                step.seq,
                keep.len(),
                cache.capacity
            )));
        }
        let logits = self.run(b, &step, Some(cache), Mode::Eval)?;
        cache.len += step.seq;
        Ok(logits)
    }

    /// The forward shared by full and incremental passes.
    fn run(
        &mut self,
        b: &B,
        step: &Step<'_>,
        mut cache: Option<&mut KvCache<B::Tensor>>,
        mode: Mode,
    ) -> Result<B::Tensor> {
        let c = &self.config;
        let (bs, t) = (step.batch, step.seq);
        check_step(c, step)?;
        let att = self.attention_inputs(b, step)?;
        let rows: Vec<usize> = step.ids.iter().map(|&i| i as usize).collect();
        let mut h = self.embed_tokens.forward(b, &rows, mode)?;
        let config = self.config.clone();
        if let Some(cache) = cache.as_deref_mut() {
            let width = cache.capacity * config.head_dim;
            for slot in cache.layers.iter_mut().filter(|s| s.is_none()) {
                let rows = bs * config.num_key_value_heads;
                *slot = Some((b.zeros(&[rows, width])?, b.zeros(&[rows, width])?));
            }
        }
        let checkpoint = mode == Mode::Train && self.gradient_checkpointing;
        if checkpoint {
            self.refuse_dropout_with_checkpointing()?;
        }
        let mut layer_inputs = Vec::new();
        for (l, layer) in self.layers.iter_mut().enumerate() {
            let slot = cache.as_deref_mut().and_then(|c| c.layers[l].as_mut());
            if checkpoint {
                // Eval keeps no activations; without dropout it computes the same values.
                layer_inputs.push(h.clone());
                h = layer.forward(b, &config, &h, &att, slot, Mode::Eval)?;
            } else {
                h = layer.forward(b, &config, &h, &att, slot, mode)?;
            }
        }
        let (h_norm, inv_rms) = b.rms_norm(&h, &self.norm, config.rms_norm_eps as f32)?;
        // The tied head's input is kept when its table's gradient or trained rows need it.
        let tied_tokens = self.lm_head.is_none() && self.embed_tokens.has_trainable_tokens();
        let embedding = (mode == Mode::Train && (self.embedding_grad || tied_tokens))
            .then(|| (rows, self.lm_head.is_none().then(|| h_norm.clone())));
        self.train_state = match mode {
            Mode::Train => Some(TrainState {
                att,
                layer_inputs: checkpoint.then_some(layer_inputs),
                h_last: h,
                inv_rms,
                embedding,
            }),
            Mode::Eval => None,
        };
        let h = h_norm;
        let logits = match &mut self.lm_head {
            Some(head) => head.forward(b, &h, mode)?,
            None => self.embed_tokens.head_logits(b, &h)?,
        };
        Ok(b.reshape(&logits, &[bs, t, config.vocab_size])?)
    }

    /// Backward from `d_logits` (`[batch, seq, vocab]`, e.g. from
    /// [`causal_lm_loss_grad`](super::causal_lm_loss_grad)) of the last training forward:
    /// leaves gradients in every active adapter; the pretrained weights, norms and
    /// embeddings stay frozen. `d_logits` is taken by value so that its storage (the
    /// largest activation of a step) is freed before the layers' backward.
    pub fn backward_logits(&mut self, b: &B, d_logits: B::Tensor) -> Result<()> {
        let st = self.train_state.take().ok_or_else(|| {
            Error::state(
                "DecoderModel",
                "backward called without a forward in training mode",
            )
        })?;
        let (bs, t) = (st.att.batch, st.att.seq);
        let v = self.config.vocab_size;
        if d_logits.shape().dims() != [bs, t, v] {
            return Err(Error::shape(
                "DecoderModel backward d_logits",
                format!("[{bs}, {t}, {v}]"),
                d_logits.shape(),
            )
            .into());
        }
        // Shadowing would keep the argument alive to the end: move it into the reshape.
        let d_logits = {
            let d = d_logits;
            b.reshape(&d, &[bs * t, v])?
        };
        let d_norm = match &mut self.lm_head {
            Some(head) => head.backward(b, &d_logits)?,
            None => {
                let tied_input = st.embedding.as_ref().and_then(|(_, h)| h.as_ref());
                self.embed_tokens.head_backward(b, &d_logits, tied_input)?
            }
        };
        // Only the tied head's share of the table's gradient reads `d_logits` again.
        let d_logits = match &st.embedding {
            Some((_, Some(_))) if self.embedding_grad => Some(d_logits),
            _ => {
                drop(d_logits);
                None
            }
        };
        let mut g = b.rms_norm_backward(&st.h_last, &self.norm, &st.inv_rms, &d_norm)?;
        let config = self.config.clone();
        // The first layer's input gradient feeds only the table's adapters and its gradient.
        let embedding = st.embedding.filter(|_| self.embedding_grad);
        let table_grad = self.embed_tokens.has_adapters() || embedding.is_some();
        for (l, layer) in self.layers.iter_mut().enumerate().rev() {
            if let Some(inputs) = &st.layer_inputs {
                layer.forward(b, &config, &inputs[l], &st.att, None, Mode::Train)?;
            }
            let name = format!("model.layers.{l}");
            match layer.backward(b, &config, &name, &st.att, (&g, l > 0 || table_grad))? {
                Some(dx) => g = dx,
                None => {
                    self.embed_tokens_grad = None;
                    return Ok(());
                }
            }
        }
        if self.embed_tokens.has_adapters() {
            self.embed_tokens.backward(b, &g)?;
        }
        self.embed_tokens_grad = match embedding {
            Some((ids, tied_input)) => {
                // As `nn.Embedding(padding_idx=pad_token_id)`: padding tokens add nothing.
                let pad = self.config.pad_token_id.map(|p| p as usize);
                let (at, kept): (Vec<usize>, Vec<usize>) = ids
                    .iter()
                    .enumerate()
                    .filter(|&(_, &id)| Some(id) != pad)
                    .unzip();
                let g = match kept.len() == ids.len() {
                    true => g,
                    false => b.gather_rows(&g, &at)?,
                };
                let mut grad = b.embedding_backward(&g, &kept, v)?;
                if let (Some(h_norm), Some(d_logits)) = (tied_input, &d_logits) {
                    // logits = h_norm · embed_tokensᵀ, so d embed_tokens += d_logitsᵀ · h_norm.
                    b.gemm(
                        1.0,
                        d_logits,
                        Transpose::Yes,
                        &h_norm,
                        Transpose::No,
                        1.0,
                        &mut grad,
                    )?;
                }
                Some(grad)
            }
            None => None,
        };
        Ok(())
    }

    /// Gradient checkpointing recomputes forwards, which would draw new dropout masks.
    fn refuse_dropout_with_checkpointing(&self) -> Result<()> {
        for layer in self.linears() {
            if let Some(a) = layer.adapter().filter(|a| a.dropout() > 0.0) {
                return Err(ModelError::Input(format!(
                    "{}: gradient checkpointing needs lora_dropout 0 (this adapter has {})",
                    layer.name(),
                    a.dropout()
                )));
            }
        }
        Ok(())
    }

    /// Rotary tables and the key mask for one step (the dense causal + padding mask is
    /// built by the attention op only if the backend needs it).
    fn attention_inputs(&mut self, b: &B, step: &Step<'_>) -> Result<AttentionInputs<B::Tensor>> {
        let [q_cos, q_sin, k_cos, k_sin] =
            self.rope_cache.tables(b, &self.config, step.positions)?;
        Ok(AttentionInputs {
            batch: step.batch,
            seq: step.seq,
            past: step.past,
            kv_len: step.past + step.seq,
            q_cos,
            q_sin,
            k_cos,
            k_sin,
            keep: step.keep.to_vec(),
            dense_mask: OnceCell::new(),
        })
    }
}

impl<B: LoraOps + DecoderOps> Model<B> for DecoderModel<B> {
    /// `x` holds token ids as numbers, `[batch, seq]`, every token attended; returns the
    /// logits. Padded batches go through [`DecoderModel::logits`].
    fn forward(&mut self, backend: &B, x: &B::Tensor, mode: Mode) -> lora_core::Result<B::Tensor> {
        let tb = TokenBatch::from_id_tensor(backend, x, "DecoderModel forward")?;
        self.logits(backend, &tb, mode)
            .map_err(|e| Error::state("DecoderModel forward", e.to_string()))
    }

    /// `dy` is the gradient of the logits, `[batch, seq, vocab]`.
    fn backward(&mut self, backend: &B, dy: &B::Tensor) -> lora_core::Result<()> {
        self.backward_logits(backend, dy.clone())
            .map_err(|e| Error::state("DecoderModel backward", e.to_string()))
    }

    fn linears(&self) -> Vec<&LoraLinear<B>> {
        let mut v: Vec<&LoraLinear<B>> = self.layers.iter().flat_map(|l| l.linears()).collect();
        v.extend(self.lm_head.as_ref());
        v
    }

    fn linears_mut(&mut self) -> Vec<&mut LoraLinear<B>> {
        self.trainable_parts_mut().0
    }

    fn embeddings(&self) -> Vec<&LoraEmbedding<B>> {
        vec![&self.embed_tokens]
    }

    fn embeddings_mut(&mut self) -> Vec<&mut LoraEmbedding<B>> {
        vec![&mut self.embed_tokens]
    }

    fn trainable_parts_mut(&mut self) -> (Vec<&mut LoraLinear<B>>, Vec<&mut LoraEmbedding<B>>) {
        let mut linears: Vec<&mut LoraLinear<B>> = self
            .layers
            .iter_mut()
            .flat_map(|l| l.linears_mut())
            .collect();
        linears.extend(self.lm_head.as_mut());
        (linears, vec![&mut self.embed_tokens])
    }

    fn input_embedding(&self) -> Option<String> {
        Some(self.embed_tokens.name().to_string())
    }

    fn output_head(&self) -> Option<String> {
        Some("lm_head".into())
    }
}

/// A dense f32 base (every backend); half-precision weights need a quantization-capable
/// backend ([`DecoderModel::from_pretrained_as`]).
fn dense_base<B: LoraOps>(
    backend: &B,
    w: LinearWeight,
    bias: Option<B::Tensor>,
) -> Result<Box<dyn lora_core::Linear<B>>> {
    let w = match w {
        LinearWeight::F32(t) => t.into_backend(backend)?,
        LinearWeight::Half(h) => backend.from_host_vec(h.dequantize(), &h.shape)?,
    };
    Ok(Box::new(DenseLinear::new(w, bias)?))
}
