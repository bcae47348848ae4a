//! PEFT's SVD-based combinations (`svd`, `ties_svd`, `dare_linear_svd`, `dare_ties_svd`,
//! `magnitude_prune_svd`): per module, each source's delta `Δᵢ = sᵢ·Bᵢ Aᵢ` (`[out, in]`)
//! is formed on the backend, the deltas are combined (a weighted sum, or the
//! task-arithmetic method on the whole deltas), and the result is cut back to rank `k` by
//! an SVD: `B = U[:, :k]·diag(S[:k])`, `A = Vᵀ[:k]`, so `A` has orthonormal rows and `B`
//! carries the singular values, as in PEFT's
//! `_svd_generalized_task_arithmetic_weighted_adapter`. The SVD runs on the host in f64
//! (faer); `svd_clamp` clips both factors to the quantile PEFT takes.

use faer::Mat;
use lora_core::ops::TaskMerge;
use lora_core::{Error, LoraOps, Result, Tensor};

use crate::weighted_adapter::Source;

/// An SVD-based combination's settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SvdCombination {
    /// The combination before the SVD: `None` for the weighted sum (`svd`), else the
    /// task-arithmetic method on the deltas (`ties_svd`, ...).
    pub merge: Option<TaskMerge>,
    /// `svd_rank`: the new rank (`None` or 0: the largest source rank, as in PEFT).
    pub rank: Option<usize>,
    /// `svd_clamp`: a quantile in (0, 1]; both factors are clipped to `±` that quantile of
    /// their values.
    pub clamp: Option<f32>,
}

impl SvdCombination {
    /// Checks `svd_clamp` and the task method's `density`, naming the fields.
    pub fn validate(&self) -> Result<()> {
        if let Some(m) = &self.merge {
            m.validate()?;
        }
        if let Some(q) = self.clamp
            && !(q > 0.0 && q <= 1.0)
        {
            return Err(Error::config(
                "add_weighted_adapter",
                "svd_clamp",
                q,
                "must be a quantile in (0, 1]",
            ));
        }
        Ok(())
    }
}

/// The rank-`rank` `(lora_A, lora_B)` of one module from its sources.
pub(crate) fn svd_combine_module<B: LoraOps>(
    backend: &B,
    sources: &[Source<'_, B::Tensor>],
    svd: &SvdCombination,
    rank: usize,
    module: &str,
) -> Result<(B::Tensor, B::Tensor)> {
    let ctx = format!("add_weighted_adapter, module {module}");
    let first = sources
        .first()
        .ok_or_else(|| Error::state(&ctx, "no adapter to combine"))?;
    let (out, inp) = (first.1.shape().as_matrix().0, first.0.shape().as_matrix().1);
    if rank == 0 || rank > out.min(inp) {
        return Err(Error::config(
            ctx,
            "svd_rank",
            rank,
            format!(
                "must be in 1..=min(out, in) = {} for this module",
                out.min(inp)
            ),
        ));
    }
    let mut deltas = Vec::with_capacity(sources.len());
    for &(a, b, scaling, _) in sources {
        let d = backend.lora_delta_weight(a, b, scaling, false)?;
        if d.shape().dims() != [out, inp] {
            return Err(Error::shape(
                format!("{ctx}: a source's delta"),
                format!("[{out}, {inp}]"),
                d.shape(),
            ));
        }
        deltas.push(backend.to_host(&d)?);
    }
    let weights: Vec<f32> = sources.iter().map(|s| s.3).collect();
    let combined: Vec<f32> = match &svd.merge {
        None => (0..out * inp)
            .map(|i| deltas.iter().zip(&weights).map(|(d, w)| w * d[i]).sum())
            .collect(),
        Some(m) => {
            let refs: Vec<&[f32]> = deltas.iter().map(Vec::as_slice).collect();
            m.combine(&refs, &weights, module)?
        }
    };
    let m = Mat::<f64>::from_fn(out, inp, |i, j| f64::from(combined[i * inp + j]));
    let factored = m
        .thin_svd()
        .map_err(|e| Error::state(&ctx, format!("the SVD did not converge: {e:?}")))?;
    let (u, sv, v) = (factored.U(), factored.S(), factored.V());
    let mut b: Vec<f32> = (0..out * rank)
        .map(|idx| (u[(idx / rank, idx % rank)] * sv[idx % rank]) as f32)
        .collect();
    let mut a: Vec<f32> = (0..rank * inp)
        .map(|idx| v[(idx % inp, idx / inp)] as f32)
        .collect();
    if let Some(q) = svd.clamp {
        svd_clamp(&mut a, &mut b, q);
    }
    Ok((
        backend.from_host_vec(a, &[rank, inp])?,
        backend.from_host_vec(b, &[out, rank])?,
    ))
}

/// PEFT's `svd_clamp`: both factors clipped to `±` the `q`-quantile of all their (signed)
/// values. The result depends on the singular vectors' signs, which differ between SVD
/// implementations, so it is reproducible given the factors, not given the deltas.
pub fn svd_clamp(a: &mut [f32], b: &mut [f32], q: f32) {
    let hi = quantile(b.iter().chain(a.iter()).copied().collect(), q);
    for x in b.iter_mut().chain(a.iter_mut()) {
        // torch.clamp(min = -hi, max = hi): the upper bound wins if hi < 0.
        *x = x.max(-hi).min(hi);
    }
}

/// `torch.quantile(values, q)` with linear interpolation between the closest ranks.
fn quantile(mut values: Vec<f32>, q: f32) -> f32 {
    values.sort_by(f32::total_cmp);
    let Some(last) = values.len().checked_sub(1) else {
        return 0.0;
    };
    let pos = f64::from(q) * last as f64;
    let (lo, frac) = (pos.floor() as usize, pos - pos.floor());
    let hi = (lo + 1).min(last);
    (f64::from(values[lo]) + frac * (f64::from(values[hi]) - f64::from(values[lo]))) as f32
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn quantile_interpolates_as_torch() {
        // torch.quantile(torch.tensor([3., 1., 2., 4.]), 0.9) == 3.7
        assert!((quantile(vec![3.0, 1.0, 2.0, 4.0], 0.9) - 3.7).abs() < 1e-6);
        assert_eq!(quantile(vec![5.0], 0.3), 5.0);
        assert_eq!(quantile(vec![-1.0, 2.0], 1.0), 2.0);
    }
}
