//! Fused CPU kernels with hand-written backward passes, as candle custom ops: linear (x Wᵀ + b),
//! LayerNorm, quick-GELU, exact GELU and multi-head attention over a packed q|k|v tensor; and on
//! slices only, for a Llama decoder's hand-written pass, RMSNorm, rotary positions, SwiGLU and
//! causal grouped-query attention (`decoder`, `causal`).
//!
//! Why: candle's autograd builds every gradient as `zeros + add` per graph node, runs most
//! element-wise ops on one thread, and the weight gradient of `x.matmul(&w.t())` arrives
//! transposed (a strided add). One node per layer operation, with backward passes that write
//! contiguous results, multi-threaded with rayon, removes most of that (BENCHMARKS.md).
//!
//! Every op takes contiguous f32 or f64 tensors on the CPU ([`supported`]); `crate::ops` falls back to
//! the composed reference ops elsewhere. Each is tested against those references (values and
//! gradients) in `tests/kernels.rs`.

use candle_core::{bail, CpuStorage, DType, Layout, Result, Tensor, WithDType};
use gemm::Parallelism;
use rayon::prelude::*;
use soup_core::kernels::Isa;

/// Whether the fused kernels handle `t` (CPU, f32 or f64).
pub fn supported(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// The float types of the kernels.
pub trait Real: WithDType + std::ops::Neg<Output = Self> {
    /// e^x: for f32 [`exp_f32`] (vectorisable, relative error below 3e-7), for f64 the libm one.
    fn exp(self) -> Self;
    fn sqrt(self) -> Self;
    /// The exact GELU x·Φ(x) and its derivative Φ(x) + x·φ(x): for f32 from [`normal_cdf_f32`]
    /// (vectorisable), for f64 through erf in f64 (`gelu::normal_cdf`).
    fn gelu(self) -> Self;
    fn gelu_derivative(self) -> Self;
}

/// e^x in f32 without a libm call, so that loops over it vectorise (Cephes' expf: x = n·ln 2 + r,
/// |r| ≤ ln 2 / 2, e^r by a degree-7 polynomial; the rounding of x·log2(e) to n uses the 1.5·2²³
/// trick, which needs no SSE4.1). Relative error below 3e-7 on [−87, 88]; inputs are clamped
/// there (e^−87 ≈ 1.6e−38, e^88 ≈ 1.7e38), NaN stays NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    let x = x.clamp(-87.0, 88.0);
    // n = round(x·log2 e), held in the low mantissa bits of `shifted` as 2^22 + n.
    let shifted = x * std::f32::consts::LOG2_E + MAGIC;
    let n = shifted - MAGIC;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n from those bits, by integer operations only: they vectorise, where Rust's float-to-int
    // cast (saturating, NaN to 0) ran one lane at a time.
    let biased = shifted
        .to_bits()
        .wrapping_sub(MAGIC.to_bits())
        .wrapping_add(127);
    e * f32::from_bits(biased << 23)
}

/// Φ(x), the standard normal CDF, in f32 without a libm call, so that loops over it vectorise:
/// Φ(x) = ½ erfc(|x|/√2) for x < 0 and 1 − ½ erfc(x/√2) otherwise (no cancellation in the lower
/// tail), erfc(z) = t·e^(−z² + P(t)) with t = 1/(1 + z/2) and P the degree-9 Chebyshev fit of
/// Numerical Recipes' `erfcc` (fractional error below 1.2e-7 in exact arithmetic), e^ by
/// [`exp_f32`]. Relative error below 1e-5 on [−10, 10], growing with x² through e^(−z²) (tested
/// against erfc in f64).
#[inline(always)]
pub fn normal_cdf_f32(x: f32) -> f32 {
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + 0.5 * z);
    let mut p = 0.170_872_77_f32;
    p = p * t - 0.822_152_23;
    p = p * t + 1.488_515_9;
    p = p * t - 1.135_204;
    p = p * t + 0.278_868_07;
    p = p * t - 0.186_288_06;
    p = p * t + 0.096_784_18;
    p = p * t + 0.374_091_96;
    p = p * t + 1.000_023_7;
    p = p * t - 1.265_512_2;
    let half_erfc = 0.5 * t * exp_f32(p - z * z);
    if x < 0.0 {
        half_erfc
    } else {
        1.0 - half_erfc
    }
}

/// Runs `f` compiled for instruction set `isa` (which the CPU must have: `Isa::detected()` or one
/// of `Isa::available()`): `f`, marked `#[inline(always)]`, is inlined into a function built for
/// those features, so its loops vectorise to their width. The arithmetic is the same in each (Rust
/// neither reassociates nor fuses floating-point operations), so the results are the same bits.
#[inline(always)]
pub(crate) fn on_isa<R>(isa: Isa, f: impl FnOnce() -> R) -> R {
    match isa {
        // SAFETY: the CPU has AVX-512 F/BW/VL (callers pass a detected or available set).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { on_avx512(f) },
        // SAFETY: the CPU has AVX2 and FMA, as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { on_avx2(f) },
        _ => f(),
    }
}

// SAFETY (callers): the CPU has the features named.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn on_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

// SAFETY (callers): the CPU has the features named.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn on_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// The independent lanes of the kernels' row reductions (attention's softmax and dS, LayerNorm): sequential sums and maxima do not
/// vectorise (floating-point addition is not reassociated), 16 accumulators over fixed-size
/// chunks do (one AVX-512 register of f32).
const LANES: usize = 16;

/// Σ a_j b_j over 16 lanes, then the lanes and the remainder in order.
#[inline(always)]
fn lanes_dot<T: Real>(a: &[T], b: &[T]) -> T {
    lanes_fold(a, b, |x, y| x * y)
}

/// Σ f(a_j, b_j) over [`LANES`] independent accumulators (vectorisable), then the lanes and the
/// remainder in order.
#[inline(always)]
fn lanes_fold<T: Real>(a: &[T], b: &[T], f: impl Fn(T, T) -> T) -> T {
    let mut acc = [T::zero(); LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        let x: &[T; LANES] = x.try_into().expect("chunks_exact");
        let y: &[T; LANES] = y.try_into().expect("chunks_exact");
        for k in 0..LANES {
            acc[k] += f(x[k], y[k]);
        }
    }
    let mut sum = acc.iter().fold(T::zero(), |s, &v| s + v);
    for (&x, &y) in ra.iter().zip(rb) {
        sum += f(x, y);
    }
    sum
}

/// 1/√(2π).
const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

impl Real for f32 {
    fn exp(self) -> Self {
        exp_f32(self)
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    #[inline(always)]
    fn gelu(self) -> Self {
        self * normal_cdf_f32(self)
    }
    #[inline(always)]
    fn gelu_derivative(self) -> Self {
        let pdf = INV_SQRT_2PI as f32 * exp_f32(-0.5 * self * self);
        normal_cdf_f32(self) + self * pdf
    }
}

impl Real for f64 {
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn gelu(self) -> Self {
        self * gelu::normal_cdf(self)
    }
    fn gelu_derivative(self) -> Self {
        gelu::normal_cdf(self) + self * (INV_SQRT_2PI * (-0.5 * self * self).exp())
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

// One file per fused kernel; each uses the helpers above (declared after `dispatch!`,
// which they need in scope).
mod attention;
#[cfg(feature = "openblas")]
mod blas;
mod causal;
mod decoder;
mod gelu;
mod layer_norm;
mod linear;
mod sgemm;
mod vocab;

pub use attention::attention;
pub use gelu::{gelu, quick_gelu};
pub use layer_norm::layer_norm;
pub use linear::linear;
pub use sgemm::{sgemm, GemmKernels};
/// Rows of vocabulary-sized logits a language model's fused head holds at once.
pub use vocab::CHUNK as VOCAB_CHUNK_ROWS;

/// The kernels on plain slices (what the tensor ops above run), for the hand-written
/// whole-model backward passes of `arch` (`arch/tape`).
pub(crate) mod slices {
    pub(crate) use super::attention::{attention_backward_into, attention_into};
    pub(crate) use super::causal::{
        causal_attention_backward_into, causal_attention_into, CausalDims, BLOCK,
    };
    pub(crate) use super::decoder::{
        rms_norm_backward_into, rms_norm_into, swiglu_backward_into, swiglu_into, Rotary,
    };
    pub(crate) use super::gelu::{
        gelu_backward_into, gelu_into, quick_gelu_backward_into, quick_gelu_into,
    };
    pub(crate) use super::layer_norm::{layer_norm_backward_into, layer_norm_into};
    pub(crate) use super::linear::{linear_backward_into, linear_into};
    pub(crate) use super::vocab::next_token_loss_into;
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
// SAFETY: an unsafe fn whose contract is the "# Safety" section above; it only forwards the
// pointers to `gemm::gemm`, whose requirements are that same contract.
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
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
        let f = |v: &T| -> f32 {
            // SAFETY: T is f32 (checked above): the same type, read by value.
            unsafe { std::mem::transmute_copy(v) }
        };
        // The products that run on every thread go to OpenBLAS where it is built in; those of
        // one task among many (attention's per-head products) stay on the gemm crate,
        // single-threaded.
        #[cfg(feature = "openblas")]
        if !matches!(parallelism, Parallelism::None) {
            // SAFETY: T is f32, so the pointers address f32 elements; the contract is forwarded.
            let done = unsafe {
                blas::sgemm(
                    (m, n, k),
                    (dst.0.cast(), dst.1, dst.2),
                    (lhs.0.cast(), lhs.1, lhs.2),
                    (rhs.0.cast(), rhs.1, rhs.2),
                    read_dst,
                    (f(&alpha), f(&beta)),
                )
            };
            if done {
                return;
            }
        }
        // SAFETY: T is f32, so the pointers address f32 elements; the contract is forwarded, and
        // `GemmKernels::current` only names kernels this CPU runs.
        unsafe {
            sgemm::sgemm(
                sgemm::GemmKernels::current(),
                (m, n, k),
                (dst.0.cast(), dst.2 as isize, dst.1 as isize),
                read_dst,
                (lhs.0.cast(), lhs.2 as isize, lhs.1 as isize),
                (rhs.0.cast(), rhs.2 as isize, rhs.1 as isize),
                (f(&alpha), f(&beta)),
                parallelism,
            )
        };
        return;
    }
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
