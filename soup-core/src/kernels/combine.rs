//! θ = c + Σ X d (spec §3.3).

#![allow(clippy::disallowed_methods)] // CPU only: tensors of data already on the host.

use candle_core::{DType, Tensor, WithDType};
use half::{bf16, f16};
use rayon::prelude::*;

use super::*;

pub(super) fn combine_slices<T: WithDType, D: Widen<T>>(
    c: &[T],
    d: &[D],
    x: &[f64],
    range: std::ops::Range<usize>,
) -> Vec<T> {
    let mut out = vec![T::zero(); range.len()];
    combine_into_slice(&mut out, c, d, x, range);
    out
}

pub(super) fn combine_into_slice<T: WithDType, D: Widen<T>>(
    out: &mut [T],
    c: &[T],
    d: &[D],
    x: &[f64],
    range: std::ops::Range<usize>,
) {
    combine_into_slice_on(Isa::detected(), out, c, d, x, range)
}

pub(super) fn combine_into_slice_on<T: WithDType, D: Widen<T>>(
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

pub(super) struct CombineInto<'a> {
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
