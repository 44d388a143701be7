//! Memory-bound CPU kernels of the MEHL step (spec §3.3): the b dot products ⟨g, d_i⟩ of one
//! block, θ = c + Σ X d, and sums of squares. Each reads its operands once, runs on rayon in
//! fixed chunks (results do not depend on the thread count: partial sums are added in chunk
//! order), and takes contiguous f32/f64 CPU tensors; callers fall back to candle ops otherwise
//! (`None`). Tested against those candle ops in the tests below and in `verify`.

use candle_core::{DType, Storage, Tensor, WithDType};
use rayon::prelude::*;

/// Elements per parallel task.
const CHUNK: usize = 1 << 16;

/// Runs `f` on the contiguous CPU data of `t` as `[T]`; `None` if `t` is not such a tensor.
fn with_slice<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Option<R> {
    if t.dtype() != T::DTYPE {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let (a, b) = layout.contiguous_offsets()?;
    match &*storage {
        Storage::Cpu(cpu) => Some(f(&cpu.as_slice::<T>().ok()?[a..b])),
        _ => None,
    }
}

/// Runs `f` on the contiguous CPU data of two tensors of dtype `T`; `None` otherwise.
fn with_slices<T: WithDType, R>(
    a: &Tensor,
    b: &Tensor,
    f: impl FnOnce(&[T], &[T]) -> R,
) -> Option<R> {
    with_slice::<T, _>(a, |a| with_slice::<T, _>(b, |b| f(a, b)))?
}

/// Σ a_j b_j with eight independent accumulators (vectorisable), then in f64.
fn dot<T: WithDType>(a: &[T], b: &[T]) -> f64 {
    let mut acc = [T::zero(); 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut sum: f64 = acc.iter().map(|v| v.to_f64()).sum();
    for (x, y) in ra.iter().zip(rb) {
        sum += (*x * *y).to_f64();
    }
    sum
}

fn dots_slices<T: WithDType>(d: &[T], g: &[T]) -> Vec<f64> {
    let len = g.len();
    let rows = d.len().checked_div(len).unwrap_or(0);
    let partials: Vec<Vec<f64>> = (0..len.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| {
            let r = c * CHUNK..((c + 1) * CHUNK).min(len);
            (0..rows)
                .map(|i| dot(&d[i * len..(i + 1) * len][r.clone()], &g[r.clone()]))
                .collect()
        })
        .collect();
    let mut out = vec![0.0; rows];
    for p in partials {
        for (o, v) in out.iter_mut().zip(p) {
            *o += v;
        }
    }
    out
}

/// ⟨d_i, g⟩ for every row i of `d` (b × D) and `g` (D elements), in f64.
pub fn dots(d: &Tensor, g: &Tensor) -> Option<Vec<f64>> {
    if d.elem_count() != d.dims().first().copied().unwrap_or(0) * g.elem_count() {
        return None;
    }
    match d.dtype() {
        DType::F32 => with_slices::<f32, _>(d, g, dots_slices),
        DType::F64 => with_slices::<f64, _>(d, g, dots_slices),
        _ => None,
    }
}

fn combine_slices<T: WithDType>(
    c: &[T],
    d: &[T],
    x: &[f64],
    range: std::ops::Range<usize>,
) -> Vec<T> {
    let mut out = vec![T::zero(); range.len()];
    combine_into_slice(&mut out, c, d, x, range);
    out
}

fn combine_into_slice<T: WithDType>(
    out: &mut [T],
    c: &[T],
    d: &[T],
    x: &[f64],
    range: std::ops::Range<usize>,
) {
    let len = c.len();
    let x: Vec<T> = x.iter().map(|&v| T::from_f64(v)).collect();
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(k, o)| {
        let j0 = range.start + k * CHUNK;
        o.copy_from_slice(&c[j0..j0 + o.len()]);
        for (i, &xi) in x.iter().enumerate() {
            if xi != T::zero() {
                let di = &d[i * len + j0..i * len + j0 + o.len()];
                for (v, &dv) in o.iter_mut().zip(di) {
                    *v += xi * dv;
                }
            }
        }
    });
}

/// c + Σ_i x_i d_i over the elements `range` of a block: `c` (D), `d` (b × D), `x` (b), as a
/// new variable of `shape` (`range.len()` elements): autograd can take its gradient without the
/// copy that `Var::from_tensor` makes of a plain tensor.
pub fn combine(
    c: &Tensor,
    d: &Tensor,
    x: &[f64],
    range: std::ops::Range<usize>,
    shape: &[usize],
) -> Option<Tensor> {
    if d.elem_count() != x.len() * c.elem_count() || range.end > c.elem_count() {
        return None;
    }
    let dev = c.device().clone();
    let var = |v: candle_core::Result<candle_core::Var>| v.ok().map(candle_core::Var::into_inner);
    match c.dtype() {
        DType::F32 => var(candle_core::Var::from_vec(
            with_slices::<f32, _>(c, d, |cs, ds| combine_slices(cs, ds, x, range))?,
            shape,
            &dev,
        )),
        DType::F64 => var(candle_core::Var::from_vec(
            with_slices::<f64, _>(c, d, |cs, ds| combine_slices(cs, ds, x, range))?,
            shape,
            &dev,
        )),
        _ => None,
    }
}

/// [`combine`] written into `dst` in place (its old values are overwritten): `dst` must be a
/// contiguous CPU tensor of `range.len()` elements and of the dtype of `c`, and must not share
/// its storage with `c` or `d`. `None` (nothing written) otherwise.
pub fn combine_into(
    dst: &Tensor,
    c: &Tensor,
    d: &Tensor,
    x: &[f64],
    range: std::ops::Range<usize>,
) -> Option<()> {
    if d.elem_count() != x.len() * c.elem_count()
        || range.end > c.elem_count()
        || dst.elem_count() != range.len()
        || dst.dtype() != c.dtype()
        || d.dtype() != c.dtype()
        || !dst.is_contiguous()
        || !dst.device().is_cpu()
    {
        return None;
    }
    let op = CombineInto { c, d, x, range };
    dst.inplace_op1(&op).ok()
}

struct CombineInto<'a> {
    c: &'a Tensor,
    d: &'a Tensor,
    x: &'a [f64],
    range: std::ops::Range<usize>,
}

impl candle_core::InplaceOp1 for CombineInto<'_> {
    fn name(&self) -> &'static str {
        "soup-combine-into"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use candle_core::CpuStorage;
        let (a, b) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("combine_into: not contiguous".into()))?;
        let done = match storage {
            CpuStorage::F32(out) => with_slices::<f32, _>(self.c, self.d, |c, d| {
                combine_into_slice(&mut out[a..b], c, d, self.x, self.range.clone())
            }),
            CpuStorage::F64(out) => with_slices::<f64, _>(self.c, self.d, |c, d| {
                combine_into_slice(&mut out[a..b], c, d, self.x, self.range.clone())
            }),
            _ => None,
        };
        match done {
            Some(()) => Ok(()),
            _ => Err(candle_core::Error::Msg(
                "combine_into: c and d must be contiguous CPU tensors".into(),
            )),
        }
    }
}

/// Σ t_j² in f64.
pub fn sum_squares(t: &Tensor) -> Option<f64> {
    fn go<T: WithDType>(s: &[T]) -> f64 {
        let partials: Vec<f64> = s.par_chunks(CHUNK).map(|c| dot(c, c)).collect();
        partials.into_iter().sum()
    }
    match t.dtype() {
        DType::F32 => with_slice::<f32, _>(t, go),
        DType::F64 => with_slice::<f64, _>(t, go),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn random(seed: u64, shape: &[usize], dtype: DType) -> Tensor {
        let n = shape.iter().product();
        let v = crate::rng::SplitMix64::new(seed).normals(n);
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    #[test]
    fn dots_match_a_matrix_vector_product() {
        // Lengths around the chunk size and the eight lanes.
        for (len, rows) in [(1, 1), (7, 3), (CHUNK + 9, 5), (3 * CHUNK, 2)] {
            for dtype in [DType::F32, DType::F64] {
                let d = random(len as u64, &[rows, len], dtype);
                let g = random(1 + len as u64, &[len], dtype);
                let want: Vec<f64> = d
                    .to_dtype(DType::F64)
                    .unwrap()
                    .matmul(&g.to_dtype(DType::F64).unwrap().unsqueeze(1).unwrap())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let got = dots(&d, &g).unwrap();
                let tol = if dtype == DType::F32 { 1e-4 } else { 1e-10 };
                for (a, b) in got.iter().zip(&want) {
                    assert!((a - b).abs() <= tol * (len as f64).sqrt(), "{a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn combine_matches_candle_ops() {
        for (len, rows) in [(5, 1), (CHUNK + 3, 4)] {
            let c = random(3, &[len], DType::F64);
            let d = random(4, &[rows, len], DType::F64);
            let x: Vec<f64> = (0..rows).map(|i| i as f64 - 1.5).collect();
            let xs = Tensor::from_vec(x.clone(), (1, rows), &Device::Cpu).unwrap();
            let want = (xs.matmul(&d).unwrap().squeeze(0).unwrap() + &c).unwrap();
            let got = combine(&c, &d, &x, 0..len, &[len]).unwrap();
            let err: f64 = (got - &want)
                .unwrap()
                .abs()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(err < 1e-12, "{err}");
            // In place into an existing tensor: the same values.
            let dst = Tensor::zeros(len, DType::F64, &Device::Cpu).unwrap();
            combine_into(&dst, &c, &d, &x, 0..len).unwrap();
            let err: f64 = (&dst - &want)
                .unwrap()
                .abs()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(err < 1e-12, "{err}");
            assert!(combine_into(&dst.to_dtype(DType::F32).unwrap(), &c, &d, &x, 0..len).is_none());
            // A sub-range is the same elements.
            let part = combine(&c, &d, &x, 2..len, &[len - 2]).unwrap();
            let tail = want.narrow(0, 2, len - 2).unwrap();
            let err: f64 = (part - tail)
                .unwrap()
                .abs()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(err < 1e-12, "{err}");
        }
    }

    #[test]
    fn sum_squares_and_unsupported_inputs() {
        let t = random(9, &[3, CHUNK + 1], DType::F32);
        let want: f64 = t
            .to_dtype(DType::F64)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        let got = sum_squares(&t).unwrap();
        assert!((got - want).abs() < 1e-6 * want, "{got} vs {want}");
        // Non-contiguous and other dtypes go back to candle's ops.
        assert!(sum_squares(&t.t().unwrap()).is_none());
        assert!(sum_squares(&t.to_dtype(DType::BF16).unwrap()).is_none());
        let g = random(1, &[4], DType::F32);
        assert!(dots(&random(2, &[2, 5], DType::F32), &g).is_none());
    }
}
