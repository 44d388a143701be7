//! What a soup method returns: the soup, its coefficients, its history, its time and memory.

use std::time::Instant;

use candle_core::Tensor;

use crate::layout::{Block, ParamLayout};
use crate::traits::Metrics;

/// One coefficient step.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct StepRecord {
    /// Outer pass over the models (0-based).
    pub outer_pass: usize,
    /// Model batch, counted over the whole run (0-based).
    pub model_batch: usize,
    /// Step within the model batch (0-based).
    pub step: usize,
    /// Step counted over the whole run (0-based).
    pub global_step: usize,
    /// Loss on the step's data mini-batch, before the update.
    pub loss: f64,
    /// The learning rate of the step.
    pub lr: f64,
    /// Global L2 norm of ∇θ before clipping.
    pub grad_norm: f64,
}

/// Held-out metrics of the soup after a model batch.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct BatchEval {
    /// The model batch evaluated after.
    pub model_batch: usize,
    /// Steps taken until then.
    pub global_step: usize,
    /// The soup's held-out metrics.
    pub metrics: Metrics,
}

/// Wall-clock seconds per phase of a method, accumulated.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Timings {
    /// Seconds per named phase, in the order first seen.
    pub phases: Vec<(&'static str, f64)>,
}

impl Timings {
    /// Adds the time since `since` to `phase`.
    pub fn add(&mut self, phase: &'static str, since: Instant) {
        let secs = since.elapsed().as_secs_f64();
        match self.phases.iter_mut().find(|(p, _)| *p == phase) {
            Some((_, s)) => *s += secs,
            None => self.phases.push((phase, secs)),
        }
    }

    /// Seconds of every phase.
    pub fn total(&self) -> f64 {
        self.phases.iter().map(|(_, s)| s).sum()
    }
}

/// The bytes a method holds, by kind, at its peak: the phase of the run (loading, stepping...)
/// whose tensors weigh most. Tensor kinds are O(D); `coefficients` (X or logits, optimizer state,
/// α bookkeeping) is O((b + N)·L) and is the most held at any time. Transient copies inside one
/// tensor operation and the model's activations are not counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryAccount {
    /// Whole models resident at once (loaded checkpoints, running sums, stacked models).
    pub models: usize,
    /// Normalised directions of the current model batch (MEHL).
    pub directions: usize,
    /// The center c (MEHL).
    pub center: usize,
    /// The materialised parameters θ handed to the objective.
    pub theta: usize,
    /// ∇θ.
    pub gradient: usize,
    /// Coefficients, optimizer state and α bookkeeping, on the host.
    pub coefficients: usize,
}

impl MemoryAccount {
    /// The O(D) part: everything but the coefficients.
    pub fn tensor_bytes(&self) -> usize {
        self.models + self.directions + self.center + self.theta + self.gradient
    }

    /// Bytes of every part.
    pub fn total(&self) -> usize {
        self.tensor_bytes() + self.coefficients
    }

    /// Records a phase: keeps the heavier of the two phases' tensors, and the larger coefficients.
    pub fn peak(self, phase: MemoryAccount) -> MemoryAccount {
        let coefficients = self.coefficients.max(phase.coefficients);
        let heavier = if phase.tensor_bytes() > self.tensor_bytes() {
            phase
        } else {
            self
        };
        MemoryAccount {
            coefficients,
            ..heavier
        }
    }
}

/// Bytes of a list of tensors.
pub fn bytes_of(tensors: &[Tensor]) -> usize {
    tensors
        .iter()
        .map(|t| t.elem_count() * t.dtype().size_in_bytes())
        .sum()
}

/// A soup and everything known about how it was made.
#[derive(Clone, Debug)]
pub struct SoupResult {
    /// `uniform`, `greedy`, `learned`, `learned+`, `mehl` or `mehl+` (or a custom label).
    pub method: String,
    /// The models, by the store's names.
    pub model_names: Vec<String>,
    /// The layout of the soup's tensors.
    pub layout: ParamLayout,
    /// The blocks the coefficients are given for.
    pub blocks: Vec<Block>,
    /// The soup's tensors, in layout order.
    pub soup: Vec<Tensor>,
    /// α[l][j]: coefficient of model j in block l. Each row sums to 1.
    pub alpha: Vec<Vec<f64>>,
    /// Every coefficient step.
    pub history: Vec<StepRecord>,
    /// Held-out metrics along the way (after each model batch for MEHL, each epoch for Learned).
    pub evaluations: Vec<BatchEval>,
    /// Seconds per phase.
    pub timings: Timings,
    /// The tensor memory the method held at its peak.
    pub memory: MemoryAccount,
}
