//! Classification on labelled images: the [`Objective`] that soups and fine-tuning minimise.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use soup_core::rng::permutation;
use soup_core::{Batch, Metrics, Objective};

use crate::arch::Architecture;
use crate::ops::cross_entropy;

/// Images (n × channels × height × width, normalised for the architecture, f32) and labels.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub images: Tensor,
    pub labels: Vec<u32>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The examples at `rows`.
    pub fn select(&self, rows: &[u32]) -> candle_core::Result<(Tensor, Vec<u32>)> {
        let idx = Tensor::from_slice(rows, rows.len(), self.images.device())?;
        let labels = rows.iter().map(|&r| self.labels[r as usize]).collect();
        Ok((self.images.index_select(&idx, 0)?, labels))
    }
}

/// Cross-entropy of an architecture's logits on a data set, in mini-batches drawn from the
/// epoch seed; evaluation in order, in batches of `eval_batch_size`.
#[derive(Clone, Debug)]
pub struct Classification {
    pub arch: Arc<dyn Architecture>,
    pub data: Dataset,
    pub batch_size: usize,
    pub eval_batch_size: usize,
    /// ε of the training loss (evaluation reports plain cross-entropy).
    pub label_smoothing: f64,
    /// This process's part of the data in a run over several ([`Objective::set_shard`]):
    /// (rank, world); (0, 1) is all of it.
    pub shard: (usize, usize),
}

/// Part `rank` of `world` of `0..len`, contiguous and balanced.
fn part(len: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    (rank * len / world)..((rank + 1) * len / world)
}

impl Classification {
    /// Classification of `data` by `arch` in mini-batches of `batch_size` (evaluated in batches
    /// of the same size), plain cross-entropy, all of the data (no shard).
    pub fn new(arch: Arc<dyn Architecture>, data: Dataset, batch_size: usize) -> Self {
        Self {
            arch,
            data,
            batch_size,
            eval_batch_size: batch_size,
            label_smoothing: 0.0,
            shard: (0, 1),
        }
    }

    /// The rows of mini-batch `batch`: a slice of the permutation drawn from its epoch seed.
    pub fn batch_rows(&self, batch: Batch) -> Vec<u32> {
        let order = permutation(self.data.len(), batch.epoch_seed);
        let start = (batch.index * self.batch_size).min(order.len());
        let end = (start + self.batch_size).min(order.len());
        order[start..end].iter().map(|&i| i as u32).collect()
    }

    /// Logits of the examples `rows` under `params`.
    pub fn logits(&self, params: &[Tensor], rows: &[u32]) -> soup_core::Result<(Tensor, Vec<u32>)> {
        let (images, labels) = self.data.select(rows)?;
        let images = images.to_device(device_of(params))?;
        Ok((self.arch.forward(params, &images)?, labels))
    }
}

fn device_of(params: &[Tensor]) -> &Device {
    params.first().map_or(&Device::Cpu, Tensor::device)
}

impl Objective for Classification {
    fn num_batches(&self) -> usize {
        self.data.len().div_ceil(self.batch_size.max(1))
    }

    fn loss(
        &mut self,
        params: &[Tensor],
        logit_scale: Option<&Tensor>,
        batch: Batch,
    ) -> soup_core::Result<Tensor> {
        let rows = self.batch_rows(batch);
        let (rank, world) = self.shard;
        if world == 1 {
            let (mut logits, labels) = self.logits(params, &rows)?;
            if let Some(s) = logit_scale {
                logits = logits.broadcast_mul(s)?;
            }
            return Ok(cross_entropy(&logits, &labels, self.label_smoothing)?);
        }
        // This shard's examples: their mean loss weighted by their share of the batch.
        let mine = &rows[part(rows.len(), rank, world)];
        if mine.is_empty() {
            let p = params.first().ok_or(soup_core::SoupError::EmptyLayout)?;
            return Ok(p.flatten_all()?.sum_all()?.affine(0.0, 0.0)?);
        }
        let (mut logits, labels) = self.logits(params, mine)?;
        if let Some(s) = logit_scale {
            logits = logits.broadcast_mul(s)?;
        }
        let mean = cross_entropy(&logits, &labels, self.label_smoothing)?;
        Ok(mean.affine(mine.len() as f64 / rows.len() as f64, 0.0)?)
    }

    fn set_shard(&mut self, rank: usize, world: usize) -> soup_core::Result<()> {
        if world == 0 || rank >= world {
            return Err(soup_core::SoupError::config(
                "shard",
                format!("{rank} of {world}"),
                "the rank must be below the world size",
            ));
        }
        self.shard = (rank, world);
        Ok(())
    }

    fn evaluate(&mut self, params: &[Tensor]) -> soup_core::Result<Metrics> {
        let range = part(self.data.len(), self.shard.0, self.shard.1);
        let (first, n) = (range.start, range.len());
        let (mut loss_sum, mut correct) = (0.0f64, 0usize);
        let step = self.eval_batch_size.max(1);
        for start in (0..n).step_by(step) {
            let rows: Vec<u32> = (first + start..first + (start + step).min(n))
                .map(|i| i as u32)
                .collect();
            let (logits, labels) = self.logits(params, &rows)?;
            let logits = logits.detach();
            let loss = cross_entropy(&logits, &labels, 0.0)?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            loss_sum += loss * rows.len() as f64;
            let predicted = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
            correct += predicted
                .iter()
                .zip(&labels)
                .filter(|(p, y)| p == y)
                .count();
        }
        Ok(Metrics {
            loss: loss_sum / n.max(1) as f64,
            accuracy: Some(correct as f64 / n.max(1) as f64),
            count: n,
        })
    }
}
