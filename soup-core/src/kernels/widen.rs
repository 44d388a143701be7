//! Element types: what a direction may be stored as, widened exactly to the compute type, and
//! the contiguous CPU data of a tensor.

#![allow(clippy::disallowed_methods)] // CPU only: tensors of data already on the host.

use candle_core::{Storage, Tensor, WithDType};
use half::{bf16, f16};

/// Elements per parallel task.
pub(super) const CHUNK: usize = 1 << 16;

/// An element of a direction matrix: the compute type `T` itself, or a half-precision type
/// widened (exactly) to f32.
pub(super) trait Widen<T>: WithDType {
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
pub(super) fn f16_to_f32(h: u16) -> f32 {
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
pub(super) fn with_slice<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Option<R> {
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
pub(super) fn with_slices<A: WithDType, B: WithDType, R>(
    a: &Tensor,
    b: &Tensor,
    f: impl FnOnce(&[A], &[B]) -> R,
) -> Option<R> {
    with_slice::<A, _>(a, |a| with_slice::<B, _>(b, |b| f(a, b)))?
}
