//! Hand-written whole-model backward passes: a forward pass on plain slices that keeps what its
//! backward needs, the loss against a [`Target`], and a backward that writes every parameter's
//! gradient once, into one buffer of the whole layout, with no autograd graph and no per-node
//! gradient store. candle's autograd through [`super::Architecture::forward`] stays the reference
//! they are tested against, with golden gradients of PyTorch's autograd (`tests/tape.rs`, f64,
//! every tensor).
//!
//! The layers families share are here on slices (`encoder`: the pre-norm transformer layer);
//! a family's tape composes them with its own embedding and head (`super::vit`).

use candle_core::{DType, Storage, Tensor, WithDType};
use soup_core::ParamLayout;

use crate::error::Result;
use crate::ops::cpu::Real;

pub(crate) mod encoder;

/// What a loss compares a model's logits with.
#[derive(Clone, Copy, Debug)]
pub enum Target<'a> {
    /// One class per example (n labels against n × classes logits), cross-entropy with label
    /// smoothing ε.
    Classes {
        labels: &'a [u32],
        label_smoothing: f64,
    },
    /// The next token at every position of n × t token sequences (n × t × vocabulary logits):
    /// position j predicts token j + 1, and the last position predicts nothing. `mask`, where
    /// given (n × t), marks the real tokens: a position counts only when it and the token it
    /// predicts are real. The loss is the mean over the positions that count.
    NextTokens {
        tokens: &'a [u32],
        mask: Option<&'a [bool]>,
    },
}

/// A forward pass kept for its backward.
pub trait Tape {
    /// The logits (n × classes, or n × t × vocabulary), not part of any autograd graph.
    fn logits(&self) -> &Tensor;

    /// The gradients of ⟨dlogits, logits⟩ with respect to every parameter, in layout order, with
    /// the parameters' shapes and dtype (views into one buffer of the whole layout).
    fn backward(self: Box<Self>, dlogits: &Tensor) -> Result<Vec<Tensor>>;

    /// The loss of the logits against `target` times `weight`, and the gradients of that with
    /// respect to every parameter. By default the cross-entropy of [`Self::logits`] computed in
    /// f64, then [`Self::backward`]; a family whose head is best fused with its loss (a
    /// vocabulary-sized one) overrides this.
    fn loss_backward(self: Box<Self>, target: &Target, weight: f64) -> Result<(f64, Vec<Tensor>)> {
        let logits = self.logits();
        let (dims, k) = (logits.dims().to_vec(), logits.dim(candle_core::D::Minus1)?);
        let values = logits
            .flatten_all()?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let (loss, mut dlogits) = match *target {
            Target::Classes {
                labels,
                label_smoothing,
            } => cross_entropy_and_grad(&values, k, labels, label_smoothing),
            Target::NextTokens { tokens, mask } => {
                let t = dims.get(1).copied().unwrap_or(1);
                next_token_and_grad(&values, (t, k), tokens, mask)
            }
        };
        for v in &mut dlogits {
            *v *= weight;
        }
        let dlogits = Tensor::from_vec(dlogits, dims, logits.device())?.to_dtype(logits.dtype())?;
        Ok((loss * weight, self.backward(&dlogits)?))
    }
}

/// Whether every tensor suits the hand-written passes: on the CPU, contiguous, all f32 or all f64.
pub(crate) fn supported(params: &[Tensor]) -> bool {
    let dtype = match params.first() {
        Some(p) => p.dtype(),
        None => return false,
    };
    matches!(dtype, DType::F32 | DType::F64)
        && params
            .iter()
            .all(|p| p.device().is_cpu() && p.dtype() == dtype && p.is_contiguous())
}

/// Calls `f` with the contiguous CPU data of each tensor (read locks held meanwhile).
pub(crate) fn with_slices<T: WithDType, R>(
    tensors: &[Tensor],
    f: impl FnOnce(&[&[T]]) -> R,
) -> Result<R> {
    let guards: Vec<_> = tensors.iter().map(Tensor::storage_and_layout).collect();
    let mut slices = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        let Storage::Cpu(cpu) = &**storage else {
            return Err(candle_core::Error::Msg(
                "the hand-written backward runs on the CPU only".into(),
            )
            .into());
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Err(candle_core::Error::Msg(
                "the hand-written backward needs contiguous tensors".into(),
            )
            .into());
        };
        slices.push(&cpu.as_slice::<T>()?[start..end]);
    }
    Ok(f(&slices))
}

/// Tensor `i`'s gradient slice, taken out of `g` (a backward writes each tensor's once).
pub(crate) fn take<'a, T>(g: &mut [&'a mut [T]], i: usize) -> &'a mut [T] {
    std::mem::take(&mut g[i])
}

/// The contiguous data of one tensor, copied.
pub(crate) fn to_vec<T: WithDType>(t: &Tensor) -> Result<Vec<T>> {
    Ok(t.flatten_all()?.to_dtype(T::DTYPE)?.to_vec1::<T>()?)
}

/// The gradient buffer of a whole layout: one zeroed vector, handed out as one mutable slice
/// per tensor (each taken once by the backward that writes it).
pub(crate) struct Gradients<T> {
    flat: Vec<T>,
}

impl<T: Real> Gradients<T> {
    pub fn new(layout: &ParamLayout) -> Self {
        Self {
            flat: vec![T::zero(); layout.numel()],
        }
    }

    /// One mutable slice per tensor of the layout, in layout order.
    pub fn slices<'a>(&'a mut self, layout: &ParamLayout) -> Vec<&'a mut [T]> {
        let mut rest: &mut [T] = &mut self.flat;
        let mut out = Vec::with_capacity(layout.len());
        for spec in &layout.tensors {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(spec.numel());
            out.push(head);
            rest = tail;
        }
        out
    }

    /// The gradients as tensors of the layout's shapes: views into one tensor of the buffer.
    pub fn into_tensors(self, layout: &ParamLayout) -> Result<Vec<Tensor>> {
        let numel = self.flat.len();
        let all = Tensor::from_vec(self.flat, numel, &candle_core::Device::Cpu)?;
        let mut offset = 0;
        layout
            .tensors
            .iter()
            .map(|spec| {
                let t = all
                    .narrow(0, offset, spec.numel())?
                    .reshape(spec.shape.as_slice())?;
                offset += spec.numel();
                Ok(t)
            })
            .collect()
    }
}

/// Mean cross-entropy of `logits` (n × k) against `labels` with label smoothing ε (PyTorch's:
/// target (1 − ε)·onehot + ε/k), computed in f64, and its gradient with respect to the logits,
/// (softmax − target)/n.
pub fn cross_entropy_and_grad(
    logits: &[f64],
    k: usize,
    labels: &[u32],
    label_smoothing: f64,
) -> (f64, Vec<f64>) {
    let n = labels.len();
    assert_eq!(logits.len(), n * k);
    let off = label_smoothing / k as f64;
    let mut grad = vec![0.0; n * k];
    let mut loss = 0.0;
    for (i, (row, g)) in logits
        .chunks_exact(k)
        .zip(grad.chunks_exact_mut(k))
        .enumerate()
    {
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = row.iter().map(|v| (v - max).exp()).sum();
        let log_sum = sum.ln() + max;
        for (j, (&v, g)) in row.iter().zip(g.iter_mut()).enumerate() {
            let target = off
                + if j == labels[i] as usize {
                    1.0 - label_smoothing
                } else {
                    0.0
                };
            loss -= target * (v - log_sum);
            *g = ((v - log_sum).exp() - target) / n as f64;
        }
    }
    (loss / n.max(1) as f64, grad)
}

/// The mean next-token cross-entropy of `logits` (n·t rows of `k`: n sequences of t positions)
/// against the sequences `tokens` (n × t) over the positions that count ([`Target::NextTokens`]),
/// in f64, and its gradient with respect to the logits (zero at the positions that do not count).
pub fn next_token_and_grad(
    logits: &[f64],
    (t, k): (usize, usize),
    tokens: &[u32],
    mask: Option<&[bool]>,
) -> (f64, Vec<f64>) {
    assert_eq!(logits.len(), tokens.len() * k);
    let real = |i: usize| mask.is_none_or(|m| m[i]);
    let counted: Vec<usize> = (0..tokens.len())
        .filter(|&i| (i + 1) % t != 0 && real(i) && real(i + 1))
        .collect();
    let n = counted.len().max(1) as f64;
    let mut grad = vec![0.0; logits.len()];
    let mut loss = 0.0;
    for &i in &counted {
        let row = &logits[i * k..(i + 1) * k];
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let log_sum = row.iter().map(|v| (v - max).exp()).sum::<f64>().ln() + max;
        let target = tokens[i + 1] as usize;
        loss -= row[target] - log_sum;
        for (j, (g, &v)) in grad[i * k..(i + 1) * k].iter_mut().zip(row).enumerate() {
            let onehot = if j == target { 1.0 } else { 0.0 };
            *g = ((v - log_sum).exp() - onehot) / n;
        }
    }
    (loss / n, grad)
}

/// Checks a ViT's input (n × channels × size × size images, one tensor per layout entry) and
/// returns n and the images' patches as rows (n·g² × channels·patch², g = size / patch), in the
/// order of the patch convolution kernel's elements.
pub(crate) fn patch_rows<T: Real>(
    family: &str,
    images: &Tensor,
    (channels, size, patch): (usize, usize, usize),
    (tensors, layout_len): (usize, usize),
) -> Result<(usize, Vec<T>)> {
    let (n, ch, h, w) = images.dims4()?;
    if ch != channels || h != size || w != size {
        return Err(crate::ModelError::config(
            family,
            format!("images are {ch}×{h}×{w}, the model takes {channels}×{size}×{size}"),
        ));
    }
    if tensors != layout_len {
        return Err(crate::ModelError::config(
            family,
            format!("forward got {tensors} tensors, the layout has {layout_len}"),
        ));
    }
    let g = size / patch;
    let rows = images
        .to_dtype(T::DTYPE)?
        .reshape((n, ch, g, patch, g, patch))?
        .permute((0, 2, 4, 1, 3, 5))?
        .contiguous()?;
    Ok((n, to_vec::<T>(&rows)?))
}

/// The token rows (n·t × e, t = np + 1) of a ViT: per image the `first` token (class or CLS)
/// then its np patch embeddings (`embeds`, n·np × e), plus the positions (t × e).
pub(crate) fn tokens<T: Real>(first: &[T], embeds: &[T], position: &[T], np: usize) -> Vec<T> {
    let e = first.len();
    let (n, t) = (embeds.len() / (np * e), np + 1);
    let mut h = vec![T::zero(); n * t * e];
    for i in 0..n {
        for j in 0..t {
            let src = match j {
                0 => first,
                _ => &embeds[(i * np + j - 1) * e..(i * np + j) * e],
            };
            let row = &mut h[(i * t + j) * e..(i * t + j + 1) * e];
            for ((r, &s), &q) in row.iter_mut().zip(src).zip(&position[j * e..(j + 1) * e]) {
                *r = s + q;
            }
        }
    }
    h
}

/// The backward of [`tokens`] for the rows' gradient `dh`: the first token's and the positions'
/// gradients added into `dfirst` and `dposition`; returns the patch embeddings' (n·np × e).
pub(crate) fn tokens_backward<T: Real>(
    dh: &[T],
    dfirst: &mut [T],
    dposition: &mut [T],
    np: usize,
) -> Vec<T> {
    let e = dfirst.len();
    let t = np + 1;
    let n = dh.len() / (t * e);
    let mut dembeds = vec![T::zero(); n * np * e];
    for i in 0..n {
        for j in 0..t {
            let src = &dh[(i * t + j) * e..(i * t + j + 1) * e];
            for (a, &v) in dposition[j * e..(j + 1) * e].iter_mut().zip(src) {
                *a += v;
            }
            if j == 0 {
                for (a, &v) in dfirst.iter_mut().zip(src) {
                    *a += v;
                }
            } else {
                dembeds[(i * np + j - 1) * e..(i * np + j) * e].copy_from_slice(src);
            }
        }
    }
    dembeds
}

/// What every tape's `backward` does around its own pass: checks dlogits (n × k), runs `pass` on
/// the parameters' data, the tensors' gradient slices and dlogits, and returns the gradients.
pub(crate) fn backward_with<T: Real>(
    family: &str,
    layout: &ParamLayout,
    params: &[Tensor],
    (n, k): (usize, usize),
    dlogits: &Tensor,
    pass: impl FnOnce(&[&[T]], &mut [&mut [T]], &[T]),
) -> Result<Vec<Tensor>> {
    if dlogits.dims() != [n, k] {
        return Err(crate::ModelError::config(
            family,
            format!("the logits' gradient has shape {:?}", dlogits.dims()),
        ));
    }
    let dlogits = to_vec::<T>(dlogits)?;
    let mut grads = Gradients::<T>::new(layout);
    with_slices::<T, _>(params, |p| {
        let mut g = grads.slices(layout);
        pass(p, &mut g, &dlogits);
    })?;
    grads.into_tensors(layout)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The next-token loss is the classification loss of the positions that count, each labelled
    /// with the token after it; its gradient matches central differences.
    #[test]
    fn the_next_token_loss_is_cross_entropy_of_the_shifted_tokens() {
        let (n, t, k) = (2, 4, 5);
        let mut rng = soup_core::rng::SplitMix64::new(7);
        let logits = rng.normals(n * t * k);
        let tokens: Vec<u32> = (0..n * t).map(|_| rng.below(k) as u32).collect();
        // The second sequence is padded after its third token.
        let mask: Vec<bool> = (0..n * t).map(|i| i != 7).collect();
        let (loss, grad) = next_token_and_grad(&logits, (t, k), &tokens, Some(&mask));
        // Positions 0, 1, 2 of the first sequence and 4, 5 of the second count.
        let rows = [0usize, 1, 2, 4, 5];
        let picked: Vec<f64> = rows
            .iter()
            .flat_map(|&i| logits[i * k..(i + 1) * k].to_vec())
            .collect();
        let labels: Vec<u32> = rows.iter().map(|&i| tokens[i + 1]).collect();
        let (reference, _) = cross_entropy_and_grad(&picked, k, &labels, 0.0);
        assert!((loss - reference).abs() < 1e-12, "{loss} {reference}");
        for &i in &[3usize, 6, 7] {
            assert!(grad[i * k..(i + 1) * k].iter().all(|&g| g == 0.0));
        }
        let h = 1e-6;
        for j in 0..logits.len() {
            let mut up = logits.clone();
            up[j] += h;
            let mut down = logits.clone();
            down[j] -= h;
            let fd = (next_token_and_grad(&up, (t, k), &tokens, Some(&mask)).0
                - next_token_and_grad(&down, (t, k), &tokens, Some(&mask)).0)
                / (2.0 * h);
            assert!((fd - grad[j]).abs() < 1e-7, "{j}: {fd} {}", grad[j]);
        }
    }
}
