//! Sums of a tensor: scaled into an f64 accumulator, or of its squares.

#![allow(clippy::disallowed_methods)] // CPU only: tensors of data already on the host.

use candle_core::{DType, Tensor, WithDType};
use half::{bf16, f16};
use rayon::prelude::*;

use super::*;

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
