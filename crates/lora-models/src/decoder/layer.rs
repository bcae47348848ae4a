//! One decoder layer of the Llama family, forward: pre-RMSNorm, grouped-query attention
//! with rotary embedding (Qwen3: RMSNorm per head on queries and keys first), causal and
//! padding mask, then pre-RMSNorm and the SwiGLU MLP, each with its residual.

use std::cell::OnceCell;

use lora_core::ops::{DenseMask, swap_middle_axes};
use lora_core::{AttentionMask, BinaryOp, DecoderOps, LoraLinear, LoraOps, Mode};

use super::config::DecoderConfig;
use crate::error::Result;

/// The frozen and LoRA-capable parts of one layer.
#[derive(Debug)]
pub(crate) struct DecoderLayer<B: LoraOps> {
    pub q_proj: LoraLinear<B>,
    pub k_proj: LoraLinear<B>,
    pub v_proj: LoraLinear<B>,
    pub o_proj: LoraLinear<B>,
    pub gate_proj: LoraLinear<B>,
    pub up_proj: LoraLinear<B>,
    pub down_proj: LoraLinear<B>,
    pub input_norm: B::Tensor,
    pub post_norm: B::Tensor,
    /// Qwen3's `q_norm` / `k_norm` (`[head_dim]` each).
    pub qk_norm: Option<(B::Tensor, B::Tensor)>,
    /// What the last training forward kept for the backward.
    pub cache: Option<LayerCache<B::Tensor>>,
}

/// Activations one training forward keeps for the backward.
#[derive(Debug)]
pub(crate) struct LayerCache<T> {
    /// The layer input and its input-RMSNorm's `1/rms`.
    pub h: T,
    pub inv_rms1: T,
    pub attention: AttentionSaved<T>,
    /// The attention residual and its post-attention RMSNorm's `1/rms`.
    pub h1: T,
    pub inv_rms2: T,
    /// `gate_proj` and `up_proj` outputs. `silu(gate)` and `down_proj`'s input
    /// `silu(gate)·up` are recomputed in the backward (two elementwise passes) rather than
    /// kept: that saves two `[tokens, intermediate]` activations per layer, the largest.
    pub gate: T,
    pub up: T,
}

/// The attention output, and what a training forward keeps.
type AttentionOut<T> = (T, Option<AttentionSaved<T>>);

/// What the attention forward keeps for its backward.
#[derive(Debug)]
pub(crate) struct AttentionSaved<T> {
    /// Qwen3: queries and keys before their per-head RMSNorm, with its `1/rms`.
    pub qk_pre_norm: Option<(T, T, T, T)>,
    /// Rotated queries `[B*heads, T, hd]`, keys and values `[B*kv_heads, T, hd]`.
    pub q: T,
    pub k: T,
    pub v: T,
    /// What the attention backward needs besides q, k, v (`DecoderOps::self_attention`).
    pub attn_saved: T,
}

/// What the attention of one forward needs besides the layer: the batch shape, the
/// rotary tables per (token, head) row and the additive mask per (batch, head, query).
#[derive(Debug)]
pub(crate) struct AttentionInputs<T> {
    pub batch: usize,
    /// New (query) tokens per row.
    pub seq: usize,
    /// Tokens per row already in the KV cache (0 without one).
    pub past: usize,
    /// Keys per row: `past + seq`.
    pub kv_len: usize,
    /// `[batch * seq * heads, head_dim]` for queries.
    pub q_cos: T,
    pub q_sin: T,
    /// `[batch * seq * kv_heads, head_dim]` for keys.
    pub k_cos: T,
    pub k_sin: T,
    /// `[batch * kv_len]`: the attention mask of every key (0: padding).
    pub keep: Vec<u32>,
    /// The dense mask, if a backend's attention asks for it (built once per step).
    pub dense_mask: OnceCell<DenseMask<T>>,
}

impl<T> AttentionInputs<T> {
    /// The mask of this step for its `heads` query heads (always the model's count).
    pub fn mask(&self, heads: usize) -> AttentionMask<'_, T> {
        AttentionMask {
            heads,
            causal: true,
            past: self.past,
            keep: &self.keep,
            dense: &self.dense_mask,
        }
    }
}

impl<B: LoraOps> DecoderLayer<B> {
    /// The seven projections, in PyTorch's order.
    pub fn linears(&self) -> [&LoraLinear<B>; 7] {
        [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.o_proj,
            &self.gate_proj,
            &self.up_proj,
            &self.down_proj,
        ]
    }

    /// The seven projections, mutably, in PyTorch's order.
    pub fn linears_mut(&mut self) -> [&mut LoraLinear<B>; 7] {
        [
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.o_proj,
            &mut self.gate_proj,
            &mut self.up_proj,
            &mut self.down_proj,
        ]
    }
}

impl<B: LoraOps + DecoderOps> DecoderLayer<B> {
    /// `h + attn(norm(h))`, then `+ mlp(norm(.))`; `h` is `[batch * seq, hidden]`.
    pub fn forward(
        &mut self,
        b: &B,
        c: &DecoderConfig,
        h: &B::Tensor,
        att: &AttentionInputs<B::Tensor>,
        cache: Option<&mut (B::Tensor, B::Tensor)>,
        mode: Mode,
    ) -> Result<B::Tensor> {
        let eps = c.rms_norm_eps as f32;
        let (x, inv_rms1) = b.rms_norm(h, &self.input_norm, eps)?;
        let (attn, saved) = self.attention(b, c, &x, att, cache, mode)?;
        let h1 = b.binary(BinaryOp::Add, h, &attn)?;
        let (x, inv_rms2) = b.rms_norm(&h1, &self.post_norm, eps)?;
        let gate = self.gate_proj.forward(b, &x, mode)?;
        let up = self.up_proj.forward(b, &x, mode)?;
        let act = swiglu(b, &gate, &up)?;
        let mlp = match mode {
            Mode::Train => self.down_proj.forward_discarding_input(b, &act)?,
            Mode::Eval => self.down_proj.forward(b, &act, mode)?,
        };
        drop(act);
        let out = b.binary(BinaryOp::Add, &h1, &mlp)?;
        self.cache = match saved {
            Some(attention) => Some(LayerCache {
                h: h.clone(),
                inv_rms1,
                attention,
                h1,
                inv_rms2,
                gate,
                up,
            }),
            None => None,
        };
        Ok(out)
    }

    /// Grouped-query self-attention of `x` (`[batch * seq, hidden]`), through `o_proj`.
    fn attention(
        &mut self,
        b: &B,
        c: &DecoderConfig,
        x: &B::Tensor,
        att: &AttentionInputs<B::Tensor>,
        cache: Option<&mut (B::Tensor, B::Tensor)>,
        mode: Mode,
    ) -> Result<AttentionOut<B::Tensor>> {
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let (bs, t) = (att.batch, att.seq);
        let q = self.q_proj.forward(b, x, mode)?;
        let k = self.k_proj.forward(b, x, mode)?;
        let v = self.v_proj.forward(b, x, mode)?;
        // One row per (token, head).
        let mut q = b.reshape(&q, &[bs * t * nh, hd])?;
        let mut k = b.reshape(&k, &[bs * t * nkv, hd])?;
        let mut qk_pre_norm = None;
        if let Some((qn, kn)) = &self.qk_norm {
            let eps = c.rms_norm_eps as f32;
            let (qq, rq) = b.rms_norm(&q, qn, eps)?;
            let (kk, rk) = b.rms_norm(&k, kn, eps)?;
            qk_pre_norm = Some((q, rq, k, rk));
            (q, k) = (qq, kk);
        }
        let q = b.rotary(&q, &att.q_cos, &att.q_sin)?;
        let k = b.rotary(&k, &att.k_cos, &att.k_sin)?;
        let q = heads_first(b, &q, bs, t, nh, hd)?;
        let k = heads_first(b, &k, bs, t, nkv, hd)?;
        let v = heads_first(b, &b.reshape(&v, &[bs * t * nkv, hd])?, bs, t, nkv, hd)?;
        // With a KV cache, the new keys and values join the cached ones.
        let (k, v) = match cache {
            Some((kc, vc)) => {
                b.assign_cols(kc, att.past * hd, &k)?;
                b.assign_cols(vc, att.past * hd, &v)?;
                (
                    b.slice_cols(kc, 0, att.kv_len * hd)?,
                    b.slice_cols(vc, 0, att.kv_len * hd)?,
                )
            }
            None => (k, v),
        };
        // Each key/value head serves `nh / nkv` query heads inside the attention op.
        let kv = att.kv_len;
        let (q, k, v) = (
            b.reshape(&q, &[bs * nh, t, hd])?,
            b.reshape(&k, &[bs * nkv, kv, hd])?,
            b.reshape(&v, &[bs * nkv, kv, hd])?,
        );
        let scale = 1.0 / (hd as f32).sqrt();
        let (ctx, attn_saved) = b.self_attention(&q, &k, &v, &att.mask(nh), scale)?;
        let ctx = heads_last(b, &ctx, bs, t, nh, hd)?;
        let out = self.o_proj.forward(b, &ctx, mode)?;
        let saved = match mode {
            Mode::Train => Some(AttentionSaved {
                qk_pre_norm,
                q,
                k,
                v,
                attn_saved,
            }),
            Mode::Eval => None,
        };
        Ok((out, saved))
    }
}

/// The SwiGLU MLP's `silu(gate) · up`, `down_proj`'s input.
fn swiglu<B: DecoderOps>(b: &B, gate: &B::Tensor, up: &B::Tensor) -> Result<B::Tensor> {
    Ok(b.binary(BinaryOp::Mul, &b.silu(gate)?, up)?)
}

/// `[batch * heads, seq, hd]` -> `[batch * seq, heads * hd]` (token-major again).
pub(crate) fn heads_last<B: LoraOps>(
    b: &B,
    x: &B::Tensor,
    bs: usize,
    t: usize,
    heads: usize,
    hd: usize,
) -> Result<B::Tensor> {
    Ok(swap_middle_axes(
        b,
        x,
        [bs, heads, t, hd],
        &[bs * t, heads * hd],
    )?)
}

/// `[batch * seq * heads, hd]` (token-major) -> `[batch * heads, seq * hd]`.
pub(crate) fn heads_first<B: LoraOps>(
    b: &B,
    x: &B::Tensor,
    bs: usize,
    t: usize,
    heads: usize,
    hd: usize,
) -> Result<B::Tensor> {
    Ok(swap_middle_axes(
        b,
        x,
        [bs, t, heads, hd],
        &[bs * heads, t * hd],
    )?)
}
