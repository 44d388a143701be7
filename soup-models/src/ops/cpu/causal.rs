//! Causal grouped-query attention on slices, forward and backward, as a Llama decoder runs it.
//! Each row of `qkv` (n sequences × t positions) holds the `heads` query heads, then the
//! `kv_heads` key heads, then as many value heads, each `d` wide; query head h reads key/value
//! head h / (heads / kv_heads) (transformers' `repeat_kv`). Position i sees positions 0 … i.
//!
//! The work is split into tasks of (sequence, key/value head, block of [`BLOCK`] query rows):
//! the query heads sharing the key/value head are stacked into one matrix, so each product
//! reads K and V once for all of them; a block's scores are computed only against the keys up to
//! its last row (about half of the t × t products), and the masked entries are never
//! exponentiated (their probability is exactly 0). The backward recomputes the probabilities
//! instead of storing them; each task writes its own share of dK and dV, summed per key/value
//! head after the parallel part, in block order, so no two tasks write the same element and the
//! result does not depend on the threads.

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
    #[cfg(test)]
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

/// One task's rows: sequence i, key/value head c, and the query block starting at row r0 with m
/// rows (every query head of the group: `group` · m stacked rows).
#[derive(Clone, Copy)]
struct Task {
    i: usize,
    c: usize,
    r0: usize,
    m: usize,
}

impl CausalDims {
    /// Query heads per key/value head.
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// Every (sequence, key/value head, query block), in that order.
    fn tasks(&self) -> Vec<Task> {
        let mut tasks = Vec::new();
        for i in 0..self.n {
            for c in 0..self.kv_heads {
                for r0 in (0..self.t).step_by(self.block) {
                    let m = self.block.min(self.t - r0);
                    tasks.push(Task { i, c, r0, m });
                }
            }
        }
        tasks
    }

    /// The first element of sequence i's row r, column `col` of qkv.
    fn at(&self, i: usize, r: usize, col: usize) -> usize {
        (i * self.t + r) * self.width() + col
    }
}

/// Copies rows r0 … r0 + m − 1 of the group's query heads out of `src` (rows of `stride`, query
/// head h at column `col0` + h·d) into `dst` (group·m × d, head by head).
fn gather<T: Copy>(
    (src, stride, col0): (&[T], usize, usize),
    dims: &CausalDims,
    task: Task,
    dst: &mut [T],
) {
    let (d, group) = (dims.d, dims.group());
    for j in 0..group {
        let h = task.c * group + j;
        for a in 0..task.m {
            let at = (task.i * dims.t + task.r0 + a) * stride + col0 + h * d;
            dst[(j * task.m + a) * d..(j * task.m + a + 1) * d].copy_from_slice(&src[at..at + d]);
        }
    }
}

/// The inverse of [`gather`]: rows of `src` (group·m × d) into the heads' columns of `dst`.
///
/// # Safety
/// `dst` points at a buffer of n·t rows of `stride` elements; no other thread writes the rows
/// r0 … r0 + m − 1 of the group's query heads' columns meanwhile.
unsafe fn scatter<T: Copy>(
    src: &[T],
    dims: &CausalDims,
    task: Task,
    (dst, stride, col0): (SharedMut<T>, usize, usize),
) {
    let (d, group) = (dims.d, dims.group());
    for j in 0..group {
        let h = task.c * group + j;
        for a in 0..task.m {
            let at = (task.i * dims.t + task.r0 + a) * stride + col0 + h * d;
            let row = &src[(j * task.m + a) * d..(j * task.m + a + 1) * d];
            // SAFETY: `at` + d lies inside dst's n·t rows (the contract), and the caller's task
            // owns these elements.
            unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), dst.at(at), d) };
        }
    }
}

/// P of the task's stacked query rows `qs` (group·m × d) against keys 0 … r0 + m − 1 into `p`
/// (group·m × keys): row a of each head is softmax(scale · q·kⱼ) over j ≤ r0 + a and exactly 0
/// beyond.
fn probabilities<T: Real>(qkv: &[T], dims: &CausalDims, task: Task, qs: &[T], p: &mut [T]) {
    let (d, w, rows) = (dims.d, dims.width(), dims.group() * task.m);
    let keys = task.r0 + task.m;
    let k = &qkv[dims.at(task.i, 0, (dims.heads + task.c) * d)..];
    assert!(qs.len() >= rows * d && p.len() >= rows * keys && k.len() >= (keys - 1) * w + d);
    // SAFETY: p holds rows × keys and qs rows × d elements (asserted); k addresses `keys` rows of
    // d elements with row stride w inside qkv (asserted).
    unsafe {
        matmul(
            (rows, keys, d),
            (p.as_mut_ptr(), keys, 1),
            (qs.as_ptr(), d, 1),
            (k.as_ptr(), 1, w),
            false,
            (T::zero(), T::from_f64(dims.scale)),
            Parallelism::None,
        );
    }
    softmax_causal_on(
        Isa::detected(),
        &mut p[..rows * keys],
        (keys, task.m),
        task.r0,
    );
}

/// Row a (mod `m`) of `p` (rows of `keys`) ← the softmax of its first r0 + a + 1 entries, zeros
/// after.
fn softmax_causal_on<T: Real>(isa: Isa, p: &mut [T], (keys, m): (usize, usize), r0: usize) {
    on_isa(
        isa,
        #[inline(always)]
        || {
            for (a, row) in p.chunks_exact_mut(keys).enumerate() {
                let (seen, masked) = row.split_at_mut(r0 + a % m + 1);
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
    let (d, w, e) = (dims.d, dims.width(), dims.heads * dims.d);
    assert_eq!(out.len(), dims.n * dims.t * e);
    let most = dims.group() * dims.block.min(dims.t);
    let dst = SharedMut(out.as_mut_ptr());
    dims.tasks().into_par_iter().for_each_init(
        || {
            let z = T::zero();
            (vec![z; most * d], vec![z; most * dims.t], vec![z; most * d])
        },
        |(qs, p, os), task| {
            let rows = dims.group() * task.m;
            let keys = task.r0 + task.m;
            gather((qkv, w, 0), &dims, task, qs);
            probabilities(qkv, &dims, task, qs, p);
            let v = &qkv[dims.at(task.i, 0, (dims.heads + dims.kv_heads + task.c) * d)..];
            assert!(v.len() >= (keys - 1) * w + d);
            // SAFETY: os holds rows × d and p rows × keys elements; v addresses `keys` rows of d
            // elements with stride w (asserted). The scatter writes rows r0 … r0 + m − 1 of this
            // group's query heads in `out` (n·t × e), which only this task writes.
            unsafe {
                // O (rows × d) = P (rows × keys) · V (keys × d)
                matmul(
                    (rows, d, keys),
                    (os.as_mut_ptr(), d, 1),
                    (p.as_ptr(), keys, 1),
                    (v.as_ptr(), w, 1),
                    false,
                    (T::zero(), T::one()),
                    Parallelism::None,
                );
                scatter(&os[..rows * d], &dims, task, (dst, e, 0));
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
        ..
    } = dims;
    let (w, e) = (dims.width(), heads * d);
    assert!(dout.len() == n * t * e && g.len() == qkv.len());
    let scale = T::from_f64(dims.scale);
    let tasks = dims.tasks();
    // Each task's dK and dV over its keys (r0 + m rows of d each), at these offsets of `parts`;
    // summed per key/value head after the parallel part, in task order.
    let mut offsets = Vec::with_capacity(tasks.len() + 1);
    offsets.push(0);
    for task in &tasks {
        offsets.push(offsets.last().copied().unwrap_or(0) + 2 * (task.r0 + task.m) * d);
    }
    let mut parts = vec![T::zero(); offsets.last().copied().unwrap_or(0)];
    let most = dims.group() * dims.block.min(t);
    let dst = SharedMut(g.as_mut_ptr());
    let part_dst = SharedMut(parts.as_mut_ptr());
    (0..tasks.len()).into_par_iter().for_each_init(
        || {
            let z = T::zero();
            let (qs, dos, dqs) = (vec![z; most * d], vec![z; most * d], vec![z; most * d]);
            (qs, dos, dqs, vec![z; most * t], vec![z; most * t])
        },
        |(qs, dos, dqs, p, dp), index| {
            let task = tasks[index];
            let rows = dims.group() * task.m;
            let keys = task.r0 + task.m;
            gather((qkv, w, 0), &dims, task, qs);
            gather((dout, e, 0), &dims, task, dos);
            probabilities(qkv, &dims, task, qs, p);
            let kc = &qkv[dims.at(task.i, 0, (heads + task.c) * d)..];
            let vc = &qkv[dims.at(task.i, 0, (heads + kv_heads + task.c) * d)..];
            assert!(vc.len() >= (keys - 1) * w + d && kc.len() > vc.len());
            let (dk, dv) = (offsets[index], offsets[index] + keys * d);
            // SAFETY: the buffers hold rows × d, rows × keys (p, dp) elements; K and V address
            // `keys` rows of d with stride w (asserted); this task alone writes its parts
            // (offsets[index] … offsets[index + 1]).
            unsafe {
                // dV (keys × d) = Pᵀ · dO
                matmul(
                    (keys, d, rows),
                    (part_dst.at(dv), d, 1),
                    (p.as_ptr(), 1, keys),
                    (dos.as_ptr(), d, 1),
                    false,
                    (T::zero(), T::one()),
                    Parallelism::None,
                );
                // dP (rows × keys) = dO · Vᵀ
                matmul(
                    (rows, keys, d),
                    (dp.as_mut_ptr(), keys, 1),
                    (dos.as_ptr(), d, 1),
                    (vc.as_ptr(), 1, w),
                    false,
                    (T::zero(), T::one()),
                    Parallelism::None,
                );
            }
            softmax_backward_on(
                Isa::detected(),
                &mut dp[..rows * keys],
                &p[..rows * keys],
                keys,
                scale,
            );
            // SAFETY: as above; the scatter writes rows r0 … r0 + m − 1 of this group's query
            // heads in g, which only this task writes.
            unsafe {
                // dQ (rows × d) = dS · K
                matmul(
                    (rows, d, keys),
                    (dqs.as_mut_ptr(), d, 1),
                    (dp.as_ptr(), keys, 1),
                    (kc.as_ptr(), w, 1),
                    false,
                    (T::zero(), T::one()),
                    Parallelism::None,
                );
                scatter(&dqs[..rows * d], &dims, task, (dst, w, 0));
                // dK (keys × d) = dSᵀ · Q
                matmul(
                    (keys, d, rows),
                    (part_dst.at(dk), d, 1),
                    (dp.as_ptr(), 1, keys),
                    (qs.as_ptr(), d, 1),
                    false,
                    (T::zero(), T::one()),
                    Parallelism::None,
                );
            }
        },
    );
    // dK and dV of key/value head c: the sum of its blocks' parts, in block order.
    g.par_chunks_mut(t * w).enumerate().for_each(|(i, gi)| {
        for c in 0..kv_heads {
            for (which, col) in [(0, heads + c), (1, heads + kv_heads + c)] {
                for r in 0..t {
                    gi[r * w + col * d..r * w + (col + 1) * d].fill(T::zero());
                }
                for (index, task) in tasks.iter().enumerate() {
                    if task.i != i || task.c != c {
                        continue;
                    }
                    let keys = task.r0 + task.m;
                    let part = &parts[offsets[index] + which * keys * d..][..keys * d];
                    for (r, src) in part.chunks_exact(d).enumerate() {
                        let row = &mut gi[r * w + col * d..r * w + (col + 1) * d];
                        for (a, &b) in row.iter_mut().zip(src) {
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
            softmax_causal_on(isa, &mut p, (keys, m), r0);
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
