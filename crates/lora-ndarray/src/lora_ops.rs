//! LoRA-level operations fused on ndarray: DoRA's per-feature scaling, output and backward
//! backward terms in one pass each (the defaults in `lora_core::ops::LoraOps` take several).

use lora_core::backend::check_row_broadcast;
use lora_core::{LoraGrads, LoraOps, Result, Tensor};
use rayon::prelude::*;

use crate::backend::NdArray;
use crate::pool;
use crate::tensor::NdTensor;

impl LoraOps for NdArray {
    fn lora_dense_forward(
        &self,
        x: &NdTensor,
        base: (&NdTensor, Option<&NdTensor>),
        adapter: (&NdTensor, &NdTensor, f32),
        y_shape: &[usize],
    ) -> Result<Option<(NdTensor, NdTensor)>> {
        crate::gemm::lora_dense_forward(x, base, adapter, y_shape)
    }

    fn lora_dense_backward(
        &self,
        dy: &NdTensor,
        w: &NdTensor,
        adapter: (&NdTensor, &NdTensor, f32),
        saved: (&NdTensor, &NdTensor),
        dx_shape: &[usize],
    ) -> Result<Option<(NdTensor, LoraGrads<NdTensor>)>> {
        crate::gemm::lora_dense_backward(dy, w, adapter, saved, dx_shape)
    }

    fn scale_features(&self, t: &NdTensor, v: &NdTensor) -> Result<NdTensor> {
        let cols = check_row_broadcast(t.shape(), v.shape())?;
        let (src, scale) = (t.as_slice(), v.as_slice());
        let mut out = pool::take_for_overwrite(src.len());
        if cols > 0 {
            out.par_chunks_mut(cols)
                .zip(src.par_chunks(cols))
                .with_min_len(64)
                .for_each(|(o, s)| {
                    for ((o, s), v) in o.iter_mut().zip(s).zip(scale) {
                        *o = s * v;
                    }
                });
        }
        NdTensor::from_vec(out, t.shape().dims())
    }

    fn dora_output(
        &self,
        y: &mut NdTensor,
        bias: Option<&NdTensor>,
        scale: &NdTensor,
    ) -> Result<NdTensor> {
        let cols = check_row_broadcast(y.shape(), scale.shape())?;
        if let Some(b) = bias {
            check_row_broadcast(y.shape(), b.shape())?;
        }
        let zeros;
        let b = match bias {
            Some(b) => b.as_slice(),
            None => {
                zeros = vec![0.0f32; cols];
                &zeros
            }
        };
        let s = scale.as_slice();
        let mut u = pool::take_for_overwrite(y.numel());
        if cols > 0 {
            y.as_mut_slice()
                .par_chunks_mut(cols)
                .zip(u.par_chunks_mut(cols))
                .with_min_len(64)
                .for_each(|(y, u)| {
                    for (((y, u), b), s) in y.iter_mut().zip(u).zip(b).zip(s) {
                        *u = *y - b;
                        *y = b + s * *u;
                    }
                });
        }
        NdTensor::from_vec(u, y.shape().dims())
    }

    fn dora_backward_terms(
        &self,
        dy: &NdTensor,
        u: &NdTensor,
        scale: &NdTensor,
    ) -> Result<(NdTensor, NdTensor)> {
        let cols = check_row_broadcast(dy.shape(), scale.shape())?;
        lora_core::backend::check_same_shape("dora_backward_terms dy vs u", dy.shape(), u.shape())?;
        let s = scale.as_slice();
        let mut scaled = pool::take_for_overwrite(dy.numel());
        // Column sums per block of rows, then added in block order (deterministic).
        let block = 256 * cols.max(1);
        let partial: Vec<Vec<f32>> = scaled
            .par_chunks_mut(block)
            .zip(
                dy.as_slice()
                    .par_chunks(block)
                    .zip(u.as_slice().par_chunks(block)),
            )
            .map(|(o, (g, u))| {
                let mut sums = vec![0.0f32; cols];
                for ((o, g), u) in o.chunks_mut(cols).zip(g.chunks(cols)).zip(u.chunks(cols)) {
                    for ((((o, g), u), s), acc) in o.iter_mut().zip(g).zip(u).zip(s).zip(&mut sums)
                    {
                        *o = g * s;
                        *acc += g * u;
                    }
                }
                sums
            })
            .collect();
        let mut numer = vec![0.0f32; cols];
        for p in partial {
            numer.iter_mut().zip(p).for_each(|(n, p)| *n += p);
        }
        Ok((
            NdTensor::from_vec(numer, &[cols])?,
            NdTensor::from_vec(scaled, dy.shape().dims())?,
        ))
    }

    fn dora_magnitude_numerator(&self, dy: &NdTensor, u: &NdTensor) -> Result<NdTensor> {
        lora_core::backend::check_same_shape(
            "dora_magnitude_numerator dy vs u",
            dy.shape(),
            u.shape(),
        )?;
        let cols = dy.shape().dims().last().copied().unwrap_or(1);
        // Column sums per block of rows, then added in block order (deterministic).
        let block = 256 * cols.max(1);
        let partial: Vec<Vec<f32>> = dy
            .as_slice()
            .par_chunks(block)
            .zip(u.as_slice().par_chunks(block))
            .map(|(g, u)| {
                let mut sums = vec![0.0f32; cols];
                for (g, u) in g.chunks(cols).zip(u.chunks(cols)) {
                    for ((g, u), acc) in g.iter().zip(u).zip(&mut sums) {
                        *acc += g * u;
                    }
                }
                sums
            })
            .collect();
        let mut numer = vec![0.0f32; cols];
        for p in partial {
            numer.iter_mut().zip(p).for_each(|(n, p)| *n += p);
        }
        NdTensor::from_vec(numer, &[cols])
    }
}
