//! Task-arithmetic combinations of LoRA factors, as PEFT's `utils/merge_utils.py` defines
//! them for `add_weighted_adapter`: TIES (prune by magnitude, elect a sign, disjoint
//! mean), magnitude pruning, and DARE (random pruning with rescaling, linear or with TIES'
//! sign election). Each combines the same factor (all the `lora_A`s, or all the `lora_B`s)
//! of several adapters, element by element, on the host: the work is `O(r · (in + out))`
//! per layer, far below any product. DARE's masks come from the seeded Philox generator,
//! not from PyTorch's, so they match PEFT in distribution, not bit for bit.

use crate::error::{Error, Result};
use crate::rng::{self, RngState};

/// Which task-arithmetic combination (PEFT's `combination_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskMethod {
    /// `ties`: keep each tensor's `density` largest magnitudes, elect the majority sign
    /// per element, average the weighted values that agree with it.
    Ties,
    /// `magnitude_prune`: keep each tensor's `density` largest magnitudes, weighted sum.
    MagnitudePrune,
    /// `dare_linear`: keep each element with probability `density` (rescaled by
    /// `1 / density`), weighted sum.
    DareLinear,
    /// `dare_ties`: DARE's random pruning, then TIES' sign election and disjoint mean.
    DareTies,
}

/// How TIES elects the sign of each element (PEFT's `majority_sign_method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MajoritySign {
    /// The sign of the sum of the (pruned, unweighted) values.
    Total,
    /// The sign held by most (pruned, unweighted) values.
    Frequency,
}

/// A task-arithmetic combination and its settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TaskMerge {
    /// The method.
    pub method: TaskMethod,
    /// Fraction of values kept, in `[0, 1]` (1 keeps everything).
    pub density: f32,
    /// Sign election for the TIES methods.
    pub majority_sign: MajoritySign,
    /// Seed of DARE's masks.
    pub seed: u64,
}

impl TaskMerge {
    /// Checks `density`, naming the field.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.density) {
            return Err(Error::config(
                "add_weighted_adapter",
                "density",
                self.density,
                "must be in [0, 1]",
            ));
        }
        Ok(())
    }

    /// Combines `tensors` (equal lengths) with `weights`; `stream` names the random stream
    /// of DARE's masks (distinct per layer and factor).
    pub fn combine(&self, tensors: &[&[f32]], weights: &[f32], stream: &str) -> Result<Vec<f32>> {
        self.validate()?;
        let n = tensors.first().map_or(0, |t| t.len());
        if tensors.iter().any(|t| t.len() != n) || weights.len() != tensors.len() {
            return Err(Error::state(
                "add_weighted_adapter",
                "the combined tensors must all have one shape, with one weight each",
            ));
        }
        let pruned: Vec<Vec<f32>> = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| match self.method {
                TaskMethod::Ties | TaskMethod::MagnitudePrune => magnitude_prune(t, self.density),
                TaskMethod::DareLinear | TaskMethod::DareTies => {
                    let rng = RngState::new(self.seed, rng::stream_id(stream, &format!("dare{i}")));
                    random_prune(t, self.density, rng)
                }
            })
            .collect();
        Ok(match self.method {
            TaskMethod::MagnitudePrune | TaskMethod::DareLinear => (0..n)
                .map(|j| pruned.iter().zip(weights).map(|(t, w)| t[j] * w).sum())
                .collect(),
            TaskMethod::Ties | TaskMethod::DareTies => (0..n)
                .map(|j| disjoint_mean(&pruned, weights, j, self.majority_sign))
                .collect(),
        })
    }
}

/// PEFT's `magnitude_based_pruning`: keeps the `int(density · n)` largest `|x|`, zeroes
/// the rest (`density >= 1` keeps all).
fn magnitude_prune(t: &[f32], density: f32) -> Vec<f32> {
    if density >= 1.0 {
        return t.to_vec();
    }
    let k = (f64::from(density) * t.len() as f64) as usize;
    let mut order: Vec<usize> = (0..t.len()).collect();
    // Largest magnitude first; equal magnitudes by index, so the result is deterministic.
    order.sort_by(|&a, &b| t[b].abs().total_cmp(&t[a].abs()).then(a.cmp(&b)));
    let mut out = vec![0.0; t.len()];
    for &i in &order[..k] {
        out[i] = t[i];
    }
    out
}

/// PEFT's `random_pruning` with `rescale=True`: each value kept with probability
/// `density` and divided by it (`density >= 1` keeps all).
fn random_prune(t: &[f32], density: f32, rng: RngState) -> Vec<f32> {
    if density >= 1.0 {
        return t.to_vec();
    }
    let mut u = vec![0.0f32; t.len()];
    rng::uniform(rng, 0.0, 1.0, &mut u);
    t.iter()
        .zip(&u)
        .map(|(v, u)| if *u < density { v / density } else { 0.0 })
        .collect()
}

/// TIES' sign election and disjoint merge at element `j`: the weighted values whose sign
/// agrees with the majority, summed and divided by how many agree (at least 1).
fn disjoint_mean(pruned: &[Vec<f32>], weights: &[f32], j: usize, how: MajoritySign) -> f32 {
    let sign = |v: f32| {
        if v > 0.0 {
            1.0
        } else if v < 0.0 {
            -1.0
        } else {
            0.0
        }
    };
    let votes: f32 = pruned
        .iter()
        .map(|t| match how {
            MajoritySign::Total => t[j],
            MajoritySign::Frequency => sign(t[j]),
        })
        .sum();
    let majority = if votes >= 0.0 { 1.0 } else { -1.0 };
    let (mut sum, mut count) = (0.0f32, 0.0f32);
    for (t, w) in pruned.iter().zip(weights) {
        if sign(t[j]) == majority {
            sum += t[j] * w;
            count += 1.0;
        }
    }
    sum / count.max(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn merge(method: TaskMethod, density: f32) -> TaskMerge {
        TaskMerge {
            method,
            density,
            majority_sign: MajoritySign::Total,
            seed: 3,
        }
    }

    #[test]
    fn ties_elects_the_sign_and_averages_the_agreeing_values() -> Result<()> {
        let (a, b) = ([3.0, -1.0, 0.5, 2.0], [-1.0, -4.0, 0.25, -3.0]);
        // density 1: no pruning. Element 0: total +2 -> keep 3·w0 alone; element 1: both
        // negative -> mean of the weighted two; element 3: total -1 -> keep -3·w1 alone.
        let got = merge(TaskMethod::Ties, 1.0).combine(&[&a, &b], &[1.0, 2.0], "t")?;
        assert_eq!(got, [3.0, (-1.0 - 8.0) / 2.0, (0.5 + 0.5) / 2.0, -6.0]);
        let half = merge(TaskMethod::MagnitudePrune, 0.5).combine(&[&a, &b], &[1.0, 1.0], "t")?;
        // Each keeps its two largest |values|: a -> 3, 2; b -> -4, -3.
        assert_eq!(half, [3.0, -4.0, 0.0, -1.0]);
        Ok(())
    }

    #[test]
    fn dare_keeps_about_density_rescaled_and_is_seeded() -> Result<()> {
        let t = vec![1.0f32; 20_000];
        let m = merge(TaskMethod::DareLinear, 0.3);
        let got = m.combine(&[&t], &[1.0], "layer.lora_A")?;
        let kept = got.iter().filter(|v| **v != 0.0).count() as f64 / t.len() as f64;
        assert!((kept - 0.3).abs() < 0.02, "kept {kept}");
        assert!(
            got.iter()
                .all(|v| *v == 0.0 || (*v - 1.0 / 0.3).abs() < 1e-6)
        );
        assert_eq!(got, m.combine(&[&t], &[1.0], "layer.lora_A")?);
        assert_ne!(got, m.combine(&[&t], &[1.0], "layer.lora_B")?);
        assert!(merge(TaskMethod::Ties, 1.5).validate().is_err());
        Ok(())
    }
}
