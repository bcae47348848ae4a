//! Backward of one decoder layer, from the gradient of its output to the gradient of its
//! input, leaving gradients in every active adapter of its seven projections. The
//! pretrained weights and norms are frozen.

use lora_core::{BinaryOp, DecoderOps, Error, LoraOps};

use super::config::DecoderConfig;
use super::layer::{
    AttentionInputs, AttentionSaved, DecoderLayer, LayerCache, heads_first, heads_last,
};
use crate::error::Result;

impl<B: LoraOps + DecoderOps> DecoderLayer<B> {
    /// `d_out` is `[batch * seq, hidden]`; returns the gradient of the layer input when
    /// `input_grad` asks for it (else `None`, with the attention projections' `dy W` and
    /// the input norm's backward skipped: the first layer over a frozen embedding table).
    pub fn backward(
        &mut self,
        b: &B,
        c: &DecoderConfig,
        name: &str,
        att: &AttentionInputs<B::Tensor>,
        (d_out, input_grad): (&B::Tensor, bool),
    ) -> Result<Option<B::Tensor>> {
        let cache = self.cache.take().ok_or_else(|| {
            Error::state(name, "backward called without a forward in training mode")
        })?;
        let LayerCache {
            h,
            inv_rms1,
            attention,
            h1,
            inv_rms2,
            gate,
            up,
        } = cache;
        // MLP: out = h1 + down(silu(gate) * up), with down's input recomputed.
        let gate_act = b.silu(&gate)?;
        let d_act = self.down_proj.backward_with_input(
            b,
            &b.binary(BinaryOp::Mul, &gate_act, &up)?,
            d_out,
        )?;
        let d_up = b.binary(BinaryOp::Mul, &d_act, &gate_act)?;
        drop(gate_act);
        let d_gate = b.silu_backward(&gate, &b.binary(BinaryOp::Mul, &d_act, &up)?)?;
        drop((d_act, gate, up));
        let mut dx2 = self.up_proj.backward(b, &d_up)?;
        drop(d_up);
        self.gate_proj.backward_accumulate(b, &d_gate, &mut dx2)?;
        drop(d_gate);
        let mut d_h1 = d_out.clone();
        let d_norm2 = b.rms_norm_backward(&h1, &self.post_norm, &inv_rms2, &dx2)?;
        b.axpby(1.0, &d_norm2, 1.0, &mut d_h1)?;
        // Attention: h1 = h + o_proj(attn(norm(h))).
        let Some(dx1) = self.attention_backward(b, c, att, attention, (&d_h1, input_grad))? else {
            return Ok(None);
        };
        let mut d_h = d_h1;
        let d_norm1 = b.rms_norm_backward(&h, &self.input_norm, &inv_rms1, &dx1)?;
        b.axpby(1.0, &d_norm1, 1.0, &mut d_h)?;
        Ok(Some(d_h))
    }

    /// From the gradient of `o_proj`'s output to the gradient of the normed input `x`
    /// (`None` unless `input_grad`: the projections' adapters' gradients only).
    fn attention_backward(
        &mut self,
        b: &B,
        c: &DecoderConfig,
        att: &AttentionInputs<B::Tensor>,
        cache: AttentionSaved<B::Tensor>,
        (d_attn, input_grad): (&B::Tensor, bool),
    ) -> Result<Option<B::Tensor>> {
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let (bs, t) = (att.batch, att.seq);
        let scale = 1.0 / (hd as f32).sqrt();
        let d_ctx = self.o_proj.backward(b, d_attn)?;
        let d_ctx = b.reshape(&heads_first(b, &d_ctx, bs, t, nh, hd)?, &[bs * nh, t, hd])?;
        let (d_q, d_k, d_v) = b.self_attention_backward(
            (&cache.q, &cache.k, &cache.v),
            &cache.attn_saved,
            &att.mask(nh),
            &d_ctx,
            scale,
        )?;
        // Back to one row per (token, head), undoing the rotation.
        let d_q = b.reshape(&heads_last(b, &d_q, bs, t, nh, hd)?, &[bs * t * nh, hd])?;
        let d_k = b.reshape(&heads_last(b, &d_k, bs, t, nkv, hd)?, &[bs * t * nkv, hd])?;
        let d_v = heads_last(b, &d_v, bs, t, nkv, hd)?;
        let mut d_q = b.rotary_backward(&d_q, &att.q_cos, &att.q_sin)?;
        let mut d_k = b.rotary_backward(&d_k, &att.k_cos, &att.k_sin)?;
        if let (Some((qn, kn)), Some((q, rq, k, rk))) = (&self.qk_norm, &cache.qk_pre_norm) {
            d_q = b.rms_norm_backward(q, qn, rq, &d_q)?;
            d_k = b.rms_norm_backward(k, kn, rk, &d_k)?;
        }
        let d_q = b.reshape(&d_q, &[bs * t, nh * hd])?;
        let d_k = b.reshape(&d_k, &[bs * t, nkv * hd])?;
        if !input_grad {
            self.q_proj.backward_params(b, &d_q)?;
            self.k_proj.backward_params(b, &d_k)?;
            self.v_proj.backward_params(b, &d_v)?;
            return Ok(None);
        }
        let mut dx = self.q_proj.backward(b, &d_q)?;
        // The three projections' input gradients summed inside their products.
        self.k_proj.backward_accumulate(b, &d_k, &mut dx)?;
        self.v_proj.backward_accumulate(b, &d_v, &mut dx)?;
        Ok(Some(dx))
    }
}
