//! Language modelling: how well a causal language model predicts windows of tokens. Position j of
//! a window predicts its token j + 1; the metrics are the mean next-token cross-entropy over every
//! such position (nats per token), its exponential (perplexity) and the fraction of positions
//! whose most likely token is the next one.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use soup_core::rng::permutation;
use soup_core::{Batch, Metrics, Objective, Rank};

use crate::arch::tape::Target;
use crate::arch::{Architecture, InputSpec};
use crate::error::{ModelError, Result};
use crate::ops::{cross_entropy, log_softmax};
use crate::train::objective::{device_of, part, shard, weighted, zero_gradients};

/// Windows per batch of an evaluation: the logits of a batch are vocabulary × tokens wide.
pub const EVAL_BATCH: usize = 4;

/// The next-token metrics of `arch` with `params` on `windows` (each of the same length), in
/// batches of `batch` windows; `count` is the number of predicted tokens.
pub fn evaluate(
    arch: &dyn Architecture,
    params: &[Tensor],
    windows: &[Vec<u32>],
    batch: usize,
) -> Result<Metrics> {
    let mut sums = NextTokenSums::default();
    for chunk in windows.chunks(batch.max(1)) {
        sums.add(arch, params, chunk)?;
    }
    sums.metrics(arch)
}

/// The sums of the next-token metrics over windows added a batch at a time, so that windows
/// streamed from a corpus are scored without holding them: added in the batches of
/// [`evaluate`], they give its metrics to the bit.
#[derive(Clone, Copy, Debug, Default)]
pub struct NextTokenSums {
    nll: f64,
    correct: usize,
    count: usize,
}

impl NextTokenSums {
    /// Adds one batch of windows (each of the same length, at least 2 tokens).
    pub fn add(
        &mut self,
        arch: &dyn Architecture,
        params: &[Tensor],
        chunk: &[Vec<u32>],
    ) -> Result<()> {
        let t = chunk.first().map_or(0, Vec::len);
        if t < 2 || chunk.iter().any(|w| w.len() != t) {
            return Err(ModelError::config(
                arch.family(),
                "windows of at least 2 tokens, all of one length, are needed",
            ));
        }
        let device = params.first().map_or(Device::Cpu, |p| p.device().clone());
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
        self.nll -= logp;
        self.correct += hits as usize;
        self.count += n * (t - 1);
        Ok(())
    }

    /// The metrics of the windows added: an error when there were none.
    pub fn metrics(&self, arch: &dyn Architecture) -> Result<Metrics> {
        if self.count == 0 {
            return Err(ModelError::config(
                arch.family(),
                "windows of at least 2 tokens, all of one length, are needed",
            ));
        }
        Ok(Metrics {
            rank: Rank::Loss,
            loss: self.nll / self.count as f64,
            accuracy: Some(self.correct as f64 / self.count as f64),
            count: self.count,
        })
    }
}

/// Next-token prediction on windows of tokens ([`crate::data::text::windows`]): the
/// [`Objective`] of a language model's soups and fine-tuning. A batch is `batch_size` windows
/// drawn from the epoch seed; its loss is the mean next-token cross-entropy over every predicted
/// token (each window predicts its t − 1 tokens after the first), and models are ranked by
/// held-out loss ([`soup_core::Rank::Loss`]).
#[derive(Clone, Debug)]
pub struct LanguageModeling {
    pub arch: Arc<dyn Architecture>,
    /// Windows of one length, at least 2 tokens.
    pub windows: Arc<Vec<Vec<u32>>>,
    pub batch_size: usize,
    pub eval_batch_size: usize,
    /// This process's part of the windows in a run over several (rank, world).
    pub shard: (usize, usize),
}

impl LanguageModeling {
    /// Next-token prediction of `windows` by `arch` in batches of `batch_size` windows. The
    /// windows must all have one length of at least 2 tokens within the model's positions, and
    /// every id must lie in its vocabulary.
    pub fn new(
        arch: Arc<dyn Architecture>,
        windows: Vec<Vec<u32>>,
        batch_size: usize,
    ) -> Result<Self> {
        let t = windows.first().map_or(0, Vec::len);
        let err = |d: String| Err(ModelError::config(arch.family(), d));
        if windows.is_empty() || t < 2 || windows.iter().any(|w| w.len() != t) {
            return err("windows of at least 2 tokens, all of one length, are needed".into());
        }
        if let InputSpec::Tokens(spec) = arch.input() {
            if t > spec.max_positions {
                return err(format!(
                    "windows of {t} tokens, beyond the model's {} positions",
                    spec.max_positions
                ));
            }
            if let Some(id) = windows
                .iter()
                .flatten()
                .find(|&&id| id as usize >= spec.vocab_size)
            {
                return err(format!(
                    "token id {id} is beyond the vocabulary of {}",
                    spec.vocab_size
                ));
            }
        } else {
            return err("next-token prediction needs a model of token sequences".into());
        }
        Ok(Self {
            arch,
            windows: Arc::new(windows),
            batch_size: batch_size.max(1),
            eval_batch_size: batch_size.max(1),
            shard: (0, 1),
        })
    }

    /// Tokens per window.
    pub fn seq_len(&self) -> usize {
        self.windows.first().map_or(0, Vec::len)
    }

    /// The windows of mini-batch `batch`: a slice of the permutation drawn from its epoch seed.
    pub fn batch_rows(&self, batch: Batch) -> Vec<usize> {
        let order = permutation(self.windows.len(), batch.epoch_seed);
        let start = (batch.index * self.batch_size).min(order.len());
        let end = (start + self.batch_size).min(order.len());
        order[start..end].to_vec()
    }

    /// This process's windows of `batch` and their share of the whole batch.
    fn shard_rows(&self, batch: Batch) -> (Vec<usize>, f64) {
        let rows = self.batch_rows(batch);
        let (rank, world) = self.shard;
        if world == 1 {
            return (rows, 1.0);
        }
        let r = part(rows.len(), rank, world);
        let weight = r.len() as f64 / rows.len().max(1) as f64;
        (rows[r].to_vec(), weight)
    }

    /// The windows `rows` as one n × t tensor of ids on `device`.
    fn tokens(&self, rows: &[usize], device: &Device) -> Result<(Tensor, Vec<u32>)> {
        let flat: Vec<u32> = rows
            .iter()
            .flat_map(|&r| self.windows[r].iter().copied())
            .collect();
        let tokens = Tensor::from_vec(flat.clone(), (rows.len(), self.seq_len()), device)?;
        Ok((tokens, flat))
    }
}

impl Objective for LanguageModeling {
    fn num_batches(&self) -> usize {
        self.windows.len().div_ceil(self.batch_size)
    }

    fn loss(
        &mut self,
        params: &[Tensor],
        logit_scale: Option<&Tensor>,
        batch: Batch,
    ) -> soup_core::Result<Tensor> {
        let (mine, weight) = self.shard_rows(batch);
        if mine.is_empty() {
            let p = params.first().ok_or(soup_core::SoupError::EmptyLayout)?;
            return Ok(p.flatten_all()?.sum_all()?.affine(0.0, 0.0)?);
        }
        let (tokens, _) = self.tokens(&mine, device_of(params))?;
        let mut logits = self.arch.forward(params, &tokens)?;
        if let Some(s) = logit_scale {
            logits = logits.broadcast_mul(s)?;
        }
        let (n, t, v) = logits.dims3()?;
        let shifted = logits.narrow(1, 0, t - 1)?.reshape((n * (t - 1), v))?;
        let labels: Vec<u32> = mine
            .iter()
            .flat_map(|&r| self.windows[r][1..].iter().copied())
            .collect();
        let mean = cross_entropy(&shifted, &labels, 0.0)?;
        weighted(mean, weight)
    }

    /// Through the architecture's hand-written pass where it has one for these tensors (its head
    /// fused with the loss: the full logits are never made), else by autograd through
    /// [`Self::loss`].
    fn loss_and_grad(
        &mut self,
        params: &[Tensor],
        batch: Batch,
    ) -> soup_core::Result<(f64, Vec<Tensor>)> {
        if !crate::arch::tape::supported(params) {
            return soup_core::autograd_loss_and_grad(self, params, batch);
        }
        let (mine, weight) = self.shard_rows(batch);
        if mine.is_empty() {
            return zero_gradients(params);
        }
        let (tokens, flat) = self.tokens(&mine, device_of(params))?;
        let Some(tape) = self.arch.tape(params, &tokens)? else {
            return soup_core::autograd_loss_and_grad(self, params, batch);
        };
        let target = Target::NextTokens {
            tokens: &flat,
            mask: None,
        };
        Ok(tape.loss_backward(&target, weight)?)
    }

    fn set_shard(&mut self, rank: usize, world: usize) -> soup_core::Result<()> {
        self.shard = shard(rank, world)?;
        Ok(())
    }

    fn evaluate(&mut self, params: &[Tensor]) -> soup_core::Result<Metrics> {
        let range = part(self.windows.len(), self.shard.0, self.shard.1);
        if range.is_empty() {
            return Ok(Metrics {
                loss: 0.0,
                accuracy: Some(0.0),
                count: 0,
                rank: Rank::Loss,
            });
        }
        let windows = &self.windows[range];
        Ok(evaluate(
            self.arch.as_ref(),
            params,
            windows,
            self.eval_batch_size,
        )?)
    }
}
