//! Classification on labelled images: the [`Objective`] that soups and fine-tuning minimise.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use soup_core::rng::permutation;
use soup_core::{Batch, Metrics, Objective};

use crate::arch::tape::Target;
use crate::arch::Architecture;
use crate::data::stream::{ImageSource, Stream};
use crate::ops::cross_entropy;

/// Labelled examples prepared for an architecture (channels × height × width, normalised, f32):
/// in memory, or decoded batch by batch from files ([`Images::Stream`]).
#[derive(Clone, Debug)]
pub struct Dataset {
    pub images: Images,
    /// Each example's class: in the model's head, or among [`Self::classes`].
    pub labels: Vec<u32>,
    /// The classes scored where they are not the head's (model-soups' projection): each a
    /// group of the head's classes whose largest logit is the class's logit, before the loss
    /// and the argmax: one class each for a subset (ImageNet-A's 200 of 1,000), several for
    /// ObjectNet's classes; `None`: the head's classes.
    pub classes: Option<Vec<Vec<u32>>>,
}

/// Where a data set's images are.
#[derive(Clone, Debug)]
pub enum Images {
    /// All of them, n × channels × height × width.
    Memory(Tensor),
    /// Prepared when a batch asks for them.
    Stream(Stream),
}

impl Dataset {
    pub fn in_memory(images: Tensor, labels: Vec<u32>) -> Self {
        Self {
            images: Images::Memory(images),
            labels,
            classes: None,
        }
    }

    /// A data set read from `source` batch by batch.
    pub fn stream(source: Arc<dyn ImageSource>, labels: Vec<u32>) -> Self {
        Self {
            images: Images::Stream(Stream::new(source)),
            labels,
            classes: None,
        }
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Channels, height and width of an image.
    pub fn image_shape(&self) -> candle_core::Result<(usize, usize, usize)> {
        match &self.images {
            Images::Memory(t) => {
                let (_, c, h, w) = t.dims4()?;
                Ok((c, h, w))
            }
            Images::Stream(s) => Ok(s.source.shape()),
        }
    }

    /// Bytes of f32 images this data set holds in memory when read in batches of `batch`: all
    /// of them, or for a streamed one the batch being used and the one being prefetched.
    pub fn resident_bytes(&self, batch: usize) -> u64 {
        match &self.images {
            Images::Memory(t) => 4 * t.elem_count() as u64,
            Images::Stream(s) => {
                let (c, h, w) = s.source.shape();
                (2 * batch.min(self.len()) * c * h * w * 4) as u64
            }
        }
    }

    /// The examples at `rows`.
    pub fn select(&self, rows: &[u32]) -> crate::Result<(Tensor, Vec<u32>)> {
        let labels = rows.iter().map(|&r| self.labels[r as usize]).collect();
        let images = match &self.images {
            Images::Memory(t) => {
                let idx = Tensor::from_slice(rows, rows.len(), t.device())?;
                t.index_select(&idx, 0)?
            }
            Images::Stream(s) => s.batch(rows)?,
        };
        Ok((images, labels))
    }

    /// Every image, in order (a streamed data set decodes them all: for small sets and tests).
    pub fn all(&self) -> crate::Result<Tensor> {
        let rows: Vec<u32> = (0..self.len() as u32).collect();
        Ok(self.select(&rows)?.0)
    }

    /// Starts preparing the examples at `rows`, which [`Dataset::select`] will ask for next
    /// (streamed data sets decode them meanwhile; in memory there is nothing to do).
    pub fn prefetch(&self, rows: Vec<u32>) {
        if let Images::Stream(s) = &self.images {
            s.prefetch(rows);
        }
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
pub(crate) fn part(len: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    (rank * len / world)..((rank + 1) * len / world)
}

/// (rank, world) of [`Objective::set_shard`], checked: the rank below a positive world size.
pub(crate) fn shard(rank: usize, world: usize) -> soup_core::Result<(usize, usize)> {
    if world == 0 || rank >= world {
        return Err(soup_core::SoupError::config(
            "shard",
            format!("{rank} of {world}"),
            "the rank must be below the world size",
        ));
    }
    Ok((rank, world))
}

/// A shard's mean loss times its share of the whole batch.
pub(crate) fn weighted(mean: Tensor, weight: f64) -> soup_core::Result<Tensor> {
    Ok(if weight == 1.0 {
        mean
    } else {
        mean.affine(weight, 0.0)?
    })
}

/// Zero gradients of every parameter: a shard with no example of a batch.
pub(crate) fn zero_gradients(params: &[Tensor]) -> soup_core::Result<(f64, Vec<Tensor>)> {
    let zeros = params.iter().map(Tensor::zeros_like);
    Ok((0.0, zeros.collect::<candle_core::Result<_>>()?))
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

    /// This process's rows of mini-batch `batch` and their share of the whole batch (1 without a
    /// shard); starts decoding the next batch of a streamed data set.
    fn shard_rows(&mut self, batch: Batch) -> (Vec<u32>, f64) {
        let rows = self.batch_rows(batch);
        let (rank, world) = self.shard;
        // Streamed images: the next batch decodes while this one computes (its rows cost a
        // permutation, so in-memory data skip this).
        if matches!(self.data.images, Images::Stream(_)) && batch.index + 1 < self.num_batches() {
            let next = self.batch_rows(Batch {
                index: batch.index + 1,
                ..batch
            });
            self.data
                .prefetch(next[part(next.len(), rank, world)].to_vec());
        }
        if world == 1 {
            return (rows, 1.0);
        }
        let mine = rows[part(rows.len(), rank, world)].to_vec();
        let weight = mine.len() as f64 / rows.len() as f64;
        (mine, weight)
    }

    /// Logits of the examples `rows` under `params`, with their labels; projected onto the
    /// data set's classes where they are not the head's ([`Dataset::classes`]).
    pub fn logits(&self, params: &[Tensor], rows: &[u32]) -> soup_core::Result<(Tensor, Vec<u32>)> {
        let (images, labels) = self.data.select(rows)?;
        let images = images.to_device(device_of(params))?;
        let logits = self.arch.forward(params, &images)?;
        let Some(groups) = &self.data.classes else {
            return Ok((logits, labels));
        };
        Ok((project(&logits, groups)?, labels))
    }
}

/// Each group's logit: the largest of its classes' (one class: that class's logit).
pub fn project(logits: &Tensor, groups: &[Vec<u32>]) -> candle_core::Result<Tensor> {
    let device = logits.device();
    if groups.iter().all(|g| g.len() == 1) {
        let index: Vec<u32> = groups.iter().map(|g| g[0]).collect();
        return logits.index_select(&Tensor::from_slice(&index, index.len(), device)?, 1);
    }
    let columns = groups
        .iter()
        .map(|g| {
            let index = Tensor::from_slice(g, g.len(), device)?;
            logits.index_select(&index, 1)?.max_keepdim(1)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::cat(&columns, 1)
}

pub(crate) fn device_of(params: &[Tensor]) -> &Device {
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
        let (mine, weight) = self.shard_rows(batch);
        if mine.is_empty() {
            let p = params.first().ok_or(soup_core::SoupError::EmptyLayout)?;
            return Ok(p.flatten_all()?.sum_all()?.affine(0.0, 0.0)?);
        }
        let (mut logits, labels) = self.logits(params, &mine)?;
        if let Some(s) = logit_scale {
            logits = logits.broadcast_mul(s)?;
        }
        let mean = cross_entropy(&logits, &labels, self.label_smoothing)?;
        weighted(mean, weight)
    }

    /// Through the architecture's hand-written backward where it has one for these tensors
    /// (`arch/tape`: the same loss and gradients as autograd, without its graph), else by
    /// autograd through [`Self::loss`].
    fn loss_and_grad(
        &mut self,
        params: &[Tensor],
        batch: Batch,
    ) -> soup_core::Result<(f64, Vec<Tensor>)> {
        // The hand-written backward takes every class; a projected data set goes through
        // autograd.
        if !crate::arch::tape::supported(params) || self.data.classes.is_some() {
            return soup_core::autograd_loss_and_grad(self, params, batch);
        }
        let (mine, weight) = self.shard_rows(batch);
        if mine.is_empty() {
            return zero_gradients(params);
        }
        let (images, labels) = self.data.select(&mine)?;
        let Some(tape) = self
            .arch
            .tape(params, &images.to_device(device_of(params))?)?
        else {
            return soup_core::autograd_loss_and_grad(self, params, batch);
        };
        let target = Target::Classes {
            labels: &labels,
            label_smoothing: self.label_smoothing,
        };
        Ok(tape.loss_backward(&target, weight)?)
    }

    fn set_shard(&mut self, rank: usize, world: usize) -> soup_core::Result<()> {
        self.shard = shard(rank, world)?;
        Ok(())
    }

    fn evaluate(&mut self, params: &[Tensor]) -> soup_core::Result<Metrics> {
        let range = part(self.data.len(), self.shard.0, self.shard.1);
        let (first, n) = (range.start, range.len());
        let (mut loss_sum, mut correct) = (0.0f64, 0usize);
        let step = self.eval_batch_size.max(1);
        let rows_at = |start: usize| -> Vec<u32> {
            (first + start..first + (start + step).min(n))
                .map(|i| i as u32)
                .collect()
        };
        for start in (0..n).step_by(step) {
            let rows = rows_at(start);
            if start + step < n {
                self.data.prefetch(rows_at(start + step));
            }
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
            rank: Default::default(),
            loss: loss_sum / n.max(1) as f64,
            accuracy: Some(correct as f64 / n.max(1) as f64),
            count: n,
        })
    }
}
