//! Backward of one decoder layer, from the gradient of its output to the gradient of its
//! input, leaving gradients in every active adapter of its seven projections. The
//! pretrained weights and norms are frozen.

use lora_core::{BinaryOp, DecoderOps, Error, LoraOps};

use super::config::DecoderConfig;
use super::layer::{AttentionInputs, DecoderLayer, LayerCache, heads_first, heads_last, kv_rows};
use crate::error::Result;

impl<B: LoraOps + DecoderOps> DecoderLayer<B> {
    /// `d_out` is `[batch * seq, hidden]`; returns the gradient of the layer input.
    pub fn backward(
        &mut self,
        b: &B,
        c: &DecoderConfig,
        name: &str,
        att: &AttentionInputs<B::Tensor>,
        d_out: &B::Tensor,
    ) -> Result<B::Tensor> {
        let cache = self.cache.take().ok_or_else(|| {
            Error::state(name, "backward called without a forward in training mode")
        })?;
        // MLP: out = h1 + down(silu(gate) * up).
        let d_act = self.down_proj.backward(b, d_out)?;
        let d_gate_act = b.binary(BinaryOp::Mul, &d_act, &cache.up)?;
        let d_up = b.binary(BinaryOp::Mul, &d_act, &cache.gate_act)?;
        let d_gate = b.silu_backward(&cache.gate, &d_gate_act)?;
        let mut dx2 = self.up_proj.backward(b, &d_up)?;
        b.axpby(1.0, &self.gate_proj.backward(b, &d_gate)?, 1.0, &mut dx2)?;
        let mut d_h1 = d_out.clone();
        let d_norm2 = b.rms_norm_backward(&cache.h1, &self.post_norm, &cache.inv_rms2, &dx2)?;
        b.axpby(1.0, &d_norm2, 1.0, &mut d_h1)?;
        // Attention: h1 = h + o_proj(attn(norm(h))).
        let dx1 = self.attention_backward(b, c, att, &cache, &d_h1)?;
        let mut d_h = d_h1;
        let d_norm1 = b.rms_norm_backward(&cache.h, &self.input_norm, &cache.inv_rms1, &dx1)?;
        b.axpby(1.0, &d_norm1, 1.0, &mut d_h)?;
        Ok(d_h)
    }

    /// From the gradient of `o_proj`'s output to the gradient of the normed input `x`.
    fn attention_backward(
        &mut self,
        b: &B,
        c: &DecoderConfig,
        att: &AttentionInputs<B::Tensor>,
        cache: &LayerCache<B::Tensor>,
        d_attn: &B::Tensor,
    ) -> Result<B::Tensor> {
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let (bs, t) = (att.batch, att.seq);
        let scale = 1.0 / (hd as f32).sqrt();
        let d_ctx = self.o_proj.backward(b, d_attn)?;
        let d_ctx = b.reshape(&heads_first(b, &d_ctx, bs, t, nh, hd)?, &[bs * nh, t, hd])?;
        let (d_q, d_k, d_v) = b.causal_attention_backward(
            (&cache.q, &cache.k, &cache.v),
            &cache.attn_saved,
            &att.mask(nh),
            &d_ctx,
            scale,
        )?;
        // Back to one row per (token, head), undoing repeat_kv and the rotation.
        let d_q = b.reshape(&heads_last(b, &d_q, bs, t, nh, hd)?, &[bs * t * nh, hd])?;
        let d_k = sum_kv_groups(b, &d_k, bs, nh, nkv, t * hd)?;
        let d_k = b.reshape(&heads_last(b, &d_k, bs, t, nkv, hd)?, &[bs * t * nkv, hd])?;
        let d_v = sum_kv_groups(b, &d_v, bs, nh, nkv, t * hd)?;
        let d_v = heads_last(b, &d_v, bs, t, nkv, hd)?;
        let mut d_q = b.rotary_backward(&d_q, &att.q_cos, &att.q_sin)?;
        let mut d_k = b.rotary_backward(&d_k, &att.k_cos, &att.k_sin)?;
        if let (Some((qn, kn)), Some((q, rq, k, rk))) = (&self.qk_norm, &cache.qk_pre_norm) {
            d_q = b.rms_norm_backward(q, qn, rq, &d_q)?;
            d_k = b.rms_norm_backward(k, kn, rk, &d_k)?;
        }
        let d_q = b.reshape(&d_q, &[bs * t, nh * hd])?;
        let d_k = b.reshape(&d_k, &[bs * t, nkv * hd])?;
        let mut dx = self.q_proj.backward(b, &d_q)?;
        b.axpby(1.0, &self.k_proj.backward(b, &d_k)?, 1.0, &mut dx)?;
        b.axpby(1.0, &self.v_proj.backward(b, &d_v)?, 1.0, &mut dx)?;
        Ok(dx)
    }
}

/// Backward of `repeat_kv`: the gradients of the query heads sharing a key/value head
/// summed into it, in head order. `x` is `[batch * heads, width]` as a matrix view. This
/// is the backward of a row gather, so `embedding_backward` (scatter-add over repeated
/// rows) computes it.
fn sum_kv_groups<B: LoraOps + DecoderOps>(
    b: &B,
    x: &B::Tensor,
    bs: usize,
    heads: usize,
    kv: usize,
    width: usize,
) -> Result<B::Tensor> {
    let x = b.reshape(x, &[bs * heads, width])?;
    if heads == kv {
        return Ok(x);
    }
    Ok(b.embedding_backward(&x, &kv_rows(bs, heads, kv), bs * kv)?)
}
