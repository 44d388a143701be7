//! Where the outside plugs in: model stores, objectives, collectives.

use candle_core::{Device, Tensor, Var};

use crate::error::{Result, SoupError};
use crate::layout::ParamLayout;

/// N models of one architecture, loaded on demand, so that a method holds only the models it asks
/// for. Loading the same model twice gives the same tensors.
pub trait ModelStore {
    /// Number of models, N.
    fn len(&self) -> usize;

    /// Whether the store holds no model.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A human name for model `i` (its file, say), used in errors and reports.
    fn name(&self, i: usize) -> String;

    /// The layout of model `i`, ideally without loading its weights.
    fn layout(&self, i: usize) -> Result<ParamLayout>;

    /// The tensors of model `i`, in the order of its layout.
    fn load(&self, i: usize) -> Result<Vec<Tensor>>;

    /// Tensor `tensor` (its index in the layout) of model `i`. Stores that can read one tensor
    /// without the rest override this: the data-free merges hold one tensor of every model at a
    /// time through it.
    fn load_tensor(&self, i: usize, tensor: usize) -> Result<Tensor> {
        let mut all = self.load(i)?;
        if tensor >= all.len() {
            return Err(crate::SoupError::config(
                "tensor",
                tensor,
                "is not the index of a tensor of the layout",
            ));
        }
        Ok(all.swap_remove(tensor))
    }

    /// The device [`Self::load`] puts tensors on (where sums over the models are made).
    fn device(&self) -> Device {
        Device::Cpu
    }
}

/// One mini-batch of the held-out data: batch `index` of the epoch whose order is drawn from
/// `epoch_seed`. The objective maps the pair to examples; equal pairs mean equal examples.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Batch {
    /// The seed the epoch's example order is drawn from.
    pub epoch_seed: u64,
    /// The mini-batch's position in the epoch.
    pub index: usize,
}

/// Evaluation of a model over a whole data split.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Metrics {
    /// Mean loss per example.
    pub loss: f64,
    /// Fraction of examples classified correctly, when the objective is a classifier.
    pub accuracy: Option<f64>,
    /// Number of examples evaluated.
    pub count: usize,
    /// What ranks models by these metrics ([`Self::score`]).
    #[cfg_attr(feature = "serde", serde(default))]
    pub rank: Rank,
}

/// What ranks models in selection (greedy soups, the best member).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum Rank {
    /// Accuracy when there is one, else the loss: classifiers.
    #[default]
    Accuracy,
    /// The loss, lowest first: language models, whose next-token accuracy says little next to
    /// the loss it comes with.
    Loss,
}

impl Metrics {
    /// The score that ranks models, higher first: accuracy when there is one and the metrics
    /// rank by it, else the negative loss.
    pub fn score(&self) -> f64 {
        match self.rank {
            Rank::Accuracy => self.accuracy.unwrap_or(-self.loss),
            Rank::Loss => -self.loss,
        }
    }
}

/// The training objective on the held-out data: a model architecture plus its data.
pub trait Objective {
    /// Number of mini-batches in one epoch over the held-out data.
    fn num_batches(&self) -> usize;

    /// The mean loss on `batch` of the model with parameters `params` (in layout order), as a
    /// tensor differentiable with respect to `params`. `logit_scale`, when given, multiplies the
    /// model's logits before the loss (the learned temperature of Learned-Soup).
    fn loss(
        &mut self,
        params: &[Tensor],
        logit_scale: Option<&Tensor>,
        batch: Batch,
    ) -> Result<Tensor>;

    /// The loss and ∇θ at `params` on `batch`, by backpropagation through [`Self::loss`]
    /// ([`autograd_loss_and_grad`]); an objective with a faster way to the same numbers overrides it.
    /// A parameter the loss does not depend on gets a zero gradient.
    fn loss_and_grad(&mut self, params: &[Tensor], batch: Batch) -> Result<(f64, Vec<Tensor>)> {
        autograd_loss_and_grad(self, params, batch)
    }

    /// Loss and metrics of `params` over the whole held-out data (this shard's part of it after
    /// [`Self::set_shard`]).
    fn evaluate(&mut self, params: &[Tensor]) -> Result<Metrics>;

    /// Restricts the objective to shard `rank` of `world` for a run over several processes
    /// (spec §3.7): afterwards [`Self::loss`] of a batch is the summed loss of this shard's
    /// examples of the batch divided by the size of the whole batch, so that the shards' losses
    /// and gradients add up to those of the whole batch; [`Self::evaluate`] covers this shard's
    /// part of the data. An objective that cannot split its data refuses worlds of more than one.
    fn set_shard(&mut self, rank: usize, world: usize) -> Result<()> {
        if world == 1 && rank == 0 {
            Ok(())
        } else {
            Err(SoupError::config(
                "world_size",
                world,
                "this objective cannot split its data across processes",
            ))
        }
    }
}

/// The loss and ∇θ at `params` on `batch` by candle's autograd through [`Objective::loss`] (the
/// default of [`Objective::loss_and_grad`]). A parameter the loss does not depend on gets a zero
/// gradient.
pub fn autograd_loss_and_grad<O: Objective + ?Sized>(
    objective: &mut O,
    params: &[Tensor],
    batch: Batch,
) -> Result<(f64, Vec<Tensor>)> {
    let vars: Vec<Var> = params
        .iter()
        .map(Var::from_tensor)
        .collect::<candle_core::Result<_>>()?;
    let inputs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let loss = objective.loss(&inputs, None, batch)?;
    let grads = loss.backward()?;
    let value = crate::transfer::scalar(&loss)?;
    let g = inputs
        .iter()
        .map(|t| match grads.get(t) {
            Some(g) => Ok(g.clone()),
            None => t.zeros_like(),
        })
        .collect::<candle_core::Result<_>>()?;
    Ok((value, g))
}

/// Communication between the processes of one run (spec §3.7). Every rank makes the same calls
/// in the same order; the sums are identical on every rank.
pub trait Collective {
    /// This process's rank, 0 to W − 1.
    fn rank(&self) -> usize;
    /// W, the number of processes.
    fn world_size(&self) -> usize;
    /// The element-wise sum of `t` over all ranks, returned on every rank.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;

    /// The element-wise sums of several tensors of one dtype, in one reduction.
    fn all_reduce_sum_each(&self, ts: &[Tensor]) -> Result<Vec<Tensor>> {
        if self.world_size() == 1 || ts.is_empty() {
            return Ok(ts.to_vec());
        }
        let flat = ts
            .iter()
            .map(Tensor::flatten_all)
            .collect::<candle_core::Result<Vec<_>>>()?;
        let summed = self.all_reduce_sum(&Tensor::cat(&flat, 0)?)?;
        let mut offset = 0;
        ts.iter()
            .map(|t| {
                let n = t.elem_count();
                let part = summed.narrow(0, offset, n)?.reshape(t.shape())?;
                offset += n;
                Ok(part)
            })
            .collect()
    }

    /// The element-wise sum of host numbers over all ranks.
    fn all_reduce_f64(&self, v: &[f64]) -> Result<Vec<f64>> {
        if self.world_size() == 1 {
            return Ok(v.to_vec());
        }
        let t = crate::transfer::upload(v, v.len(), candle_core::DType::F64, &Device::Cpu)?;
        crate::transfer::to_vec(&self.all_reduce_sum(&t)?)
    }
}

/// The collective of a run with one process: the sum over one rank is the tensor itself.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ranked by accuracy, the more accurate model wins; ranked by loss, the lower loss wins
    /// whatever the accuracies say.
    #[test]
    fn metrics_rank_by_what_they_say() {
        let m = |loss, accuracy, rank| Metrics {
            loss,
            accuracy: Some(accuracy),
            count: 10,
            rank,
        };
        let (a, b) = (m(2.0, 0.6, Rank::Accuracy), m(1.0, 0.5, Rank::Accuracy));
        assert!(a.score() > b.score());
        let (a, b) = (m(2.0, 0.6, Rank::Loss), m(1.0, 0.5, Rank::Loss));
        assert!(b.score() > a.score());
        let none = Metrics {
            accuracy: None,
            ..m(3.0, 0.0, Rank::Accuracy)
        };
        assert_eq!(none.score(), -3.0);
    }
}
