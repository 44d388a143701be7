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
//!
//! One file a job: `widen` (element types), `isa` (instruction sets), `lanes` (the row loops),
//! `dots`, `combine`, `direction` and `sums` (the kernels).

mod combine;
mod direction;
mod dots;
mod isa;
mod lanes;
mod sums;
#[cfg(test)]
mod tests;
mod widen;

use dots::*;
use lanes::*;
use widen::*;

pub use combine::{combine, combine_into};
pub use direction::direction_row;
pub use dots::{dots, dots_pieces, dots_pieces_and_squares};
pub use isa::Isa;
pub use sums::{add_scaled, sum_squares};
