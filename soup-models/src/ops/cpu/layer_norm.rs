//! LayerNorm over the last dimension: y = (x − μ)/√(σ² + ε) · w + b.

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{data, lanes_dot, lanes_fold, on_isa, rows_per_task, Real};
use soup_core::kernels::Isa;

/// LayerNorm of x over its last dimension, with weight and bias of that length.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, LayerNorm { eps })
}

struct LayerNorm {
    eps: f64,
}

/// μ and 1/√(σ² + ε) of one row (two passes, as the composed reference; each sum over 16 lanes,
/// which vectorise where a sequential sum does not).
#[inline(always)]
fn moments<T: Real>(row: &[T], eps: f64) -> (T, T) {
    let d = T::from_f64(row.len() as f64);
    let mean = lanes_fold(row, row, |v, _| v) / d;
    let sq = lanes_fold(row, row, |v, _| (v - mean) * (v - mean));
    let rstd = T::one() / (sq / d + T::from_f64(eps)).sqrt();
    (mean, rstd)
}

fn layer_norm_fwd<T: Real>(
    eps: f64,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let d = l1.dims().last().copied().unwrap_or(0);
    if d == 0 || l2.shape().elem_count() != d || l3.shape().elem_count() != d {
        bail!(
            "layer_norm: input {:?} and weight {:?}",
            l1.dims(),
            l2.dims()
        );
    }
    let (x, w, b) = (
        data::<T>(s1, l1, "layer_norm")?,
        data::<T>(s2, l2, "layer_norm")?,
        data::<T>(s3, l3, "layer_norm")?,
    );
    let mut y = vec![T::zero(); x.len()];
    layer_norm_into(x, w, b, eps, &mut y);
    Ok((T::to_cpu_storage_owned(y), l1.shape().clone()))
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "soup-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(
            s1,
            "layer_norm",
            layer_norm_fwd(self.eps, (s1, l1), (s2, l2), (s3, l3))
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = x.elem_count();
        let d = w.elem_count();
        let packed = x.apply_op3_no_bwd(w, &dy.contiguous()?, &LayerNormBwd { eps: self.eps })?;
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = packed.narrow(0, n, d)?.reshape(w.shape())?;
        let db = packed.narrow(0, n + d, d)?.reshape(b.shape())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// (x, w, dy) → [dx | dw | db]: with x̂ = (x − μ)·r and g = dy·w,
/// dx = r·(g − mean(g) − x̂·mean(g·x̂)), dw = Σ_rows dy·x̂, db = Σ_rows dy.
struct LayerNormBwd {
    eps: f64,
}

fn layer_norm_bwd<T: Real>(
    eps: f64,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let d = l2.shape().elem_count();
    let (x, w, dy) = (
        data::<T>(s1, l1, "layer_norm")?,
        data::<T>(s2, l2, "layer_norm")?,
        data::<T>(s3, l3, "layer_norm")?,
    );
    if dy.len() != x.len() {
        bail!(
            "layer_norm backward: the gradient has shape {:?}",
            l3.dims()
        );
    }
    let n = x.len();
    let mut g = vec![T::zero(); n + 2 * d];
    let (dx, dwb) = g.split_at_mut(n);
    let (dw, db) = dwb.split_at_mut(d);
    layer_norm_backward_into(x, w, dy, eps, (dx, false), dw, db);
    Ok((T::to_cpu_storage_owned(g), Shape::from(n + 2 * d)))
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "soup-layer-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(
            s1,
            "layer_norm backward",
            layer_norm_bwd(self.eps, (s1, l1), (s2, l2), (s3, l3))
        )
    }
}

/// y = LayerNorm(x) over rows of w.len() elements, with weight w and bias b.
pub(crate) fn layer_norm_into<T: Real>(x: &[T], w: &[T], b: &[T], eps: f64, y: &mut [T]) {
    layer_norm_on(Isa::detected(), x, w, b, eps, y)
}

/// [`layer_norm_into`] with the row loops built for `isa`.
fn layer_norm_on<T: Real>(isa: Isa, x: &[T], w: &[T], b: &[T], eps: f64, y: &mut [T]) {
    let d = w.len();
    assert!(d > 0 && b.len() == d && x.len() == y.len() && x.len().is_multiple_of(d));
    let chunk = rows_per_task(d) * d;
    y.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(yc, xc)| {
            on_isa(
                isa,
                #[inline(always)]
                || {
                    for (yr, xr) in yc.chunks_exact_mut(d).zip(xc.chunks_exact(d)) {
                        let (mean, rstd) = moments(xr, eps);
                        for j in 0..d {
                            yr[j] = (xr[j] - mean) * rstd * w[j] + b[j];
                        }
                    }
                },
            )
        });
}

/// The backward of [`layer_norm_into`] for dy: with x̂ = (x − μ)·r and g = dy·w,
/// dx = r·(g − mean(g) − x̂·mean(g·x̂)) written into dx (added to it when its flag is true),
/// dw = Σ_rows dy·x̂ and db = Σ_rows dy written into dw and db.
pub(crate) fn layer_norm_backward_into<T: Real>(
    x: &[T],
    w: &[T],
    dy: &[T],
    eps: f64,
    (dx, accumulate): (&mut [T], bool),
    dw: &mut [T],
    db: &mut [T],
) {
    layer_norm_backward_on(Isa::detected(), x, w, dy, eps, (dx, accumulate), (dw, db))
}

/// [`layer_norm_backward_into`] with the row loops built for `isa`.
fn layer_norm_backward_on<T: Real>(
    isa: Isa,
    x: &[T],
    w: &[T],
    dy: &[T],
    eps: f64,
    (dx, accumulate): (&mut [T], bool),
    (dw, db): (&mut [T], &mut [T]),
) {
    let d = w.len();
    assert!(d > 0 && dw.len() == d && db.len() == d && x.len().is_multiple_of(d));
    assert!(dy.len() == x.len() && dx.len() == x.len());
    let chunk = rows_per_task(d) * d;
    let inv_d = T::from_f64(1.0 / d as f64);
    // Each task returns its partial [dw | db]; the partials are summed in task order.
    let partials: Vec<Vec<T>> = dx
        .par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk).zip(dy.par_chunks(chunk)))
        .map(|(dxc, (xc, dyc))| {
            let mut part = vec![T::zero(); 2 * d];
            let (pw, pb) = part.split_at_mut(d);
            let (mut xhat, mut g) = (vec![T::zero(); d], vec![T::zero(); d]);
            on_isa(
                isa,
                #[inline(always)]
                || {
                    for ((dxr, xr), dyr) in dxc
                        .chunks_exact_mut(d)
                        .zip(xc.chunks_exact(d))
                        .zip(dyc.chunks_exact(d))
                    {
                        let (mean, rstd) = moments(xr, eps);
                        for j in 0..d {
                            xhat[j] = (xr[j] - mean) * rstd;
                            g[j] = dyr[j] * w[j];
                            pw[j] += dyr[j] * xhat[j];
                            pb[j] += dyr[j];
                        }
                        // mean(g) and mean(g·x̂) over 16 lanes.
                        let mg = lanes_fold(&g, &g, |v, _| v) * inv_d;
                        let mgx = lanes_dot(&g, &xhat) * inv_d;
                        if accumulate {
                            for j in 0..d {
                                dxr[j] += rstd * (g[j] - mg - xhat[j] * mgx);
                            }
                        } else {
                            for j in 0..d {
                                dxr[j] = rstd * (g[j] - mg - xhat[j] * mgx);
                            }
                        }
                    }
                },
            );
            part
        })
        .collect();
    dw.fill(T::zero());
    db.fill(T::zero());
    for part in partials {
        let (pw, pb) = part.split_at(d);
        for (a, v) in dw.iter_mut().zip(pw) {
            *a += *v;
        }
        for (a, v) in db.iter_mut().zip(pb) {
            *a += *v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The forward and backward row loops built for each instruction set this CPU has give the
    /// baseline's bits, in f32 and f64, on widths below, at and past the 16 lanes (384: DINOv2-S).
    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        fn run<T: Real>(isa: Isa, d: usize) -> Vec<f64> {
            let rows = 7;
            let normals = soup_core::rng::SplitMix64::new(d as u64).normals(3 * rows * d + 2 * d);
            let v = |i: usize, s: f64| T::from_f64(s * normals[i]);
            let x: Vec<T> = (0..rows * d).map(|i| v(i, 3.0)).collect();
            let dy: Vec<T> = (0..rows * d).map(|i| v(rows * d + i, 1.0)).collect();
            let w: Vec<T> = (0..d).map(|i| v(3 * rows * d + i, 1.0)).collect();
            let b: Vec<T> = (0..d).map(|i| v(3 * rows * d + d + i, 1.0)).collect();
            let mut y = vec![T::zero(); rows * d];
            layer_norm_on(isa, &x, &w, &b, 1e-5, &mut y);
            // dx accumulated onto a non-zero start, as the tape does.
            let mut dx: Vec<T> = (0..rows * d).map(|i| v(2 * rows * d + i, 1.0)).collect();
            let (mut dw, mut db) = (vec![T::zero(); d], vec![T::zero(); d]);
            layer_norm_backward_on(isa, &x, &w, &dy, 1e-5, (&mut dx, true), (&mut dw, &mut db));
            [y, dx, dw, db]
                .concat()
                .iter()
                .map(|v| v.to_f64())
                .collect()
        }
        let same = |a: &[f64], b: &[f64]| {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
        };
        let isas = Isa::available();
        eprintln!("instruction sets compared: {isas:?}");
        for d in [1, 15, 16, 17, 39, 384] {
            let (base32, base64) = (run::<f32>(Isa::Baseline, d), run::<f64>(Isa::Baseline, d));
            for &isa in &isas[1..] {
                assert!(same(&run::<f32>(isa, d), &base32), "f32 {isa:?}, d = {d}");
                assert!(same(&run::<f64>(isa, d), &base64), "f64 {isa:?}, d = {d}");
            }
        }
    }
}
