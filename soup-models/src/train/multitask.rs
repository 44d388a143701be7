//! Multi-task merging (spec §3.9): one shared encoder, one classification head per task kept from
//! that task's fine-tune, batches drawn from every task.
//!
//! [`EncoderStore`] is the zoo of encoders (a base θ_0 and the task models, their heads left
//! out) that soup-core merges; [`MultiTask`] is the objective: the summed loss of every task's
//! batch through the merged encoder and the task's own head, either AdaMerging's entropy of the
//! predictions (labels unused: the test inputs of each task) or labelled cross-entropy.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use soup_core::rng::derive_seed;
use soup_core::{Batch, Metrics, ModelStore, Objective, ParamLayout, TensorSpec};

use crate::arch::Architecture;
use crate::checkpoint::store::FileStore;
use crate::error::{ModelError, Result};
use crate::ops::{cross_entropy, log_softmax};
use crate::train::objective::Classification;

/// The tensors of `arch` but its head: what a multi-task merge merges.
pub fn encoder_layout(arch: &dyn Architecture) -> ParamLayout {
    let head = arch.head_tensors();
    ParamLayout::new(
        arch.layout()
            .tensors
            .iter()
            .filter(|t| !head.contains(&t.name))
            .cloned()
            .collect(),
    )
}

/// The encoders of checkpoints of one family whose heads may differ (a base and models
/// fine-tuned from it on tasks with different classes): each checkpoint is read with its own
/// architecture and handed out without its head.
#[derive(Debug)]
pub struct EncoderStore {
    /// One store per checkpoint, with that checkpoint's architecture.
    pub models: Vec<FileStore>,
    /// The shared encoder layout (the first model's).
    pub encoder: ParamLayout,
    /// Per model: the positions of the encoder's tensors in its full layout.
    picks: Vec<Vec<usize>>,
}

impl EncoderStore {
    /// The encoders of `models` (path and architecture each), on `device`. Every model's encoder
    /// must be the first's, name for name and shape for shape.
    pub fn new(models: Vec<(PathBuf, Arc<dyn Architecture>)>, device: &Device) -> Result<Self> {
        let Some((first_path, first)) = models.first() else {
            return Err(ModelError::format(
                std::path::Path::new("<zoo>"),
                "the zoo is empty",
            ));
        };
        let encoder = encoder_layout(first.as_ref());
        let mut picks = Vec::with_capacity(models.len());
        for (path, arch) in &models {
            if arch.family() != first.family() {
                return Err(ModelError::format(
                    path,
                    format!(
                        "a {} model cannot be merged with the {} model {}",
                        arch.family(),
                        first.family(),
                        first_path.display()
                    ),
                ));
            }
            let index: HashMap<&str, usize> = arch
                .layout()
                .tensors
                .iter()
                .enumerate()
                .map(|(i, t)| (t.name.as_str(), i))
                .collect();
            let mut pick = Vec::with_capacity(encoder.len());
            for spec in &encoder.tensors {
                match index.get(spec.name.as_str()) {
                    Some(&i) if arch.layout().tensors[i].shape == spec.shape => pick.push(i),
                    _ => {
                        return Err(ModelError::format(
                            path,
                            format!(
                                "its encoder differs from that of {} at tensor {} {:?}",
                                first_path.display(),
                                spec.name,
                                spec.shape
                            ),
                        ))
                    }
                }
            }
            picks.push(pick);
        }
        let models = models
            .into_iter()
            .map(|(p, a)| FileStore::with_arch(vec![p], a, device.clone()))
            .collect();
        Ok(Self {
            models,
            encoder,
            picks,
        })
    }

    /// Model `i`'s head tensors, in the order of its architecture's [`Architecture::head_tensors`].
    pub fn head(&self, i: usize) -> soup_core::Result<Vec<Tensor>> {
        let store = &self.models[i];
        let names = store.arch.head_tensors();
        let all = store.load(0)?;
        let layout = store.arch.layout();
        Ok(names
            .iter()
            .filter_map(|n| layout.tensors.iter().position(|t| &t.name == n))
            .map(|k| all[k].clone())
            .collect())
    }
}

impl ModelStore for EncoderStore {
    fn len(&self) -> usize {
        self.models.len()
    }

    fn name(&self, i: usize) -> String {
        self.models[i].name(0)
    }

    fn layout(&self, i: usize) -> soup_core::Result<ParamLayout> {
        let full = self.models[i].layout(0)?;
        Ok(ParamLayout::new(
            self.picks[i]
                .iter()
                .map(|&k| full.tensors[k].clone())
                .collect::<Vec<TensorSpec>>(),
        ))
    }

    fn load(&self, i: usize) -> soup_core::Result<Vec<Tensor>> {
        let all = self.models[i].load(0)?;
        Ok(self.picks[i].iter().map(|&k| all[k].clone()).collect())
    }

    fn load_tensor(&self, i: usize, tensor: usize) -> soup_core::Result<Tensor> {
        let k = *self.picks[i].get(tensor).ok_or_else(|| {
            soup_core::SoupError::config(
                "tensor",
                tensor,
                "is not the index of a tensor of the encoder",
            )
        })?;
        self.models[i].load_tensor(0, k)
    }

    fn device(&self) -> Device {
        self.models
            .first()
            .map_or(Device::Cpu, |m| m.device.clone())
    }
}

/// The loss a multi-task merge minimises, summed over the tasks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskLoss {
    /// AdaMerging's: the mean Shannon entropy −Σ_c p_c log p_c of each task's predictions on
    /// its batch (labels unused).
    Entropy,
    /// Labelled cross-entropy of each task's batch.
    CrossEntropy,
}

/// One task: its data, read through its own architecture, and its head.
#[derive(Clone, Debug)]
pub struct Task {
    pub name: String,
    /// The task's data and architecture (its number of classes); batches, evaluation.
    pub classification: Classification,
    /// The head's tensors, in the order of the architecture's [`Architecture::head_tensors`].
    pub head: Vec<Tensor>,
}

/// The objective of a multi-task merge: the parameters it is handed are the shared encoder's
/// (in the encoder layout); each task's logits come from them and the task's head.
#[derive(Clone, Debug)]
pub struct MultiTask {
    pub encoder: ParamLayout,
    pub tasks: Vec<Task>,
    pub loss: TaskLoss,
}

impl MultiTask {
    /// Task `k`'s full parameter list: the encoder's tensors and the task's head, in the order
    /// of the task's architecture.
    pub fn task_params(&self, k: usize, encoder: &[Tensor]) -> soup_core::Result<Vec<Tensor>> {
        let task = &self.tasks[k];
        let arch = &task.classification.arch;
        let heads = arch.head_tensors();
        let at: HashMap<&str, usize> = self
            .encoder
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.as_str(), i))
            .collect();
        arch.layout()
            .tensors
            .iter()
            .map(|spec| {
                if let Some(h) = heads.iter().position(|n| n == &spec.name) {
                    return Ok(task.head[h].to_device(encoder[0].device())?);
                }
                match at.get(spec.name.as_str()) {
                    Some(&i) => Ok(encoder[i].clone()),
                    None => Err(soup_core::SoupError::config(
                        "task",
                        &task.name,
                        "its architecture has a tensor the encoder lacks",
                    )),
                }
            })
            .collect()
    }

    /// Batch `batch` of task `k`: the task's own permutation (the epoch seed and k), cycled so
    /// that a task smaller than the largest one starts over.
    fn task_batch(&self, k: usize, batch: Batch) -> Batch {
        let c = &self.tasks[k].classification;
        let own = c.num_batches().max(1);
        Batch {
            epoch_seed: derive_seed(batch.epoch_seed, &[k as u64, (batch.index / own) as u64]),
            index: batch.index % own,
        }
    }

    /// Loss and metrics of every task at the merged encoder `encoder`, in task order.
    pub fn evaluate_tasks(&mut self, encoder: &[Tensor]) -> soup_core::Result<Vec<Metrics>> {
        (0..self.tasks.len())
            .map(|k| {
                let params = self.task_params(k, encoder)?;
                self.tasks[k].classification.evaluate(&params)
            })
            .collect()
    }
}

/// The mean over the rows of −Σ_c p_c log p_c, p = softmax(logits).
pub fn mean_entropy(logits: &Tensor) -> candle_core::Result<Tensor> {
    let n = logits.dim(0)?;
    let log_p = log_softmax(logits)?;
    (log_p.exp()? * log_p)?
        .sum_all()?
        .affine(-1.0 / n.max(1) as f64, 0.0)
}

impl Objective for MultiTask {
    /// The largest task's batches per epoch (the smaller tasks cycle).
    fn num_batches(&self) -> usize {
        self.tasks
            .iter()
            .map(|t| t.classification.num_batches())
            .max()
            .unwrap_or(0)
    }

    fn loss(
        &mut self,
        params: &[Tensor],
        logit_scale: Option<&Tensor>,
        batch: Batch,
    ) -> soup_core::Result<Tensor> {
        let mut total: Option<Tensor> = None;
        for k in 0..self.tasks.len() {
            let full = self.task_params(k, params)?;
            let c = &self.tasks[k].classification;
            let rows = c.batch_rows(self.task_batch(k, batch));
            let (mut logits, labels) = c.logits(&full, &rows)?;
            if let Some(s) = logit_scale {
                logits = logits.broadcast_mul(s)?;
            }
            let loss = match self.loss {
                TaskLoss::Entropy => mean_entropy(&logits)?,
                TaskLoss::CrossEntropy => cross_entropy(&logits, &labels, c.label_smoothing)?,
            };
            total = Some(match total {
                None => loss,
                Some(t) => (t + loss)?,
            });
        }
        total.ok_or(soup_core::SoupError::NoData)
    }

    /// The tasks' mean loss (the objective's, summed per task, divided by the number of tasks:
    /// the entropy for [`TaskLoss::Entropy`]) and their mean accuracy (FusionBench's "average").
    fn evaluate(&mut self, params: &[Tensor]) -> soup_core::Result<Metrics> {
        let per_task = self.evaluate_tasks(params)?;
        let k = per_task.len().max(1) as f64;
        let loss = match self.loss {
            TaskLoss::CrossEntropy => per_task.iter().map(|m| m.loss).sum::<f64>() / k,
            TaskLoss::Entropy => {
                let mut sum = 0.0;
                for t in 0..self.tasks.len() {
                    sum += self.entropy_of(t, params)?;
                }
                sum / k
            }
        };
        Ok(Metrics {
            rank: Default::default(),
            loss,
            accuracy: Some(per_task.iter().filter_map(|m| m.accuracy).sum::<f64>() / k),
            count: per_task.iter().map(|m| m.count).sum(),
        })
    }
}

impl MultiTask {
    /// Task `k`'s mean prediction entropy over its whole data.
    fn entropy_of(&self, k: usize, encoder: &[Tensor]) -> soup_core::Result<f64> {
        let full = self.task_params(k, encoder)?;
        let c = &self.tasks[k].classification;
        let n = c.data.len();
        let step = c.eval_batch_size.max(1);
        let mut sum = 0.0;
        for start in (0..n).step_by(step) {
            let rows: Vec<u32> = (start..(start + step).min(n)).map(|i| i as u32).collect();
            let (logits, _) = c.logits(&full, &rows)?;
            let e = mean_entropy(&logits.detach())?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
            sum += e * rows.len() as f64;
        }
        Ok(sum / n.max(1) as f64)
    }
}
