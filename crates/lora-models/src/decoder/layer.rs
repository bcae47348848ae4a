//! One decoder layer of the Llama family, forward: pre-RMSNorm, grouped-query attention
//! with rotary embedding (Qwen3: RMSNorm per head on queries and keys first), causal and
//! padding mask, then pre-RMSNorm and the SwiGLU MLP, each with its residual.

use lora_core::{BinaryOp, DecoderOps, LoraLinear, LoraOps, Mode, RowOrCol, Tensor, Transpose};

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
}

/// What the attention of one forward needs besides the layer: the batch shape, the
/// rotary tables per (token, head) row and the additive mask per (batch, head, query).
#[derive(Debug)]
pub(crate) struct AttentionInputs<T> {
    pub batch: usize,
    pub seq: usize,
    /// `[batch * seq * heads, head_dim]` for queries.
    pub q_cos: T,
    pub q_sin: T,
    /// `[batch * seq * kv_heads, head_dim]` for keys.
    pub k_cos: T,
    pub k_sin: T,
    /// `[batch * heads * seq, seq]`: 0 where a query may attend a key, a large negative
    /// number elsewhere (future positions, padding, outside the sliding window).
    pub mask_bias: T,
    /// `[batch * heads * seq]`: 0 for query rows that may see no key (left padding),
    /// whose attention output is zero; `None` when there are none.
    pub nonempty_rows: Option<T>,
}

impl<B: LoraOps + DecoderOps> DecoderLayer<B> {
    /// `h + attn(norm(h))`, then `+ mlp(norm(.))`; `h` is `[batch * seq, hidden]`.
    pub fn forward(
        &mut self,
        b: &B,
        c: &DecoderConfig,
        h: &B::Tensor,
        att: &AttentionInputs<B::Tensor>,
        mode: Mode,
    ) -> Result<B::Tensor> {
        let eps = c.rms_norm_eps as f32;
        let (x, _) = b.rms_norm(h, &self.input_norm, eps)?;
        let attn = self.attention(b, c, &x, att, mode)?;
        let h1 = b.binary(BinaryOp::Add, h, &attn)?;
        let (x, _) = b.rms_norm(&h1, &self.post_norm, eps)?;
        let gate = b.silu(&self.gate_proj.forward(b, &x, mode)?)?;
        let up = self.up_proj.forward(b, &x, mode)?;
        let mlp = self
            .down_proj
            .forward(b, &b.binary(BinaryOp::Mul, &gate, &up)?, mode)?;
        Ok(b.binary(BinaryOp::Add, &h1, &mlp)?)
    }

    /// Grouped-query self-attention of `x` (`[batch * seq, hidden]`), through `o_proj`.
    fn attention(
        &mut self,
        b: &B,
        c: &DecoderConfig,
        x: &B::Tensor,
        att: &AttentionInputs<B::Tensor>,
        mode: Mode,
    ) -> Result<B::Tensor> {
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let (bs, t) = (att.batch, att.seq);
        let q = self.q_proj.forward(b, x, mode)?;
        let k = self.k_proj.forward(b, x, mode)?;
        let v = self.v_proj.forward(b, x, mode)?;
        // One row per (token, head).
        let mut q = b.reshape(&q, &[bs * t * nh, hd])?;
        let mut k = b.reshape(&k, &[bs * t * nkv, hd])?;
        if let Some((qn, kn)) = &self.qk_norm {
            q = b.rms_norm(&q, qn, c.rms_norm_eps as f32)?.0;
            k = b.rms_norm(&k, kn, c.rms_norm_eps as f32)?.0;
        }
        let q = b.rotary(&q, &att.q_cos, &att.q_sin)?;
        let k = b.rotary(&k, &att.k_cos, &att.k_sin)?;
        let q = heads_first(b, &q, bs, t, nh, hd)?;
        let k = repeat_kv(b, &heads_first(b, &k, bs, t, nkv, hd)?, bs, nh, nkv, t * hd)?;
        let v = b.reshape(&v, &[bs * t * nkv, hd])?;
        let v = repeat_kv(b, &heads_first(b, &v, bs, t, nkv, hd)?, bs, nh, nkv, t * hd)?;
        let (q, k, v) = (
            b.reshape(&q, &[bs * nh, t, hd])?,
            b.reshape(&k, &[bs * nh, t, hd])?,
            b.reshape(&v, &[bs * nh, t, hd])?,
        );
        let mut scores = b.zeros(&[bs * nh, t, t])?;
        let scale = 1.0 / (hd as f32).sqrt();
        b.bmm(
            scale,
            &q,
            Transpose::No,
            &k,
            Transpose::Yes,
            0.0,
            &mut scores,
        )?;
        let scores = b.reshape(&scores, &[bs * nh * t, t])?;
        let mut probs = b.softmax(&scores, Some(&att.mask_bias))?;
        if let Some(keep) = &att.nonempty_rows {
            let keep = b.outer(keep, bs * nh * t, t, RowOrCol::PerRow)?;
            probs = b.binary(BinaryOp::Mul, &probs, &keep)?;
        }
        let probs = b.reshape(&probs, &[bs * nh, t, t])?;
        let mut ctx = b.zeros(&[bs * nh, t, hd])?;
        b.bmm(1.0, &probs, Transpose::No, &v, Transpose::No, 0.0, &mut ctx)?;
        // [batch, heads, seq, hd] -> [batch * seq, heads * hd]
        let ctx = b.permute(&b.reshape(&ctx, &[bs, nh, t, hd])?, &[0, 2, 1, 3])?;
        let ctx = b.reshape(&ctx, &[bs * t, nh * hd])?;
        Ok(self.o_proj.forward(b, &ctx, mode)?)
    }
}

/// `[batch * seq * heads, hd]` (token-major) -> `[batch * heads, seq * hd]`.
fn heads_first<B: LoraOps>(
    b: &B,
    x: &B::Tensor,
    bs: usize,
    t: usize,
    heads: usize,
    hd: usize,
) -> Result<B::Tensor> {
    let x = b.permute(&b.reshape(x, &[bs, t, heads, hd])?, &[0, 2, 1, 3])?;
    Ok(b.reshape(&x, &[bs * heads, t * hd])?)
}

/// Grouped-query attention: each of the `kv` key/value heads of a sequence serves
/// `heads / kv` consecutive query heads (transformers' `repeat_kv`).
fn repeat_kv<B: LoraOps>(
    b: &B,
    x: &B::Tensor,
    bs: usize,
    heads: usize,
    kv: usize,
    width: usize,
) -> Result<B::Tensor> {
    if heads == kv {
        return Ok(x.clone());
    }
    let group = heads / kv;
    let rows: Vec<usize> = (0..bs * heads)
        .map(|r| (r / heads) * kv + (r % heads) / group)
        .collect();
    let out = b.gather_rows(x, &rows)?;
    debug_assert_eq!(out.shape().dims(), [bs * heads, width]);
    Ok(out)
}
