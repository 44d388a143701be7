//! ⟨g, d_i⟩ for every direction of a block (the projection of spec §3.3).

#![allow(clippy::disallowed_methods)] // CPU only: tensors of data already on the host.

use candle_core::{DType, Storage, Tensor, WithDType};
use half::{bf16, f16};
use rayon::prelude::*;

use super::*;

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
pub(super) fn with_many<T: WithDType, R>(ts: &[Tensor], f: impl FnOnce(&[&[T]]) -> R) -> Option<R> {
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
pub(super) fn dots_pieces_on<T: WithDType + Widen<T>, D: Widen<T>>(
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
