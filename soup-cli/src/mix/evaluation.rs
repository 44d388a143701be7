//! The data a single-task soup learns from and is scored on: labelled images for a classifier,
//! windows of text for a language model (its tokenizer read from the zoo's first model). One
//! [`Objective`] over the held-out split, switched to the test split for the final scores.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use candle_core::Tensor;
use soup_core::{Batch, Metrics, Objective};
use soup_models::arch::InputSpec;
use soup_models::data::Split;
use soup_models::{Architecture, Classification, Dataset, LanguageModeling};

use crate::common::DataArgs;
use crate::error::Result;
use crate::recipe::Recipe;

/// Evaluation batches: the largest a run uses for images; a language model's batches of
/// windows hold a vocabulary-sized row of logits per token, so they stay small.
const IMAGE_EVAL_BATCH: usize = 256;
const TEXT_EVAL_BATCH: usize = soup_models::train::language::EVAL_BATCH;

pub(super) enum Evaluation {
    Images {
        objective: Classification,
        test: Option<Dataset>,
    },
    Text {
        objective: LanguageModeling,
        test: Option<Vec<Vec<u32>>>,
        /// The domains of a union of text data sets, with their windows' positions in the
        /// held-out and test splits.
        domains: Vec<DomainSlices>,
    },
}

/// Where one domain's windows are in the held-out and test splits.
pub(super) struct DomainSlices {
    pub name: String,
    heldout: Range<usize>,
    test: Range<usize>,
}

/// One domain's scores on both splits.
pub(super) struct DomainMetrics {
    pub name: String,
    pub heldout: Metrics,
    pub test: Metrics,
}

impl Evaluation {
    /// The held-out and test splits of `data` for `arch`; `model_dir` holds a language model's
    /// tokenizer.
    pub fn load(
        data: &DataArgs,
        arch: &Arc<dyn Architecture>,
        recipe: &Recipe,
        model_dir: &Path,
    ) -> Result<Self> {
        Ok(match arch.input() {
            InputSpec::Images(_) => {
                let heldout = data.load(Split::Heldout, arch)?;
                let test = data.load(Split::Test, arch)?;
                let objective = Classification {
                    eval_batch_size: IMAGE_EVAL_BATCH,
                    label_smoothing: recipe.label_smoothing.unwrap_or(0.0),
                    ..Classification::new(arch.clone(), heldout, recipe.batch_size.unwrap_or(128))
                };
                Evaluation::Images {
                    objective,
                    test: Some(test),
                }
            }
            InputSpec::Tokens(spec) => {
                let heldout = data.load_domains(Split::Heldout, model_dir, &spec)?;
                let test = data.load_domains(Split::Test, model_dir, &spec)?;
                let ranges = |split: &[crate::common::Domain]| {
                    let mut start = 0;
                    split
                        .iter()
                        .map(|d| {
                            start += d.windows.len();
                            start - d.windows.len()..start
                        })
                        .collect::<Vec<_>>()
                };
                let domains = heldout
                    .iter()
                    .zip(ranges(&heldout).into_iter().zip(ranges(&test)))
                    .map(|(d, (heldout, test))| DomainSlices {
                        name: d.name.clone(),
                        heldout,
                        test,
                    })
                    .collect();
                let join = |split: Vec<crate::common::Domain>| -> Vec<Vec<u32>> {
                    split.into_iter().flat_map(|d| d.windows).collect()
                };
                let batch = recipe.batch_size.unwrap_or(TEXT_EVAL_BATCH);
                let mut objective = LanguageModeling::new(arch.clone(), join(heldout), batch)?;
                objective.eval_batch_size = TEXT_EVAL_BATCH;
                Evaluation::Text {
                    objective,
                    test: Some(join(test)),
                    domains,
                }
            }
        })
    }

    /// Examples (images, or windows of text) of the split in use.
    pub fn len(&self) -> usize {
        match self {
            Evaluation::Images { objective, .. } => objective.data.len(),
            Evaluation::Text { objective, .. } => objective.windows.len(),
        }
    }

    /// Examples of the test split (before [`Self::use_test`]).
    pub fn test_len(&self) -> usize {
        match self {
            Evaluation::Images { test, .. } => test.as_ref().map_or(0, Dataset::len),
            Evaluation::Text { test, .. } => test.as_ref().map_or(0, Vec::len),
        }
    }

    /// Examples per training batch, and per evaluation batch.
    pub fn batch_sizes(&self) -> (usize, usize) {
        match self {
            Evaluation::Images { objective, .. } => {
                (objective.batch_size, objective.eval_batch_size)
            }
            Evaluation::Text { objective, .. } => (objective.batch_size, objective.eval_batch_size),
        }
    }

    /// Bytes the data and the vocabulary-sized activations hold: the images (or the ones a batch
    /// streams); or the windows' ids, one evaluation batch's logits (f32) with their
    /// log-softmax, and one chunk of a training step's logits (the tape's fused head holds
    /// `VOCAB_CHUNK_ROWS` at a time, or the whole batch's through autograd).
    pub fn resident_bytes(&self) -> u64 {
        match self {
            Evaluation::Images { objective, test } => {
                objective.data.resident_bytes(IMAGE_EVAL_BATCH)
                    + test
                        .as_ref()
                        .map_or(0, |t| t.resident_bytes(IMAGE_EVAL_BATCH))
            }
            Evaluation::Text {
                objective, test, ..
            } => {
                let t = objective.seq_len() as u64;
                let windows = (objective.windows.len() + test.as_ref().map_or(0, Vec::len)) as u64;
                let vocab = objective.arch.num_classes() as u64;
                let chunk = soup_models::ops::cpu::VOCAB_CHUNK_ROWS as u64;
                let step_rows = (objective.batch_size as u64 * t).min(chunk);
                4 * t * windows + 2 * 4 * TEXT_EVAL_BATCH as u64 * t * vocab + 4 * step_rows * vocab
            }
        }
    }

    /// Whether the data are text (the scores then read loss per token and perplexity).
    pub fn is_text(&self) -> bool {
        matches!(self, Evaluation::Text { .. })
    }

    /// The final scores of `params` on the held-out and test splits, and for a union of text
    /// data sets each domain's (the union's then weighs the domains by their tokens). Leaves the
    /// objective on the test split.
    pub fn final_scores(
        &mut self,
        params: &[Tensor],
    ) -> Result<(Metrics, Metrics, Vec<DomainMetrics>)> {
        let (objective, test, domains) = match self {
            Evaluation::Text {
                objective,
                test,
                domains,
            } if domains.len() > 1 => (objective, test, domains),
            _ => {
                let heldout = self.evaluate(params)?;
                self.use_test();
                return Ok((heldout, self.evaluate(params)?, Vec::new()));
            }
        };
        let test = test.take().unwrap_or_default();
        let heldout = objective.windows.clone();
        let arch = objective.arch.clone();
        let score = |windows: &[Vec<u32>]| -> Result<Metrics> {
            let mut one = LanguageModeling::new(arch.clone(), windows.to_vec(), TEXT_EVAL_BATCH)?;
            Ok(one.evaluate(params)?)
        };
        let mut each = Vec::with_capacity(domains.len());
        for d in domains.iter() {
            each.push(DomainMetrics {
                name: d.name.clone(),
                heldout: score(&heldout[d.heldout.clone()])?,
                test: score(&test[d.test.clone()])?,
            });
        }
        objective.windows = Arc::new(test);
        let union = |pick: fn(&DomainMetrics) -> &Metrics| {
            let count: usize = each.iter().map(|d| pick(d).count).sum();
            let mean = |f: fn(&Metrics) -> f64| {
                each.iter()
                    .map(|d| f(pick(d)) * pick(d).count as f64)
                    .sum::<f64>()
                    / count.max(1) as f64
            };
            Metrics {
                loss: mean(|m| m.loss),
                accuracy: Some(mean(|m| m.accuracy.unwrap_or(0.0))),
                count,
                rank: soup_core::Rank::Loss,
            }
        };
        Ok((union(|d| &d.heldout), union(|d| &d.test), each))
    }

    /// From now on, the test split (once).
    pub fn use_test(&mut self) {
        match self {
            Evaluation::Images { objective, test } => {
                if let Some(test) = test.take() {
                    objective.data = test;
                }
            }
            Evaluation::Text {
                objective, test, ..
            } => {
                if let Some(test) = test.take() {
                    objective.windows = Arc::new(test);
                }
            }
        }
    }

    /// The first evaluation batch alone, as its own objective (for the dry run's timing).
    pub fn first_batch(&self) -> Result<Evaluation> {
        Ok(match self {
            Evaluation::Images { objective, .. } => {
                let first = objective.data.len().min(objective.eval_batch_size);
                let rows: Vec<u32> = (0..first as u32).collect();
                let (images, labels) = objective.data.select(&rows)?;
                let mut data = Dataset::in_memory(images, labels);
                data.classes = objective.data.classes.clone();
                Evaluation::Images {
                    objective: Classification {
                        eval_batch_size: objective.eval_batch_size,
                        ..Classification::new(objective.arch.clone(), data, first)
                    },
                    test: None,
                }
            }
            Evaluation::Text { objective, .. } => {
                let first = objective.windows.len().min(objective.eval_batch_size);
                let windows = objective.windows[..first].to_vec();
                Evaluation::Text {
                    objective: LanguageModeling::new(objective.arch.clone(), windows, first)?,
                    test: None,
                    domains: Vec::new(),
                }
            }
        })
    }

    fn objective(&mut self) -> &mut dyn Objective {
        match self {
            Evaluation::Images { objective, .. } => objective,
            Evaluation::Text { objective, .. } => objective,
        }
    }
}

impl Objective for Evaluation {
    fn num_batches(&self) -> usize {
        match self {
            Evaluation::Images { objective, .. } => objective.num_batches(),
            Evaluation::Text { objective, .. } => objective.num_batches(),
        }
    }

    fn loss(
        &mut self,
        params: &[Tensor],
        logit_scale: Option<&Tensor>,
        batch: Batch,
    ) -> soup_core::Result<Tensor> {
        self.objective().loss(params, logit_scale, batch)
    }

    fn loss_and_grad(
        &mut self,
        params: &[Tensor],
        batch: Batch,
    ) -> soup_core::Result<(f64, Vec<Tensor>)> {
        self.objective().loss_and_grad(params, batch)
    }

    fn evaluate(&mut self, params: &[Tensor]) -> soup_core::Result<Metrics> {
        self.objective().evaluate(params)
    }

    fn set_shard(&mut self, rank: usize, world: usize) -> soup_core::Result<()> {
        self.objective().set_shard(rank, world)
    }
}
