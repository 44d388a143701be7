//! Synthetic problems for the property tests of soup: a small MLP classifier in candle (any float
//! dtype, f64 where precision matters), seeded Gaussian-cluster data, and an in-memory model store
//! that records which models were loaded.

use std::cell::RefCell;

use candle_core::{DType, Device, Tensor, D};
use soup_core::rng::{permutation, SplitMix64};
use soup_core::{Batch, Metrics, ModelStore, Objective, ParamLayout, Result, TensorSpec};

/// A one-hidden-layer tanh MLP: `layers.0.{weight,bias}`, `head.{weight,bias}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mlp {
    pub input: usize,
    pub hidden: usize,
    pub classes: usize,
}

impl Mlp {
    pub fn layout(&self) -> ParamLayout {
        let spec = |name: &str, shape: &[usize]| TensorSpec {
            name: name.to_string(),
            shape: shape.to_vec(),
        };
        ParamLayout::new(vec![
            spec("layers.0.weight", &[self.hidden, self.input]),
            spec("layers.0.bias", &[self.hidden]),
            spec("head.weight", &[self.classes, self.hidden]),
            spec("head.bias", &[self.classes]),
        ])
    }

    /// Logits of `x` (n × input).
    pub fn forward(&self, params: &[Tensor], x: &Tensor) -> candle_core::Result<Tensor> {
        let h = x
            .matmul(&params[0].t()?)?
            .broadcast_add(&params[1])?
            .tanh()?;
        h.matmul(&params[2].t()?)?.broadcast_add(&params[3])
    }
}

/// Labelled examples: x (n × input) and one-hot targets (n × classes).
#[derive(Clone, Debug)]
pub struct Data {
    pub x: Tensor,
    pub onehot: Tensor,
    pub labels: Vec<usize>,
}

impl Data {
    /// Gaussian clusters, one per class, with unit noise around means of norm ~`separation`.
    pub fn clusters(arch: Mlp, n: usize, separation: f64, seed: u64, dtype: DType) -> Result<Self> {
        let mut rng = SplitMix64::new(seed);
        let means: Vec<f64> = rng
            .normals(arch.classes * arch.input)
            .into_iter()
            .map(|v| v * separation / (arch.input as f64).sqrt())
            .collect();
        let labels: Vec<usize> = (0..n).map(|i| i % arch.classes).collect();
        let noise = rng.normals(n * arch.input);
        let x: Vec<f64> = (0..n * arch.input)
            .map(|k| means[labels[k / arch.input] * arch.input + k % arch.input] + noise[k])
            .collect();
        let mut onehot = vec![0.0; n * arch.classes];
        for (i, &y) in labels.iter().enumerate() {
            onehot[i * arch.classes + y] = 1.0;
        }
        Ok(Self {
            x: Tensor::from_vec(x, (n, arch.input), &Device::Cpu)?.to_dtype(dtype)?,
            onehot: Tensor::from_vec(onehot, (n, arch.classes), &Device::Cpu)?.to_dtype(dtype)?,
            labels,
        })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Mean cross-entropy of `logits` against one-hot `targets`, differentiable.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let m = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&m)?;
    let log_z = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let log_p = shifted.broadcast_sub(&log_z)?;
    let n = logits.dim(0)? as f64;
    (log_p * targets)?.sum_all()?.affine(-1.0 / n, 0.0)
}

/// Classification on held-out data with an [`Mlp`]: mini-batches of `batch_size` examples in the
/// order of a permutation drawn from the epoch seed.
#[derive(Clone, Debug)]
pub struct MlpObjective {
    pub arch: Mlp,
    pub data: Data,
    pub batch_size: usize,
    /// (rank, world) of a run over several processes; (0, 1) is all the data.
    pub shard: (usize, usize),
}

/// Part `rank` of `world` of `0..len`, contiguous and balanced.
fn part(len: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    (rank * len / world)..((rank + 1) * len / world)
}

impl MlpObjective {
    /// The examples of `batch`, as row indices.
    pub fn batch_rows(&self, batch: Batch) -> Vec<u32> {
        let order = permutation(self.data.len(), batch.epoch_seed);
        let start = batch.index * self.batch_size;
        let end = (start + self.batch_size).min(order.len());
        order[start..end].iter().map(|&i| i as u32).collect()
    }
}

impl Objective for MlpObjective {
    fn num_batches(&self) -> usize {
        self.data.len().div_ceil(self.batch_size)
    }

    fn loss(
        &mut self,
        params: &[Tensor],
        logit_scale: Option<&Tensor>,
        batch: Batch,
    ) -> Result<Tensor> {
        let all = self.batch_rows(batch);
        let (rank, world) = self.shard;
        let rows = &all[part(all.len(), rank, world)];
        if rows.is_empty() {
            return Ok(params[0].flatten_all()?.sum_all()?.affine(0.0, 0.0)?);
        }
        let idx = Tensor::from_vec(rows.to_vec(), rows.len(), &Device::Cpu)?;
        let x = self.data.x.index_select(&idx, 0)?;
        let y = self.data.onehot.index_select(&idx, 0)?;
        let mut logits = self.arch.forward(params, &x)?;
        if let Some(s) = logit_scale {
            logits = logits.broadcast_mul(s)?;
        }
        let mean = cross_entropy(&logits, &y)?;
        if world == 1 {
            return Ok(mean);
        }
        Ok(mean.affine(rows.len() as f64 / all.len() as f64, 0.0)?)
    }

    fn evaluate(&mut self, params: &[Tensor]) -> Result<Metrics> {
        let range = part(self.data.len(), self.shard.0, self.shard.1);
        let n = range.len();
        let idx = Tensor::from_vec(
            range.clone().map(|i| i as u32).collect::<Vec<_>>(),
            n,
            &Device::Cpu,
        )?;
        let logits = self
            .arch
            .forward(params, &self.data.x.index_select(&idx, 0)?)?;
        let loss = cross_entropy(&logits, &self.data.onehot.index_select(&idx, 0)?)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        let predicted = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let correct = predicted
            .iter()
            .zip(&self.data.labels[range])
            .filter(|(p, y)| **p as usize == **y)
            .count();
        Ok(Metrics {
            rank: Default::default(),
            loss,
            accuracy: Some(correct as f64 / n as f64),
            count: n,
        })
    }

    fn set_shard(&mut self, rank: usize, world: usize) -> Result<()> {
        self.shard = (rank, world);
        Ok(())
    }
}

/// Models held in memory. Every `load` is recorded, so tests can check which models a method
/// read and in what order.
#[derive(Debug)]
pub struct MemoryStore {
    pub names: Vec<String>,
    pub layouts: Vec<ParamLayout>,
    pub models: Vec<Vec<Tensor>>,
    pub loads: RefCell<Vec<usize>>,
}

impl MemoryStore {
    pub fn new(layout: ParamLayout, models: Vec<Vec<Tensor>>) -> Self {
        Self {
            names: (0..models.len()).map(|i| format!("model-{i}")).collect(),
            layouts: vec![layout; models.len()],
            models,
            loads: RefCell::new(Vec::new()),
        }
    }

    /// A zoo of `n` MLPs: a random start point plus, per model, a perturbation of its own scale
    /// (0.05 to 0.5), standing in for fine-tunes with different hyper-parameters. Tensors listed
    /// in `frozen` are the same in every model (as a frozen layer would be).
    pub fn mlp_zoo(arch: Mlp, n: usize, seed: u64, dtype: DType, frozen: &[usize]) -> Result<Self> {
        let layout = arch.layout();
        let mut rng = SplitMix64::new(seed);
        let base: Vec<Vec<f64>> = layout
            .tensors
            .iter()
            .map(|t| {
                let fan_in = *t.shape.last().expect("non-empty shape") as f64;
                rng.normals(t.numel())
                    .into_iter()
                    .map(|v| v / fan_in.sqrt())
                    .collect()
            })
            .collect();
        let mut models = Vec::with_capacity(n);
        for _ in 0..n {
            let scale = 0.05 + 0.45 * rng.next_f64();
            let model = layout
                .tensors
                .iter()
                .zip(&base)
                .enumerate()
                .map(|(k, (spec, b))| {
                    let noise = rng.normals(b.len());
                    let v: Vec<f64> = if frozen.contains(&k) {
                        b.clone()
                    } else {
                        b.iter().zip(&noise).map(|(b, e)| b + scale * e).collect()
                    };
                    Tensor::from_vec(v, spec.shape.as_slice(), &Device::Cpu)?.to_dtype(dtype)
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            models.push(model);
        }
        Ok(Self::new(layout, models))
    }

    /// The models loaded so far, in order; clears the record.
    pub fn take_loads(&self) -> Vec<usize> {
        std::mem::take(&mut *self.loads.borrow_mut())
    }
}

impl ModelStore for MemoryStore {
    fn len(&self) -> usize {
        self.models.len()
    }

    fn name(&self, i: usize) -> String {
        self.names[i].clone()
    }

    fn layout(&self, i: usize) -> Result<ParamLayout> {
        Ok(self.layouts[i].clone())
    }

    fn load(&self, i: usize) -> Result<Vec<Tensor>> {
        self.loads.borrow_mut().push(i);
        Ok(self.models[i].clone())
    }
}

/// Σ_j α_j θ_j^l for every block: the soup that the coefficients `alpha` (L × N) describe,
/// computed naively from the stored models, as block vectors in f64.
pub fn soup_from_alpha(
    store: &MemoryStore,
    blocks: &[soup_core::Block],
    alpha: &[Vec<f64>],
) -> Result<Vec<Vec<f64>>> {
    let flat: Vec<Vec<Vec<f64>>> = store
        .models
        .iter()
        .map(|m| {
            soup_core::to_blocks(m, blocks)?
                .iter()
                .map(|b| Ok(b.to_dtype(DType::F64)?.to_vec1::<f64>()?))
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<_>>()?;
    Ok(blocks
        .iter()
        .enumerate()
        .map(|(l, b)| {
            (0..b.numel)
                .map(|k| (0..flat.len()).map(|j| alpha[l][j] * flat[j][l][k]).sum())
                .collect()
        })
        .collect())
}

/// Block vectors as host f64.
pub fn host_blocks(blocks: &[Tensor]) -> Result<Vec<Vec<f64>>> {
    blocks
        .iter()
        .map(|b| Ok(b.to_dtype(DType::F64)?.to_vec1::<f64>()?))
        .collect()
}

/// max_k |a_k − b_k| / max(1, max_k |b_k|): a relative error that is meaningful near zero.
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

/// A [`Collective`] over threads of one process, for testing runs over several processes without
/// MPI: every rank deposits its tensor, and each sums all deposits in rank order, so every rank
/// gets the same bits.
pub struct ThreadCollective {
    rank: usize,
    shared: std::sync::Arc<ThreadShared>,
}

struct ThreadShared {
    world: usize,
    slots: std::sync::Mutex<Vec<Option<Tensor>>>,
    barrier: std::sync::Barrier,
}

impl ThreadCollective {
    /// One collective per rank of a world of `world` threads.
    pub fn world(world: usize) -> Vec<ThreadCollective> {
        let shared = std::sync::Arc::new(ThreadShared {
            world,
            slots: std::sync::Mutex::new(vec![None; world]),
            barrier: std::sync::Barrier::new(world),
        });
        (0..world)
            .map(|rank| ThreadCollective {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    /// `f` run by every rank of a world of `world` threads, each on its own thread with its own
    /// collective; the results in rank order.
    pub fn run<R: Send>(world: usize, f: impl Fn(&ThreadCollective) -> R + Sync) -> Vec<R> {
        std::thread::scope(|s| {
            let handles: Vec<_> = ThreadCollective::world(world)
                .into_iter()
                .map(|comm| {
                    let f = &f;
                    s.spawn(move || f(&comm))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a rank panicked"))
                .collect()
        })
    }
}

impl soup_core::Collective for ThreadCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.world
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        self.shared.slots.lock().expect("slots")[self.rank] = Some(t.clone());
        self.shared.barrier.wait();
        let sum = {
            let slots = self.shared.slots.lock().expect("slots");
            let mut it = slots
                .iter()
                .map(|s| s.as_ref().expect("every rank deposited"));
            let first = it.next().expect("a rank").clone();
            it.try_fold(first, |acc, t| acc + t)?
        };
        self.shared.barrier.wait();
        Ok(sum)
    }
}
