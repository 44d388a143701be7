//! Coefficient optimizers with PyTorch semantics, and gradient clipping by global norm.
//!
//! Coefficients (X of MEHL, the softmax logits of Learned-Soup) are few (b·L or N·L numbers), so
//! they live on the host in f64; the optimizer never touches a D-sized vector.

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::transfer;

/// Which optimizer updates the coefficients.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptimizerKind {
    /// `torch.optim.SGD` (dampening 0, no Nesterov): weight decay is added to the gradient.
    Sgd {
        /// The momentum (0: plain SGD).
        momentum: f64,
    },
    /// `torch.optim.AdamW` (no AMSGrad): decoupled weight decay x ← x (1 − lr λ).
    AdamW {
        /// The decay of the first moment.
        beta1: f64,
        /// The decay of the second moment.
        beta2: f64,
        /// Added to the second moment's square root.
        eps: f64,
    },
}

impl OptimizerKind {
    /// AdamW with PyTorch's defaults (β = (0.9, 0.999), ε = 1e-8).
    pub const ADAMW: OptimizerKind = OptimizerKind::AdamW {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
    };
    /// SGD with momentum 0.9, the authors' alternative.
    pub const SGD_MOMENTUM: OptimizerKind = OptimizerKind::Sgd { momentum: 0.9 };
}

/// An optimizer and its state for a vector of `n` coefficients.
#[derive(Clone, Debug)]
pub struct Optimizer {
    /// Which optimizer.
    pub kind: OptimizerKind,
    step: u64,
    first: Vec<f64>,
    second: Vec<f64>,
}

impl Optimizer {
    /// An optimizer of `n` coefficients, its state at zero.
    pub fn new(kind: OptimizerKind, n: usize) -> Self {
        let (first, second) = match kind {
            OptimizerKind::Sgd { momentum: 0.0 } => (vec![], vec![]),
            OptimizerKind::Sgd { .. } => (vec![0.0; n], vec![]),
            OptimizerKind::AdamW { .. } => (vec![0.0; n], vec![0.0; n]),
        };
        Self {
            kind,
            step: 0,
            first,
            second,
        }
    }

    /// Bytes of optimizer state.
    pub fn state_bytes(&self) -> usize {
        (self.first.len() + self.second.len()) * std::mem::size_of::<f64>()
    }

    /// One update of `x` with gradient `grad`, learning rate `lr` and weight decay `wd`.
    pub fn step(&mut self, x: &mut [f64], grad: &[f64], lr: f64, wd: f64) {
        assert_eq!(
            x.len(),
            grad.len(),
            "coefficients and gradient differ in length"
        );
        self.step += 1;
        match self.kind {
            OptimizerKind::Sgd { momentum } => {
                for i in 0..x.len() {
                    let mut d = grad[i] + wd * x[i];
                    if momentum != 0.0 {
                        let buf = &mut self.first[i];
                        *buf = if self.step == 1 {
                            d
                        } else {
                            momentum * *buf + d
                        };
                        d = *buf;
                    }
                    x[i] -= lr * d;
                }
            }
            OptimizerKind::AdamW { beta1, beta2, eps } => {
                let bias1 = 1.0 - beta1.powi(self.step as i32);
                let bias2_sqrt = (1.0 - beta2.powi(self.step as i32)).sqrt();
                let step_size = lr / bias1;
                for i in 0..x.len() {
                    x[i] *= 1.0 - lr * wd;
                    let m = &mut self.first[i];
                    *m = beta1 * *m + (1.0 - beta1) * grad[i];
                    let v = &mut self.second[i];
                    *v = beta2 * *v + (1.0 - beta2) * grad[i] * grad[i];
                    let denom = v.sqrt() / bias2_sqrt + eps;
                    x[i] -= step_size * *m / denom;
                }
            }
        }
    }
}

/// The global L2 norm of `grads`, accumulated in f64: by the fused CPU kernel where every
/// tensor allows it, else [`global_norm_portable`].
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let fused: Option<Vec<f64>> = grads.iter().map(crate::kernels::sum_squares).collect();
    match fused {
        Some(sums) => Ok(sums.iter().fold(0.0, |a, s| a + s).sqrt()),
        None => global_norm_portable(grads),
    }
}

/// The global L2 norm of `grads` with candle ops on their device: each tensor's sum of squares
/// in its dtype, their total in f64, one transfer to the host.
pub fn global_norm_portable(grads: &[Tensor]) -> Result<f64> {
    if grads.is_empty() {
        return Ok(0.0);
    }
    let sums = grads
        .iter()
        .map(|g| g.sqr()?.sum_all()?.to_dtype(DType::F64))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(transfer::scalar(&Tensor::stack(&sums, 0)?.sum_all()?)?.sqrt())
}

/// The factor `torch.nn.utils.clip_grad_norm_` scales gradients of global norm `norm` by:
/// max_norm / (norm + 1e-6), applied when below 1.
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f64 {
    max_norm / (norm + 1e-6)
}

/// `torch.nn.utils.clip_grad_norm_`: scales `grads` by max_norm / (norm + 1e-6) when that is
/// below 1. Returns the norm before clipping.
pub fn clip_global_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    let coef = clip_coefficient(norm, max_norm);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            *g = g.affine(coef, 0.0)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sgd_momentum_matches_pytorch_recurrence() {
        // torch: buf1 = g1; x1 = x0 - lr*buf1; buf2 = 0.9*buf1 + g2 + wd*x1; x2 = x1 - lr*buf2.
        let mut opt = Optimizer::new(OptimizerKind::Sgd { momentum: 0.9 }, 1);
        let mut x = [1.0];
        opt.step(&mut x, &[2.0], 0.1, 0.5);
        let buf1 = 2.0 + 0.5;
        assert_eq!(x[0], 1.0 - 0.1 * buf1);
        let x1 = x[0];
        opt.step(&mut x, &[-1.0], 0.1, 0.5);
        let buf2 = 0.9 * buf1 + (-1.0 + 0.5 * x1);
        assert_eq!(x[0], x1 - 0.1 * buf2);
    }

    #[test]
    fn adamw_first_step_is_sign_times_lr() {
        // With bias correction the first Adam step is lr·g/(|g| + eps') ≈ lr·sign(g).
        let mut opt = Optimizer::new(OptimizerKind::ADAMW, 2);
        let mut x = [0.0, 0.0];
        opt.step(&mut x, &[3.0, -0.5], 0.01, 0.0);
        assert!(
            (x[0] + 0.01).abs() < 1e-9 && (x[1] - 0.01).abs() < 1e-9,
            "{x:?}"
        );
        // Decoupled decay: zero gradient still shrinks x by (1 - lr wd).
        let mut opt = Optimizer::new(OptimizerKind::ADAMW, 1);
        let mut x = [2.0];
        opt.step(&mut x, &[0.0], 0.1, 0.5);
        assert!((x[0] - 2.0 * 0.95).abs() < 1e-12);
    }
}
