//! Fused CPU kernels with hand-written backward passes, as candle custom ops: linear (x Wᵀ + b),
//! LayerNorm, quick-GELU and multi-head attention over a packed q|k|v tensor.
//!
//! Why: candle's autograd builds every gradient as `zeros + add` per graph node, runs most
//! element-wise ops on one thread, and the weight gradient of `x.matmul(&w.t())` arrives
//! transposed (a strided add). One node per layer operation, with backward passes that write
//! contiguous results, multi-threaded with rayon, removes most of that (BENCHMARKS.md).
//!
//! Every op takes contiguous f32 or f64 tensors on the CPU ([`supported`]); `ops.rs` falls back to
//! the composed reference ops elsewhere. Each is tested against those references (values and
//! gradients) in `tests/kernels.rs`.

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
    WithDType,
};
use gemm::Parallelism;
use rayon::prelude::*;

/// Whether the fused kernels handle `t` (CPU, f32 or f64).
pub fn supported(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// The float types of the kernels.
pub trait Real: WithDType + std::ops::Neg<Output = Self> {
    /// e^x: for f32 [`exp_f32`] (vectorisable, relative error below 3e-7), for f64 the libm one.
    fn exp(self) -> Self;
    fn sqrt(self) -> Self;
}

/// e^x in f32 without a libm call, so that loops over it vectorise (Cephes' expf: x = n·ln 2 + r,
/// |r| ≤ ln 2 / 2, e^r by a degree-7 polynomial; the rounding of x·log2(e) to n uses the 1.5·2²³
/// trick, which needs no SSE4.1). Relative error below 3e-7 on [−87, 88]; inputs are clamped
/// there (e^−87 ≈ 1.6e−38, e^88 ≈ 1.7e38), NaN stays NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + MAGIC) - MAGIC;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

impl Real for f32 {
    fn exp(self) -> Self {
        exp_f32(self)
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
}

impl Real for f64 {
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
}

/// The contiguous data of a storage/layout pair.
fn data<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => bail!("{op}: the input is not contiguous"),
    }
}

/// Calls `$f::<T>` for the dtype of a storage (f32 or f64).
macro_rules! dispatch {
    ($storage:expr, $op:expr, $f:ident ( $($arg:expr),* )) => {
        match $storage {
            CpuStorage::F32(_) => $f::<f32>($($arg),*),
            CpuStorage::F64(_) => $f::<f64>($($arg),*),
            _ => bail!("{}: only f32 and f64 are supported", $op),
        }
    };
}

/// Threads for the large matrix products: candle's own setting (RAYON_NUM_THREADS or the cores).
fn parallelism() -> Parallelism {
    match candle_core::utils::get_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// Rows per parallel task so that each task gets about 64 K elements (at least one row).
fn rows_per_task(row_len: usize) -> usize {
    (65_536 / row_len.max(1)).max(1)
}

/// A raw pointer that parallel tasks may share: each task writes a disjoint part.
#[derive(Clone, Copy)]
struct SharedMut<T>(*mut T);
// SAFETY: the wrapped pointer is only written through `at` by parallel tasks that each write a
// disjoint range of one buffer, which outlives the parallel loop; the values are `Send`.
unsafe impl<T: Send> Send for SharedMut<T> {}
// SAFETY: as for `Send`: no two tasks touch the same element, so sharing the pointer is sound.
unsafe impl<T: Send> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// The pointer, `offset` elements on (a method, so closures capture the Sync wrapper).
    ///
    /// # Safety
    /// `offset` must stay within the buffer the pointer was taken from.
    unsafe fn at(self, offset: usize) -> *mut T {
        self.0.add(offset)
    }
}

/// dst (m × n, row stride dst_rs) = alpha·dst + beta·lhs·rhs, with every operand given by its
/// pointer, row stride and column stride.
///
/// # Safety
/// Each pointer with its strides must address valid elements of an m × n (dst), m × k (lhs) and
/// k × n (rhs) matrix for the whole call; dst must not overlap lhs or rhs, and no other thread
/// may touch the elements of dst meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul<T: 'static>(
    (m, n, k): (usize, usize, usize),
    dst: (*mut T, usize, usize),
    lhs: (*const T, usize, usize),
    rhs: (*const T, usize, usize),
    read_dst: bool,
    (alpha, beta): (T, T),
    parallelism: Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst.0,
        dst.2 as isize,
        dst.1 as isize,
        read_dst,
        lhs.0,
        lhs.2 as isize,
        lhs.1 as isize,
        rhs.0,
        rhs.2 as isize,
        rhs.1 as isize,
        alpha,
        beta,
        false,
        false,
        false,
        parallelism,
    )
}

// ---------------------------------------------------------------------------------------------
// Linear: y = x Wᵀ + b, x (rows × in), W (out × in), b (out).

/// x Wᵀ + b for a 2-D x; without a bias, x Wᵀ.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let b = match b {
        Some(b) => b.contiguous()?,
        None => Tensor::zeros(w.dim(0)?, w.dtype(), w.device())?,
    };
    x.contiguous()?.apply_op3(&w.contiguous()?, &b, Linear)
}

struct Linear;

fn linear_dims(x: &Layout, w: &Layout, b: &Layout) -> Result<(usize, usize, usize)> {
    let (rows, inp) = x.shape().dims2()?;
    let (out, win) = w.shape().dims2()?;
    if win != inp || b.shape().elem_count() != out {
        bail!(
            "linear: x {:?}, weight {:?}, bias {:?} do not fit",
            x.dims(),
            w.dims(),
            b.dims()
        );
    }
    Ok((rows, inp, out))
}

fn linear_fwd<T: Real>(
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let (rows, inp, out) = linear_dims(l1, l2, l3)?;
    let (x, w, b) = (
        data::<T>(s1, l1, "linear")?,
        data::<T>(s2, l2, "linear")?,
        data::<T>(s3, l3, "linear")?,
    );
    let mut y: Vec<T> = Vec::with_capacity(rows * out);
    for _ in 0..rows {
        y.extend_from_slice(b);
    }
    // SAFETY: y holds rows × out (filled above), x rows × in and w out × in (their lengths come
    // from the shapes checked by `data`); y is a fresh buffer.
    unsafe {
        matmul(
            (rows, out, inp),
            (y.as_mut_ptr(), out, 1),
            (x.as_ptr(), inp, 1),
            (w.as_ptr(), 1, inp),
            true,
            (T::one(), T::one()),
            parallelism(),
        );
    }
    Ok((T::to_cpu_storage_owned(y), Shape::from((rows, out))))
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "soup-linear"
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
        dispatch!(s1, "linear", linear_fwd((s1, l1), (s2, l2), (s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (rows, inp) = x.dims2()?;
        let out = w.dim(0)?;
        // The input of a first layer (images) needs no gradient: skip its product.
        let with_dx = x.track_op();
        let packed = x.apply_op3_no_bwd(w, &dy.contiguous()?, &LinearBwd { with_dx })?;
        let dx = match with_dx {
            true => Some(packed.narrow(0, 0, rows * inp)?.reshape((rows, inp))?),
            false => None,
        };
        let dw = packed
            .narrow(0, rows * inp, out * inp)?
            .reshape((out, inp))?;
        let db = match b.track_op() {
            true => Some(
                packed
                    .narrow(0, (rows + out) * inp, out)?
                    .reshape(b.shape())?,
            ),
            false => None,
        };
        Ok((dx, Some(dw), db))
    }
}

/// (x, W, dy) → [dx = dy W | dW = dyᵀ x | db = Σ_rows dy], packed in one vector (dx left zero
/// unless `with_dx`).
struct LinearBwd {
    with_dx: bool,
}

fn linear_bwd<T: Real>(
    with_dx: bool,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let (rows, inp) = l1.shape().dims2()?;
    let (out, _) = l2.shape().dims2()?;
    if l3.shape().dims2()? != (rows, out) {
        bail!("linear backward: the gradient has shape {:?}", l3.dims());
    }
    let (x, w, dy) = (
        data::<T>(s1, l1, "linear")?,
        data::<T>(s2, l2, "linear")?,
        data::<T>(s3, l3, "linear")?,
    );
    let total = rows * inp + out * inp + out;
    let mut g: Vec<T> = vec![T::zero(); total];
    let (dx, rest) = g.split_at_mut(rows * inp);
    let (dw, db) = rest.split_at_mut(out * inp);
    // SAFETY: dx (rows × in) and dw (out × in) are disjoint slices of g of exactly those sizes;
    // dy is rows × out, x rows × in and w out × in, as `data` checked against the shapes.
    unsafe {
        // dx (rows × in) = dy (rows × out) · W (out × in)
        if with_dx {
            matmul(
                (rows, inp, out),
                (dx.as_mut_ptr(), inp, 1),
                (dy.as_ptr(), out, 1),
                (w.as_ptr(), inp, 1),
                false,
                (T::zero(), T::one()),
                parallelism(),
            );
        }
        // dW (out × in) = dyᵀ (out × rows) · x (rows × in)
        matmul(
            (out, inp, rows),
            (dw.as_mut_ptr(), inp, 1),
            (dy.as_ptr(), 1, out),
            (x.as_ptr(), inp, 1),
            false,
            (T::zero(), T::one()),
            parallelism(),
        );
    }
    for row in dy.chunks_exact(out) {
        for (d, &v) in db.iter_mut().zip(row) {
            *d += v;
        }
    }
    Ok((T::to_cpu_storage_owned(g), Shape::from(total)))
}

impl CustomOp3 for LinearBwd {
    fn name(&self) -> &'static str {
        "soup-linear-bwd"
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
            "linear backward",
            linear_bwd(self.with_dx, (s1, l1), (s2, l2), (s3, l3))
        )
    }
}

// ---------------------------------------------------------------------------------------------
// LayerNorm over the last dimension: y = (x − μ)/√(σ² + ε) · w + b.

/// LayerNorm of x over its last dimension, with weight and bias of that length.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, LayerNorm { eps })
}

struct LayerNorm {
    eps: f64,
}

/// μ and 1/√(σ² + ε) of one row (two passes, as the composed reference).
fn moments<T: Real>(row: &[T], eps: f64) -> (T, T) {
    let d = T::from_f64(row.len() as f64);
    let mut sum = T::zero();
    for &v in row {
        sum += v;
    }
    let mean = sum / d;
    let mut sq = T::zero();
    for &v in row {
        let c = v - mean;
        sq += c * c;
    }
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
    let chunk = rows_per_task(d) * d;
    y.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(yc, xc)| {
            for (yr, xr) in yc.chunks_exact_mut(d).zip(xc.chunks_exact(d)) {
                let (mean, rstd) = moments(xr, eps);
                for j in 0..d {
                    yr[j] = (xr[j] - mean) * rstd * w[j] + b[j];
                }
            }
        });
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
    let chunk = rows_per_task(d) * d;
    let inv_d = T::from_f64(1.0 / d as f64);
    // Each task returns its partial [dw | db]; the partials are summed in task order.
    let partials: Vec<Vec<T>> = dx
        .par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk).zip(dy.par_chunks(chunk)))
        .map(|(dxc, (xc, dyc))| {
            let mut part = vec![T::zero(); 2 * d];
            let (pw, pb) = part.split_at_mut(d);
            let mut xhat = vec![T::zero(); d];
            for ((dxr, xr), dyr) in dxc
                .chunks_exact_mut(d)
                .zip(xc.chunks_exact(d))
                .zip(dyc.chunks_exact(d))
            {
                let (mean, rstd) = moments(xr, eps);
                let (mut mg, mut mgx) = (T::zero(), T::zero());
                for j in 0..d {
                    xhat[j] = (xr[j] - mean) * rstd;
                    let gj = dyr[j] * w[j];
                    mg += gj;
                    mgx += gj * xhat[j];
                    pw[j] += dyr[j] * xhat[j];
                    pb[j] += dyr[j];
                }
                mg *= inv_d;
                mgx *= inv_d;
                for j in 0..d {
                    dxr[j] = rstd * (dyr[j] * w[j] - mg - xhat[j] * mgx);
                }
            }
            part
        })
        .collect();
    for part in partials {
        for (a, v) in dwb.iter_mut().zip(part) {
            *a += v;
        }
    }
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

// ---------------------------------------------------------------------------------------------
// quick-GELU: y = x·σ(1.702 x), y' = σ + 1.702·x·σ·(1 − σ).

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

// ---------------------------------------------------------------------------------------------
// Multi-head self-attention on a packed (n, t, 3e) tensor [q | k | v]: per (image, head),
// P = softmax(scale · Q Kᵀ), O = P V, written into (n, t, e) with the heads side by side.
// The backward recomputes P (t × t per head, cheap) instead of storing it.

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
        for row in p.chunks_exact_mut(t) {
            let max = row
                .iter()
                .copied()
                .fold(row[0], |m, v| if v > m { v } else { m });
            let mut sum = T::zero();
            for v in row.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            let inv = T::one() / sum;
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
    }

    fn fwd<T: Real>(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = self.dims(l)?;
        let AttnDims { n, t, e, hd } = d;
        let qkv = data::<T>(s, l, "attention")?;
        let mut out = vec![T::zero(); n * t * e];
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
        Ok((T::to_cpu_storage_owned(out), Shape::from((n, t, e))))
    }

    fn bwd_kernel<T: Real>(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let d = self.dims(l1)?;
        let AttnDims { n, t, e, hd } = d;
        let qkv = data::<T>(s1, l1, "attention")?;
        let dout = data::<T>(s2, l2, "attention")?;
        if dout.len() != n * t * e {
            bail!("attention backward: the gradient has shape {:?}", l2.dims());
        }
        let scale = T::from_f64(self.scale);
        let mut g = vec![T::zero(); n * t * 3 * e];
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
                // dS = scale · P ⊙ (dP − rowsum(dP ⊙ P)), in place of dP.
                for (dpr, pr) in dp.chunks_exact_mut(t).zip(p.chunks_exact(t)) {
                    let mut dot = T::zero();
                    for (&a, &b) in dpr.iter().zip(pr) {
                        dot += a * b;
                    }
                    for (a, &b) in dpr.iter_mut().zip(pr) {
                        *a = scale * b * (*a - dot);
                    }
                }
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

// ---------------------------------------------------------------------------------------------
// In-place y ← y + a·x (a plain SGD update without a new tensor).

/// y ← y + a·x in place, for contiguous y and x of the same shape. Not differentiable.
pub fn axpy_inplace(y: &Tensor, a: f64, x: &Tensor) -> Result<()> {
    if y.shape() != x.shape() || !y.is_contiguous() {
        bail!("axpy: y {:?} (contiguous) and x {:?}", y.dims(), x.dims());
    }
    y.inplace_op2(&x.contiguous()?, &Axpy { a })
}

struct Axpy {
    a: f64,
}

fn axpy_slices<T: Real>(y: &mut [T], x: &[T], a: f64) {
    let a = T::from_f64(a);
    y.par_chunks_mut(65_536)
        .zip(x.par_chunks(65_536))
        .for_each(|(yc, xc)| {
            for (y, &x) in yc.iter_mut().zip(xc) {
                *y += a * x;
            }
        });
}

impl candle_core::InplaceOp2 for Axpy {
    fn name(&self) -> &'static str {
        "soup-axpy"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (a, b) = match l1.contiguous_offsets() {
            Some(r) => r,
            None => bail!("axpy: y is not contiguous"),
        };
        match (s1, s2) {
            (CpuStorage::F32(y), CpuStorage::F32(_)) => {
                axpy_slices(&mut y[a..b], data::<f32>(s2, l2, "axpy")?, self.a)
            }
            (CpuStorage::F64(y), CpuStorage::F64(_)) => {
                axpy_slices(&mut y[a..b], data::<f64>(s2, l2, "axpy")?, self.a)
            }
            _ => bail!("axpy: only f32 and f64 of one dtype are supported"),
        }
        Ok(())
    }
}
