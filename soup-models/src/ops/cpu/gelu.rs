//! quick-GELU: y = x·σ(1.702 x), y' = σ + 1.702·x·σ·(1 − σ).

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{data, Real};

const GELU_K: f64 = 1.702;

/// CLIP's activation x·σ(1.702 x), element-wise.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(QuickGelu)
}

struct QuickGelu;

fn sigmoid<T: Real>(v: T) -> T {
    T::one() / (T::one() + (-v).exp())
}

fn quick_gelu_fwd<T: Real>(s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    let x = data::<T>(s, l, "quick_gelu")?;
    let k = T::from_f64(GELU_K);
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(65_536)
        .zip(x.par_chunks(65_536))
        .for_each(|(yc, xc)| {
            for (y, &x) in yc.iter_mut().zip(xc) {
                *y = x * sigmoid(k * x);
            }
        });
    Ok((T::to_cpu_storage_owned(y), l.shape().clone()))
}

impl CustomOp1 for QuickGelu {
    fn name(&self) -> &'static str {
        "soup-quick-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(s, "quick_gelu", quick_gelu_fwd(s, l))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&dy.contiguous()?, &QuickGeluBwd)?))
    }
}

/// (x, dy) → dy·(σ + 1.702·x·σ·(1 − σ)).
struct QuickGeluBwd;

fn quick_gelu_bwd<T: Real>(
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let (x, dy) = (
        data::<T>(s1, l1, "quick_gelu")?,
        data::<T>(s2, l2, "quick_gelu")?,
    );
    if x.len() != dy.len() {
        bail!(
            "quick_gelu backward: the gradient has shape {:?}",
            l2.dims()
        );
    }
    let k = T::from_f64(GELU_K);
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(65_536)
        .zip(x.par_chunks(65_536).zip(dy.par_chunks(65_536)))
        .for_each(|(dc, (xc, gc))| {
            for ((d, &x), &g) in dc.iter_mut().zip(xc).zip(gc) {
                let s = sigmoid(k * x);
                *d = g * (s + k * x * s * (T::one() - s));
            }
        });
    Ok((T::to_cpu_storage_owned(dx), l1.shape().clone()))
}

impl CustomOp2 for QuickGeluBwd {
    fn name(&self) -> &'static str {
        "soup-quick-gelu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(
            s1,
            "quick_gelu backward",
            quick_gelu_bwd((s1, l1), (s2, l2))
        )
    }
}
