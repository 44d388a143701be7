//! Multi-head self-attention on a packed (n, t, 3e) tensor [q | k | v]: per (image, head),
//! P = softmax(scale · Q Kᵀ), O = P V, written into (n, t, e) with the heads side by side.
//! The backward recomputes P (t × t per head, cheap) instead of storing it.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use soup_core::kernels::Isa;

use super::{data, lanes_dot, matmul, on_isa, Real, SharedMut, LANES};

/// softmax(scale · Q Kᵀ) V per head, for `qkv` (n, t, 3e) holding q, k, v along the last
/// dimension; returns (n, t, e) with head h in columns h·e/heads...
pub fn attention(qkv: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let (_, _, e3) = qkv.dims3()?;
    if heads == 0 || !e3.is_multiple_of(3 * heads) {
        bail!("attention: width {e3} is not 3 × a multiple of {heads} heads");
    }
    qkv.contiguous()?.apply_op1(Attention { heads, scale })
}

#[derive(Clone, Copy)]
struct Attention {
    heads: usize,
    scale: f64,
}

/// Shapes of one attention call: images n, tokens t, width e, head width hd.
#[derive(Clone, Copy)]
struct AttnDims {
    n: usize,
    t: usize,
    e: usize,
    hd: usize,
}

impl Attention {
    fn dims(&self, l: &Layout) -> Result<AttnDims> {
        let (n, t, e3) = l.shape().dims3()?;
        let e = e3 / 3;
        Ok(AttnDims {
            n,
            t,
            e,
            hd: e / self.heads,
        })
    }

    /// P = softmax(scale · Q_h K_hᵀ) of image i, head h, into `p` (t × t).
    fn probabilities<T: Real>(&self, qkv: &[T], d: AttnDims, i: usize, h: usize, p: &mut [T]) {
        let AttnDims { t, e, hd, .. } = d;
        let base = i * t * 3 * e + h * hd;
        // SAFETY: p is t × t (the caller's buffer); Q_h and K_h are the t × hd columns of head
        // h < heads of image i < n in qkv (n × t × 3e, hd · heads = e), read with row stride 3e.
        unsafe {
            matmul(
                (t, t, hd),
                (p.as_mut_ptr(), t, 1),
                (qkv.as_ptr().add(base), 3 * e, 1),
                (qkv.as_ptr().add(base + e), 1, 3 * e),
                false,
                (T::zero(), T::from_f64(self.scale)),
                Parallelism::None,
            );
        }
        softmax_rows_on(Isa::detected(), p, t);
    }

    /// softmax(scale · Q_h K_hᵀ) V_h of every image and head into `out` (n × t × e).
    fn forward_into<T: Real>(&self, qkv: &[T], d: AttnDims, out: &mut [T]) {
        let AttnDims { n, t, e, hd } = d;
        assert!(qkv.len() == n * t * 3 * e && out.len() == n * t * e && hd * self.heads == e);
        let dst = SharedMut(out.as_mut_ptr());
        (0..n * self.heads).into_par_iter().for_each_init(
            || vec![T::zero(); t * t],
            |p, task| {
                let (i, h) = (task / self.heads, task % self.heads);
                self.probabilities(qkv, d, i, h, p);
                // O_h (t × hd) = P (t × t) · V_h (t × hd); each task writes its own columns.
                // SAFETY: the destination is columns h·hd..(h+1)·hd of image i's rows of `out`
                // (n × t × e): no other task writes them; V_h lies inside qkv as in
                // `probabilities`, and p is this task's own t × t buffer.
                unsafe {
                    matmul(
                        (t, hd, t),
                        (dst.at(i * t * e + h * hd), e, 1),
                        (p.as_ptr(), t, 1),
                        (qkv.as_ptr().add(i * t * 3 * e + 2 * e + h * hd), 3 * e, 1),
                        false,
                        (T::zero(), T::one()),
                        Parallelism::None,
                    );
                }
            },
        );
    }

    /// The gradient of q|k|v for dO = `dout` (n × t × e), written into `g` (n × t × 3e).
    fn backward_into<T: Real>(&self, qkv: &[T], dout: &[T], d: AttnDims, g: &mut [T]) {
        let AttnDims { n, t, e, hd } = d;
        assert!(qkv.len() == n * t * 3 * e && g.len() == qkv.len() && hd * self.heads == e);
        assert_eq!(dout.len(), n * t * e);
        let scale = T::from_f64(self.scale);
        let dst = SharedMut(g.as_mut_ptr());
        (0..n * self.heads).into_par_iter().for_each_init(
            || (vec![T::zero(); t * t], vec![T::zero(); t * t]),
            |(p, dp), task| {
                let (i, h) = (task / self.heads, task % self.heads);
                self.probabilities(qkv, d, i, h, p);
                let base = i * t * 3 * e + h * hd;
                // SAFETY: base + 2e + hd ≤ (i + 1)·t·3e: the three offsets lie inside qkv.
                let (q, k, v) = unsafe {
                    (
                        qkv.as_ptr().add(base),
                        qkv.as_ptr().add(base + e),
                        qkv.as_ptr().add(base + 2 * e),
                    )
                };
                // SAFETY: dout holds n × t × e elements (checked above); i < n, h·hd < e.
                let d_o = unsafe { dout.as_ptr().add(i * t * e + h * hd) };
                // SAFETY: dV is head h's columns of image i's rows of g (n × t × 3e), written by
                // this task only; p and dp are its own t × t buffers; dO and V lie inside their
                // buffers as shown above.
                unsafe {
                    // dV (t × hd) = Pᵀ · dO
                    matmul(
                        (t, hd, t),
                        (dst.at(base + 2 * e), 3 * e, 1),
                        (p.as_ptr(), 1, t),
                        (d_o, e, 1),
                        false,
                        (T::zero(), T::one()),
                        Parallelism::None,
                    );
                    // dP (t × t) = dO · Vᵀ
                    matmul(
                        (t, t, hd),
                        (dp.as_mut_ptr(), t, 1),
                        (d_o, e, 1),
                        (v, 1, 3 * e),
                        false,
                        (T::zero(), T::one()),
                        Parallelism::None,
                    );
                }
                softmax_backward_rows_on(Isa::detected(), dp, p, t, scale);
                // SAFETY: dQ and dK are head h's columns of image i's rows of g, this task's
                // alone; dp is its t × t buffer; K and Q lie inside qkv as shown above.
                unsafe {
                    // dQ (t × hd) = dS · K
                    matmul(
                        (t, hd, t),
                        (dst.at(base), 3 * e, 1),
                        (dp.as_ptr(), t, 1),
                        (k, 3 * e, 1),
                        false,
                        (T::zero(), T::one()),
                        Parallelism::None,
                    );
                    // dK (t × hd) = dSᵀ · Q
                    matmul(
                        (t, hd, t),
                        (dst.at(base + e), 3 * e, 1),
                        (dp.as_ptr(), 1, t),
                        (q, 3 * e, 1),
                        false,
                        (T::zero(), T::one()),
                        Parallelism::None,
                    );
                }
            },
        );
    }

    fn fwd<T: Real>(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = self.dims(l)?;
        let AttnDims { n, t, e, .. } = d;
        let qkv = data::<T>(s, l, "attention")?;
        let mut out = vec![T::zero(); n * t * e];
        self.forward_into(qkv, d, &mut out);
        Ok((T::to_cpu_storage_owned(out), Shape::from((n, t, e))))
    }

    fn bwd_kernel<T: Real>(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let d = self.dims(l1)?;
        let AttnDims { n, t, e, .. } = d;
        let qkv = data::<T>(s1, l1, "attention")?;
        let dout = data::<T>(s2, l2, "attention")?;
        if dout.len() != n * t * e {
            bail!("attention backward: the gradient has shape {:?}", l2.dims());
        }
        let mut g = vec![T::zero(); n * t * 3 * e];
        self.backward_into(qkv, dout, d, &mut g);
        Ok((T::to_cpu_storage_owned(g), l1.shape().clone()))
    }
}

fn attention_fwd<T: Real>(
    op: &Attention,
    s: &CpuStorage,
    l: &Layout,
) -> Result<(CpuStorage, Shape)> {
    op.fwd::<T>(s, l)
}

fn attention_bwd<T: Real>(
    op: &Attention,
    a: (&CpuStorage, &Layout),
    b: (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    op.bwd_kernel::<T>(a, b)
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "soup-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(s, "attention", attention_fwd(self, s, l))
    }

    fn bwd(&self, qkv: &Tensor, _out: &Tensor, dout: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(qkv.apply_op2_no_bwd(
            &dout.contiguous()?,
            &AttentionBwd(*self),
        )?))
    }
}

/// (qkv, dO) → d qkv.
struct AttentionBwd(Attention);

impl CustomOp2 for AttentionBwd {
    fn name(&self) -> &'static str {
        "soup-attention-bwd"
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
            "attention backward",
            attention_bwd(&self.0, (s1, l1), (s2, l2))
        )
    }
}

/// Multi-head self-attention on slices: `qkv` (n × t × 3e, q | k | v) → `out` (n × t × e).
pub(crate) fn attention_into<T: Real>(
    qkv: &[T],
    (n, t, e): (usize, usize, usize),
    heads: usize,
    scale: f64,
    out: &mut [T],
) {
    let d = AttnDims {
        n,
        t,
        e,
        hd: e / heads,
    };
    Attention { heads, scale }.forward_into(qkv, d, out)
}

/// The backward of [`attention_into`]: d qkv (n × t × 3e) for dO (n × t × e), written into `g`.
pub(crate) fn attention_backward_into<T: Real>(
    qkv: &[T],
    dout: &[T],
    (n, t, e): (usize, usize, usize),
    heads: usize,
    scale: f64,
    g: &mut [T],
) {
    let d = AttnDims {
        n,
        t,
        e,
        hd: e / heads,
    };
    Attention { heads, scale }.backward_into(qkv, dout, d, g)
}

/// Each row of `p` (rows of t) ← its softmax ([`softmax_row`]), the loops built for `isa`.
fn softmax_rows_on<T: Real>(isa: Isa, p: &mut [T], t: usize) {
    on_isa(
        isa,
        #[inline(always)]
        || {
            for row in p.chunks_exact_mut(t) {
                softmax_row(row);
            }
        },
    );
}

/// dS = scale · P ⊙ (dP − rowsum(dP ⊙ P)) in place of dP, for rows of t, the loops built for
/// `isa` (the row sums over 16 lanes).
fn softmax_backward_rows_on<T: Real>(isa: Isa, dp: &mut [T], p: &[T], t: usize, scale: T) {
    on_isa(
        isa,
        #[inline(always)]
        || {
            for (dpr, pr) in dp.chunks_exact_mut(t).zip(p.chunks_exact(t)) {
                let dot = lanes_dot(dpr, pr);
                for (a, &b) in dpr.iter_mut().zip(pr) {
                    *a = scale * b * (*a - dot);
                }
            }
        },
    );
}

/// row ← softmax(row) in place: the maximum subtracted, e^x, divided by the sum; the maximum
/// and the sum over 16 lanes. Comparisons skip NaN as the sequential maximum did; a NaN in the
/// row makes the row NaN.
#[inline(always)]
pub(super) fn softmax_row<T: Real>(row: &mut [T]) {
    if row.is_empty() {
        return;
    }
    let (_, sum) = exp_shifted(row);
    let inv = T::one() / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// row ← e^(row − max) in place for a non-empty row; returns (max, Σ e^(row − max)), both over
/// 16 lanes (comparisons skip NaN as a sequential maximum does).
#[inline(always)]
pub(super) fn exp_shifted<T: Real>(row: &mut [T]) -> (T, T) {
    let first = row[0];
    let mut lanes = [first; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        let c: &[T; LANES] = c.try_into().expect("chunks_exact");
        for k in 0..LANES {
            if c[k] > lanes[k] {
                lanes[k] = c[k];
            }
        }
    }
    let max = lanes
        .iter()
        .chain(rest)
        .fold(first, |m, &v| if v > m { v } else { m });
    let mut acc = [T::zero(); LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        let c: &mut [T; LANES] = c.try_into().expect("chunks_exact");
        for k in 0..LANES {
            c[k] = (c[k] - max).exp();
            acc[k] += c[k];
        }
    }
    let mut sum = acc.iter().fold(T::zero(), |s, &v| s + v);
    for v in chunks.into_remainder() {
        *v = (*v - max).exp();
        sum += *v;
    }
    (max, sum)
}

#[cfg(test)]
mod lane_tests {
    use super::*;

    fn values(n: usize, salt: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + salt * 104_729) % 1000) as f32 / 50.0 - 10.0)
            .collect()
    }

    /// The 16-lane softmax and dot product against sequential f64 ones, on lengths below, at
    /// and past the lanes (257: DINOv2's tokens).
    #[test]
    fn lane_reductions_match_sequential_ones() {
        for n in [1, 2, 15, 16, 17, 50, 257] {
            let (a, b) = (values(n, 1), values(n, 2));
            let want: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            let got = lanes_dot(&a, &b) as f64;
            assert!(
                (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "dot {n}: {got} {want}"
            );

            // Spread over ±100: e^x overflows f32 unless the row's maximum is subtracted.
            let mut a: Vec<f32> = a.iter().map(|v| 10.0 * v).collect();
            a[0] = -100.0;
            let mut row = a.clone();
            softmax_row(&mut row);
            let max = a.iter().fold(f64::MIN, |m, &v| m.max(v as f64));
            let exps: Vec<f64> = a.iter().map(|&v| (v as f64 - max).exp()).collect();
            let total: f64 = exps.iter().sum();
            for (j, (&got, e)) in row.iter().zip(&exps).enumerate() {
                let want = e / total;
                assert!(
                    (got as f64 - want).abs() <= 1e-6,
                    "softmax {n} [{j}]: {got} {want}"
                );
            }
        }
        let mut empty: [f32; 0] = [];
        softmax_row(&mut empty);
        let mut with_nan = values(40, 3);
        with_nan[20] = f32::NAN;
        softmax_row(&mut with_nan);
        assert!(with_nan.iter().all(|v| v.is_nan()));
    }

    /// The softmax rows and their backward built for each instruction set this CPU has give the
    /// baseline's bits, in f32 and f64, on row lengths below, at and past the lanes (257:
    /// DINOv2's tokens).
    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        fn run<T: Real>(isa: Isa, t: usize) -> Vec<f64> {
            let rows = 5;
            let p0: Vec<T> = values(rows * t, 4)
                .iter()
                .map(|&v| T::from_f64(3.0 * v as f64))
                .collect();
            let mut p = p0.clone();
            softmax_rows_on(isa, &mut p, t);
            let mut dp: Vec<T> = values(rows * t, 5)
                .iter()
                .map(|&v| T::from_f64(v as f64))
                .collect();
            softmax_backward_rows_on(isa, &mut dp, &p, t, T::from_f64(0.125));
            p.iter().chain(&dp).map(|v| v.to_f64()).collect()
        }
        let isas = Isa::available();
        eprintln!("instruction sets compared: {isas:?}");
        for t in [1, 15, 16, 17, 50, 257] {
            let (base32, base64) = (run::<f32>(Isa::Baseline, t), run::<f64>(Isa::Baseline, t));
            for &isa in &isas[1..] {
                let same = |a: &[f64], b: &[f64]| {
                    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
                };
                assert!(same(&run::<f32>(isa, t), &base32), "f32 {isa:?}, t = {t}");
                assert!(same(&run::<f64>(isa, t), &base64), "f64 {isa:?}, t = {t}");
            }
        }
    }
}
