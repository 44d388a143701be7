//! A vocabulary-sized output layer fused with its cross-entropy: logits = h Wᵀ of the rows that
//! predict a token, taken [`CHUNK`] rows at a time, each chunk's softmax turned into its
//! gradient in place and multiplied back (dh = dlogits W, dW += dlogitsᵀ h) before the next
//! chunk. Only CHUNK × vocabulary logits exist at once (a language model's full logits are
//! n·t × vocabulary), and rows that predict nothing (a sequence's last position, padding) are
//! never multiplied.

use rayon::prelude::*;
use soup_core::kernels::Isa;

use super::attention::exp_shifted;
use super::linear::{linear_backward_with, linear_into};
use super::{on_isa, Real};

/// Rows of logits held at once.
pub const CHUNK: usize = 256;

/// For each `(row, target)` of `rows`: the cross-entropy of softmax(h_row Wᵀ) against `target`,
/// for h of rows `e` wide and W (vocabulary × e).
/// Returns their sum (in f64). With `coef` = c, writes c · the gradient of that sum: dh
/// (`dh`, rows of h's width, the rows not listed left as they are) and dW, added to `dw`
/// (vocabulary × width).
pub(crate) fn next_token_loss_into<T: Real>(
    (h, e): (&[T], usize),
    w: &[T],
    rows: &[(usize, u32)],
    coef: f64,
    (dh, dw): (&mut [T], &mut [T]),
) -> f64 {
    next_token_loss_chunked((h, e), w, rows, coef, (dh, dw), CHUNK)
}

fn next_token_loss_chunked<T: Real>(
    (h, e): (&[T], usize),
    w: &[T],
    rows: &[(usize, u32)],
    coef: f64,
    (dh, dw): (&mut [T], &mut [T]),
    chunk: usize,
) -> f64 {
    assert!(e > 0 && w.len().is_multiple_of(e) && dw.len() == w.len() && dh.len() == h.len());
    let k = w.len() / e;
    assert!(rows
        .iter()
        .all(|&(r, t)| (r + 1) * e <= h.len() && (t as usize) < k));
    let chunk = chunk.max(1).min(rows.len().max(1));
    let (mut hc, mut lc, mut dhc) = (
        vec![T::zero(); chunk * e],
        vec![T::zero(); chunk * k],
        vec![T::zero(); chunk * e],
    );
    let mut loss = 0.0;
    for part in rows.chunks(chunk) {
        let m = part.len();
        for (dst, &(r, _)) in hc.chunks_exact_mut(e).zip(part) {
            dst.copy_from_slice(&h[r * e..(r + 1) * e]);
        }
        linear_into(&hc, w, None, false, (m, e, k), (&mut lc, k));
        let losses: Vec<f64> = lc[..m * k]
            .par_chunks_mut(k)
            .zip(part)
            .map(|(row, &(_, target))| softmax_loss_on(Isa::detected(), row, target as usize, coef))
            .collect();
        loss += losses.iter().sum::<f64>();
        linear_backward_with(
            &hc,
            w,
            (&lc, k),
            (m, e, k),
            Some((&mut dhc, false)),
            (dw, true),
            None,
        );
        for (src, &(r, _)) in dhc.chunks_exact(e).zip(part) {
            dh[r * e..(r + 1) * e].copy_from_slice(src);
        }
    }
    loss
}

/// −log softmax(row)[target], and row ← coef · (softmax(row) − onehot(target)) in place; the
/// maximum and the sum over 16 lanes, the loss from them in f64.
fn softmax_loss_on<T: Real>(isa: Isa, row: &mut [T], target: usize, coef: f64) -> f64 {
    on_isa(
        isa,
        #[inline(always)]
        || {
            let picked = row[target];
            let (max, sum) = exp_shifted(row);
            let scale = T::from_f64(coef) / sum;
            for v in row.iter_mut() {
                *v *= scale;
            }
            row[target] -= T::from_f64(coef);
            sum.to_f64().ln() + max.to_f64() - picked.to_f64()
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::tape::cross_entropy_and_grad;
    use soup_core::rng::SplitMix64;

    /// Chunks of 1, 2 and more than the rows: the loss and the gradients of h and W equal the
    /// f64 cross-entropy of the full logits, multiplied out.
    #[test]
    fn the_fused_loss_is_cross_entropy_of_the_full_logits() {
        let (n, e, k) = (7, 5, 37);
        let mut rng = SplitMix64::new(11);
        let h = rng.normals(n * e);
        let w = rng.normals(k * e);
        let rows: Vec<(usize, u32)> = [0, 2, 3, 6]
            .iter()
            .map(|&r| (r, rng.below(k) as u32))
            .collect();
        let logit = |r: usize, j: usize| (0..e).map(|c| h[r * e + c] * w[j * e + c]).sum::<f64>();
        let logits: Vec<f64> = rows
            .iter()
            .flat_map(|&(r, _)| (0..k).map(move |j| logit(r, j)))
            .collect();
        let labels: Vec<u32> = rows.iter().map(|&(_, t)| t).collect();
        let (mean, dlogits) = cross_entropy_and_grad(&logits, k, &labels, 0.0);
        let m = rows.len() as f64;
        for chunk in [1, 2, 100] {
            let (mut dh, mut dw) = (vec![7.0; n * e], vec![1.0; k * e]);
            let loss =
                next_token_loss_chunked((&h, e), &w, &rows, 0.5 / m, (&mut dh, &mut dw), chunk);
            assert!((loss / m - mean).abs() < 1e-12, "{chunk}: {loss} {mean}");
            for r in 0..n {
                let listed = rows.iter().position(|&(q, _)| q == r);
                for c in 0..e {
                    let want = match listed {
                        // dlogits is the gradient of the mean: × m × 0.5 / m.
                        Some(i) => (0..k)
                            .map(|j| 0.5 * dlogits[i * k + j] * w[j * e + c])
                            .sum::<f64>(),
                        None => 7.0,
                    };
                    assert!((dh[r * e + c] - want).abs() < 1e-12, "{chunk} dh[{r},{c}]");
                }
            }
            for j in 0..k {
                for c in 0..e {
                    let want = 1.0
                        + rows
                            .iter()
                            .enumerate()
                            .map(|(i, &(r, _))| 0.5 * dlogits[i * k + j] * h[r * e + c])
                            .sum::<f64>();
                    assert!((dw[j * e + c] - want).abs() < 1e-12, "{chunk} dw[{j},{c}]");
                }
            }
        }
    }

    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        let v: Vec<f32> = SplitMix64::new(3)
            .normals(1000)
            .iter()
            .map(|&x| 6.0 * x as f32)
            .collect();
        let run = |isa: Isa| {
            let mut row = v.clone();
            let loss = softmax_loss_on(isa, &mut row, 17, 0.25);
            (
                loss.to_bits(),
                row.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            )
        };
        let base = run(Isa::Baseline);
        for &isa in &Isa::available()[1..] {
            assert!(run(isa) == base, "{isa:?} differs from the baseline");
        }
    }
}
