//! The row loops every kernel is made of: dot products in fixed lanes, and o = c + Σ x d over
//! groups of rows read side by side, each built for AVX2 and AVX-512 at run time.

#![allow(clippy::disallowed_methods)] // CPU only: tensors of data already on the host.

use candle_core::WithDType;

use super::*;

/// The independent accumulators of [`lanes_sums`]: 32 lanes, so that one step of the loop is two
/// 16-lane (AVX-512) or four 8-lane (AVX2) vector additions with no dependency between them.
pub(super) const DOT_LANES: usize = 32;

/// Σ f(a_j, b_j) with [`DOT_LANES`] independent accumulators of type `T` (vectorisable), then
/// in f64.
#[inline(always)]
pub(super) fn lanes_sum<A: Copy, B: Copy, T: WithDType>(
    a: &[A],
    b: &[B],
    f: impl Fn(A, B) -> T,
) -> f64 {
    lanes_sums([a], b, f)[0]
}

/// [`lanes_sum`] of each of the `R` rows `a` against the same `b`, in one pass over `b`: each row
/// has its own accumulators and sees the same operations in the same order as alone (the same
/// bits). The rows take turns over blocks of [`ROW_BLOCK`] elements, so that the `R` rows are
/// read side by side, `R` streams from memory at once, while each row's inner loop is the
/// one-row loop (which LLVM vectorises; an inner loop over the rows it did not, for f32 rows).
#[inline(always)]
pub(super) fn lanes_sums<A: Copy, B: Copy, T: WithDType, const R: usize>(
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
pub(super) const ROW_BLOCK: usize = 8 * DOT_LANES;

/// ⟨a_r, b⟩ for each of the `R` rows `a` ([`lanes_sums`]).
#[inline(always)]
pub(super) fn dots_rows<T: WithDType, D: Widen<T>, const R: usize>(
    a: [&[D]; R],
    b: &[T],
) -> [f64; R] {
    lanes_sums(a, b, |x, y| x.widen() * y)
}

/// o_j = s_j + Σ_r x_r · d_r,j (d widened), the terms added one row after the other in row
/// order, as `R` separate passes of o_j += x_r · d_r,j would add them (the same bits): `s` is `c`
/// where given, o itself otherwise. The rows take turns over blocks of [`ROW_BLOCK`] elements of
/// o (in L1 meanwhile), so that the `R` rows are read side by side; each turn is the one-row loop,
/// which LLVM vectorises (one loop over the rows inside it was not, for some f32 row counts).
#[inline(always)]
pub(super) fn axpys<T: WithDType, D: Widen<T>, const R: usize>(
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
pub(super) unsafe fn dots_rows_avx2<T: WithDType, D: Widen<T>, const R: usize>(
    a: [&[D]; R],
    b: &[T],
) -> [f64; R] {
    dots_rows(a, b)
}

// SAFETY (callers): the CPU has the features named.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
pub(super) unsafe fn dots_rows_avx512<T: WithDType, D: Widen<T>, const R: usize>(
    a: [&[D]; R],
    b: &[T],
) -> [f64; R] {
    dots_rows(a, b)
}

// SAFETY (callers): the CPU has the features named.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn axpys_avx2<T: WithDType, D: Widen<T>, const R: usize>(
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
pub(super) unsafe fn axpys_avx512<T: WithDType, D: Widen<T>, const R: usize>(
    o: &mut [T],
    c: Option<&[T]>,
    x: [T; R],
    d: [&[D]; R],
) {
    axpys(o, c, x, d)
}

/// [`dots_rows`] compiled for `isa`, which the CPU must have (`Isa::available`).
pub(super) fn dots_rows_on<T: WithDType, D: Widen<T>, const R: usize>(
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
pub(super) fn dot_on<T: WithDType, D: Widen<T>>(isa: Isa, a: &[D], b: &[T]) -> f64 {
    dots_rows_on(isa, [a], b)[0]
}

/// [`axpys`] compiled for `isa`, which the CPU must have.
pub(super) fn axpys_on<T: WithDType, D: Widen<T>, const R: usize>(
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
/// streams from memory at once, where one row at a time leaves a core's memory bandwidth unused.
/// The arms of the dispatch below go up to this.
pub(super) const MAX_GROUP: usize = 4;

/// ⟨r, g⟩ for each row r of `rows`, appended to `out`: [`dots_rows_on`] over groups of rows.
pub(super) fn dots_grouped_on<T: WithDType, D: Widen<T>>(
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
pub(super) fn axpys_grouped_on<T: WithDType, D: Widen<T>>(
    isa: Isa,
    o: &mut [T],
    c: &[T],
    rows: &[(T, &[D])],
) {
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
pub(super) fn dots_slices_on<T: WithDType + Widen<T>, D: Widen<T>>(
    isa: Isa,
    d: &[D],
    g: &[T],
) -> Vec<f64> {
    dots_pieces_on(isa, d, &[g]).0
}
