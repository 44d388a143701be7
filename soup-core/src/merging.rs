//! The data-free multi-task merges users compare AdaMerging with (spec §3.9): task arithmetic
//! and TIES-Merging. Both return a merged task vector τ, from which a caller makes
//! θ(λ) = θ_0 + λ τ for the λ it chooses on held-out data ([`scaled_merge`]).
//!
//! Both stream the zoo: one task model is resident at a time beside θ_0 and a few model-sized
//! sums, whatever the number of tasks.

use candle_core::Tensor;

use crate::error::{Result, SoupError};
use crate::traits::ModelStore;
use crate::transfer;
use crate::zoo::Zoo;

/// θ_0 and a merged task vector τ of a zoo, as named tensors in layout order.
#[derive(Clone, Debug)]
pub struct MergedTaskVector {
    /// θ_0, the base.
    pub base: Vec<Tensor>,
    /// τ, the merged task vector.
    pub tau: Vec<Tensor>,
}

impl MergedTaskVector {
    /// θ_0 + λ τ.
    pub fn at(&self, lambda: f64) -> Result<Vec<Tensor>> {
        scaled_merge(&self.base, &self.tau, lambda)
    }
}

/// θ_0 + λ τ, tensor by tensor.
pub fn scaled_merge(base: &[Tensor], tau: &[Tensor], lambda: f64) -> Result<Vec<Tensor>> {
    base.iter()
        .zip(tau)
        .map(|(b, t)| Ok((b + t.affine(lambda, 0.0)?.to_dtype(b.dtype())?)?))
        .collect()
}

/// The task models of a zoo with base `base`: every other index.
fn task_models(zoo: &Zoo, base: usize) -> Result<Vec<usize>> {
    if base >= zoo.len() {
        return Err(SoupError::config(
            "base",
            base,
            "is not the index of a model of the zoo",
        ));
    }
    if zoo.len() < 2 {
        return Err(SoupError::config(
            "base",
            base,
            "task vectors need a base and at least one task model",
        ));
    }
    Ok((0..zoo.len()).filter(|&j| j != base).collect())
}

/// Task arithmetic (Ilharco et al., ICLR 2023): τ = Σ_k (θ_k − θ_0), the sum of the task
/// vectors of every model but the base `base`.
pub fn task_arithmetic(store: &dyn ModelStore, base: usize) -> Result<MergedTaskVector> {
    let zoo = Zoo::open(store)?;
    let tasks = task_models(&zoo, base)?;
    let (_, theta_0) = zoo.load(base)?;
    let sum = zoo.sum(&tasks)?;
    let k = tasks.len() as f64;
    let tau = sum
        .iter()
        .zip(&theta_0)
        .map(|(s, b)| s - b.to_dtype(s.dtype())?.affine(k, 0.0)?)
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(MergedTaskVector { base: theta_0, tau })
}

/// TIES-Merging (Yadav et al., NeurIPS 2023), as its authors' code does it: each task vector
/// keeps its `density` fraction of largest-magnitude entries over the whole model (trim: an
/// entry is kept when |τ| ≥ the k-th smallest |τ|, k = D − ⌊D · density⌋), the sign of each
/// parameter is the sign of the sum of the trimmed vectors (a zero sum takes the majority sign
/// of all parameters), and τ is the mean of the trimmed entries that agree with it (disjoint
/// mean; 0 where none does). Two passes over the zoo.
pub fn ties_merging(store: &dyn ModelStore, base: usize, density: f64) -> Result<MergedTaskVector> {
    if !(density > 0.0 && density <= 1.0) {
        return Err(SoupError::config("density", density, "must be in (0, 1]"));
    }
    let zoo = Zoo::open(store)?;
    let tasks = task_models(&zoo, base)?;
    let (_, theta_0) = zoo.load(base)?;
    let base_flat = flatten(&theta_0)?;
    let d = base_flat.len();
    // The task vector of model j, flattened, and its trim threshold.
    let task_vector = |j: usize| -> Result<Vec<f64>> {
        let (_, model) = zoo.load(j)?;
        let mut tau = flatten(&model)?;
        tau.iter_mut().zip(&base_flat).for_each(|(t, b)| *t -= b);
        Ok(tau)
    };
    let threshold = |tau: &[f64]| -> f64 {
        let k = d - (d as f64 * density).floor() as usize;
        if k == 0 {
            return 0.0;
        }
        let mut mags: Vec<f64> = tau.iter().map(|v| v.abs()).collect();
        let (_, kth, _) = mags.select_nth_unstable_by(k - 1, f64::total_cmp);
        *kth
    };
    // Pass 1: the sum of the trimmed task vectors elects each parameter's sign.
    let mut thresholds = Vec::with_capacity(tasks.len());
    let mut elected = vec![0.0f64; d];
    for &j in &tasks {
        let tau = task_vector(j)?;
        let t = threshold(&tau);
        thresholds.push(t);
        for (e, v) in elected.iter_mut().zip(&tau) {
            if v.abs() >= t {
                *e += v;
            }
        }
    }
    let majority = elected.iter().map(|v| v.signum_or_zero()).sum::<f64>();
    let majority = majority.signum_or_zero();
    for e in elected.iter_mut() {
        *e = match e.signum_or_zero() {
            0.0 => majority,
            s => s,
        };
    }
    // Pass 2: the mean of the kept entries whose sign agrees with the elected one.
    let mut sum = vec![0.0f64; d];
    let mut count = vec![0u32; d];
    for (&j, &t) in tasks.iter().zip(&thresholds) {
        let tau = task_vector(j)?;
        for i in 0..d {
            let v = tau[i];
            let agrees = if elected[i] > 0.0 { v > 0.0 } else { v < 0.0 };
            if v.abs() >= t && agrees {
                sum[i] += v;
                count[i] += 1;
            }
        }
    }
    let merged: Vec<f64> = sum
        .iter()
        .zip(&count)
        .map(|(s, &c)| s / f64::from(c.max(1)))
        .collect();
    Ok(MergedTaskVector {
        tau: unflatten(&merged, &theta_0)?,
        base: theta_0,
    })
}

/// Sign as −1, 0 or 1 (`f64::signum` gives ±1 for ±0).
trait SignumOrZero {
    fn signum_or_zero(self) -> f64;
}

impl SignumOrZero for f64 {
    fn signum_or_zero(self) -> f64 {
        if self > 0.0 {
            1.0
        } else if self < 0.0 {
            -1.0
        } else {
            0.0
        }
    }
}

/// Every tensor's values in layout order, in f64 on the host.
fn flatten(tensors: &[Tensor]) -> Result<Vec<f64>> {
    let mut out = Vec::new();
    for t in tensors {
        out.extend(transfer::to_vec(&t.flatten_all()?)?);
    }
    Ok(out)
}

/// `flat` cut into tensors shaped, typed and placed like `like`.
fn unflatten(flat: &[f64], like: &[Tensor]) -> Result<Vec<Tensor>> {
    let mut offset = 0;
    like.iter()
        .map(|t| {
            let n = t.elem_count();
            let part =
                transfer::upload(&flat[offset..offset + n], t.shape(), t.dtype(), t.device())?;
            offset += n;
            Ok(part)
        })
        .collect()
}
