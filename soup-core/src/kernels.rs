//! Memory-bound CPU kernels of the MEHL step (spec §3.3): the b dot products ⟨g, d_i⟩ of one
//! block, θ = c + Σ X d, and sums of squares; and of building a hyperplane (spec §3.2): each
//! direction written from a loaded model's tensors. Each reads its operands once (a direction:
//! its model twice, for the norm first), runs on rayon in fixed chunks (results do not depend on
//! the thread count: partial sums are added in chunk order), and takes contiguous f32/f64 CPU
//! tensors; the directions may also be bf16 or f16 beside an f32 center and gradient
//! (`--direction-dtype`): each element is widened to f32, which is exact, so the result is bit
//! for bit the f32 kernel's on the widened directions. Callers fall back to candle ops otherwise
//! (`None`). Tested against those candle ops in the tests below and
//! in `verify`.

#![allow(clippy::disallowed_methods)] // CPU only: tensors of data already on the host.

use candle_core::{DType, Storage, Tensor, WithDType};
use half::{bf16, f16};
use rayon::prelude::*;

/// Elements per parallel task.
const CHUNK: usize = 1 << 16;

/// An element of a direction matrix: the compute type `T` itself, or a half-precision type
/// widened (exactly) to f32.
trait Widen<T>: WithDType {
    fn widen(self) -> T;
}

impl Widen<f32> for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Widen<f64> for f64 {
    #[inline(always)]
    fn widen(self) -> f64 {
        self
    }
}

impl Widen<f32> for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        // bf16 is the upper half of an f32.
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
}

impl Widen<f32> for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f16_to_f32(self.to_bits())
    }
}

/// The f32 of the f16 with bits `h`, exactly, as F16C's `vcvtph2ps` and `half` give it (NaNs
/// quietened). Integer and select operations only, so that loops over it vectorise:
/// `f16::to_f32` asks the CPU for F16C at every call and converts one element at a time.
#[inline(always)]
fn f16_to_f32(h: u16) -> f32 {
    let h = u32::from(h);
    let sign = (h & 0x8000) << 16;
    let exponent = h & 0x7c00;
    // Exponent and mantissa moved to their f32 places, the exponent still biased by 15.
    let em = (h & 0x7fff) << 13;
    // Normal: the exponent re-biased to 127.
    let normal = em + ((127 - 15) << 23);
    // Infinity and NaN: f32's maximum exponent, the mantissa kept, a NaN's quiet bit set.
    let quiet = if h & 0x03ff != 0 { 0x0040_0000 } else { 0 };
    let special = em | 0x7f80_0000 | quiet;
    // Zero and subnormal, m · 2⁻²⁴: (2⁻¹⁴ + m · 2⁻²⁴) − 2⁻¹⁴, both exact in f32.
    let magic = 113 << 23;
    let subnormal = (f32::from_bits(em + magic) - f32::from_bits(magic)).to_bits();
    let bits = if exponent == 0x7c00 {
        special
    } else if exponent == 0 {
        subnormal
    } else {
        normal
    };
    f32::from_bits(bits | sign)
}

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

/// Runs `f` on the contiguous CPU data of a tensor of dtype `A` and one of dtype `B`; `None`
/// otherwise.
fn with_slices<A: WithDType, B: WithDType, R>(
    a: &Tensor,
    b: &Tensor,
    f: impl FnOnce(&[A], &[B]) -> R,
) -> Option<R> {
    with_slice::<A, _>(a, |a| with_slice::<B, _>(b, |b| f(a, b)))?
}

/// The instruction sets the hot loops are compiled for, chosen once at run time from what the
/// CPU has. The arithmetic is the same in each (the eight lanes of `dot` are explicit, and Rust
/// neither reassociates nor fuses floating-point operations), so results are bit for bit equal
/// whichever runs; only the width of the vectors differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// The target's baseline (SSE2 on x86-64).
    Baseline,
    /// AVX2 and FMA (x86-64).
    Avx2,
    /// AVX-512 F/BW/VL (x86-64).
    Avx512,
}

impl Isa {
    /// The widest set this CPU has.
    pub fn detected() -> Isa {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                {
                    return Isa::Avx512;
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    return Isa::Avx2;
                }
            }
            Isa::Baseline
        })
    }

    /// Every set this CPU can run, narrowest first (for tests).
    pub fn available() -> Vec<Isa> {
        [Isa::Baseline, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|&i| i == Isa::Baseline || i as u8 <= Isa::detected() as u8)
            .collect()
    }
}

/// The independent accumulators of [`lanes_sums`]: 32 lanes, so that one step of the loop is two
/// 16-lane (AVX-512) or four 8-lane (AVX2) vector additions with no dependency between them.
const DOT_LANES: usize = 32;

/// Σ f(a_j, b_j) with [`DOT_LANES`] independent accumulators of type `T` (vectorisable), then
/// in f64.
#[inline(always)]
fn lanes_sum<A: Copy, B: Copy, T: WithDType>(a: &[A], b: &[B], f: impl Fn(A, B) -> T) -> f64 {
    lanes_sums([a], b, f)[0]
}

/// [`lanes_sum`] of each of the `R` rows `a` against the same `b`, in one pass over `b`: each row
/// has its own accumulators and sees the same operations in the same order as alone (the same
/// bits). The rows take turns over blocks of [`ROW_BLOCK`] elements, so that the `R` rows are
/// read side by side, `R` streams from memory at once, while each row's inner loop is the
/// one-row loop (which LLVM vectorises; an inner loop over the rows it did not, for f32 rows).
#[inline(always)]
fn lanes_sums<A: Copy, B: Copy, T: WithDType, const R: usize>(
    a: [&[A]; R],
    b: &[B],
    f: impl Fn(A, B) -> T,
) -> [f64; R] {
    let n = b.len();
    let a = a.map(|a| &a[..n]);
    let mut acc = [[T::zero(); DOT_LANES]; R];
    let whole = n - n % DOT_LANES;
    for (c, y) in b[..whole].chunks(ROW_BLOCK).enumerate() {
        let j = c * ROW_BLOCK;
        for (acc, a) in acc.iter_mut().zip(&a) {
            let mut lanes = *acc;
            let x = &a[j..j + y.len()];
            for (x, y) in x.chunks_exact(DOT_LANES).zip(y.chunks_exact(DOT_LANES)) {
                // Fixed-size arrays: no bounds checks in the loop below, which LLVM vectorises.
                let x: &[A; DOT_LANES] = x.try_into().expect("chunks_exact");
                let y: &[B; DOT_LANES] = y.try_into().expect("chunks_exact");
                for k in 0..DOT_LANES {
                    lanes[k] += f(x[k], y[k]);
                }
            }
            *acc = lanes;
        }
    }
    let mut sums = [0.0; R];
    for ((sum, acc), a) in sums.iter_mut().zip(&acc).zip(&a) {
        *sum = acc.iter().map(|v| v.to_f64()).sum();
        for (&x, &y) in a[whole..].iter().zip(&b[whole..]) {
            *sum += f(x, y).to_f64();
        }
    }
    sums
}

/// The elements of `b` each row of [`lanes_sums`] reads before the next row's turn (a multiple of
/// [`DOT_LANES`]; 1 KiB of f32, in L1 for the next rows).
const ROW_BLOCK: usize = 8 * DOT_LANES;

/// ⟨a_r, b⟩ for each of the `R` rows `a` ([`lanes_sums`]).
#[inline(always)]
fn dots_rows<T: WithDType, D: Widen<T>, const R: usize>(a: [&[D]; R], b: &[T]) -> [f64; R] {
    lanes_sums(a, b, |x, y| x.widen() * y)
}

/// o_j = s_j + Σ_r x_r · d_r,j (d widened), the terms added one row after the other in row
/// order, as `R` separate passes of o_j += x_r · d_r,j would add them (the same bits): `s` is `c`
/// where given, o itself otherwise. The rows take turns over blocks of [`ROW_BLOCK`] elements of
/// o (in L1 meanwhile), so that the `R` rows are read side by side; each turn is the one-row loop,
/// which LLVM vectorises (one loop over the rows inside it was not, for some f32 row counts).
#[inline(always)]
fn axpys<T: WithDType, D: Widen<T>, const R: usize>(
    o: &mut [T],
    c: Option<&[T]>,
    x: [T; R],
    d: [&[D]; R],
) {
    let n = o.len();
    let d = d.map(|d| &d[..n]);
    for (k, o) in o.chunks_mut(ROW_BLOCK).enumerate() {
        let range = k * ROW_BLOCK..k * ROW_BLOCK + o.len();
        if let Some(c) = c {
            o.copy_from_slice(&c[range.clone()]);
        }
        for (&x, d) in x.iter().zip(&d) {
            for (v, &dv) in o.iter_mut().zip(&d[range.clone()]) {
                *v += x * dv.widen();
            }
        }
    }
}

// The same loops compiled for wider vectors. SAFETY (callers): the CPU has the features named
// (`Isa::detected` checked them).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_rows_avx2<T: WithDType, D: Widen<T>, const R: usize>(
    a: [&[D]; R],
    b: &[T],
) -> [f64; R] {
    dots_rows(a, b)
}

// SAFETY (callers): the CPU has the features named.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn dots_rows_avx512<T: WithDType, D: Widen<T>, const R: usize>(
    a: [&[D]; R],
    b: &[T],
) -> [f64; R] {
    dots_rows(a, b)
}

// SAFETY (callers): the CPU has the features named.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpys_avx2<T: WithDType, D: Widen<T>, const R: usize>(
    o: &mut [T],
    c: Option<&[T]>,
    x: [T; R],
    d: [&[D]; R],
) {
    axpys(o, c, x, d)
}

// SAFETY (callers): the CPU has the features named.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn axpys_avx512<T: WithDType, D: Widen<T>, const R: usize>(
    o: &mut [T],
    c: Option<&[T]>,
    x: [T; R],
    d: [&[D]; R],
) {
    axpys(o, c, x, d)
}

/// [`dots_rows`] compiled for `isa`, which the CPU must have (`Isa::available`).
fn dots_rows_on<T: WithDType, D: Widen<T>, const R: usize>(
    isa: Isa,
    a: [&[D]; R],
    b: &[T],
) -> [f64; R] {
    match isa {
        // SAFETY: `isa` is one the CPU has (callers pass `Isa::detected()` or an available one).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { dots_rows_avx512(a, b) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { dots_rows_avx2(a, b) },
        _ => dots_rows(a, b),
    }
}

/// ⟨a, b⟩ compiled for `isa`, which the CPU must have.
fn dot_on<T: WithDType, D: Widen<T>>(isa: Isa, a: &[D], b: &[T]) -> f64 {
    dots_rows_on(isa, [a], b)[0]
}

/// [`axpys`] compiled for `isa`, which the CPU must have.
fn axpys_on<T: WithDType, D: Widen<T>, const R: usize>(
    isa: Isa,
    o: &mut [T],
    c: Option<&[T]>,
    x: [T; R],
    d: [&[D]; R],
) {
    match isa {
        // SAFETY: `isa` is one the CPU has.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { axpys_avx512(o, c, x, d) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { axpys_avx2(o, c, x, d) },
        _ => axpys(o, c, x, d),
    }
}

/// How many rows of the directions one pass reads side by side ([`lanes_sums`], [`axpys`]): several
/// streams from memory at once, where one row at a time left a core's memory bandwidth unused
/// (the projection and θ at ViT-B/32 size, b = 8, bf16: 0.094 → 0.066 s and 0.089 → 0.069 s on
/// an EPYC Zen 4). The arms of the dispatch below go up to this.
const MAX_GROUP: usize = 4;

/// ⟨r, g⟩ for each row r of `rows`, appended to `out`: [`dots_rows_on`] over groups of rows.
fn dots_grouped_on<T: WithDType, D: Widen<T>>(
    isa: Isa,
    rows: &[&[D]],
    g: &[T],
    out: &mut Vec<f64>,
) {
    for group in rows.chunks(MAX_GROUP) {
        macro_rules! arms {
            ($($r:literal),*) => {
                match group.len() {
                    $($r => out.extend(dots_rows_on::<T, D, $r>(
                        isa,
                        group.try_into().expect("length checked"),
                        g,
                    )),)*
                    _ => unreachable!("groups of at most {} rows", MAX_GROUP),
                }
            };
        }
        arms!(1, 2, 3, 4);
    }
}

/// o = c + Σ_r x_r d_r over the rows `(x_r, d_r)` in order ([`axpys_on`] over groups of rows).
fn axpys_grouped_on<T: WithDType, D: Widen<T>>(isa: Isa, o: &mut [T], c: &[T], rows: &[(T, &[D])]) {
    if rows.is_empty() {
        o.copy_from_slice(c);
    }
    for (k, group) in rows.chunks(MAX_GROUP).enumerate() {
        let c = (k == 0).then_some(c);
        let x: Vec<T> = group.iter().map(|&(x, _)| x).collect();
        let d: Vec<&[D]> = group.iter().map(|&(_, d)| d).collect();
        macro_rules! arms {
            ($($r:literal),*) => {
                match group.len() {
                    $($r => axpys_on::<T, D, $r>(
                        isa,
                        o,
                        c,
                        x[..].try_into().expect("length checked"),
                        d[..].try_into().expect("length checked"),
                    ),)*
                    _ => unreachable!("groups of at most {} rows", MAX_GROUP),
                }
            };
        }
        arms!(1, 2, 3, 4);
    }
}

#[cfg(test)]
fn dots_slices_on<T: WithDType + Widen<T>, D: Widen<T>>(isa: Isa, d: &[D], g: &[T]) -> Vec<f64> {
    dots_pieces_on(isa, d, &[g]).0
}

/// ⟨d_i, g⟩ for every row i of `d` (b × D) and `g` (D elements), in f64. `d` and `g` are both
/// f32 or both f64, or `d` is bf16/f16 and `g` f32.
pub fn dots(d: &Tensor, g: &Tensor) -> Option<Vec<f64>> {
    dots_pieces(d, std::slice::from_ref(g))
}

/// ⟨d_i, g⟩ for every row i of `d` (b × D) and the gradient g given as the concatenation of
/// `pieces` (D elements in all; a block's tensors, read where they are, without the copy a
/// concatenation would make), in f64. The dtypes as for [`dots`].
pub fn dots_pieces(d: &Tensor, pieces: &[Tensor]) -> Option<Vec<f64>> {
    dots_pieces_and_squares(d, pieces).map(|(dots, _)| dots)
}

/// [`dots_pieces`] and, from the same pass over the gradient, each piece's Σ g_j² in f64: the
/// bits [`sum_squares`] gives for that piece alone (the same chunks, summed in the same order),
/// so a global norm made from them equals `optim::global_norm` exactly.
pub fn dots_pieces_and_squares(d: &Tensor, pieces: &[Tensor]) -> Option<(Vec<f64>, Vec<f64>)> {
    let len: usize = pieces.iter().map(Tensor::elem_count).sum();
    let g_dtype = pieces.first()?.dtype();
    if d.elem_count() != d.dims().first().copied().unwrap_or(0) * len
        || pieces.iter().any(|p| p.dtype() != g_dtype)
    {
        return None;
    }
    fn run<T: WithDType + Widen<T>, D: Widen<T>>(
        d: &Tensor,
        pieces: &[Tensor],
    ) -> Option<(Vec<f64>, Vec<f64>)> {
        with_slice::<D, _>(d, |d| {
            with_many::<T, _>(pieces, |g| dots_pieces_on(Isa::detected(), d, g))
        })?
    }
    match (d.dtype(), g_dtype) {
        (DType::F32, DType::F32) => run::<f32, f32>(d, pieces),
        (DType::F64, DType::F64) => run::<f64, f64>(d, pieces),
        (DType::BF16, DType::F32) => run::<f32, bf16>(d, pieces),
        (DType::F16, DType::F32) => run::<f32, f16>(d, pieces),
        _ => None,
    }
}

/// Runs `f` on the contiguous CPU data of every tensor of `ts` as `[T]`; `None` if one is not
/// such a tensor.
fn with_many<T: WithDType, R>(ts: &[Tensor], f: impl FnOnce(&[&[T]]) -> R) -> Option<R> {
    let guards: Vec<_> = ts.iter().map(Tensor::storage_and_layout).collect();
    let mut slices = Vec::with_capacity(ts.len());
    for ((storage, layout), t) in guards.iter().zip(ts) {
        if t.dtype() != T::DTYPE {
            return None;
        }
        let (a, b) = layout.contiguous_offsets()?;
        match &**storage {
            Storage::Cpu(cpu) => slices.push(&cpu.as_slice::<T>().ok()?[a..b]),
            _ => return None,
        }
    }
    Some(f(&slices))
}

/// ⟨d_i, g⟩ for g in pieces, and each piece's Σ g_j²: the tasks are the CHUNK-long parts of
/// each piece, their partial dot products summed in order (the same result whatever the number
/// of threads).
fn dots_pieces_on<T: WithDType + Widen<T>, D: Widen<T>>(
    isa: Isa,
    d: &[D],
    pieces: &[&[T]],
) -> (Vec<f64>, Vec<f64>) {
    let len: usize = pieces.iter().map(|p| p.len()).sum();
    let rows = d.len().checked_div(len).unwrap_or(0);
    // (piece, its offset in g, the range within the piece) of every task.
    let mut tasks = Vec::new();
    let mut offset = 0;
    for (k, p) in pieces.iter().enumerate() {
        for c in 0..p.len().div_ceil(CHUNK) {
            tasks.push((k, offset, c * CHUNK..((c + 1) * CHUNK).min(p.len())));
        }
        offset += p.len();
    }
    // Per task: its piece, the b partial dot products, and the chunk's Σ g² (read while the
    // chunk is in cache for the dot products).
    let partials: Vec<(usize, Vec<f64>, f64)> = tasks
        .into_par_iter()
        .map(|(k, offset, r)| {
            let g = &pieces[k][r.clone()];
            let d_rows: Vec<&[D]> = (0..rows)
                .map(|i| {
                    let start = i * len + offset + r.start;
                    &d[start..start + g.len()]
                })
                .collect();
            let mut dots = Vec::with_capacity(rows);
            dots_grouped_on(isa, &d_rows, g, &mut dots);
            (k, dots, dot_on(isa, g, g))
        })
        .collect();
    let mut out = vec![0.0; rows];
    // Each piece's chunk sums in chunk order, as `sum_squares` adds them (a sum from −0.0).
    let mut squares: Vec<Vec<f64>> = vec![Vec::new(); pieces.len()];
    for (k, p, sq) in partials {
        for (o, v) in out.iter_mut().zip(p) {
            *o += v;
        }
        squares[k].push(sq);
    }
    (
        out,
        squares.into_iter().map(|s| s.into_iter().sum()).collect(),
    )
}

fn combine_slices<T: WithDType, D: Widen<T>>(
    c: &[T],
    d: &[D],
    x: &[f64],
    range: std::ops::Range<usize>,
) -> Vec<T> {
    let mut out = vec![T::zero(); range.len()];
    combine_into_slice(&mut out, c, d, x, range);
    out
}

fn combine_into_slice<T: WithDType, D: Widen<T>>(
    out: &mut [T],
    c: &[T],
    d: &[D],
    x: &[f64],
    range: std::ops::Range<usize>,
) {
    combine_into_slice_on(Isa::detected(), out, c, d, x, range)
}

fn combine_into_slice_on<T: WithDType, D: Widen<T>>(
    isa: Isa,
    out: &mut [T],
    c: &[T],
    d: &[D],
    x: &[f64],
    range: std::ops::Range<usize>,
) {
    let len = c.len();
    let x: Vec<T> = x.iter().map(|&v| T::from_f64(v)).collect();
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(k, o)| {
        let j0 = range.start + k * CHUNK;
        // The rows with x_i ≠ 0 (a zero term is not added: c_j = −0.0 stays −0.0).
        let rows: Vec<(T, &[D])> = x
            .iter()
            .enumerate()
            .filter(|&(_, &xi)| xi != T::zero())
            .map(|(i, &xi)| (xi, &d[i * len + j0..i * len + j0 + o.len()]))
            .collect();
        axpys_grouped_on(isa, o, &c[j0..j0 + o.len()], &rows);
    });
}

/// Runs `f` on the data of an f32 center `c` and directions `d` of dtype f32, bf16 or f16.
macro_rules! with_f32_center {
    ($c:expr, $d:expr, |$cs:ident, $ds:ident| $body:expr) => {
        match $d.dtype() {
            DType::F32 => with_slices::<f32, f32, _>($c, $d, |$cs, $ds| $body),
            DType::BF16 => with_slices::<f32, bf16, _>($c, $d, |$cs, $ds| $body),
            DType::F16 => with_slices::<f32, f16, _>($c, $d, |$cs, $ds| $body),
            _ => None,
        }
    };
}

/// c + Σ_i x_i d_i over the elements `range` of a block: `c` (D), `d` (b × D), `x` (b), as a
/// new variable of `shape` (`range.len()` elements) and of the dtype of `c`: autograd can take
/// its gradient without the copy that `Var::from_tensor` makes of a plain tensor.
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
            with_f32_center!(c, d, |cs, ds| combine_slices(cs, ds, x, range))?,
            shape,
            &dev,
        )),
        DType::F64 => var(candle_core::Var::from_vec(
            with_slices::<f64, f64, _>(c, d, |cs, ds| combine_slices(cs, ds, x, range))?,
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
        let (x, range) = (self.x, self.range.clone());
        let done = match storage {
            CpuStorage::F32(out) => with_f32_center!(self.c, self.d, |c, d| {
                combine_into_slice(&mut out[a..b], c, d, x, range)
            }),
            CpuStorage::F64(out) => with_slices::<f64, f64, _>(self.c, self.d, |c, d| {
                combine_into_slice(&mut out[a..b], c, d, x, range)
            }),
            _ => None,
        };
        match done {
            Some(()) => Ok(()),
            _ => Err(candle_core::Error::Msg(
                "combine_into: c and d must be contiguous CPU tensors of a supported pair of \
                 dtypes"
                    .into(),
            )),
        }
    }
}

/// One direction of a hyperplane written straight into row `row` of `directions` (b × D; f32,
/// bf16 or f16) from one model's block, given as its tensors `pieces` in layout order (D
/// elements in all, read where they are: no concatenated copy), and the origin `from` (the center
/// or the base; D elements): two passes over the model, no temporary of the block's size.
///
/// The first pass makes ‖m − from‖ (the differences in f32, their squares summed in f32 lanes per
/// chunk and the chunks in f64, in a fixed order). `scale` maps that norm to the factor the row
/// gets, or to `None` to leave the row as it is (a zero-norm or non-finite block). The second pass
/// writes (m − from) · scale, in f32 and then rounded (to nearest even) to the directions' dtype.
/// Returns the norm; `None` (nothing written) unless `from` and the pieces are contiguous f32 CPU
/// tensors of matching sizes and `directions` a contiguous CPU matrix of a supported dtype.
pub fn direction_row(
    directions: &Tensor,
    row: usize,
    pieces: &[Tensor],
    from: &Tensor,
    scale: impl FnOnce(f64) -> Option<f64>,
) -> Option<f64> {
    let len = from.elem_count();
    if pieces.iter().map(Tensor::elem_count).sum::<usize>() != len
        || directions.dims().len() != 2
        || directions.dims()[1] != len
        || row >= directions.dims()[0]
        || !directions.is_contiguous()
        || !directions.device().is_cpu()
        || !matches!(directions.dtype(), DType::F32 | DType::BF16 | DType::F16)
    {
        return None;
    }
    let (norm, factor) = with_slice::<f32, _>(from, |c| {
        with_many::<f32, _>(pieces, |m| {
            let norm = difference_squares(Isa::detected(), m, c).sqrt();
            (norm, scale(norm))
        })
    })??;
    if let Some(factor) = factor {
        let op = DirectionRow {
            row,
            pieces,
            from,
            factor: factor as f32,
        };
        directions.inplace_op1(&op).ok()?;
    }
    Some(norm)
}

/// Σ (m_j − c_j)² over m given as the concatenation of `pieces`: per CHUNK-long part of each
/// piece in f32 lanes, the parts summed in f64 in order.
fn difference_squares(isa: Isa, pieces: &[&[f32]], c: &[f32]) -> f64 {
    let mut tasks = Vec::new();
    let mut offset = 0;
    for (k, p) in pieces.iter().enumerate() {
        for start in (0..p.len()).step_by(CHUNK) {
            tasks.push((k, offset + start, start..(start + CHUNK).min(p.len())));
        }
        offset += p.len();
    }
    let partials: Vec<f64> = tasks
        .into_par_iter()
        .map(|(k, at, r)| {
            let m = &pieces[k][r.clone()];
            squared_distance_on(isa, m, &c[at..at + m.len()])
        })
        .collect();
    partials.into_iter().sum()
}

/// Σ (a_j − b_j)² in f32 lanes ([`lanes_sum`]).
#[inline(always)]
fn squared_distance(a: &[f32], b: &[f32]) -> f64 {
    lanes_sum(a, b, |x, y| (x - y) * (x - y))
}

// SAFETY (callers): the CPU has the features named.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn squared_distance_avx2(a: &[f32], b: &[f32]) -> f64 {
    squared_distance(a, b)
}

// SAFETY (callers): the CPU has the features named.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn squared_distance_avx512(a: &[f32], b: &[f32]) -> f64 {
    squared_distance(a, b)
}

/// [`squared_distance`] compiled for `isa`, which the CPU must have.
fn squared_distance_on(isa: Isa, a: &[f32], b: &[f32]) -> f64 {
    match isa {
        // SAFETY: `isa` is one the CPU has.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { squared_distance_avx512(a, b) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { squared_distance_avx2(a, b) },
        _ => squared_distance(a, b),
    }
}

/// A direction element from an f32 value: rounded to nearest even.
trait Narrow: WithDType {
    fn narrow(v: f32) -> Self;
}

impl Narrow for f32 {
    #[inline(always)]
    fn narrow(v: f32) -> f32 {
        v
    }
}

impl Narrow for bf16 {
    #[inline(always)]
    fn narrow(v: f32) -> bf16 {
        bf16::from_f32(v)
    }
}

impl Narrow for f16 {
    #[inline(always)]
    fn narrow(v: f32) -> f16 {
        f16::from_f32(v)
    }
}

/// out_j = narrow((m_j − c_j) · factor) for m the concatenation of `pieces`, in CHUNK-long tasks.
fn write_direction<D: Narrow>(out: &mut [D], pieces: &[&[f32]], c: &[f32], factor: f32) {
    let mut offset = 0;
    for p in pieces {
        let (o, c) = (
            &mut out[offset..offset + p.len()],
            &c[offset..offset + p.len()],
        );
        o.par_chunks_mut(CHUNK)
            .zip(p.par_chunks(CHUNK))
            .zip(c.par_chunks(CHUNK))
            .for_each(|((o, m), c)| {
                for ((o, &m), &c) in o.iter_mut().zip(m).zip(c) {
                    *o = D::narrow((m - c) * factor);
                }
            });
        offset += p.len();
    }
}

struct DirectionRow<'a> {
    row: usize,
    pieces: &'a [Tensor],
    from: &'a Tensor,
    factor: f32,
}

impl candle_core::InplaceOp1 for DirectionRow<'_> {
    fn name(&self) -> &'static str {
        "soup-direction-row"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use candle_core::CpuStorage;
        let len = self.from.elem_count();
        let (a, _) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("direction_row: not contiguous".into()))?;
        let at = a + self.row * len..a + (self.row + 1) * len;
        let factor = self.factor;
        let done = with_slice::<f32, _>(self.from, |c| {
            with_many::<f32, _>(self.pieces, |m| match storage {
                CpuStorage::F32(out) => write_direction(&mut out[at], m, c, factor),
                CpuStorage::BF16(out) => write_direction(&mut out[at], m, c, factor),
                CpuStorage::F16(out) => write_direction(&mut out[at], m, c, factor),
                _ => unreachable!("direction_row checked the dtype"),
            })
        })
        .flatten();
        done.ok_or_else(|| {
            candle_core::Error::Msg(
                "direction_row: operands are not contiguous f32 on the CPU".into(),
            )
        })
    }
}

/// acc += w · t, elementwise, in f64: `t` a contiguous CPU tensor of `acc.len()` elements of
/// dtype f32, f64, bf16 or f16. `None` (nothing added) otherwise.
pub fn add_scaled(acc: &mut [f64], w: f64, t: &Tensor) -> Option<()> {
    fn go<T: WithDType>(acc: &mut [f64], w: f64, s: &[T]) {
        acc.par_chunks_mut(CHUNK)
            .zip(s.par_chunks(CHUNK))
            .for_each(|(a, s)| {
                for (a, v) in a.iter_mut().zip(s) {
                    *a += w * v.to_f64();
                }
            });
    }
    if t.elem_count() != acc.len() {
        return None;
    }
    match t.dtype() {
        DType::F32 => with_slice::<f32, _>(t, |s| go(acc, w, s)),
        DType::F64 => with_slice::<f64, _>(t, |s| go(acc, w, s)),
        DType::BF16 => with_slice::<bf16, _>(t, |s| go(acc, w, s)),
        DType::F16 => with_slice::<f16, _>(t, |s| go(acc, w, s)),
        _ => None,
    }
}

/// Σ t_j² in f64.
pub fn sum_squares(t: &Tensor) -> Option<f64> {
    fn go<T: WithDType + Widen<T>>(s: &[T]) -> f64 {
        let isa = Isa::detected();
        let partials: Vec<f64> = s.par_chunks(CHUNK).map(|c| dot_on(isa, c, c)).collect();
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

    /// The 32-lane sum of `dot` written out one element at a time: lane j mod 32 of the whole
    /// lanes, the lanes added in f64 in order, then the rest.
    fn lane_by_lane_dot(a: &[f32], b: &[f32]) -> f64 {
        let whole = a.len() - a.len() % DOT_LANES;
        let mut acc = [0.0f32; DOT_LANES];
        for j in 0..whole {
            acc[j % DOT_LANES] += a[j] * b[j];
        }
        let mut sum: f64 = acc.iter().map(|&v| f64::from(v)).sum();
        for j in whole..a.len() {
            sum += f64::from(a[j] * b[j]);
        }
        sum
    }

    /// Rows read side by side, in groups, give each row the bits it gets alone: the dot products
    /// those of the lane-by-lane sum, θ those of adding the rows one after the other (rows with
    /// x = 0 not added: a −0.0 of c stays −0.0, an infinite element adds no NaN).
    #[test]
    fn grouped_rows_give_each_rows_own_bits() {
        let v = |seed: u64, n: usize| -> Vec<f32> {
            crate::rng::SplitMix64::new(seed)
                .normals(n)
                .into_iter()
                .map(|a| a as f32)
                .collect()
        };
        for isa in Isa::available() {
            for rows in 1..=2 * MAX_GROUP + 1 {
                for len in [1usize, 31, 32, 33, 100, 2 * ROW_BLOCK + 37] {
                    let mut d32 = v(rows as u64, rows * len);
                    // Rows 0, 3, 6, … have x = 0 and an infinite first element: added, they
                    // would make NaNs.
                    for i in (0..rows).step_by(3) {
                        d32[i * len] = f32::INFINITY;
                    }
                    let dbf: Vec<bf16> = d32.iter().map(|&a| bf16::from_f32(a)).collect();
                    let wide: Vec<f32> = dbf.iter().map(|&a| a.to_f32()).collect();
                    let g = v(100 + len as u64, len);
                    let mut c = v(200, len);
                    c[0] = -0.0;
                    let x: Vec<f32> = (0..rows)
                        .map(|i| if i % 3 == 0 { 0.0 } else { 0.5 + i as f32 })
                        .collect();
                    for (d, reference) in [(&d32, &d32), (&wide, &wide)] {
                        let row = |i: usize| &d[i * len..(i + 1) * len];
                        let all: Vec<&[f32]> = (0..rows).map(row).collect();
                        let mut got = Vec::new();
                        dots_grouped_on(isa, &all, &g, &mut got);
                        let want: Vec<f64> = (0..rows)
                            .map(|i| lane_by_lane_dot(&reference[i * len..(i + 1) * len], &g))
                            .collect();
                        assert_eq!(
                            got.iter().map(|a| a.to_bits()).collect::<Vec<_>>(),
                            want.iter().map(|a| a.to_bits()).collect::<Vec<_>>(),
                            "{isa:?}, {rows} rows of {len}"
                        );
                        let active: Vec<(f32, &[f32])> = (0..rows)
                            .filter(|&i| x[i] != 0.0)
                            .map(|i| (x[i], row(i)))
                            .collect();
                        let mut got = vec![f32::NAN; len];
                        axpys_grouped_on(isa, &mut got, &c, &active);
                        let want: Vec<f32> = (0..len)
                            .map(|j| {
                                let mut o = c[j];
                                for (xi, di) in &active {
                                    o += xi * di[j];
                                }
                                o
                            })
                            .collect();
                        assert_eq!(
                            got.iter().map(|a| a.to_bits()).collect::<Vec<_>>(),
                            want.iter().map(|a| a.to_bits()).collect::<Vec<_>>(),
                            "{isa:?}, {rows} rows of {len}"
                        );
                        // The whole kernel leaves out the rows with x = 0 itself.
                        let x64: Vec<f64> = x.iter().map(|&a| f64::from(a)).collect();
                        let mut got = vec![f32::NAN; len];
                        combine_into_slice_on(isa, &mut got, &c, d, &x64, 0..len);
                        assert_eq!(
                            got.iter().map(|a| a.to_bits()).collect::<Vec<_>>(),
                            want.iter().map(|a| a.to_bits()).collect::<Vec<_>>(),
                            "{isa:?}, {rows} rows of {len}, combine"
                        );
                    }
                    // Half-precision rows widen to the f32 rows' results.
                    let rows_bf: Vec<&[bf16]> =
                        (0..rows).map(|i| &dbf[i * len..(i + 1) * len]).collect();
                    let mut got = Vec::new();
                    dots_grouped_on(isa, &rows_bf, &g, &mut got);
                    let want: Vec<f64> = (0..rows)
                        .map(|i| lane_by_lane_dot(&wide[i * len..(i + 1) * len], &g))
                        .collect();
                    assert_eq!(got, want, "{isa:?}, bf16, {rows} rows of {len}");
                }
            }
        }
    }

    /// Every one of the 65,536 f16s widens to `half`'s f32, bit for bit (zeros, subnormals,
    /// infinities and NaNs included).
    #[test]
    fn f16_widens_as_half_does() {
        for h in 0..=u16::MAX {
            let want = f16::from_bits(h).to_f32().to_bits();
            let got = f16_to_f32(h).to_bits();
            assert_eq!(
                got, want,
                "f16 bits {h:#06x}: {got:#010x}, half gives {want:#010x}"
            );
        }
    }

    /// The vectorised builds of the loops give the baseline's bits (the CPUs that run CI have
    /// AVX2 or AVX-512; this test says which it compared).
    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        let isas = Isa::available();
        eprintln!("instruction sets compared: {isas:?}");
        let v = |seed: u64, n: usize| crate::rng::SplitMix64::new(seed).normals(n);
        for len in [1usize, 7, 8, 9, 1000, CHUNK + 13] {
            let rows = 3;
            let (d64, g64, c64) = (v(1, rows * len), v(2, len), v(3, len));
            let x = [0.25, -1.5, 0.0];
            let d32: Vec<f32> = d64.iter().map(|&a| a as f32).collect();
            let (g32, c32): (Vec<f32>, Vec<f32>) = (
                g64.iter().map(|&a| a as f32).collect(),
                c64.iter().map(|&a| a as f32).collect(),
            );
            let dbf: Vec<bf16> = d32.iter().map(|&a| bf16::from_f32(a)).collect();
            let dh: Vec<f16> = d32.iter().map(|&a| f16::from_f32(a)).collect();
            let bits64 = |v: Vec<f64>| v.iter().map(|a| a.to_bits()).collect::<Vec<_>>();
            let bits32 = |v: Vec<f32>| v.iter().map(|a| a.to_bits()).collect::<Vec<_>>();
            let run = |isa: Isa| {
                let combine32 = |d: &dyn Fn(&mut [f32])| {
                    let mut out = vec![0.0f32; len];
                    d(&mut out);
                    bits32(out)
                };
                (
                    bits64(dots_slices_on(isa, &d64, &g64)),
                    bits64(dots_slices_on(isa, &d32, &g32)),
                    bits64(dots_slices_on(isa, &dbf, &g32)),
                    bits64(dots_slices_on(isa, &dh, &g32)),
                    combine32(&|o| combine_into_slice_on(isa, o, &c32, &d32, &x, 0..len)),
                    combine32(&|o| combine_into_slice_on(isa, o, &c32, &dbf, &x, 0..len)),
                    combine32(&|o| combine_into_slice_on(isa, o, &c32, &dh, &x, 0..len)),
                    {
                        let mut out = vec![0.0f64; len];
                        combine_into_slice_on(isa, &mut out, &c64, &d64, &x, 0..len);
                        bits64(out)
                    },
                    dot_on(isa, &g32, &g32).to_bits(),
                )
            };
            let base = run(Isa::Baseline);
            for &isa in &isas[1..] {
                assert!(
                    run(isa) == base,
                    "{isa:?} differs from the baseline at length {len}"
                );
            }
        }
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
    fn dots_over_pieces_match_the_product_with_their_concatenation() {
        for lens in [
            vec![3],
            vec![1, 7, 2],
            vec![CHUNK + 9, 5, CHUNK - 1],
            vec![2 * CHUNK, CHUNK],
        ] {
            let len: usize = lens.iter().sum();
            for dtype in [DType::F32, DType::F64] {
                let d = random(len as u64, &[3, len], dtype);
                let pieces: Vec<Tensor> = lens
                    .iter()
                    .enumerate()
                    .map(|(k, &n)| random(10 + k as u64, &[n], dtype))
                    .collect();
                let g = Tensor::cat(&pieces, 0).unwrap();
                let want: Vec<f64> = d
                    .to_dtype(DType::F64)
                    .unwrap()
                    .matmul(&g.to_dtype(DType::F64).unwrap().unsqueeze(1).unwrap())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let got = dots_pieces(&d, &pieces).unwrap();
                let tol = if dtype == DType::F32 { 1e-4 } else { 1e-10 };
                for (a, b) in got.iter().zip(&want) {
                    assert!(
                        (a - b).abs() <= tol * (len as f64).sqrt(),
                        "{lens:?}: {a} vs {b}"
                    );
                }
                // One piece is `dots`, bit for bit.
                assert_eq!(dots_pieces(&d, std::slice::from_ref(&g)), dots(&d, &g));
                // Each piece's Σ g² from the same pass: `sum_squares`'s bits, piece by piece.
                let (dots_too, squares) = dots_pieces_and_squares(&d, &pieces).unwrap();
                assert_eq!(dots_too, got);
                let want: Vec<u64> = pieces
                    .iter()
                    .map(|p| sum_squares(p).unwrap().to_bits())
                    .collect();
                let squares: Vec<u64> = squares.iter().map(|v| v.to_bits()).collect();
                assert_eq!(squares, want, "{lens:?} {dtype:?}");
            }
        }
        // Pieces that do not add up to the directions' length, or of two dtypes.
        let d = random(1, &[2, 6], DType::F32);
        let a = random(2, &[4], DType::F32);
        assert!(dots_pieces(&d, std::slice::from_ref(&a)).is_none());
        let b = random(3, &[2], DType::F64);
        assert!(dots_pieces(&d, &[a.clone(), b]).is_none());
        assert!(dots_pieces(&d, &[a, random(4, &[2], DType::F32)]).is_some());
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

    #[test]
    fn half_directions_give_the_f32_kernels_results_on_the_widened_directions() {
        for dtype in [DType::BF16, DType::F16] {
            for (len, rows) in [(13, 2), (CHUNK + 5, 3)] {
                let c = random(5, &[len], DType::F32);
                let g = random(6, &[len], DType::F32);
                let d = random(7, &[rows, len], DType::F32).to_dtype(dtype).unwrap();
                let wide = d.to_dtype(DType::F32).unwrap();
                let x: Vec<f64> = (0..rows).map(|i| 0.25 - i as f64).collect();
                // Widening is exact, so the arithmetic is the same, bit for bit.
                assert_eq!(dots(&d, &g).unwrap(), dots(&wide, &g).unwrap());
                let half = combine(&c, &d, &x, 1..len, &[len - 1]).unwrap();
                let full = combine(&c, &wide, &x, 1..len, &[len - 1]).unwrap();
                let bits = |t: &Tensor| t.to_vec1::<f32>().unwrap();
                assert_eq!(bits(&half), bits(&full));
                let dst = Tensor::zeros(len - 1, DType::F32, &Device::Cpu).unwrap();
                combine_into(&dst, &c, &d, &x, 1..len).unwrap();
                assert_eq!(bits(&dst), bits(&full));
                // The result is in the center's dtype; f64 centers take f64 directions only.
                assert_eq!(half.dtype(), DType::F32);
                let c64 = c.to_dtype(DType::F64).unwrap();
                assert!(combine(&c64, &d, &x, 0..len, &[len]).is_none());
                assert!(dots(&d, &g.to_dtype(DType::F64).unwrap()).is_none());
            }
        }
    }

    /// A direction row written from a model's pieces is (m − c)·scale of the concatenation,
    /// rounded to the directions' dtype, as candle's ops make it; the norm is ‖m − c‖ to f32
    /// rounding; the other rows are untouched; a declined scale writes nothing.
    #[test]
    fn direction_rows_match_candle_ops() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for sizes in [vec![13usize], vec![CHUNK + 5, 7, 2 * CHUNK]] {
                let len: usize = sizes.iter().sum();
                let pieces: Vec<Tensor> = sizes
                    .iter()
                    .enumerate()
                    .map(|(k, &n)| random(20 + k as u64, &[n], DType::F32))
                    .collect();
                let c = random(9, &[len], DType::F32);
                let d = random(10, &[3, len], DType::F32).to_dtype(dtype).unwrap();
                let before = d.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
                let m = Tensor::cat(&pieces, 0).unwrap();
                let diff = (&m - &c).unwrap();
                let want_norm = diff
                    .to_dtype(DType::F64)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
                    .sqrt();
                let mut seen = None;
                let norm = direction_row(&d, 1, &pieces, &c, |n| {
                    seen = Some(n);
                    Some(1.0 / n)
                })
                .unwrap();
                assert_eq!(seen, Some(norm));
                assert!(
                    (norm - want_norm).abs() <= 1e-6 * want_norm,
                    "{norm} {want_norm}"
                );
                let want = diff
                    .affine(1.0 / norm, 0.0)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let after = d.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
                assert_eq!(after[1], want, "{dtype:?} {sizes:?}");
                assert_eq!((&after[0], &after[2]), (&before[0], &before[2]));
                // Declined: the row keeps its values.
                let norm2 = direction_row(&d, 0, &pieces, &c, |_| None).unwrap();
                assert_eq!(norm2, norm);
                assert_eq!(
                    d.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap()[0],
                    before[0]
                );
            }
        }
        // Unsupported: f64 models, a row past the end, sizes that do not add up.
        let c = random(1, &[8], DType::F32);
        let d = Tensor::zeros((2, 8), DType::F32, &Device::Cpu).unwrap();
        let p = [random(2, &[8], DType::F32)];
        let p64 = [p[0].to_dtype(DType::F64).unwrap()];
        assert!(direction_row(&d, 0, &p64, &c, |_| Some(1.0)).is_none());
        assert!(direction_row(&d, 2, &p, &c, |_| Some(1.0)).is_none());
        assert!(direction_row(&d, 0, &p[..0], &c, |_| Some(1.0)).is_none());
        assert_eq!(d.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }

    /// The squared distance of every instruction set gives the baseline's bits.
    #[test]
    fn squared_distances_agree_across_instruction_sets() {
        let v = |seed: u64, n: usize| -> Vec<f32> {
            crate::rng::SplitMix64::new(seed)
                .normals(n)
                .iter()
                .map(|&a| a as f32)
                .collect()
        };
        for len in [1usize, 31, 32, 33, 1000] {
            let (a, b) = (v(1, len), v(2, len));
            let naive: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| f64::from((x - y) * (x - y)))
                .sum();
            for isa in Isa::available() {
                let got = squared_distance_on(isa, &a, &b);
                assert_eq!(got.to_bits(), squared_distance(&a, &b).to_bits(), "{isa:?}");
                assert!((got - naive).abs() <= 1e-5 * naive, "{got} {naive}");
            }
        }
    }
}
