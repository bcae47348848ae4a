//! Permutations that keep the last axis in place (attention's head split and merge):
//! runs of the last axis copied whole, on several threads when large.

use lora_core::{Result, Tensor};
use rayon::prelude::*;

use crate::backend::{PAR_CHUNK, PAR_MIN_ELEMS};
use crate::pool;
use crate::tensor::NdTensor;

/// A copy of `a` with axes permuted, for permutations that keep the last axis last:
/// contiguous runs of the last axis are copied whole (attention's head split and merge).
pub(crate) fn permute_rows(a: &NdTensor, perm: &[usize], out_dims: &[usize]) -> Result<NdTensor> {
    let dims = a.shape().dims();
    let rank = dims.len();
    let run = dims[rank - 1];
    if rank > MAX_PERMUTE_RANK {
        let view = a.array().view().permuted_axes(perm.to_vec());
        return Ok(NdTensor::from_array(view.as_standard_layout().into_owned()));
    }
    let src = a.as_slice();
    let mut out = pool::take_for_overwrite(src.len());
    if rank == 1 || run == 0 {
        // Only the identity keeps a single axis last; nothing to move.
        out.copy_from_slice(src);
        return NdTensor::from_vec(out, out_dims);
    }
    // Per output axis (the last excluded): its extent and the input stride it walks.
    let outer_axes = rank - 1;
    let mut extent = [0usize; MAX_PERMUTE_RANK];
    let mut stride = [0usize; MAX_PERMUTE_RANK];
    let mut in_stride = 1usize;
    let mut in_strides = [0usize; MAX_PERMUTE_RANK];
    for i in (0..rank).rev() {
        in_strides[i] = in_stride;
        in_stride *= dims[i];
    }
    for ax in 0..outer_axes {
        extent[ax] = out_dims[ax];
        stride[ax] = in_strides[perm[ax]];
    }
    // Copies output rows `first..` into `dst`: the input offset of the first row from its
    // coordinates, then an odometer over the axes (attention's head split copies rows of
    // 32 floats, and a division per axis and row cost as much as the copy).
    let copy_rows = |first: usize, dst: &mut [f32]| {
        let mut coord = [0usize; MAX_PERMUTE_RANK];
        let (mut rem, mut offset) = (first, 0);
        for ax in (0..outer_axes).rev() {
            coord[ax] = rem % extent[ax];
            rem /= extent[ax];
            offset += coord[ax] * stride[ax];
        }
        for d in dst.chunks_exact_mut(run) {
            d.copy_from_slice(&src[offset..offset + run]);
            let mut ax = outer_axes - 1;
            loop {
                coord[ax] += 1;
                offset += stride[ax];
                if coord[ax] < extent[ax] || ax == 0 {
                    break;
                }
                offset -= extent[ax] * stride[ax];
                coord[ax] = 0;
                ax -= 1;
            }
        }
    };
    if src.len() < PAR_MIN_ELEMS {
        copy_rows(0, &mut out);
    } else {
        let rows_per_task = (PAR_CHUNK / run).max(1);
        out.par_chunks_mut(run * rows_per_task)
            .enumerate()
            .for_each(|(t, d)| copy_rows(t * rows_per_task, d));
    }
    NdTensor::from_vec(out, out_dims)
}

/// Ranks up to this take [`permute_rows`]' odometer (more go through ndarray's copy).
const MAX_PERMUTE_RANK: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;

    /// Against ndarray's own strided copy, on ranks 2 to 5, small (one thread) and large
    /// (tasks starting mid-way through the odometer's axes).
    #[test]
    fn matches_ndarrays_permuted_copy() -> Result<()> {
        let cases: [(&[usize], &[usize]); 5] = [
            (&[3, 5], &[0, 1]),
            (&[2, 3, 4, 5], &[0, 2, 1, 3]),
            (&[8, 128, 12, 32], &[0, 2, 1, 3]),
            (&[3, 7, 5, 11, 9], &[2, 0, 3, 1, 4]),
            (&[33, 17, 65], &[1, 0, 2]),
        ];
        for (dims, perm) in cases {
            let n: usize = dims.iter().product();
            let data: Vec<f32> = (0..n).map(|i| i as f32).collect();
            let a = NdTensor::from_vec(data, dims)?;
            let out_dims: Vec<usize> = perm.iter().map(|&p| dims[p]).collect();
            let got = permute_rows(&a, perm, &out_dims)?;
            let want = a.array().view().permuted_axes(perm.to_vec());
            assert_eq!(got.shape().dims(), &out_dims[..], "{dims:?} {perm:?}");
            let want: Vec<f32> = want.iter().copied().collect();
            assert_eq!(got.as_slice(), &want[..], "{dims:?} {perm:?}");
        }
        Ok(())
    }
}
