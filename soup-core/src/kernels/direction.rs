//! Each direction written from a loaded model's tensors (spec §3.2): its norm, then its scaled
//! and rounded row.

#![allow(clippy::disallowed_methods)] // CPU only: tensors of data already on the host.

use candle_core::{DType, Tensor, WithDType};
use half::{bf16, f16};
use rayon::prelude::*;

use super::*;

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
pub(super) fn difference_squares(isa: Isa, pieces: &[&[f32]], c: &[f32]) -> f64 {
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
pub(super) fn squared_distance(a: &[f32], b: &[f32]) -> f64 {
    lanes_sum(a, b, |x, y| (x - y) * (x - y))
}

// SAFETY (callers): the CPU has the features named.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn squared_distance_avx2(a: &[f32], b: &[f32]) -> f64 {
    squared_distance(a, b)
}

// SAFETY (callers): the CPU has the features named.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
pub(super) unsafe fn squared_distance_avx512(a: &[f32], b: &[f32]) -> f64 {
    squared_distance(a, b)
}

/// [`squared_distance`] compiled for `isa`, which the CPU must have.
pub(super) fn squared_distance_on(isa: Isa, a: &[f32], b: &[f32]) -> f64 {
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
pub(super) trait Narrow: WithDType {
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
pub(super) fn write_direction<D: Narrow>(out: &mut [D], pieces: &[&[f32]], c: &[f32], factor: f32) {
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

pub(super) struct DirectionRow<'a> {
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
