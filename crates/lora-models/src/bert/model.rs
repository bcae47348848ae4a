//! The BERT encoder (transformers' `BertModel`), generic over the backend: embeddings,
//! self-attention with the padding mask, GELU feed-forward, post-LayerNorm residuals and
//! the pooler. Every linear layer is a [`LoraLinear`] named as in PyTorch
//! (`encoder.layer.0.attention.self.query`), so PEFT's targeting and adapter files apply
//! unchanged. The backward runs through the whole encoder (attention, softmax, LayerNorm,
//! GELU) and leaves gradients in the adapters; the pretrained weights stay frozen.

use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::path::Path;

use lora_core::ops::{AttentionMask, DenseMask};
use lora_core::{
    Backend, DecoderOps, DenseLinear, Error, HostTensor, LoraEmbedding, LoraLinear, LoraOps, Mode,
    Model, Tensor, UnaryOp,
};

use super::config::BertConfig;
use super::embeddings::{Embeddings, Norm};
use super::tokenizer::TokenBatch;
use crate::error::{ModelError, Result};

/// What one encoder layer keeps from its training forward for the backward.
#[derive(Debug)]
struct LayerCache<T> {
    q: T,
    k: T,
    v: T,
    /// What the attention backward needs besides q, k, v (`DecoderOps::self_attention`:
    /// one log-sum-exp per query on ndarray, the probabilities by default).
    attn_saved: T,
    h1_pre: T,
    st1: T,
    inter: T,
    h2_pre: T,
    st2: T,
}

/// One encoder layer.
#[derive(Debug)]
struct BertLayer<B: LoraOps> {
    query: LoraLinear<B>,
    key: LoraLinear<B>,
    value: LoraLinear<B>,
    attn_out: LoraLinear<B>,
    attn_norm: Norm<B::Tensor>,
    intermediate: LoraLinear<B>,
    output: LoraLinear<B>,
    out_norm: Norm<B::Tensor>,
    cache: Option<LayerCache<B::Tensor>>,
}

impl<B: LoraOps> BertLayer<B> {
    /// The six linear layers, in PyTorch's order.
    fn linears(&self) -> [&LoraLinear<B>; 6] {
        [
            &self.query,
            &self.key,
            &self.value,
            &self.attn_out,
            &self.intermediate,
            &self.output,
        ]
    }

    /// The same, mutably.
    fn linears_mut(&mut self) -> [&mut LoraLinear<B>; 6] {
        [
            &mut self.query,
            &mut self.key,
            &mut self.value,
            &mut self.attn_out,
            &mut self.intermediate,
            &mut self.output,
        ]
    }
}

/// Sizes of the batch a forward ran on.
#[derive(Clone, Copy, Debug)]
struct Dims {
    batch: usize,
    seq: usize,
}

/// The attention mask of one batch: every query sees every real token of its sequence.
#[derive(Debug)]
struct PaddingMask<T> {
    /// `[batch * seq]`: the tokenizer's attention mask (0: padding).
    keep: Vec<u32>,
    /// The dense form, if a backend's attention asks for it (built once per batch).
    dense: OnceCell<DenseMask<T>>,
}

impl<T> PaddingMask<T> {
    fn of(batch: &TokenBatch) -> Self {
        Self {
            keep: batch
                .attention_mask
                .iter()
                .map(|&m| u32::from(m != 0))
                .collect(),
            dense: OnceCell::new(),
        }
    }

    /// The mask for `heads` query heads, not causal. transformers adds `finfo.min` to the
    /// scores of padded keys; their probability is zero here as there.
    fn attention(&self, heads: usize) -> AttentionMask<'_, T> {
        AttentionMask {
            heads,
            causal: false,
            past: 0,
            keep: &self.keep,
            dense: &self.dense,
        }
    }
}

/// A BERT encoder with LoRA-capable linear layers.
#[derive(Debug)]
pub struct BertModel<B: LoraOps> {
    config: BertConfig,
    embeddings: Embeddings<B>,
    layers: Vec<BertLayer<B>>,
    pooler: Option<LoraLinear<B>>,
    act: UnaryOp,
    /// The padding mask of the last forward.
    mask: Option<PaddingMask<B::Tensor>>,
    dims: Option<Dims>,
}

/// Takes checkpoint tensors under an optional `bert.` prefix, checking their shapes, and
/// moves each to the backend (no second copy of the weights on ndarray).
struct Weights<'a> {
    tensors: BTreeMap<String, HostTensor>,
    prefix: &'static str,
    path: &'a str,
}

impl Weights<'_> {
    fn get<B: Backend>(&mut self, b: &B, name: &str, shape: &[usize]) -> Result<B::Tensor> {
        let key = format!("{}{name}", self.prefix);
        let t = self
            .tensors
            .remove(&key)
            .ok_or_else(|| ModelError::Weights {
                path: self.path.to_string(),
                tensor: key.clone(),
                reason: "missing from the checkpoint".into(),
            })?;
        if t.shape != shape {
            return Err(ModelError::Weights {
                path: self.path.to_string(),
                tensor: key,
                reason: format!(
                    "shape {:?} disagrees with config.json (expected {shape:?})",
                    t.shape
                ),
            });
        }
        Ok(t.into_backend(b)?)
    }

    fn linear<B: LoraOps>(
        &mut self,
        b: &B,
        name: &str,
        out: usize,
        inp: usize,
    ) -> Result<LoraLinear<B>> {
        let w = self.get(b, &format!("{name}.weight"), &[out, inp])?;
        let bias = self.get(b, &format!("{name}.bias"), &[out])?;
        Ok(LoraLinear::new(
            name,
            Box::new(DenseLinear::new(w, Some(bias))?),
        ))
    }

    fn norm<B: Backend>(&mut self, b: &B, name: &str, n: usize) -> Result<Norm<B::Tensor>> {
        Ok(Norm {
            gamma: self.get(b, &format!("{name}.weight"), &[n])?,
            beta: self.get(b, &format!("{name}.bias"), &[n])?,
        })
    }
}

impl<B: LoraOps + DecoderOps> BertModel<B> {
    /// Loads `config.json` and the safetensors weights (`model.safetensors` or shards)
    /// from a Hugging Face model directory. Names may carry a `bert.` prefix
    /// (`BertFor*` checkpoints); heads other than the pooler are ignored.
    pub fn from_pretrained(backend: &B, dir: &Path) -> Result<Self> {
        let config = BertConfig::from_file(&dir.join("config.json"))?;
        let tensors = lora_io::read_checkpoint_f32(dir)?;
        Self::from_state_dict(backend, config, tensors, &dir.display().to_string())
    }

    /// Builds the model from a config and a state dict (`path` names the source in errors).
    /// The tensors are moved into the model (ndarray keeps their buffers).
    pub fn from_state_dict(
        backend: &B,
        config: BertConfig,
        tensors: BTreeMap<String, HostTensor>,
        path: &str,
    ) -> Result<Self> {
        config.validate(path)?;
        let prefix = if tensors.contains_key("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else {
            ""
        };
        let mut w = Weights {
            tensors,
            prefix,
            path,
        };
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let embeddings = Embeddings {
            word: LoraEmbedding::new(
                "embeddings.word_embeddings",
                w.get(
                    backend,
                    "embeddings.word_embeddings.weight",
                    &[config.vocab_size, h],
                )?,
                config.pad_token_id,
            ),
            position: w.get(
                backend,
                "embeddings.position_embeddings.weight",
                &[config.max_position_embeddings, h],
            )?,
            token_type: w.get(
                backend,
                "embeddings.token_type_embeddings.weight",
                &[config.type_vocab_size, h],
            )?,
            norm: w.norm(backend, "embeddings.LayerNorm", h)?,
            saved: None,
        };
        // Not `with_capacity(num_hidden_layers)`: the count is a claim of config.json, checked
        // layer by layer against the checkpoint below.
        let mut layers = Vec::new();
        for l in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            layers.push(BertLayer {
                query: w.linear(backend, &format!("{p}.attention.self.query"), h, h)?,
                key: w.linear(backend, &format!("{p}.attention.self.key"), h, h)?,
                value: w.linear(backend, &format!("{p}.attention.self.value"), h, h)?,
                attn_out: w.linear(backend, &format!("{p}.attention.output.dense"), h, h)?,
                attn_norm: w.norm(backend, &format!("{p}.attention.output.LayerNorm"), h)?,
                intermediate: w.linear(backend, &format!("{p}.intermediate.dense"), i, h)?,
                output: w.linear(backend, &format!("{p}.output.dense"), h, i)?,
                out_norm: w.norm(backend, &format!("{p}.output.LayerNorm"), h)?,
                cache: None,
            });
        }
        let pooler = if w
            .tensors
            .contains_key(&format!("{prefix}pooler.dense.weight"))
        {
            Some(w.linear(backend, "pooler.dense", h, h)?)
        } else {
            None
        };
        let act = if config.hidden_act == "relu" {
            UnaryOp::Relu
        } else {
            UnaryOp::Gelu
        };
        Ok(BertModel {
            config,
            embeddings,
            layers,
            pooler,
            act,
            mask: None,
            dims: None,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// Whether the checkpoint had a pooler.
    pub fn has_pooler(&self) -> bool {
        self.pooler.is_some()
    }

    /// The encoder's last hidden state `[batch, seq, hidden]` for a token batch. In
    /// [`Mode::Train`] every layer keeps what its backward needs.
    pub fn forward_batch(&mut self, b: &B, batch: &TokenBatch, mode: Mode) -> Result<B::Tensor> {
        let config = self.config.clone();
        let x = self.embeddings.forward(b, &config, batch, mode)?;
        let mask = PaddingMask::of(batch);
        let dims = Dims {
            batch: batch.batch,
            seq: batch.seq_len,
        };
        let mut h = x;
        for l in 0..self.layers.len() {
            h = self.layer_forward(b, l, &h, &mask, dims, mode)?;
        }
        self.mask = Some(mask);
        self.dims = Some(dims);
        Ok(b.reshape(&h, &[dims.batch, dims.seq, self.config.hidden_size])?)
    }

    fn layer_forward(
        &mut self,
        b: &B,
        l: usize,
        x: &B::Tensor,
        mask: &PaddingMask<B::Tensor>,
        d: Dims,
        mode: Mode,
    ) -> Result<B::Tensor> {
        let (nh, hd) = (self.config.num_attention_heads, self.config.head_dim());
        let eps = self.config.layer_norm_eps as f32;
        let scale = 1.0 / (hd as f32).sqrt();
        let act = self.act;
        let (q, k, v) = {
            let layer = &mut self.layers[l];
            (
                layer.query.forward(b, x, mode)?,
                layer.key.forward(b, x, mode)?,
                layer.value.forward(b, x, mode)?,
            )
        };
        // Heads read in place from the projections' rows: no split or merge is copied.
        let (ctx, attn_saved) =
            b.self_attention_rows(&q, &k, &v, &mask.attention(nh), d.batch, scale)?;
        let layer = &mut self.layers[l];
        let attn = layer.attn_out.forward(b, &ctx, mode)?;
        let (h1_pre, h1, st1) =
            b.add_layer_norm(&attn, x, &layer.attn_norm.gamma, &layer.attn_norm.beta, eps)?;
        let (inter, hidden) = layer.intermediate.forward_activated(b, &h1, mode, act)?;
        let out = layer.output.forward(b, &hidden, mode)?;
        let (h2_pre, h2, st2) =
            b.add_layer_norm(&out, &h1, &layer.out_norm.gamma, &layer.out_norm.beta, eps)?;
        layer.cache = match mode {
            Mode::Train => Some(LayerCache {
                q,
                k,
                v,
                attn_saved,
                h1_pre,
                st1,
                inter,
                h2_pre,
                st2,
            }),
            Mode::Eval => None,
        };
        Ok(h2)
    }

    /// Backward from `d_hidden` (`[batch, seq, hidden]`, the gradient of the last hidden
    /// state): leaves gradients in every active adapter, the word embeddings' included.
    pub fn backward_batch(&mut self, b: &B, d_hidden: &B::Tensor) -> Result<()> {
        let d = self.dims.ok_or_else(|| {
            Error::state(
                "BertModel",
                "backward called without a forward in training mode",
            )
        })?;
        let h = self.config.hidden_size;
        if d_hidden.shape().dims() != [d.batch, d.seq, h] {
            return Err(Error::shape(
                "BertModel backward d_hidden",
                format!("[{}, {}, {h}]", d.batch, d.seq),
                d_hidden.shape(),
            )
            .into());
        }
        let mut g = b.reshape(d_hidden, &[d.batch * d.seq, h])?;
        for l in (0..self.layers.len()).rev() {
            // The first layer's input gradient only feeds the word table's adapters.
            let input_grad = l > 0 || self.embeddings.needs_output_grad();
            match self.layer_backward(b, l, &g, d, input_grad)? {
                Some(dx) => g = dx,
                None => return Ok(()),
            }
        }
        self.embeddings.backward(b, &g)
    }

    /// The backward of layer `l`: its adapters' gradients, and the gradient of its input
    /// when `input_grad` asks for it (else `None`, its three projections' `dy W` skipped).
    fn layer_backward(
        &mut self,
        b: &B,
        l: usize,
        d_out: &B::Tensor,
        d: Dims,
        input_grad: bool,
    ) -> Result<Option<B::Tensor>> {
        let (nh, hd) = (self.config.num_attention_heads, self.config.head_dim());
        let scale = 1.0 / (hd as f32).sqrt();
        let act = self.act;
        let c = self.layers[l].cache.take().ok_or_else(|| {
            Error::state(
                format!("encoder.layer.{l}"),
                "backward called without a forward in training mode",
            )
        })?;
        let layer = &mut self.layers[l];
        let d_h2_pre = b.layer_norm_backward(&c.h2_pre, &c.st2, &layer.out_norm.gamma, d_out)?;
        let d_hidden = layer.output.backward(b, &d_h2_pre)?;
        let d_inter = b.unary_backward(act, &c.inter, &d_hidden)?;
        // The residual's gradient plus the feed-forward's: summed inside its product.
        let mut d_h1 = d_h2_pre;
        layer
            .intermediate
            .backward_accumulate(b, &d_inter, &mut d_h1)?;
        let d_h1_pre = b.layer_norm_backward(&c.h1_pre, &c.st1, &layer.attn_norm.gamma, &d_h1)?;
        let d_ctx = layer.attn_out.backward(b, &d_h1_pre)?;
        let mask = self
            .mask
            .as_ref()
            .ok_or_else(|| Error::state("BertModel", "backward called without a forward"))?;
        let (d_q, d_k, d_v) = b.self_attention_rows_backward(
            (&c.q, &c.k, &c.v),
            &c.attn_saved,
            &mask.attention(nh),
            d.batch,
            &d_ctx,
            scale,
        )?;
        let layer = &mut self.layers[l];
        if !input_grad {
            layer.query.backward_params(b, &d_q)?;
            layer.key.backward_params(b, &d_k)?;
            layer.value.backward_params(b, &d_v)?;
            return Ok(None);
        }
        // The residual's gradient plus the three projections' (a frozen one adds inside
        // its product; one with an adapter adds its result).
        let mut dx = d_h1_pre;
        layer.query.backward_accumulate(b, &d_q, &mut dx)?;
        layer.key.backward_accumulate(b, &d_k, &mut dx)?;
        layer.value.backward_accumulate(b, &d_v, &mut dx)?;
        Ok(Some(dx))
    }

    /// The pooler output `tanh(W h[:, 0] + b)` (`[batch, hidden]`) from a last hidden
    /// state, as `BertModel`'s `pooler_output`.
    pub fn pool(&mut self, b: &B, last_hidden: &B::Tensor) -> Result<B::Tensor> {
        let d = self
            .dims
            .ok_or_else(|| Error::state("BertModel", "pool called before a forward"))?;
        let pooler = self.pooler.as_mut().ok_or_else(|| {
            Error::state("BertModel", "the checkpoint has no pooler.dense weights")
        })?;
        let cls: Vec<usize> = (0..d.batch).map(|i| i * d.seq).collect();
        let h = b.reshape(last_hidden, &[d.batch * d.seq, self.config.hidden_size])?;
        let first = b.gather_rows(&h, &cls)?;
        let y = pooler.forward(b, &first, Mode::Eval)?;
        Ok(b.unary(UnaryOp::Tanh, &y)?)
    }
}

impl<B: LoraOps + DecoderOps> Model<B> for BertModel<B> {
    /// `x` holds token ids as numbers, `[batch, seq]`, every token attended (no padding).
    /// Batches with padding go through [`BertModel::forward_batch`].
    fn forward(&mut self, backend: &B, x: &B::Tensor, mode: Mode) -> lora_core::Result<B::Tensor> {
        let tb = TokenBatch::from_id_tensor(backend, x, "BertModel forward")?;
        self.forward_batch(backend, &tb, mode)
            .map_err(|e| Error::state("BertModel forward", e.to_string()))
    }

    fn backward(&mut self, backend: &B, dy: &B::Tensor) -> lora_core::Result<()> {
        self.backward_batch(backend, dy)
            .map_err(|e| Error::state("BertModel backward", e.to_string()))
    }

    fn linears(&self) -> Vec<&LoraLinear<B>> {
        let mut v: Vec<&LoraLinear<B>> = self.layers.iter().flat_map(|l| l.linears()).collect();
        v.extend(self.pooler.as_ref());
        v
    }

    fn linears_mut(&mut self) -> Vec<&mut LoraLinear<B>> {
        self.trainable_parts_mut().0
    }

    fn embeddings(&self) -> Vec<&LoraEmbedding<B>> {
        vec![&self.embeddings.word]
    }

    fn embeddings_mut(&mut self) -> Vec<&mut LoraEmbedding<B>> {
        vec![&mut self.embeddings.word]
    }

    fn trainable_parts_mut(&mut self) -> (Vec<&mut LoraLinear<B>>, Vec<&mut LoraEmbedding<B>>) {
        let mut v: Vec<&mut LoraLinear<B>> = self
            .layers
            .iter_mut()
            .flat_map(|l| l.linears_mut())
            .collect();
        v.extend(self.pooler.as_mut());
        (v, vec![&mut self.embeddings.word])
    }

    fn input_embedding(&self) -> Option<String> {
        Some(self.embeddings.word.name().to_string())
    }

    fn num_parameters(&self) -> usize {
        let norms = 2 * self.config.hidden_size * 2 * self.layers.len();
        self.embeddings.num_parameters()
            + norms
            + self
                .linears()
                .iter()
                .map(|l| l.base().num_parameters() + l.num_trainable())
                .sum::<usize>()
    }
}
