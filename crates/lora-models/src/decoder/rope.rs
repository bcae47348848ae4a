//! Rotary position embedding tables as transformers builds them (`ROPE_INIT_FUNCTIONS`
//! in `modeling_rope_utils.py`): the inverse frequencies per scaling type, in f32 as
//! PyTorch computes them, and the `cos`/`sin` rows for given positions in the
//! `rotate_half` layout (`[freqs, freqs]`).

use super::config::{DecoderConfig, RopeScaling};

/// Inverse frequencies (`head_dim / 2` values) for a batch whose largest position is
/// `max_position` (only `dynamic` scaling depends on it).
pub fn inv_freq(config: &DecoderConfig, max_position: usize) -> Vec<f32> {
    let dim = config.head_dim;
    let plain = |base: f64| -> Vec<f32> {
        // torch: 1.0 / (base ** (arange(0, dim, 2).float() / dim)), all in f32.
        (0..dim / 2)
            .map(|i| 1.0f32 / (base as f32).powf((2 * i) as f32 / dim as f32))
            .collect()
    };
    match config.rope_scaling {
        RopeScaling::Default => plain(config.rope_theta),
        RopeScaling::Linear { factor } => plain(config.rope_theta)
            .into_iter()
            .map(|f| f / factor as f32)
            .collect(),
        RopeScaling::Dynamic { factor } => {
            let max_pos = config.max_position_embeddings as f64;
            let seq_len = (max_position + 1) as f64;
            if seq_len > max_pos {
                let exp = dim as f64 / (dim as f64 - 2.0);
                plain(config.rope_theta * ((factor * seq_len / max_pos) - (factor - 1.0)).powf(exp))
            } else {
                plain(config.rope_theta)
            }
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => plain(config.rope_theta)
            .into_iter()
            .map(|f| {
                let (factor, low, high, old) = (
                    factor as f32,
                    low_freq_factor as f32,
                    high_freq_factor as f32,
                    old as f32,
                );
                let wavelen = 2.0 * std::f32::consts::PI / f;
                let low_wavelen = old / low;
                let high_wavelen = old / high;
                let scaled = if wavelen > low_wavelen { f / factor } else { f };
                if wavelen < high_wavelen || wavelen > low_wavelen {
                    scaled
                } else {
                    let smooth = (old / wavelen - low) / (high - low);
                    (1.0 - smooth) * scaled / factor + smooth * scaled
                }
            })
            .collect(),
    }
}

/// `cos` and `sin` rows (`head_dim` values each) for every position in `positions`, each
/// row repeated `repeat` times (one per attention head), flattened.
pub fn tables(inv_freq: &[f32], positions: &[usize], repeat: usize) -> (Vec<f32>, Vec<f32>) {
    let dim = inv_freq.len() * 2;
    let mut cos = Vec::with_capacity(positions.len() * repeat * dim);
    let mut sin = Vec::with_capacity(positions.len() * repeat * dim);
    let mut row_cos = vec![0.0f32; dim];
    let mut row_sin = vec![0.0f32; dim];
    for &p in positions {
        for (i, f) in inv_freq.iter().enumerate() {
            let angle = f * p as f32;
            let (s, c) = angle.sin_cos();
            row_cos[i] = c;
            row_cos[i + dim / 2] = c;
            row_sin[i] = s;
            row_sin[i + dim / 2] = s;
        }
        for _ in 0..repeat {
            cos.extend_from_slice(&row_cos);
            sin.extend_from_slice(&row_sin);
        }
    }
    (cos, sin)
}

/// The rotary tables of the last forward on the backend (`q_cos`, `q_sin`, `k_cos`,
/// `k_sin`), reused while the positions repeat: every training step of one batch shape
/// asks for the same ones, and building them on the host and uploading them was the
/// largest allocation left in a steady-state step (4 x `[tokens x heads, head_dim]`).
#[derive(Debug)]
pub(crate) struct RopeCache<T> {
    positions: Vec<usize>,
    tables: Option<[T; 4]>,
}

impl<T: Clone> RopeCache<T> {
    pub(crate) fn new() -> Self {
        RopeCache {
            positions: Vec::new(),
            tables: None,
        }
    }

    /// The tables for `positions` (query rows repeated per head, key rows per KV head).
    pub(crate) fn tables<B: lora_core::Backend<Tensor = T>>(
        &mut self,
        b: &B,
        config: &DecoderConfig,
        positions: &[usize],
    ) -> lora_core::Result<[T; 4]> {
        if let Some(t) = &self.tables
            && self.positions == positions
        {
            return Ok(t.clone());
        }
        let (nh, nkv, hd) = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        );
        let inv_freq = inv_freq(config, positions.iter().copied().max().unwrap_or(0));
        let (qc, qs) = tables(&inv_freq, positions, nh);
        let (kc, ks) = tables(&inv_freq, positions, nkv);
        let rows = positions.len();
        let built = [
            b.from_host_vec(qc, &[rows * nh, hd])?,
            b.from_host_vec(qs, &[rows * nh, hd])?,
            b.from_host_vec(kc, &[rows * nkv, hd])?,
            b.from_host_vec(ks, &[rows * nkv, hd])?,
        ];
        self.positions.clear();
        self.positions.extend_from_slice(positions);
        self.tables = Some(built.clone());
        Ok(built)
    }
}
