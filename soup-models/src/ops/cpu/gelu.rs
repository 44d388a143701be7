//! quick-GELU: y = x·σ(1.702 x), y' = σ + 1.702·x·σ·(1 − σ) (CLIP), and the exact GELU:
//! y = x·Φ(x) = ½x(1 + erf(x/√2)), y' = Φ(x) + x·φ(x) (DINOv2; PyTorch's `nn.GELU()`).

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use soup_core::kernels::Isa;

use super::{data, on_isa, Real};

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
    let mut y = vec![T::zero(); x.len()];
    quick_gelu_into(x, &mut y);
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
    let mut dx = vec![T::zero(); x.len()];
    quick_gelu_backward_into(x, dy, &mut dx);
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

/// The exact GELU x·Φ(x), element-wise (Φ the standard normal CDF: [`Real::gelu`]).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}

struct Gelu;

/// Φ(x) = ½(1 + erf(x/√2)), in f64.
pub(super) fn normal_cdf(x: f64) -> f64 {
    0.5 * (1.0 + candle_core::cpu::erf::erf_f64(x * std::f64::consts::FRAC_1_SQRT_2))
}

fn gelu_fwd<T: Real>(s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    let x = data::<T>(s, l, "gelu")?;
    let mut y = vec![T::zero(); x.len()];
    gelu_into(x, &mut y);
    Ok((T::to_cpu_storage_owned(y), l.shape().clone()))
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "soup-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(s, "gelu", gelu_fwd(s, l))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&dy.contiguous()?, &GeluBwd)?))
    }
}

/// (x, dy) → dy·(Φ(x) + x·φ(x)).
struct GeluBwd;

fn gelu_bwd<T: Real>(
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let (x, dy) = (data::<T>(s1, l1, "gelu")?, data::<T>(s2, l2, "gelu")?);
    if x.len() != dy.len() {
        bail!("gelu backward: the gradient has shape {:?}", l2.dims());
    }
    let mut dx = vec![T::zero(); x.len()];
    gelu_backward_into(x, dy, &mut dx);
    Ok((T::to_cpu_storage_owned(dx), l1.shape().clone()))
}

impl CustomOp2 for GeluBwd {
    fn name(&self) -> &'static str {
        "soup-gelu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(s1, "gelu backward", gelu_bwd((s1, l1), (s2, l2)))
    }
}

/// y = x·σ(1.702 x), element-wise.
pub(crate) fn quick_gelu_into<T: Real>(x: &[T], y: &mut [T]) {
    quick_gelu_on(Isa::detected(), x, y)
}

/// [`quick_gelu_into`] compiled for `isa`.
fn quick_gelu_on<T: Real>(isa: Isa, x: &[T], y: &mut [T]) {
    assert_eq!(x.len(), y.len());
    let k = T::from_f64(GELU_K);
    y.par_chunks_mut(65_536)
        .zip(x.par_chunks(65_536))
        .for_each(|(yc, xc)| {
            on_isa(
                isa,
                #[inline(always)]
                || {
                    for (y, &x) in yc.iter_mut().zip(xc) {
                        *y = x * sigmoid(k * x);
                    }
                },
            )
        });
}

/// dx = dy·(σ + 1.702·x·σ·(1 − σ)), element-wise.
pub(crate) fn quick_gelu_backward_into<T: Real>(x: &[T], dy: &[T], dx: &mut [T]) {
    quick_gelu_backward_on(Isa::detected(), x, dy, dx)
}

/// [`quick_gelu_backward_into`] compiled for `isa`.
fn quick_gelu_backward_on<T: Real>(isa: Isa, x: &[T], dy: &[T], dx: &mut [T]) {
    assert!(x.len() == dy.len() && x.len() == dx.len());
    let k = T::from_f64(GELU_K);
    dx.par_chunks_mut(65_536)
        .zip(x.par_chunks(65_536).zip(dy.par_chunks(65_536)))
        .for_each(|(dc, (xc, gc))| {
            on_isa(
                isa,
                #[inline(always)]
                || {
                    for ((d, &x), &g) in dc.iter_mut().zip(xc).zip(gc) {
                        let s = sigmoid(k * x);
                        *d = g * (s + k * x * s * (T::one() - s));
                    }
                },
            )
        });
}

/// y = x·Φ(x), element-wise.
pub(crate) fn gelu_into<T: Real>(x: &[T], y: &mut [T]) {
    gelu_on(Isa::detected(), x, y)
}

/// [`gelu_into`] compiled for `isa`.
fn gelu_on<T: Real>(isa: Isa, x: &[T], y: &mut [T]) {
    assert_eq!(x.len(), y.len());
    y.par_chunks_mut(65_536)
        .zip(x.par_chunks(65_536))
        .for_each(|(yc, xc)| {
            on_isa(
                isa,
                #[inline(always)]
                || {
                    for (y, &x) in yc.iter_mut().zip(xc) {
                        *y = x.gelu();
                    }
                },
            )
        });
}

/// dx = dy·(Φ(x) + x·φ(x)), element-wise.
pub(crate) fn gelu_backward_into<T: Real>(x: &[T], dy: &[T], dx: &mut [T]) {
    gelu_backward_on(Isa::detected(), x, dy, dx)
}

/// [`gelu_backward_into`] compiled for `isa`.
fn gelu_backward_on<T: Real>(isa: Isa, x: &[T], dy: &[T], dx: &mut [T]) {
    assert!(x.len() == dy.len() && x.len() == dx.len());
    dx.par_chunks_mut(65_536)
        .zip(x.par_chunks(65_536).zip(dy.par_chunks(65_536)))
        .for_each(|(dc, (xc, gc))| {
            on_isa(
                isa,
                #[inline(always)]
                || {
                    for ((d, &x), &g) in dc.iter_mut().zip(xc).zip(gc) {
                        *d = g * x.gelu_derivative();
                    }
                },
            )
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loops built for each instruction set this CPU has give the baseline's bits.
    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        let x: Vec<f32> = soup_core::rng::SplitMix64::new(3)
            .normals(70_001)
            .into_iter()
            .map(|v| (4.0 * v) as f32)
            .collect();
        let dy: Vec<f32> = x.iter().map(|v| 0.5 - v).collect();
        let run = |isa: Isa| {
            let mut out = vec![vec![0.0f32; x.len()]; 4];
            quick_gelu_on(isa, &x, &mut out[0]);
            quick_gelu_backward_on(isa, &x, &dy, &mut out[1]);
            gelu_on(isa, &x, &mut out[2]);
            gelu_backward_on(isa, &x, &dy, &mut out[3]);
            out.concat().iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        let isas = Isa::available();
        eprintln!("instruction sets compared: {isas:?}");
        let base = run(Isa::Baseline);
        for &isa in &isas[1..] {
            assert!(run(isa) == base, "{isa:?} differs from the baseline");
        }
    }
}
