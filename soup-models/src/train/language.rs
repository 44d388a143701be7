//! Language modelling: how well a causal language model predicts windows of tokens. Position j of
//! a window predicts its token j + 1; the metrics are the mean next-token cross-entropy over every
//! such position (nats per token), its exponential (perplexity) and the fraction of positions
//! whose most likely token is the next one.

use candle_core::{DType, Device, Tensor, D};
use soup_core::Metrics;

use crate::arch::Architecture;
use crate::error::{ModelError, Result};
use crate::ops::log_softmax;

/// The next-token metrics of `arch` with `params` on `windows` (each of the same length), in
/// batches of `batch` windows; `count` is the number of predicted tokens.
pub fn evaluate(
    arch: &dyn Architecture,
    params: &[Tensor],
    windows: &[Vec<u32>],
    batch: usize,
) -> Result<Metrics> {
    let t = windows.first().map_or(0, Vec::len);
    if t < 2 || windows.iter().any(|w| w.len() != t) {
        return Err(ModelError::config(
            arch.family(),
            "windows of at least 2 tokens, all of one length, are needed",
        ));
    }
    let device = params.first().map_or(Device::Cpu, |p| p.device().clone());
    let (mut nll, mut correct, mut count) = (0f64, 0usize, 0usize);
    for chunk in windows.chunks(batch.max(1)) {
        let n = chunk.len();
        let flat: Vec<u32> = chunk.iter().flatten().copied().collect();
        let tokens = Tensor::from_vec(flat, (n, t), &device)?;
        let logits = arch.forward(params, &tokens)?.to_dtype(DType::F32)?;
        let logits = logits.narrow(1, 0, t - 1)?;
        let targets = tokens.narrow(1, 1, t - 1)?.contiguous()?;
        let logp = log_softmax(&logits)?
            .gather(&targets.unsqueeze(D::Minus1)?, D::Minus1)?
            .to_dtype(DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?;
        let hits = logits
            .argmax(D::Minus1)?
            .eq(&targets)?
            .to_dtype(DType::U32)?
            .sum_all()?
            .to_scalar::<u32>()?;
        nll -= logp;
        correct += hits as usize;
        count += n * (t - 1);
    }
    let loss = nll / count as f64;
    Ok(Metrics {
        loss,
        accuracy: Some(correct as f64 / count as f64),
        count,
    })
}
