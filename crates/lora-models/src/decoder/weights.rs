//! A decoder's weights by name while the model is built, each checked against the shape the
//! config implies. They come from memory (a state dict of f32 host tensors, moved into the
//! model) or from the checkpoint's files, read one tensor at a time with positioned reads,
//! so loading never holds the whole checkpoint beside the model.
//!
//! With a half storage type (`--dtype bf16|f16`) the frozen linear weights keep 2-byte
//! values: a checkpoint saved in that type hands its bits over unchanged, any other is
//! rounded once. Every other tensor (embeddings, norms, biases) is rounded to the same type
//! as PyTorch's `model.to(dtype)` would, and kept widened to f32 for compute.

use std::collections::BTreeMap;

use lora_core::{HostTensor, Linear, LoraLinear, LoraOps};
use lora_io::{Checkpoint, SafetensorsDtype, TensorEntry, decode_f32};
use lora_quant::{HalfType, HalfWeight};

use super::config::DecoderConfig;
use super::layer::DecoderLayer;
use crate::error::{ModelError, Result};

/// Where a tensor is until it is taken.
enum Stored {
    Host(HostTensor),
    File(TensorEntry),
}

/// A tensor once taken: the file's bytes and dtype, or f32 values already in memory.
enum Taken {
    Bytes(SafetensorsDtype, Vec<u8>),
    Values(Vec<f32>),
}

/// A frozen linear layer's weight as it will be stored.
pub(crate) enum LinearWeight {
    F32(HostTensor),
    Half(HalfWeight),
}

/// Builds the frozen base of a linear layer from its weight and bias.
pub(crate) type MakeBase<'m, B> = dyn Fn(&B, LinearWeight, Option<<B as lora_core::Backend>::Tensor>) -> Result<Box<dyn Linear<B>>>
    + 'm;

/// The tensors not yet taken, and how to store them.
pub(crate) struct Weights<'a> {
    tensors: BTreeMap<String, Stored>,
    checkpoint: Option<&'a Checkpoint>,
    path: &'a str,
    half: Option<HalfType>,
}

impl<'a> Weights<'a> {
    /// A state dict in memory (`path` names its source in errors), stored in f32.
    pub fn from_host(tensors: BTreeMap<String, HostTensor>, path: &'a str) -> Self {
        Weights {
            tensors: tensors
                .into_iter()
                .map(|(k, v)| (k, Stored::Host(v)))
                .collect(),
            checkpoint: None,
            path,
            half: None,
        }
    }

    /// The tensors of an opened checkpoint, read when taken; frozen linear weights stored
    /// as `half` when given.
    pub fn from_checkpoint(
        checkpoint: &'a Checkpoint,
        path: &'a str,
        half: Option<HalfType>,
    ) -> Result<Self> {
        Ok(Weights {
            tensors: checkpoint
                .entries()?
                .into_iter()
                .map(|(k, v)| (k, Stored::File(v)))
                .collect(),
            checkpoint: Some(checkpoint),
            path,
            half,
        })
    }

    fn error(&self, tensor: &str, reason: String) -> ModelError {
        ModelError::Weights {
            path: self.path.to_string(),
            tensor: tensor.to_string(),
            reason,
        }
    }

    /// Removes `name`, checking its shape.
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Taken> {
        let stored = self
            .tensors
            .remove(name)
            .ok_or_else(|| self.error(name, "missing from the checkpoint".into()))?;
        let have = match &stored {
            Stored::Host(t) => &t.shape,
            Stored::File(e) => &e.shape,
        };
        if have != shape {
            return Err(self.error(
                name,
                format!("shape {have:?} disagrees with config.json (expected {shape:?})"),
            ));
        }
        Ok(match stored {
            Stored::Host(t) => Taken::Values(t.data),
            Stored::File(e) => {
                let checkpoint = self
                    .checkpoint
                    .ok_or_else(|| self.error(name, "no checkpoint to read from".into()))?;
                let raw = checkpoint.read(&e)?;
                Taken::Bytes(raw.dtype, raw.data.into_owned())
            }
        })
    }

    /// `name` in f32 values (rounded to the half type first when one is set).
    fn values(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let values = match self.take(name, shape)? {
            Taken::Values(values) => values,
            Taken::Bytes(dtype, bytes) => {
                let values = decode_f32(dtype, &bytes).ok_or_else(|| {
                    self.error(name, format!("dtype {dtype:?} is not a float type"))
                })?;
                if self.half.is_some_and(|h| same_type(h, dtype)) {
                    return Ok(values);
                }
                values
            }
        };
        let mut values = values;
        if let Some(h) = self.half {
            h.round_in_place(&mut values);
        }
        Ok(values)
    }

    /// `name` as a backend tensor of `shape`.
    pub fn get<B: LoraOps>(&mut self, b: &B, name: &str, shape: &[usize]) -> Result<B::Tensor> {
        let data = self.values(name, shape)?;
        Ok(b.from_host_vec(data, shape)?)
    }

    /// The weight of linear layer `name` (`[out, inp]`), as it will be stored.
    fn linear_weight(&mut self, name: &str, out: usize, inp: usize) -> Result<LinearWeight> {
        let shape = [out, inp];
        let Some(h) = self.half else {
            let data = self.values(name, &shape)?;
            return Ok(LinearWeight::F32(HostTensor {
                shape: shape.to_vec(),
                data,
            }));
        };
        let bits = match self.take(name, &shape)? {
            Taken::Bytes(dtype, bytes) if same_type(h, dtype) => bytes
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .collect(),
            Taken::Bytes(dtype, bytes) => {
                h.round(&decode_f32(dtype, &bytes).ok_or_else(|| {
                    self.error(name, format!("dtype {dtype:?} is not a float type"))
                })?)
            }
            Taken::Values(values) => h.round(&values),
        };
        Ok(LinearWeight::Half(HalfWeight::from_bits(bits, &shape, h)?))
    }

    /// Linear layer `name` with its frozen base built by `make_base`.
    pub fn linear<B: LoraOps>(
        &mut self,
        b: &B,
        make_base: &MakeBase<'_, B>,
        (name, out, inp, bias): (&str, usize, usize, bool),
    ) -> Result<LoraLinear<B>> {
        let w = self.linear_weight(&format!("{name}.weight"), out, inp)?;
        let bias = match bias {
            true => Some(self.get(b, &format!("{name}.bias"), &[out])?),
            false => None,
        };
        Ok(LoraLinear::new(name, make_base(b, w, bias)?))
    }

    /// Decoder layer `l`.
    pub fn layer<B: LoraOps>(
        &mut self,
        b: &B,
        make_base: &MakeBase<'_, B>,
        c: &DecoderConfig,
        l: usize,
    ) -> Result<DecoderLayer<B>> {
        let p = format!("model.layers.{l}");
        let (h, i, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
        let (q_out, kv_out) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
        let (at, ml) = (format!("{p}.self_attn"), format!("{p}.mlp"));
        let qk_norm = match c.qk_norm {
            true => Some((
                self.get(b, &format!("{at}.q_norm.weight"), &[hd])?,
                self.get(b, &format!("{at}.k_norm.weight"), &[hd])?,
            )),
            false => None,
        };
        let input_norm = self.get(b, &format!("{p}.input_layernorm.weight"), &[h])?;
        let post_norm = self.get(b, &format!("{p}.post_attention_layernorm.weight"), &[h])?;
        let mut linear = |name: String, out: usize, inp: usize, bias: bool| {
            self.linear(b, make_base, (&name, out, inp, bias))
        };
        Ok(DecoderLayer {
            q_proj: linear(format!("{at}.q_proj"), q_out, h, c.qkv_bias)?,
            k_proj: linear(format!("{at}.k_proj"), kv_out, h, c.qkv_bias)?,
            v_proj: linear(format!("{at}.v_proj"), kv_out, h, c.qkv_bias)?,
            o_proj: linear(format!("{at}.o_proj"), h, q_out, c.o_bias)?,
            gate_proj: linear(format!("{ml}.gate_proj"), i, h, c.mlp_bias)?,
            up_proj: linear(format!("{ml}.up_proj"), i, h, c.mlp_bias)?,
            down_proj: linear(format!("{ml}.down_proj"), h, i, c.mlp_bias)?,
            input_norm,
            post_norm,
            qk_norm,
            cache: None,
        })
    }
}

/// Whether a stored dtype is this half type.
fn same_type(h: HalfType, dtype: SafetensorsDtype) -> bool {
    matches!(
        (h, dtype),
        (HalfType::Bf16, SafetensorsDtype::BF16) | (HalfType::F16, SafetensorsDtype::F16)
    )
}
