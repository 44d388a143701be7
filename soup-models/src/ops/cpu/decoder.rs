//! The element-wise and row-wise layers of a Llama decoder on slices, forward and backward:
//! RMSNorm, rotary positions and the SwiGLU gate. They exist for the hand-written pass of
//! `arch::llama` (`arch/tape`); candle's composed ops in `arch::llama` are their reference
//! (tests there and in `tests/llama.rs`).

use rayon::prelude::*;
use soup_core::kernels::Isa;

use super::{lanes_dot, on_isa, rows_per_task, Real};

/// y = x / √(mean(x²) + ε) · w over rows of w.len() elements.
pub(crate) fn rms_norm_into<T: Real>(x: &[T], w: &[T], eps: f64, y: &mut [T]) {
    rms_norm_on(Isa::detected(), x, w, eps, y)
}

/// 1/√(mean(x²) + ε) of one row, the squares summed over 16 lanes.
#[inline(always)]
fn rstd<T: Real>(row: &[T], eps: f64) -> T {
    let ms = lanes_dot(row, row) / T::from_f64(row.len() as f64);
    T::one() / (ms + T::from_f64(eps)).sqrt()
}

fn rms_norm_on<T: Real>(isa: Isa, x: &[T], w: &[T], eps: f64, y: &mut [T]) {
    let d = w.len();
    assert!(d > 0 && x.len() == y.len() && x.len().is_multiple_of(d));
    let chunk = rows_per_task(d) * d;
    y.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(yc, xc)| {
            on_isa(
                isa,
                #[inline(always)]
                || {
                    for (yr, xr) in yc.chunks_exact_mut(d).zip(xc.chunks_exact(d)) {
                        let r = rstd(xr, eps);
                        for j in 0..d {
                            yr[j] = xr[j] * r * w[j];
                        }
                    }
                },
            )
        });
}

/// The backward of [`rms_norm_into`] for dy: with r = 1/√(mean(x²) + ε), x̂ = x·r and
/// g = dy·w, dx = r·(g − x̂·mean(g·x̂)) written into dx (added to what it holds when its flag is
/// true), and dw = Σ_rows dy·x̂ written into dw.
pub(crate) fn rms_norm_backward_into<T: Real>(
    x: &[T],
    w: &[T],
    dy: &[T],
    eps: f64,
    (dx, accumulate): (&mut [T], bool),
    dw: &mut [T],
) {
    rms_norm_backward_on(Isa::detected(), x, w, dy, eps, (dx, accumulate), dw)
}

fn rms_norm_backward_on<T: Real>(
    isa: Isa,
    x: &[T],
    w: &[T],
    dy: &[T],
    eps: f64,
    (dx, accumulate): (&mut [T], bool),
    dw: &mut [T],
) {
    let d = w.len();
    assert!(d > 0 && dw.len() == d && x.len().is_multiple_of(d));
    assert!(dy.len() == x.len() && dx.len() == x.len());
    let chunk = rows_per_task(d) * d;
    let inv_d = T::from_f64(1.0 / d as f64);
    // Each task returns its partial dw; the partials are summed in task order.
    let partials: Vec<Vec<T>> = dx
        .par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk).zip(dy.par_chunks(chunk)))
        .map(|(dxc, (xc, dyc))| {
            let mut pw = vec![T::zero(); d];
            let (mut xhat, mut g) = (vec![T::zero(); d], vec![T::zero(); d]);
            on_isa(
                isa,
                #[inline(always)]
                || {
                    for ((dxr, xr), dyr) in dxc
                        .chunks_exact_mut(d)
                        .zip(xc.chunks_exact(d))
                        .zip(dyc.chunks_exact(d))
                    {
                        let r = rstd(xr, eps);
                        for j in 0..d {
                            xhat[j] = xr[j] * r;
                            g[j] = dyr[j] * w[j];
                            pw[j] += dyr[j] * xhat[j];
                        }
                        let mgx = lanes_dot(&g, &xhat) * inv_d;
                        if accumulate {
                            for j in 0..d {
                                dxr[j] += r * (g[j] - xhat[j] * mgx);
                            }
                        } else {
                            for j in 0..d {
                                dxr[j] = r * (g[j] - xhat[j] * mgx);
                            }
                        }
                    }
                },
            );
            pw
        })
        .collect();
    dw.fill(T::zero());
    for part in partials {
        for (a, v) in dw.iter_mut().zip(part) {
            *a += v;
        }
    }
}

/// cos and sin of the rotary angles, t positions × d/2 frequencies: angle j·θ^(−2i/d), in f32
/// as transformers' `LlamaRotaryEmbedding` computes them (so f32 models see the same angles).
pub(crate) struct Rotary<T> {
    half: usize,
    cos: Vec<T>,
    sin: Vec<T>,
}

impl<T: Real> Rotary<T> {
    pub fn new(t: usize, d: usize, theta: f64) -> Self {
        let half = d / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / (theta as f32).powf(2.0 * i as f32 / d as f32))
            .collect();
        let (mut cos, mut sin) = (Vec::with_capacity(t * half), Vec::with_capacity(t * half));
        for j in 0..t {
            for f in &inv {
                let a = j as f32 * f;
                cos.push(T::from_f64(a.cos() as f64));
                sin.push(T::from_f64(a.sin() as f64));
            }
        }
        Self { half, cos, sin }
    }

    /// Rotates `heads` heads of width d = 2·half in each row of `x` (rows of `stride` elements,
    /// the heads side by side from column 0; row r at position r mod t): x·cos + rotate_half(x)·sin
    /// with rotate_half(x) = [−x₂ | x₁]; `transpose` applies the transposed map instead (the
    /// angles negated), which is the backward.
    pub fn apply(&self, x: &mut [T], (t, stride, heads): (usize, usize, usize), transpose: bool) {
        let (half, d) = (self.half, 2 * self.half);
        assert!(heads * d <= stride && x.len().is_multiple_of(stride));
        assert!(self.cos.len() >= t * half);
        let chunk = rows_per_task(stride) * stride;
        x.par_chunks_mut(chunk).enumerate().for_each(|(c, xc)| {
            let first = c * chunk / stride;
            for (r, row) in xc.chunks_exact_mut(stride).enumerate() {
                let j = (first + r) % t;
                let (cos, sin) = (
                    &self.cos[j * half..(j + 1) * half],
                    &self.sin[j * half..(j + 1) * half],
                );
                for head in row[..heads * d].chunks_exact_mut(d) {
                    let (x1, x2) = head.split_at_mut(half);
                    for i in 0..half {
                        let (a, b) = (x1[i], x2[i]);
                        let s = if transpose { -sin[i] } else { sin[i] };
                        x1[i] = a * cos[i] - b * s;
                        x2[i] = b * cos[i] + a * s;
                    }
                }
            }
        });
    }
}

/// x·σ(x) and σ(x).
#[inline(always)]
fn silu_sigmoid<T: Real>(x: T) -> (T, T) {
    let s = T::one() / (T::one() + (-x).exp());
    (x * s, s)
}

/// The SwiGLU gate: for `gu` (rows × 2f, gate | up), y = silu(gate) ⊙ up (rows × f).
pub(crate) fn swiglu_into<T: Real>(gu: &[T], f: usize, y: &mut [T]) {
    swiglu_on(Isa::detected(), gu, f, y)
}

fn swiglu_on<T: Real>(isa: Isa, gu: &[T], f: usize, y: &mut [T]) {
    assert!(f > 0 && gu.len() == 2 * y.len() && y.len().is_multiple_of(f));
    let rows = rows_per_task(f);
    y.par_chunks_mut(rows * f)
        .zip(gu.par_chunks(rows * 2 * f))
        .for_each(|(yc, gc)| {
            on_isa(
                isa,
                #[inline(always)]
                || {
                    for (yr, gr) in yc.chunks_exact_mut(f).zip(gc.chunks_exact(2 * f)) {
                        let (gate, up) = gr.split_at(f);
                        for j in 0..f {
                            yr[j] = silu_sigmoid(gate[j]).0 * up[j];
                        }
                    }
                },
            )
        });
}

/// The backward of [`swiglu_into`] for dy (rows × f): d gate = dy·up·σ(g)·(1 + g·(1 − σ(g))),
/// d up = dy·silu(g), written into `dgu` (rows × 2f).
pub(crate) fn swiglu_backward_into<T: Real>(gu: &[T], dy: &[T], f: usize, dgu: &mut [T]) {
    swiglu_backward_on(Isa::detected(), gu, dy, f, dgu)
}

fn swiglu_backward_on<T: Real>(isa: Isa, gu: &[T], dy: &[T], f: usize, dgu: &mut [T]) {
    assert!(f > 0 && gu.len() == 2 * dy.len() && dgu.len() == gu.len());
    let rows = rows_per_task(f);
    dgu.par_chunks_mut(rows * 2 * f)
        .zip(gu.par_chunks(rows * 2 * f).zip(dy.par_chunks(rows * f)))
        .for_each(|(dc, (gc, yc))| {
            on_isa(
                isa,
                #[inline(always)]
                || {
                    for ((dr, gr), yr) in dc
                        .chunks_exact_mut(2 * f)
                        .zip(gc.chunks_exact(2 * f))
                        .zip(yc.chunks_exact(f))
                    {
                        let (gate, up) = gr.split_at(f);
                        let (dgate, dup) = dr.split_at_mut(f);
                        for j in 0..f {
                            let g = gate[j];
                            let (silu, s) = silu_sigmoid(g);
                            dgate[j] = yr[j] * up[j] * s * (T::one() + g * (T::one() - s));
                            dup[j] = yr[j] * silu;
                        }
                    }
                },
            )
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use soup_core::rng::SplitMix64;

    fn normals(n: usize, seed: u64) -> Vec<f64> {
        SplitMix64::new(seed).normals(n)
    }

    /// Central differences of Σ dy ⊙ f(x) against the backward's dx, element by element.
    fn check_dx(x: &[f64], dy: &[f64], dx: &[f64], f: impl Fn(&[f64]) -> Vec<f64>, tol: f64) {
        let h = 1e-6;
        for j in 0..x.len() {
            let (mut up, mut down) = (x.to_vec(), x.to_vec());
            up[j] += h;
            down[j] -= h;
            let l = |v: &[f64]| f(v).iter().zip(dy).map(|(a, b)| a * b).sum::<f64>();
            let fd = (l(&up) - l(&down)) / (2.0 * h);
            assert!((fd - dx[j]).abs() < tol, "{j}: fd {fd}, backward {}", dx[j]);
        }
    }

    #[test]
    fn rms_norm_is_the_definition_and_its_backward_the_derivative() {
        let (rows, d) = (3, 20);
        let (x, w, dy) = (normals(rows * d, 1), normals(d, 2), normals(rows * d, 3));
        let eps = 1e-5;
        let mut y = vec![0.0; rows * d];
        rms_norm_into(&x, &w, eps, &mut y);
        for r in 0..rows {
            let row = &x[r * d..(r + 1) * d];
            let ms = row.iter().map(|v| v * v).sum::<f64>() / d as f64;
            for j in 0..d {
                let want = row[j] / (ms + eps).sqrt() * w[j];
                assert!((y[r * d + j] - want).abs() < 1e-12);
            }
        }
        // dx accumulated onto a start of 1s.
        let mut dx = vec![1.0; rows * d];
        let mut dw = vec![0.0; d];
        rms_norm_backward_into(&x, &w, &dy, eps, (&mut dx, true), &mut dw);
        let dx: Vec<f64> = dx.iter().map(|v| v - 1.0).collect();
        let fwd = |x: &[f64]| {
            let mut y = vec![0.0; x.len()];
            rms_norm_into(x, &w, eps, &mut y);
            y
        };
        check_dx(&x, &dy, &dx, fwd, 1e-7);
        let fwd_w = |w: &[f64]| {
            let mut y = vec![0.0; x.len()];
            rms_norm_into(&x, w, eps, &mut y);
            y
        };
        check_dx(&w, &dy, &dw, fwd_w, 1e-7);
    }

    #[test]
    fn the_rotation_rotates_pairs_by_position_and_its_backward_is_the_transpose() {
        let (t, d, heads, stride) = (5, 8, 2, 20);
        let rot = Rotary::<f64>::new(t, d, 100_000.0);
        let rows = 2 * t;
        let x = normals(rows * stride, 4);
        let mut y = x.clone();
        rot.apply(&mut y, (t, stride, heads), false);
        for r in 0..rows {
            let j = r % t;
            for h in 0..heads {
                for i in 0..d / 2 {
                    let a = j as f32 * (1.0 / 100_000f32.powf(2.0 * i as f32 / d as f32));
                    let (c, s) = (a.cos() as f64, a.sin() as f64);
                    let at = |k: usize| r * stride + h * d + k;
                    let (x1, x2) = (x[at(i)], x[at(i + d / 2)]);
                    assert!((y[at(i)] - (x1 * c - x2 * s)).abs() < 1e-12);
                    assert!((y[at(i + d / 2)] - (x2 * c + x1 * s)).abs() < 1e-12);
                }
            }
            // Columns past the heads are left alone.
            assert_eq!(
                y[r * stride + heads * d..(r + 1) * stride],
                x[r * stride + heads * d..(r + 1) * stride]
            );
        }
        // The backward applies the transposed map: ⟨R x, z⟩ = ⟨x, Rᵀ z⟩. (It is the inverse only
        // as far as the f32 cos² + sin² is 1.)
        let z = normals(rows * stride, 5);
        let mut zt = z.clone();
        rot.apply(&mut zt, (t, stride, heads), true);
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(p, q)| p * q).sum::<f64>();
        assert!((dot(&y, &z) - dot(&x, &zt)).abs() < 1e-12);
    }

    #[test]
    fn swiglu_is_the_definition_and_its_backward_the_derivative() {
        let (rows, f) = (3, 7);
        let gu: Vec<f64> = normals(rows * 2 * f, 5).iter().map(|v| 3.0 * v).collect();
        let dy = normals(rows * f, 6);
        let fwd = |gu: &[f64]| {
            let mut y = vec![0.0; rows * f];
            swiglu_into(gu, f, &mut y);
            y
        };
        let y = fwd(&gu);
        for r in 0..rows {
            for j in 0..f {
                let g = gu[r * 2 * f + j];
                let want = g / (1.0 + (-g).exp()) * gu[r * 2 * f + f + j];
                assert!((y[r * f + j] - want).abs() < 1e-12);
            }
        }
        let mut dgu = vec![0.0; gu.len()];
        swiglu_backward_into(&gu, &dy, f, &mut dgu);
        check_dx(&gu, &dy, &dgu, fwd, 1e-7);
    }

    /// The loops built for each instruction set this CPU has give the baseline's bits.
    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        let (rows, d) = (9, 37);
        let v = |seed| -> Vec<f32> {
            normals(rows * 2 * d, seed)
                .iter()
                .map(|&v| v as f32)
                .collect()
        };
        let (x, dy) = (v(7), v(8));
        let run = |isa: Isa| {
            let w = &x[..d];
            let mut out = vec![vec![0.0f32; rows * d]; 2];
            rms_norm_on(isa, &x[..rows * d], w, 1e-5, &mut out[0]);
            let mut dw = vec![0.0f32; d];
            rms_norm_backward_on(
                isa,
                &x[..rows * d],
                w,
                &dy[..rows * d],
                1e-5,
                (&mut out[1], false),
                &mut dw,
            );
            let mut y = vec![0.0f32; rows * d];
            swiglu_on(isa, &x, d, &mut y);
            let mut dgu = vec![0.0f32; rows * 2 * d];
            swiglu_backward_on(isa, &x, &dy[..rows * d], d, &mut dgu);
            [out.concat(), dw, y, dgu]
                .concat()
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>()
        };
        let base = run(Isa::Baseline);
        for &isa in &Isa::available()[1..] {
            assert!(run(isa) == base, "{isa:?} differs from the baseline");
        }
    }
}
