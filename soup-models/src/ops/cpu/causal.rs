//! Causal grouped-query attention on slices, forward and backward, as a Llama decoder runs it.
//! Each row of `qkv` (n sequences × t positions) holds the `heads` query heads, then the
//! `kv_heads` key heads, then as many value heads, each `d` wide; query head h reads key/value
//! head h / (heads / kv_heads) (transformers' `repeat_kv`). Position i sees positions 0 … i.
//!
//! Queries are taken in blocks of [`BLOCK`] rows: a block's scores are computed only against the
//! keys up to its last row (about half of the t × t products), and the masked entries are never
//! exponentiated (their probability is exactly 0). The backward recomputes the probabilities a
//! block at a time instead of storing them. Work is split by (sequence, query head); the key and
//! value gradients of the query heads sharing a key/value head are summed after the parallel part,
//! in head order, so no two tasks write the same element.

use gemm::Parallelism;
use rayon::prelude::*;
use soup_core::kernels::Isa;

use super::{lanes_dot, matmul, on_isa, Real, SharedMut};

/// Query rows per block.
pub(crate) const BLOCK: usize = 64;

/// The shapes of one call: sequences n, positions t, query heads, key/value heads, head width d,
/// the score scale, and the query block (tests use small ones).
#[derive(Clone, Copy, Debug)]
pub(crate) struct CausalDims {
    pub n: usize,
    pub t: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub d: usize,
    pub scale: f64,
    pub block: usize,
}

impl CausalDims {
    /// The width of a row of qkv.
    pub fn width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.d
    }

    /// Offsets into qkv of query head h's, and of its key and value heads', first column in
    /// sequence i's first row.
    fn offsets(&self, i: usize, h: usize) -> (usize, usize, usize) {
        let (w, d) = (self.width(), self.d);
        let g = h / (self.heads / self.kv_heads);
        let base = i * self.t * w;
        (
            base + h * d,
            base + (self.heads + g) * d,
            base + (self.heads + self.kv_heads + g) * d,
        )
    }

    fn check(&self, qkv: &[impl Sized]) {
        assert!(self.heads > 0 && self.kv_heads > 0 && self.d > 0 && self.block > 0);
        assert!(self.heads.is_multiple_of(self.kv_heads));
        assert_eq!(qkv.len(), self.n * self.t * self.width());
    }
}

/// P of query rows r0 … r0 + m − 1 against keys 0 … r0 + m − 1 into `p` (m × (r0 + m)): row a
/// is softmax(scale · q·kⱼ) over j ≤ r0 + a and exactly 0 beyond.
///
/// # Safety
/// `q` and `k` point at the first rows (row stride `w`) of a query and a key head inside qkv, with
/// at least r0 + m rows from there.
unsafe fn probabilities<T: Real>(
    (q, k, w): (*const T, *const T, usize),
    (r0, m, d): (usize, usize, usize),
    scale: T,
    p: &mut [T],
) {
    let keys = r0 + m;
    // SAFETY: p holds m × keys elements (the callers' buffers are block × t); q + r0·w addresses
    // m rows and k `keys` rows of d elements with row stride w, as the contract says.
    unsafe {
        matmul(
            (m, keys, d),
            (p.as_mut_ptr(), keys, 1),
            (q.add(r0 * w), w, 1),
            (k, 1, w),
            false,
            (T::zero(), scale),
            Parallelism::None,
        );
    }
    softmax_causal_on(Isa::detected(), &mut p[..m * keys], keys, r0);
}

/// Row a of `p` (rows of `keys`) ← the softmax of its first r0 + a + 1 entries, zeros after.
fn softmax_causal_on<T: Real>(isa: Isa, p: &mut [T], keys: usize, r0: usize) {
    on_isa(
        isa,
        #[inline(always)]
        || {
            for (a, row) in p.chunks_exact_mut(keys).enumerate() {
                let (seen, masked) = row.split_at_mut(r0 + a + 1);
                super::attention::softmax_row(seen);
                masked.fill(T::zero());
            }
        },
    );
}

/// O = softmax(scale · Q Kᵀ, causal) V of every sequence and query head, written into `out`
/// (n·t × heads·d, the heads side by side).
pub(crate) fn causal_attention_into<T: Real>(qkv: &[T], dims: CausalDims, out: &mut [T]) {
    dims.check(qkv);
    let CausalDims {
        n,
        t,
        heads,
        d,
        block,
        ..
    } = dims;
    let (w, e) = (dims.width(), heads * d);
    assert_eq!(out.len(), n * t * e);
    let scale = T::from_f64(dims.scale);
    let dst = SharedMut(out.as_mut_ptr());
    (0..n * heads).into_par_iter().for_each_init(
        || vec![T::zero(); block.min(t) * t],
        |p, task| {
            let (i, h) = (task / heads, task % heads);
            let (qo, ko, vo) = dims.offsets(i, h);
            let (q, k, v) = (qkv[qo..].as_ptr(), qkv[ko..].as_ptr(), qkv[vo..].as_ptr());
            for r0 in (0..t).step_by(block) {
                let m = block.min(t - r0);
                let keys = r0 + m;
                // SAFETY: the heads' offsets leave t rows of stride w inside qkv (checked sizes);
                // the destination is query head h's columns of rows r0 … r0 + m − 1 of sequence
                // i in `out`, which no other task writes; p is this task's buffer.
                unsafe {
                    probabilities((q, k, w), (r0, m, d), scale, p);
                    // O (m × d) = P (m × keys) · V (keys × d)
                    matmul(
                        (m, d, keys),
                        (dst.at((i * t + r0) * e + h * d), e, 1),
                        (p.as_ptr(), keys, 1),
                        (v, w, 1),
                        false,
                        (T::zero(), T::one()),
                        Parallelism::None,
                    );
                }
            }
        },
    );
}

/// The backward of [`causal_attention_into`]: the gradient of qkv for dO = `dout` (n·t ×
/// heads·d), written into `g` (the shape of qkv).
pub(crate) fn causal_attention_backward_into<T: Real>(
    qkv: &[T],
    dout: &[T],
    dims: CausalDims,
    g: &mut [T],
) {
    dims.check(qkv);
    let CausalDims {
        n,
        t,
        heads,
        kv_heads,
        d,
        block,
        ..
    } = dims;
    let (w, e) = (dims.width(), heads * d);
    assert!(dout.len() == n * t * e && g.len() == qkv.len());
    let scale = T::from_f64(dims.scale);
    // Per (sequence, query head): its share of dK and dV (t × d each), summed per key/value head
    // below.
    let mut parts = vec![T::zero(); n * heads * 2 * t * d];
    let dst = SharedMut(g.as_mut_ptr());
    let part_dst = SharedMut(parts.as_mut_ptr());
    (0..n * heads).into_par_iter().for_each_init(
        || {
            let size = block.min(t) * t;
            (vec![T::zero(); size], vec![T::zero(); size])
        },
        |(p, dp), task| {
            let (i, h) = (task / heads, task % heads);
            let (qo, ko, vo) = dims.offsets(i, h);
            let (q, k, v) = (qkv[qo..].as_ptr(), qkv[ko..].as_ptr(), qkv[vo..].as_ptr());
            let d_o = dout[(i * t) * e + h * d..].as_ptr();
            let (dk, dv) = (task * 2 * t * d, task * 2 * t * d + t * d);
            for r0 in (0..t).step_by(block) {
                let m = block.min(t - r0);
                let keys = r0 + m;
                // SAFETY: as in the forward, q, k, v address t rows of stride w inside qkv and
                // dO m rows of stride e from row r0 inside dout; this task alone writes query
                // head h's columns of sequence i's rows of g, and its own t × d parts of dK and
                // dV (rows below `keys`); p and dp are its m × keys buffers.
                unsafe {
                    probabilities((q, k, w), (r0, m, d), scale, p);
                    // dV (keys × d) += Pᵀ · dO
                    matmul(
                        (keys, d, m),
                        (part_dst.at(dv), d, 1),
                        (p.as_ptr(), 1, keys),
                        (d_o.add(r0 * e), e, 1),
                        true,
                        (T::one(), T::one()),
                        Parallelism::None,
                    );
                    // dP (m × keys) = dO · Vᵀ
                    matmul(
                        (m, keys, d),
                        (dp.as_mut_ptr(), keys, 1),
                        (d_o.add(r0 * e), e, 1),
                        (v, 1, w),
                        false,
                        (T::zero(), T::one()),
                        Parallelism::None,
                    );
                }
                softmax_backward_on(
                    Isa::detected(),
                    &mut dp[..m * keys],
                    &p[..m * keys],
                    keys,
                    scale,
                );
                // SAFETY: as above.
                unsafe {
                    // dQ (m × d) = dS · K
                    matmul(
                        (m, d, keys),
                        (dst.at(qo + r0 * w), w, 1),
                        (dp.as_ptr(), keys, 1),
                        (k, w, 1),
                        false,
                        (T::zero(), T::one()),
                        Parallelism::None,
                    );
                    // dK (keys × d) += dSᵀ · Q
                    matmul(
                        (keys, d, m),
                        (part_dst.at(dk), d, 1),
                        (dp.as_ptr(), 1, keys),
                        (q.add(r0 * w), w, 1),
                        true,
                        (T::one(), T::one()),
                        Parallelism::None,
                    );
                }
            }
        },
    );
    // dK and dV of key/value head c: the sum of its query heads' parts, in head order.
    let group = heads / kv_heads;
    g.par_chunks_mut(t * w).enumerate().for_each(|(i, gi)| {
        for c in 0..kv_heads {
            for (which, col) in [(0, heads + c), (1, heads + kv_heads + c)] {
                for r in 0..t {
                    let row = &mut gi[r * w + col * d..r * w + (col + 1) * d];
                    row.fill(T::zero());
                    for h in c * group..(c + 1) * group {
                        let part = ((i * heads + h) * 2 + which) * t * d;
                        for (a, &b) in row.iter_mut().zip(&parts[part + r * d..part + (r + 1) * d])
                        {
                            *a += b;
                        }
                    }
                }
            }
        }
    });
}

/// dS = scale · P ⊙ (dP − rowsum(dP ⊙ P)) in place of dP, rows of `keys`.
fn softmax_backward_on<T: Real>(isa: Isa, dp: &mut [T], p: &[T], keys: usize, scale: T) {
    on_isa(
        isa,
        #[inline(always)]
        || {
            for (dpr, pr) in dp.chunks_exact_mut(keys).zip(p.chunks_exact(keys)) {
                let dot = lanes_dot(dpr, pr);
                for (a, &b) in dpr.iter_mut().zip(pr) {
                    *a = scale * b * (*a - dot);
                }
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use soup_core::rng::SplitMix64;

    /// Causal grouped-query attention computed naively in f64, head by head.
    fn naive(qkv: &[f64], dims: CausalDims) -> Vec<f64> {
        let CausalDims { n, t, heads, d, .. } = dims;
        let w = dims.width();
        let mut out = vec![0.0; n * t * heads * d];
        for i in 0..n {
            for h in 0..heads {
                let (qo, ko, vo) = dims.offsets(i, h);
                for a in 0..t {
                    let s: Vec<f64> = (0..=a)
                        .map(|b| {
                            (0..d)
                                .map(|c| qkv[qo + a * w + c] * qkv[ko + b * w + c])
                                .sum::<f64>()
                                * dims.scale
                        })
                        .collect();
                    let max = s.iter().copied().fold(f64::MIN, f64::max);
                    let z: f64 = s.iter().map(|v| (v - max).exp()).sum();
                    for c in 0..d {
                        out[(i * t + a) * heads * d + h * d + c] = s
                            .iter()
                            .enumerate()
                            .map(|(b, v)| (v - max).exp() / z * qkv[vo + b * w + c])
                            .sum();
                    }
                }
            }
        }
        out
    }

    /// Blocks smaller than t, a last block cut short, three query heads per key/value head:
    /// values equal the naive definition, gradients equal central differences of it.
    #[test]
    fn causal_grouped_attention_is_the_definition_and_its_backward_the_derivative() {
        for (block, kv_heads) in [(3, 2), (64, 1), (1, 6)] {
            let dims = CausalDims {
                n: 2,
                t: 7,
                heads: 6,
                kv_heads,
                d: 4,
                scale: 0.5,
                block,
            };
            let mut rng = SplitMix64::new(block as u64);
            let qkv = rng.normals(dims.n * dims.t * dims.width());
            let dout = rng.normals(dims.n * dims.t * dims.heads * dims.d);
            let mut out = vec![0.0; dout.len()];
            causal_attention_into(&qkv, dims, &mut out);
            let want = naive(&qkv, dims);
            for (a, b) in out.iter().zip(&want) {
                assert!((a - b).abs() < 1e-12, "block {block}: {a} {b}");
            }
            let mut g = vec![f64::NAN; qkv.len()];
            causal_attention_backward_into(&qkv, &dout, dims, &mut g);
            let loss =
                |x: &[f64]| -> f64 { naive(x, dims).iter().zip(&dout).map(|(a, b)| a * b).sum() };
            let h = 1e-6;
            for j in 0..qkv.len() {
                let (mut up, mut down) = (qkv.clone(), qkv.clone());
                up[j] += h;
                down[j] -= h;
                let fd = (loss(&up) - loss(&down)) / (2.0 * h);
                assert!(
                    (fd - g[j]).abs() < 1e-7,
                    "block {block}, {j}: fd {fd}, backward {}",
                    g[j]
                );
            }
        }
    }

    /// The causal softmax and its backward built for each instruction set this CPU has give the
    /// baseline's bits.
    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        let (m, keys, r0) = (5, 41, 36);
        let v: Vec<f32> = SplitMix64::new(9)
            .normals(2 * m * keys)
            .iter()
            .map(|&x| 4.0 * x as f32)
            .collect();
        let run = |isa: Isa| {
            let mut p = v[..m * keys].to_vec();
            softmax_causal_on(isa, &mut p, keys, r0);
            let mut dp = v[m * keys..].to_vec();
            softmax_backward_on(isa, &mut dp, &p, keys, 0.125);
            [p, dp]
                .concat()
                .iter()
                .map(|x| x.to_bits())
                .collect::<Vec<_>>()
        };
        let base = run(Isa::Baseline);
        for &isa in &Isa::available()[1..] {
            assert!(run(isa) == base, "{isa:?} differs from the baseline");
        }
    }
}
