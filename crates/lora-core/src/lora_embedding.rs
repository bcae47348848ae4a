//! A frozen embedding table that can carry LoRA (PEFT's `lora_embedding_A` / `_B`) or
//! trainable tokens (PEFT's `trainable_token_indices`).
//!
//! LoRA on an embedding (PEFT's `lora.Embedding`): `out = W[x] + s · Aᵀ[x] Bᵀ` with
//! `A: [r, vocab]`, `B: [dim, r]`, no dropout (PEFT creates the module but never applies
//! it), `A` zero and `B ~ N(0, 1)` at init (the reverse of a linear layer's LoRA), and the
//! padding row of `Aᵀ` gets no gradient (`F.embedding(.., padding_idx)`). With DoRA
//! (`use_dora`) the output is also rescaled per dimension (`embedding_dora.rs`).
//!
//! Trainable tokens (PEFT's `TrainableTokensLayer`, `trainable_tokens.rs`): the listed rows
//! of the table are replaced by trained rows `trainable_tokens_delta` (`[n, dim]`; despite
//! the name, the rows themselves, initialised to the current rows), so a user can train new
//! tokens without training the whole table. With tied embeddings the output head uses the
//! same replaced rows.

use crate::adapter::{LoraInit, LoraSpec, Mode, ParamGrad};
use crate::backend::{Tensor, Transpose};
use crate::embedding_dora::{self, EmbeddingDora};
use crate::error::{Error, Result};
use crate::ops::{DecoderOps, LoraOps};
use crate::rng::{self, RngState};
use crate::trainable_tokens::TrainableTokens;

#[path = "embedding_merge.rs"]
mod merge;
#[path = "embedding_tied_head.rs"]
mod tied_head;

/// File name of LoRA's `A` on an embedding (`[r, vocab]`, no `.weight` suffix).
pub const EMBEDDING_A: &str = "lora_embedding_A";
/// File name of LoRA's `B` on an embedding (`[dim, r]`).
pub const EMBEDDING_B: &str = "lora_embedding_B";
/// File name of the trained rows of a trainable-tokens adapter (`[n, dim]`).
pub const TOKENS_DELTA: &str = "token_adapter.trainable_tokens_delta";
/// File name of DoRA's magnitude (`[dim]` on an embedding).
pub const MAGNITUDE: &str = "lora_magnitude_vector";

/// LoRA on an embedding. `A` is kept transposed (`[vocab, r]`) so the forward is a row
/// gather; files carry PEFT's `[r, vocab]`.
#[derive(Debug, Clone)]
struct EmbeddingLora<T> {
    a_t: T,
    b: T,
    scaling: f32,
    /// `(dAᵀ, dB)` after a backward.
    grads: Option<(T, T)>,
    /// DoRA's magnitude and state (`use_dora`).
    dora: Option<EmbeddingDora<T>>,
}

/// What an embedding carries beyond its frozen table.
#[derive(Debug, Clone)]
enum EmbeddingAdapter<T> {
    Lora(EmbeddingLora<T>),
    Tokens(TrainableTokens<T>),
}

/// A frozen `[vocab, dim]` table with named adapters (LoRA or trainable tokens; PEFT
/// refuses both on one embedding, and so does this).
#[derive(Debug)]
pub struct LoraEmbedding<B: LoraOps> {
    name: String,
    weight: B::Tensor,
    padding_idx: Option<usize>,
    adapters: Vec<(String, EmbeddingAdapter<B::Tensor>)>,
    /// The ids of the last training forward.
    saved_ids: Option<Vec<usize>>,
    /// What merging changed in the table, to undo it (`None`: not merged).
    merged: Option<merge::Merged<B::Tensor>>,
}

impl<B: LoraOps> LoraEmbedding<B> {
    /// A table `weight: [vocab, dim]` named `name` (e.g. `model.embed_tokens`); rows of
    /// `padding_idx` get no gradient, as with `nn.Embedding(padding_idx=..)`.
    pub fn new(name: impl Into<String>, weight: B::Tensor, padding_idx: Option<usize>) -> Self {
        LoraEmbedding {
            name: name.into(),
            weight,
            padding_idx,
            adapters: Vec::new(),
            saved_ids: None,
            merged: None,
        }
    }

    /// The dotted module name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The frozen table, `[vocab, dim]`.
    pub fn weight(&self) -> &B::Tensor {
        &self.weight
    }

    /// Replaces the frozen table (same shape; PEFT's saved `base_layer.weight`).
    pub fn set_weight(&mut self, weight: B::Tensor) -> Result<()> {
        if weight.shape() != self.weight.shape() {
            return Err(Error::shape(
                format!("{}.weight", self.name),
                self.weight.shape().to_string(),
                weight.shape(),
            ));
        }
        self.weight = weight;
        for (_, a) in &mut self.adapters {
            if let EmbeddingAdapter::Lora(EmbeddingLora { dora: Some(d), .. }) = a {
                d.col_sq = None;
            }
        }
        self.forget_norms();
        Ok(())
    }

    /// Drops DoRA's cached inference norms (the factors, magnitude or table may change).
    fn forget_norms(&mut self) {
        for (_, a) in &mut self.adapters {
            if let EmbeddingAdapter::Lora(EmbeddingLora { dora: Some(d), .. }) = a {
                d.norm_cache = None;
            }
        }
    }

    fn vocab_dim(&self) -> (usize, usize) {
        self.weight.shape().as_matrix()
    }

    /// Names of the adapters, in the order they were added.
    pub fn adapter_names(&self) -> Vec<&str> {
        self.adapters.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// Whether anything trainable is attached.
    pub fn has_adapters(&self) -> bool {
        !self.adapters.is_empty()
    }

    /// The token ids a trainable-tokens adapter named `adapter_name` trains.
    pub fn token_indices(&self, adapter_name: &str) -> Option<&[usize]> {
        self.adapters.iter().find_map(|(n, a)| match a {
            EmbeddingAdapter::Tokens(t) if n == adapter_name => Some(t.indices.as_slice()),
            _ => None,
        })
    }

    fn check_new(&self, adapter_name: &str, tokens: bool) -> Result<()> {
        if self
            .adapters
            .iter()
            .any(|(_, a)| matches!(a, EmbeddingAdapter::Lora(l) if l.dora.is_some()))
        {
            return Err(Error::state(
                &self.name,
                "the embedding carries DoRA, which must be its only adapter",
            ));
        }
        let other_kind = self.adapters.iter().any(|(_, a)| match a {
            EmbeddingAdapter::Lora(_) => tokens,
            EmbeddingAdapter::Tokens(_) => !tokens,
        });
        if other_kind || (tokens && !self.adapters.is_empty()) {
            return Err(Error::state(
                &self.name,
                "trainable_token_indices cannot be combined with another adapter on the same \
                 embedding (PEFT refuses it too): target the embedding with LoRA or train its tokens",
            ));
        }
        if self.adapters.iter().any(|(n, _)| n == adapter_name) {
            return Err(Error::state(
                &self.name,
                format!("an adapter named {adapter_name:?} is already attached"),
            ));
        }
        Ok(())
    }

    /// Adds LoRA named `adapter_name`: `A` zero and `B ~ N(0, 1)` (PEFT's default and
    /// `gaussian`), or both `N(0, 1)` for [`LoraInit::Random`] (`init_lora_weights=False`).
    /// `spec.dropout` is ignored, as PEFT ignores it on embeddings.
    pub fn add_lora(&mut self, backend: &B, adapter_name: &str, spec: &LoraSpec) -> Result<()> {
        self.check_new(adapter_name, false)?;
        let (vocab, dim) = self.vocab_dim();
        LoraSpec {
            dropout: 0.0,
            ..spec.clone()
        }
        .validate(&self.name, vocab, dim)?;
        let r = spec.r;
        let mut a_t = vec![0.0f32; vocab * r];
        let mut b = vec![0.0f32; dim * r];
        rng::normal(
            RngState::new(spec.seed, rng::stream_id(&self.name, "lora_embedding_B")),
            0.0,
            1.0,
            &mut b,
        );
        if spec.init == LoraInit::Random {
            let a_rng = RngState::new(spec.seed, rng::stream_id(&self.name, "lora_embedding_A"));
            rng::normal(a_rng, 0.0, 1.0, &mut a_t);
        }
        let lora = EmbeddingLora {
            a_t: backend.from_host_vec(a_t, &[vocab, r])?,
            b: backend.from_host_vec(b, &[dim, r])?,
            scaling: spec.scaling(),
            grads: None,
            dora: None,
        };
        self.adapters
            .push((adapter_name.to_string(), EmbeddingAdapter::Lora(lora)));
        Ok(())
    }

    /// Adds DoRA named `adapter_name` (PEFT's `DoraEmbeddingLayer`): LoRA as
    /// [`LoraEmbedding::add_lora`] plus a magnitude per embedding dimension, starting at
    /// the column norms of `W + s·(B A)ᵀ`. DoRA rescales everything the table outputs, so
    /// it must be the embedding's only adapter.
    pub fn add_dora(&mut self, backend: &B, adapter_name: &str, spec: &LoraSpec) -> Result<()> {
        if !self.adapters.is_empty() {
            return Err(Error::state(
                &self.name,
                "DoRA on an embedding must be its only adapter (it rescales the whole output)",
            ));
        }
        self.add_lora(backend, adapter_name, spec)?;
        let weight = &self.weight;
        if let Some((_, EmbeddingAdapter::Lora(l))) = self.adapters.last_mut() {
            let mut col_sq = None;
            let norm = embedding_dora::column_norms(
                backend,
                weight,
                &l.a_t,
                &l.b,
                l.scaling,
                &mut col_sq,
            )?;
            let dim = norm.len();
            let mut dora = EmbeddingDora::new(backend.from_host_vec(norm, &[dim])?);
            dora.col_sq = col_sq;
            l.dora = Some(dora);
        }
        Ok(())
    }

    /// Adds trainable tokens named `adapter_name` for the token ids `indices`, their rows
    /// starting as the table's. Ids past the vocabulary, repeated ids and an empty list
    /// are errors naming `trainable_token_indices`.
    pub fn add_trainable_tokens(
        &mut self,
        backend: &B,
        adapter_name: &str,
        indices: &[usize],
    ) -> Result<()> {
        self.check_new(adapter_name, true)?;
        let context = format!("trainable tokens on {}", self.name);
        let tokens = TrainableTokens::new(backend, &self.weight, indices, &context)?;
        self.adapters
            .push((adapter_name.to_string(), EmbeddingAdapter::Tokens(tokens)));
        Ok(())
    }

    /// The adapter's tensors as PEFT saves them (names without the module prefix).
    pub fn tensors(
        &self,
        backend: &B,
        adapter_name: &str,
    ) -> Result<Vec<(&'static str, B::Tensor)>> {
        let Some((_, adapter)) = self.adapters.iter().find(|(n, _)| n == adapter_name) else {
            return Ok(Vec::new());
        };
        Ok(match adapter {
            EmbeddingAdapter::Lora(l) => {
                let mut v = vec![
                    (EMBEDDING_A, backend.permute(&l.a_t, &[1, 0])?),
                    (EMBEDDING_B, l.b.clone()),
                ];
                if let Some(d) = &l.dora {
                    v.push((MAGNITUDE, d.magnitude.clone()));
                }
                v
            }
            EmbeddingAdapter::Tokens(t) => vec![(TOKENS_DELTA, t.rows.clone())],
        })
    }

    /// The gradients of the adapter's tensors after a backward, named and laid out as
    /// [`LoraEmbedding::tensors`] (empty before a backward).
    pub fn grads(&self, backend: &B, adapter_name: &str) -> Result<Vec<(&'static str, B::Tensor)>> {
        let Some((_, adapter)) = self.adapters.iter().find(|(n, _)| n == adapter_name) else {
            return Ok(Vec::new());
        };
        Ok(match adapter {
            EmbeddingAdapter::Lora(EmbeddingLora {
                grads: Some((ga, gb)),
                dora,
                ..
            }) => {
                let mut v = vec![
                    (EMBEDDING_A, backend.permute(ga, &[1, 0])?),
                    (EMBEDDING_B, gb.clone()),
                ];
                if let Some(g) = dora.as_ref().and_then(|d| d.grad.as_ref()) {
                    v.push((MAGNITUDE, g.clone()));
                }
                v
            }
            EmbeddingAdapter::Tokens(TrainableTokens { grad: Some(g), .. }) => {
                vec![(TOKENS_DELTA, g.clone())]
            }
            _ => Vec::new(),
        })
    }

    /// Sets one of the adapter's tensors from a file (shape checked; the error names the
    /// tensor and both shapes).
    pub fn set_tensor(
        &mut self,
        backend: &B,
        adapter_name: &str,
        tensor: &str,
        value: B::Tensor,
    ) -> Result<()> {
        let name = format!("{}.{tensor}", self.name);
        let (vocab, dim) = self.vocab_dim();
        self.forget_norms();
        let Some((_, adapter)) = self.adapters.iter_mut().find(|(n, _)| n == adapter_name) else {
            return Err(Error::state(
                &self.name,
                format!("no adapter named {adapter_name:?}"),
            ));
        };
        let check = |want: &[usize]| match value.shape().dims() == want {
            true => Ok(()),
            false => Err(Error::shape(
                name.clone(),
                format!("{want:?}"),
                value.shape(),
            )),
        };
        match (adapter, tensor) {
            (EmbeddingAdapter::Lora(l), EMBEDDING_A) => {
                check(&[l.b.shape().dims()[1], vocab])?;
                l.a_t = backend.permute(&value, &[1, 0])?;
            }
            (EmbeddingAdapter::Lora(l), EMBEDDING_B) => {
                check(&[dim, l.b.shape().dims()[1]])?;
                l.b = value;
            }
            (EmbeddingAdapter::Lora(EmbeddingLora { dora: Some(d), .. }), MAGNITUDE) => {
                check(&[dim])?;
                d.magnitude = value;
            }
            (EmbeddingAdapter::Tokens(t), TOKENS_DELTA) => {
                check(&[t.indices.len(), dim])?;
                t.rows = value;
            }
            _ => return Err(Error::state(&name, "not a tensor of this adapter")),
        }
        Ok(())
    }

    /// Every trainable tensor with its gradient (after a backward).
    pub fn params_and_grads(&mut self) -> Vec<ParamGrad<'_, B::Tensor>> {
        self.forget_norms();
        let mut out = Vec::new();
        for (_, adapter) in &mut self.adapters {
            match adapter {
                EmbeddingAdapter::Lora(l) => {
                    if let Some((ga, gb)) = &l.grads {
                        out.push(ParamGrad {
                            param: &mut l.a_t,
                            grad: ga,
                        });
                        out.push(ParamGrad {
                            param: &mut l.b,
                            grad: gb,
                        });
                    }
                    if let Some(EmbeddingDora {
                        magnitude,
                        grad: Some(g),
                        ..
                    }) = &mut l.dora
                    {
                        out.push(ParamGrad {
                            param: magnitude,
                            grad: g,
                        });
                    }
                }
                EmbeddingAdapter::Tokens(t) => {
                    if let Some(g) = &t.grad {
                        out.push(ParamGrad {
                            param: &mut t.rows,
                            grad: g,
                        });
                    }
                }
            }
        }
        out
    }

    /// Trainable parameters.
    pub fn num_trainable(&self) -> usize {
        self.adapters
            .iter()
            .map(|(_, a)| match a {
                EmbeddingAdapter::Lora(l) => {
                    l.a_t.numel() + l.b.numel() + l.dora.as_ref().map_or(0, |d| d.magnitude.numel())
                }
                EmbeddingAdapter::Tokens(t) => t.rows.numel(),
            })
            .sum()
    }

    /// The trainable-tokens adapter, if any (at most one per embedding).
    fn tokens(&self) -> Option<&TrainableTokens<B::Tensor>> {
        self.adapters.iter().find_map(|(_, a)| match a {
            EmbeddingAdapter::Tokens(t) => Some(t),
            _ => None,
        })
    }

    /// The embeddings of `ids`, `[ids.len(), dim]`: the table's rows with the trained
    /// rows in place and every LoRA's `s · Aᵀ[ids] Bᵀ` added.
    pub fn forward(&mut self, backend: &B, ids: &[usize], mode: Mode) -> Result<B::Tensor> {
        if self.merged.is_some() {
            if mode == Mode::Train {
                return Err(Error::state(
                    &self.name,
                    "cannot train while adapters are merged; unmerge first",
                ));
            }
            return backend.gather_rows(&self.weight, ids);
        }
        let mut out = backend.gather_rows(&self.weight, ids)?;
        let weight = &self.weight;
        for (_, adapter) in &mut self.adapters {
            match adapter {
                EmbeddingAdapter::Lora(l) => {
                    let after_a = backend.gather_rows(&l.a_t, ids)?;
                    backend.gemm(
                        l.scaling,
                        &after_a,
                        Transpose::No,
                        &l.b,
                        Transpose::Yes,
                        1.0,
                        &mut out,
                    )?;
                    if let Some(d) = &mut l.dora {
                        // out = (m / ‖W + s·(BA)ᵀ‖) ⊙ (W[x] + s·Aᵀ[x] Bᵀ), per dimension.
                        let norm = match (d.norm_cache.take(), mode) {
                            (Some(n), Mode::Eval) => n,
                            _ => embedding_dora::column_norms(
                                backend,
                                weight,
                                &l.a_t,
                                &l.b,
                                l.scaling,
                                &mut d.col_sq,
                            )?,
                        };
                        if mode == Mode::Eval {
                            d.norm_cache = Some(norm.clone());
                        }
                        let gain = embedding_dora::gain(backend, &d.magnitude, &norm)?;
                        let pre = out;
                        out = backend.scale_features(&pre, &gain)?;
                        d.saved = (mode == Mode::Train).then_some((pre, norm, gain));
                    }
                }
                EmbeddingAdapter::Tokens(t) => t.apply(backend, &mut out, ids)?,
            }
        }
        self.saved_ids = (mode == Mode::Train && self.has_adapters()).then(|| ids.to_vec());
        Ok(out)
    }
}

impl<B: LoraOps + DecoderOps> LoraEmbedding<B> {
    /// Backward from `d_out` (`[ids, dim]`, the gradient of the last training forward's
    /// output): leaves the gradients of every adapter tensor. Padding tokens add nothing to
    /// the rows of the tables (`Aᵀ`, the trained rows), as `F.embedding(.., padding_idx)`;
    /// their `Aᵀ` row still reaches `B`'s gradient through the output.
    pub fn backward(&mut self, backend: &B, d_out: &B::Tensor) -> Result<()> {
        let ids = self
            .saved_ids
            .take()
            .ok_or_else(|| Error::state(&self.name, "backward without a training forward"))?;
        let (at, kept): (Vec<usize>, Vec<usize>) = ids
            .iter()
            .enumerate()
            .filter(|&(_, &id)| Some(id) != self.padding_idx)
            .unzip();
        let d_kept = match at.len() == ids.len() {
            true => d_out.clone(),
            false => backend.gather_rows(d_out, &at)?,
        };
        let (vocab, _) = self.vocab_dim();
        for (_, adapter) in &mut self.adapters {
            match adapter {
                EmbeddingAdapter::Lora(l) => {
                    // DoRA: the unscaled output's gradient is d_out ⊙ m / norm (the norm a
                    // constant); the magnitude's is Σ d_out ⊙ unscaled / norm.
                    let scaled = match &mut l.dora {
                        None => None,
                        Some(d) => {
                            let (pre, norm, gain) = d.saved.take().ok_or_else(|| {
                                Error::state(&self.name, "DoRA backward without a training forward")
                            })?;
                            d.grad =
                                Some(embedding_dora::magnitude_grad(backend, d_out, &pre, &norm)?);
                            let d_pre = backend.scale_features(d_out, &gain)?;
                            let d_pre_kept = match at.len() == ids.len() {
                                true => d_pre.clone(),
                                false => backend.gather_rows(&d_pre, &at)?,
                            };
                            Some((d_pre, d_pre_kept))
                        }
                    };
                    let (d_all, d_kept) = match &scaled {
                        Some((a, k)) => (a, k),
                        None => (d_out, &d_kept),
                    };
                    // out += s · Aᵀ[ids] Bᵀ: dB = s · d_outᵀ Aᵀ[ids]; dAᵀ[v] += s · d_out B.
                    let r = l.b.shape().dims()[1];
                    let after_a = backend.gather_rows(&l.a_t, &ids)?;
                    let (dim, _) = l.b.shape().as_matrix();
                    let db = backend.matmul(
                        l.scaling,
                        (d_all, Transpose::Yes),
                        (&after_a, Transpose::No),
                        &[dim, r],
                    )?;
                    let d_after_a = backend.matmul(
                        l.scaling,
                        (d_kept, Transpose::No),
                        (&l.b, Transpose::No),
                        &[kept.len(), r],
                    )?;
                    let da_t = backend.embedding_backward(&d_after_a, &kept, vocab)?;
                    l.grads = Some((da_t, db));
                }
                EmbeddingAdapter::Tokens(t) => t.backward(backend, &d_kept, &kept)?,
            }
        }
        Ok(())
    }
}
