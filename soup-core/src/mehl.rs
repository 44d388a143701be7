//! The MEHL-Soup driver: block coordinate descent over model batches (spec §3.5).

use std::time::Instant;

use candle_core::{DType, Tensor};

use crate::error::{Result, SoupError};
use crate::hyperplane::{Base, Directions, Hyperplane};
use crate::layout::{from_blocks, frozen_blocks, to_blocks, Block, BlockCut, ParamLayout};
use crate::optim::{clip_coefficient, Optimizer, OptimizerKind};
use crate::options::RunOptions;
use crate::result::{bytes_of, BatchEval, MemoryAccount, SoupResult, StepRecord, Timings};
use crate::rng::{derive_seed, permutation};
use crate::schedule::StepSchedule;
use crate::traits::{Batch, Collective, Metrics, ModelStore, Objective};
use crate::zoo::{scale, Zoo};

/// Every knob of the authors' MEHL-Soup code. MEHL-Soup and MEHL-Soup+ differ only in `block_cut`.
#[derive(Clone, Debug, PartialEq)]
pub struct MehlConfig {
    /// b: models per model batch (the last batch of a pass may be smaller).
    pub model_batch: usize,
    /// E_out: passes over all models.
    pub outer_passes: usize,
    /// E_in: epochs over the held-out data per model batch.
    pub inner_epochs: usize,
    /// η, the peak learning rate.
    pub lr: f64,
    /// λ, weight decay on X.
    pub weight_decay: f64,
    /// The optimizer of X.
    pub optimizer: OptimizerKind,
    /// The step schedule of every model batch.
    pub schedule: StepSchedule,
    /// Clip ∇θ to this global L2 norm before projecting it (the authors clip ViTs at 1.0).
    pub clip_grad_norm: Option<f64>,
    /// The blocks with a coefficient each: one per model (`WHOLE`, MEHL-Soup) or per tensor (MEHL-Soup+).
    pub block_cut: BlockCut,
    /// Tensors whose loss gradient is identically zero (e.g. a CLIP key bias: softmax cancels
    /// it). A block made only of such tensors is frozen: its x stays 0, so its α stays the
    /// center's. Otherwise AdamW normalises the rounding noise of its gradient into full-size
    /// steps and α drifts at random (the authors' code does so; a deviation, `docs/MEHL-SOUP.md`).
    pub frozen_tensors: Vec<String>,
    /// Fixes the model order of every pass and the data order of every inner epoch.
    pub seed: u64,
    /// Evaluate the soup on the held-out data after every model batch.
    pub evaluate_each_model_batch: bool,
    /// The dtype the directions are stored in (`None`: the models'). bf16 or f16 beside f32
    /// models halves the memory and bandwidth of the directions; the kernels widen them to f32.
    /// The hyperplane then holds θ = c + Σ X d̃ with rounded directions d̃, so the soup returned
    /// at the end is recomputed from the models and α (one more pass over the zoo), not taken
    /// from that θ (`docs/MEHL-SOUP.md` §3.8).
    pub direction_dtype: Option<DType>,
    /// Whether a model soup's directions are normalised (the authors') or the models'
    /// differences from the center, so that X is the change of α (spec §3.4). Task vectors
    /// (below) are never normalised.
    pub directions: Directions,
    /// Merge models fine-tuned from one base model on different tasks (spec §3.9, AdaMerging
    /// through MEHL): the directions are task vectors from the base, which no model batch holds.
    /// `None`: a model soup.
    pub task_vectors: Option<TaskVectors>,
}

/// AdaMerging's parameterisation θ = θ_0 + Σ_k λ_k (θ_k − θ_0) (per block for layer-wise
/// AdaMerging+), learned by MEHL's block coordinate descent over batches of task models
/// (spec §3.9). θ_0's coefficient is 1 − Σ λ_k.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskVectors {
    /// θ_0's index in the zoo.
    pub base: usize,
    /// λ of every task model in the first soup θ_0 + prior · Σ_k τ_k (AdaMerging: 0.3).
    pub prior: f64,
    /// The range λ is clamped into in the forward pass (AdaMerging: [0, 1]); `None`: unclamped.
    pub clamp: Option<(f64, f64)>,
}

impl TaskVectors {
    /// AdaMerging's choices: prior 0.3, λ clamped into [0, 1].
    pub fn adamerging(base: usize) -> Self {
        Self {
            base,
            prior: 0.3,
            clamp: Some((0.0, 1.0)),
        }
    }
}

impl MehlConfig {
    /// MEHL-Soup+ with the defaults of the authors' ImageNet run: AdamW lr 0.01, wd 0, E_in 5,
    /// b 18, E_out 1, one block per tensor, seed 1, gradient clip 1.0, warm-up 0.2 + cosine.
    pub fn mehl_plus() -> Self {
        Self {
            model_batch: 18,
            outer_passes: 1,
            inner_epochs: 5,
            lr: 0.01,
            weight_decay: 0.0,
            optimizer: OptimizerKind::ADAMW,
            schedule: StepSchedule::default(),
            clip_grad_norm: Some(1.0),
            block_cut: BlockCut::PER_TENSOR,
            frozen_tensors: Vec::new(),
            seed: 1,
            evaluate_each_model_batch: true,
            direction_dtype: None,
            directions: Directions::Unit,
            task_vectors: None,
        }
    }

    /// AdaMerging+ (layer-wise: one λ per task model and tensor) through MEHL with AdaMerging's
    /// optimisation: Adam at a constant lr 1e-3, no clipping, no weight decay, one pass; base θ_0
    /// at zoo index `base`. The caller sets the model batch and steps (E_in epochs of its data).
    pub fn adamerging_plus(base: usize) -> Self {
        Self {
            model_batch: usize::MAX,
            inner_epochs: 1,
            lr: 1e-3,
            schedule: StepSchedule::Constant,
            clip_grad_norm: None,
            task_vectors: Some(TaskVectors::adamerging(base)),
            ..Self::mehl_plus()
        }
    }

    /// AdaMerging (task-wise: one λ per task model).
    pub fn adamerging(base: usize) -> Self {
        Self {
            block_cut: BlockCut::WHOLE,
            ..Self::adamerging_plus(base)
        }
    }

    /// MEHL-Soup: the same with one block for the whole model.
    pub fn mehl() -> Self {
        Self {
            block_cut: BlockCut::WHOLE,
            ..Self::mehl_plus()
        }
    }

    /// Checks every knob; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        if self.model_batch == 0 {
            return Err(SoupError::config("model_batch", 0, "must be at least 1"));
        }
        if self.outer_passes == 0 {
            return Err(SoupError::config("outer_passes", 0, "must be at least 1"));
        }
        if self.inner_epochs == 0 {
            return Err(SoupError::config("inner_epochs", 0, "must be at least 1"));
        }
        let uses_lr = !matches!(self.schedule, StepSchedule::ConvergenceRate { .. });
        if uses_lr && !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(SoupError::config(
                "lr",
                self.lr,
                "must be a positive number",
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(SoupError::config(
                "weight_decay",
                self.weight_decay,
                "must be ≥ 0",
            ));
        }
        if let Some(clip) = self.clip_grad_norm {
            if !(clip.is_finite() && clip > 0.0) {
                return Err(SoupError::config(
                    "clip_grad_norm",
                    clip,
                    "must be a positive number",
                ));
            }
        }
        if let Some(dtype) = self.direction_dtype {
            if !matches!(dtype, DType::BF16 | DType::F16 | DType::F32 | DType::F64) {
                return Err(SoupError::config(
                    "direction_dtype",
                    dtype.as_str(),
                    "must be bf16, f16, f32 or f64",
                ));
            }
        }
        if let Some(tv) = &self.task_vectors {
            if !tv.prior.is_finite() {
                return Err(SoupError::config("prior", tv.prior, "must be a number"));
            }
            if let Some((lo, hi)) = tv.clamp {
                if !(lo.is_finite() && hi.is_finite() && lo < hi) {
                    return Err(SoupError::config(
                        "clamp",
                        format!("[{lo}, {hi}]"),
                        "must be a finite range with low < high",
                    ));
                }
            }
        }
        validate_optimizer(&self.optimizer)?;
        validate_schedule(&self.schedule)
    }
}

pub(crate) fn validate_optimizer(kind: &OptimizerKind) -> Result<()> {
    let unit = |v: f64| (0.0..1.0).contains(&v);
    match *kind {
        OptimizerKind::Sgd { momentum } if !unit(momentum) => {
            Err(SoupError::config("momentum", momentum, "must be in [0, 1)"))
        }
        OptimizerKind::AdamW { beta1, .. } if !unit(beta1) => {
            Err(SoupError::config("beta1", beta1, "must be in [0, 1)"))
        }
        OptimizerKind::AdamW { beta2, .. } if !unit(beta2) => {
            Err(SoupError::config("beta2", beta2, "must be in [0, 1)"))
        }
        OptimizerKind::AdamW { eps, .. } if !(eps.is_finite() && eps > 0.0) => {
            Err(SoupError::config("eps", eps, "must be a positive number"))
        }
        _ => Ok(()),
    }
}

pub(crate) fn validate_schedule(schedule: &StepSchedule) -> Result<()> {
    match *schedule {
        StepSchedule::WarmupCosine { warmup_fraction }
            if !(0.0..1.0).contains(&warmup_fraction) =>
        {
            Err(SoupError::config(
                "warmup_fraction",
                warmup_fraction,
                "must be in [0, 1)",
            ))
        }
        StepSchedule::ConvergenceRate { scale, .. } if !(scale.is_finite() && scale > 0.0) => Err(
            SoupError::config("scale", scale, "must be a positive number"),
        ),
        StepSchedule::ConvergenceRate {
            smoothness: Some(beta),
            ..
        } if !(beta.is_finite() && beta > 0.0) => Err(SoupError::config(
            "smoothness",
            beta,
            "must be a positive number",
        )),
        _ => Ok(()),
    }
}

/// What the driver reports while it runs, for progress display and for tests of the invariants.
pub enum Event<'a> {
    /// A model batch starts: its hyperplane is built and X = 0.
    BatchStart {
        /// Which pass over all models.
        outer_pass: usize,
        /// Which model batch of the run.
        model_batch: usize,
        /// Its hyperplane, at X = 0.
        hyperplane: &'a Hyperplane,
    },
    /// A coefficient step was taken; `hyperplane.x` holds the updated X.
    Step {
        /// The step's loss, norm and learning rate.
        record: &'a StepRecord,
        /// The hyperplane after the step.
        hyperplane: &'a Hyperplane,
    },
    /// A step of Learned-Soup's coefficients (every model in memory: no hyperplane).
    LearnedStep {
        /// The step's loss, norm and learning rate.
        record: &'a StepRecord,
    },
    /// A model batch ended; `metrics` when the held-out data was evaluated. `progress` is the
    /// state from which [`run_mehl`] continues the run after this batch ([`RunOptions::resume`]).
    BatchEnd {
        /// Which model batch of the run.
        model_batch: usize,
        /// Its hyperplane at the batch's last X.
        hyperplane: &'a Hyperplane,
        /// The held-out metrics of the soup, when evaluated.
        metrics: Option<Metrics>,
        /// The state a resumed run continues from.
        progress: &'a MehlProgress,
    },
}

/// A MEHL run between two model batches: everything the rest of the run depends on. The model
/// order of every pass and the data order of every epoch derive from the seed, so resuming from
/// here with the same inputs gives the same soup, bit for bit, as the uninterrupted run.
///
/// With the `serde` feature it serialises all but the tensors of `soup_blocks`, which a caller
/// saves in a tensor format beside it.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct MehlProgress {
    /// Model batches completed, counted over the whole run.
    pub model_batches_done: usize,
    /// Coefficient steps taken.
    pub global_step: usize,
    /// The soup after them, as block vectors of the run's block cut.
    #[cfg_attr(feature = "serde", serde(skip))]
    pub soup_blocks: Vec<Tensor>,
    /// α[l][j] of that soup.
    pub alpha: Vec<Vec<f64>>,
    /// Every step taken so far.
    pub history: Vec<StepRecord>,
    /// The held-out evaluations so far.
    pub evaluations: Vec<BatchEval>,
}

/// Step of the secant that estimates the smoothness β along the gradient, in units of X (with
/// unit directions, X moves θ by this distance).
pub const SECANT_STEP: f64 = 1e-2;

/// The models of a model batch that rank `rank` of `world` holds: a contiguous share of
/// ⌈b/W⌉ (the last ranks may hold fewer, or none).
pub fn share(members: &[usize], rank: usize, world: usize) -> &[usize] {
    let k = members.len().div_ceil(world.max(1));
    let start = (rank * k).min(members.len());
    &members[start..(start + k).min(members.len())]
}

/// Runs MEHL-Soup (or MEHL-Soup+, by the block cut) over the models of `store`, learning the
/// coefficients on `objective`'s held-out data by block coordinate descent over model batches
/// (spec §3.5). At most `model_batch` directions and one loaded model are resident at any time.
///
/// `options` may continue an earlier run from its saved progress (timings and the memory account
/// then cover the part of the run done by this call), and may run it as one of several processes
/// (spec §3.7): every process runs this with the same arguments; each loads only its [`share`]
/// of every model batch (its directions and rows of X) and its shard of every data mini-batch
/// (see [`Objective::set_shard`]). Per step, θ − c and ∇θ are summed over the processes; the
/// first center is the summed mean. Every process returns the same soup and α, equal to the
/// one-process run's up to rounding.
pub fn run_mehl(
    store: &dyn ModelStore,
    objective: &mut dyn Objective,
    config: &MehlConfig,
    options: RunOptions,
) -> Result<SoupResult> {
    config.validate()?;
    let RunOptions {
        progress,
        comm,
        observer,
        portable,
    } = options;
    let mut ignore = |_: &Event| {};
    let observer: &mut dyn FnMut(&Event) = match observer {
        Some(observer) => observer,
        None => &mut ignore,
    };
    let (rank, world) = (comm.rank(), comm.world_size());
    if world > 1 {
        objective.set_shard(rank, world)?;
    }
    let zoo = Zoo::open(store)?;
    let mut run = Run::new(config, comm, &zoo, objective.num_batches())?;
    run.portable = portable;
    let n = zoo.len();
    // The current soup as block vectors and its α; None before the first model batch.
    let mut soup: Option<(Vec<Tensor>, Vec<Vec<f64>>)> = None;
    let mut done = 0;
    if let Some(p) = progress {
        check_progress(&p, &run.blocks, n)?;
        done = p.model_batches_done;
        run.global_step = p.global_step;
        run.history = p.history;
        run.evaluations = p.evaluations;
        soup = Some((p.soup_blocks, p.alpha));
    }

    // The models the batches are drawn from: all, or all but the base.
    let pool = run.pool.clone();
    let b = config.model_batch.min(pool.len());
    let mut model_batch = 0;
    for outer_pass in 0..config.outer_passes {
        let order: Vec<usize> = permutation(
            pool.len(),
            derive_seed(config.seed, &[0, outer_pass as u64]),
        )
        .into_iter()
        .map(|i| pool[i])
        .collect();
        for members in order.chunks(b) {
            if model_batch < done {
                model_batch += 1;
                continue;
            }
            let mut hp = run.start_batch(members, soup.take())?;
            observer(&Event::BatchStart {
                outer_pass,
                model_batch,
                hyperplane: &hp,
            });
            let theta = run.train_batch(&mut hp, objective, outer_pass, model_batch, observer)?;
            let (progress, metrics) = run.end_batch(&hp, &theta, objective, model_batch)?;
            observer(&Event::BatchEnd {
                model_batch,
                hyperplane: &hp,
                metrics,
                progress: &progress,
            });
            soup = Some((progress.soup_blocks, progress.alpha));
            model_batch += 1;
        }
    }

    let Some((soup_blocks, alpha)) = soup else {
        return Err(SoupError::config(
            "resume",
            done,
            "the saved run has more model batches than this configuration",
        ));
    };
    run.finish(soup_blocks, alpha)
}

/// A run's state across model batches: the zoo and its blocks, the step counts of the schedule,
/// and what the run has recorded so far.
struct Run<'a> {
    config: &'a MehlConfig,
    comm: &'a dyn Collective,
    zoo: &'a Zoo<'a>,
    layout: ParamLayout,
    blocks: Vec<Block>,
    /// Per block: frozen (`MehlConfig::frozen_tensors`).
    frozen: Vec<bool>,
    /// Data mini-batches per inner epoch.
    num_batches: usize,
    /// S: steps per model batch.
    steps: usize,
    /// T: steps of the whole run (spec §3.6).
    total_steps: usize,
    global_step: usize,
    history: Vec<StepRecord>,
    evaluations: Vec<BatchEval>,
    timings: Timings,
    memory: MemoryAccount,
    /// [`RunOptions::portable`].
    portable: bool,
    /// The zoo indices model batches are drawn from (all but the base of task vectors).
    pool: Vec<usize>,
}

impl<'a> Run<'a> {
    fn new(
        config: &'a MehlConfig,
        comm: &'a dyn Collective,
        zoo: &'a Zoo<'a>,
        num_batches: usize,
    ) -> Result<Self> {
        if num_batches == 0 {
            return Err(SoupError::NoData);
        }
        let n = zoo.len();
        let layout = zoo.layout.clone();
        let blocks = config.block_cut.blocks(&layout)?;
        let frozen = frozen_blocks(&blocks, &layout, &config.frozen_tensors);
        let pool: Vec<usize> = match &config.task_vectors {
            None => (0..n).collect(),
            Some(tv) => {
                if tv.base >= n {
                    return Err(SoupError::config(
                        "base",
                        tv.base,
                        "is not the index of a model of the zoo",
                    ));
                }
                if n < 2 {
                    return Err(SoupError::config(
                        "base",
                        tv.base,
                        "task vectors need a base and at least one task model",
                    ));
                }
                (0..n).filter(|&j| j != tv.base).collect()
            }
        };
        let b = config.model_batch.min(pool.len());
        let steps = config.inner_epochs * num_batches;
        let total_steps = config.outer_passes * pool.len().div_ceil(b) * steps;
        Ok(Self {
            config,
            comm,
            zoo,
            layout,
            blocks,
            frozen,
            num_batches,
            steps,
            total_steps,
            global_step: 0,
            history: Vec::with_capacity(total_steps),
            evaluations: Vec::new(),
            timings: Timings::default(),
            portable: false,
            memory: MemoryAccount::default(),
            pool,
        })
    }

    /// The first soup of task vectors: θ_0 + prior · Σ_k τ_k, i.e. α_k = prior for every task
    /// model and α_0 = 1 − K · prior, per block; streamed over the zoo (one model and the f64
    /// sums resident).
    fn task_vector_start(&mut self, tv: &TaskVectors) -> Result<(Vec<Tensor>, Vec<Vec<f64>>)> {
        let n = self.zoo.len();
        let tasks = self.pool.len() as f64;
        let row: Vec<f64> = (0..n)
            .map(|j| {
                if j == tv.base {
                    1.0 - tasks * tv.prior
                } else {
                    tv.prior
                }
            })
            .collect();
        let gamma = vec![row; self.blocks.len()];
        let all: Vec<usize> = (0..n).collect();
        let mine = share(&all, self.comm.rank(), self.comm.world_size());
        let (_, first) = self.zoo.load(0)?;
        let dtype = first.first().ok_or(SoupError::EmptyLayout)?.dtype();
        let model_bytes = bytes_of(&first);
        drop(first);
        let soup = self
            .zoo
            .combination(&gamma, &self.blocks, mine, dtype, self.comm)?;
        self.memory = self.memory.peak(MemoryAccount {
            models: model_bytes,
            theta: 8 * model_bytes / dtype.size_in_bytes(),
            ..Default::default()
        });
        Ok((soup, gamma))
    }

    /// The hyperplane of model batch `members` through the current soup (or, for the first
    /// batch, through the uniform soup of its models), with X = 0.
    fn start_batch(
        &mut self,
        members: &[usize],
        soup: Option<(Vec<Tensor>, Vec<Vec<f64>>)>,
    ) -> Result<Hyperplane> {
        let started = Instant::now();
        let comm = self.comm;
        let mine = share(members, comm.rank(), comm.world_size());
        let (center, gamma) = match soup {
            Some(s) => s,
            None if self.config.task_vectors.is_some() => {
                let tv = self.config.task_vectors.clone().expect("checked");
                self.task_vector_start(&tv)?
            }
            None => {
                // The first model batch starts at the uniform soup of its models.
                let mean = if comm.world_size() == 1 {
                    self.zoo.mean(members)?
                } else {
                    scale(&self.zoo.sum_over(mine, comm)?, 1.0 / members.len() as f64)?
                };
                self.memory = self.memory.peak(MemoryAccount {
                    models: 2 * bytes_of(&mean),
                    ..Default::default()
                });
                let mut gamma = vec![vec![0.0; self.zoo.len()]; self.blocks.len()];
                for row in &mut gamma {
                    for &j in members {
                        row[j] = 1.0 / members.len() as f64;
                    }
                }
                (to_blocks(&mean, &self.blocks)?, gamma)
            }
        };
        let hp = match &self.config.task_vectors {
            None => Hyperplane::new_share(
                self.layout.clone(),
                self.blocks.clone(),
                center,
                gamma,
                mine.to_vec(),
                members.len(),
                self.config.direction_dtype,
                self.config.directions,
                |j| self.zoo.load(j),
            )?,
            Some(tv) => {
                // θ_0 is resident while the task vectors are made, beside one loaded model.
                let (_, base) = self.zoo.load(tv.base)?;
                let base_blocks = to_blocks(&base, &self.blocks)?;
                drop(base);
                let base = Base {
                    index: tv.base,
                    clamp: tv.clamp,
                };
                Hyperplane::new_task_share(
                    self.layout.clone(),
                    self.blocks.clone(),
                    center,
                    gamma,
                    mine.to_vec(),
                    members.len(),
                    self.config.direction_dtype,
                    base,
                    base_blocks,
                    |j| self.zoo.load(j),
                )?
            }
        }
        .portable(self.portable);
        self.timings.add("load", started);
        let model_bytes = hp.center_bytes();
        if self.config.task_vectors.is_some() {
            // While the task vectors were made: θ_0 and one loaded model beside them.
            self.memory = self.memory.peak(MemoryAccount {
                models: 2 * model_bytes,
                directions: hp.direction_bytes(),
                center: model_bytes,
                ..Default::default()
            });
        }
        self.memory = self
            .memory
            .peak(MemoryAccount {
                models: model_bytes,
                directions: hp.direction_bytes(),
                center: model_bytes,
                ..Default::default()
            })
            .peak(MemoryAccount {
                directions: hp.direction_bytes(),
                center: model_bytes,
                theta: model_bytes,
                gradient: model_bytes,
                ..Default::default()
            });
        Ok(hp)
    }

    /// E_in epochs of coefficient steps on `hp` (spec §3.5); returns θ after the last step.
    fn train_batch(
        &mut self,
        hp: &mut Hyperplane,
        objective: &mut dyn Objective,
        outer_pass: usize,
        model_batch: usize,
        observer: &mut dyn FnMut(&Event),
    ) -> Result<Vec<Tensor>> {
        let (config, comm) = (self.config, self.comm);
        let started = Instant::now();
        let first_batch = Batch {
            epoch_seed: epoch_seed(config.seed, outer_pass, model_batch, 0),
            index: 0,
        };
        let eta = match config.schedule {
            StepSchedule::ConvergenceRate { smoothness, scale } => {
                let beta = match smoothness {
                    Some(beta) => beta,
                    None => estimate_smoothness(hp, objective, first_batch, comm)?,
                };
                StepSchedule::convergence_rate(beta, scale, self.total_steps)
            }
            _ => config.lr,
        };
        let mut optimizer = Optimizer::new(config.optimizer, hp.x.len());
        self.memory = self.memory.peak(MemoryAccount {
            coefficients: hp.coefficient_bytes() + optimizer.state_bytes(),
            ..Default::default()
        });
        // θ = c (X = 0), as the variables every later step writes in place: autograd takes them
        // without a copy, and the second step allocates nothing.
        let mut theta = theta_params(hp, comm, None)?;
        for epoch in 0..config.inner_epochs {
            let seed = epoch_seed(config.seed, outer_pass, model_batch, epoch);
            for index in 0..self.num_batches {
                let step = epoch * self.num_batches + index;
                let lr = config.schedule.lr(eta, step, self.steps);
                let batch = Batch {
                    epoch_seed: seed,
                    index,
                };
                let (loss, grad) = loss_and_grad(objective, &theta, batch, comm)?;
                let non_finite = |what| SoupError::NonFinite {
                    what,
                    step,
                    model_batch,
                };
                if !loss.is_finite() {
                    return Err(non_finite("loss"));
                }
                // ‖∇θ‖ from the projection's own pass over ∇θ (the same bits as a pass of its own).
                let (mut grad_x, grad_norm) = hp.project_and_norm(&grad)?;
                if !grad_norm.is_finite() {
                    return Err(non_finite("gradient"));
                }
                let num_blocks = self.blocks.len();
                for (i, g) in grad_x.iter_mut().enumerate() {
                    if self.frozen[i % num_blocks] {
                        *g = 0.0;
                    }
                }
                // Clipping ∇θ to a global norm scales its projection by the same factor
                // (torch's clip_grad_norm_ coefficient), without a pass over ∇θ.
                if let Some(max) = config.clip_grad_norm {
                    let coef = clip_coefficient(grad_norm, max);
                    if coef < 1.0 {
                        grad_x.iter_mut().for_each(|v| *v *= coef);
                    }
                }
                optimizer.step(&mut hp.x, &grad_x, lr, config.weight_decay);
                theta = theta_params(hp, comm, Some(theta))?;
                let record = StepRecord {
                    outer_pass,
                    model_batch,
                    step,
                    global_step: self.global_step,
                    loss,
                    lr,
                    grad_norm,
                };
                self.history.push(record);
                self.global_step += 1;
                observer(&Event::Step {
                    record: &record,
                    hyperplane: hp,
                });
            }
        }
        self.timings.add("steps", started);
        Ok(theta)
    }

    /// The state after model batch `model_batch` (θ as the new soup, its α), with the held-out
    /// metrics when the configuration evaluates every batch.
    fn end_batch(
        &mut self,
        hp: &Hyperplane,
        theta: &[Tensor],
        objective: &mut dyn Objective,
        model_batch: usize,
    ) -> Result<(MehlProgress, Option<Metrics>)> {
        let metrics = if self.config.evaluate_each_model_batch {
            let started = Instant::now();
            let m = evaluate(objective, theta, self.comm)?;
            self.timings.add("evaluate", started);
            self.evaluations.push(BatchEval {
                model_batch,
                global_step: self.global_step,
                metrics: m,
            });
            Some(m)
        } else {
            None
        };
        let progress = MehlProgress {
            model_batches_done: model_batch + 1,
            global_step: self.global_step,
            soup_blocks: to_blocks(theta, &self.blocks)?
                .iter()
                .map(Tensor::detach)
                .collect(),
            alpha: alpha_of(hp, self.comm)?,
            history: self.history.clone(),
            evaluations: self.evaluations.clone(),
        };
        Ok((progress, metrics))
    }

    /// The result of the run, the soup given as block vectors with its α. With directions in
    /// another dtype than the soup's, the soup is recomputed as Σ_j α_j θ_j from the models.
    fn finish(mut self, soup_blocks: Vec<Tensor>, alpha: Vec<Vec<f64>>) -> Result<SoupResult> {
        let dtype = soup_blocks.first().map_or(DType::F32, Tensor::dtype);
        let soup_blocks = match self.config.direction_dtype {
            Some(d) if d != dtype => {
                let started = Instant::now();
                let all: Vec<usize> = (0..self.zoo.len()).collect();
                let mine = share(&all, self.comm.rank(), self.comm.world_size());
                let soup = self
                    .zoo
                    .combination(&alpha, &self.blocks, mine, dtype, self.comm)?;
                self.timings.add("recompute soup", started);
                // One model loaded beside the f64 sums (twice an f32 model).
                let model_bytes = bytes_of(&soup);
                self.memory = self.memory.peak(MemoryAccount {
                    models: model_bytes,
                    theta: 8 * model_bytes / dtype.size_in_bytes(),
                    ..Default::default()
                });
                soup
            }
            _ => soup_blocks,
        };
        let whole = self.config.block_cut == BlockCut::WHOLE;
        let method = match (self.config.task_vectors.is_some(), whole) {
            (false, true) => "mehl",
            (false, false) => "mehl+",
            (true, true) => "adamerging",
            (true, false) => "adamerging+",
        };
        Ok(SoupResult {
            method: method.to_string(),
            model_names: self.zoo.names.clone(),
            soup: from_blocks(&soup_blocks, &self.blocks, &self.layout)?,
            layout: self.layout,
            blocks: self.blocks,
            alpha,
            history: self.history,
            evaluations: self.evaluations,
            timings: self.timings,
            memory: self.memory,
        })
    }
}

/// Checks that saved progress fits this run: its blocks and models.
fn check_progress(p: &MehlProgress, blocks: &[Block], n: usize) -> Result<()> {
    let fits = p.soup_blocks.len() == blocks.len()
        && p.alpha.len() == blocks.len()
        && p.alpha.iter().all(|row| row.len() == n)
        && p.soup_blocks
            .iter()
            .zip(blocks)
            .all(|(t, b)| t.elem_count() == b.numel);
    if fits {
        Ok(())
    } else {
        Err(SoupError::config(
            "resume",
            p.model_batches_done,
            "the saved run was made with other models or another block cut",
        ))
    }
}

/// The seed of the data order of one inner epoch of one model batch.
pub fn epoch_seed(seed: u64, outer_pass: usize, model_batch: usize, epoch: usize) -> u64 {
    derive_seed(
        seed,
        &[1, outer_pass as u64, model_batch as u64, epoch as u64],
    )
}

/// θ = c + Σ X d of the whole model batch as block vectors: the rows of every process summed.
fn theta_of(hp: &Hyperplane, comm: &dyn Collective) -> Result<Vec<Tensor>> {
    if comm.world_size() == 1 {
        return hp.theta_blocks();
    }
    let (deltas, active) = hp.delta_blocks()?;
    let deltas = comm.all_reduce_sum_each(&deltas)?;
    hp.add_center(deltas, &comm.all_reduce_f64(&active)?)
}

/// θ as named tensors for the next step: [`Hyperplane::theta_step`] in one process, the
/// all-reduced rows of every process over several.
/// `previous` (the θ of the last step, no longer needed) is overwritten in place when it can be.
fn theta_params(
    hp: &Hyperplane,
    comm: &dyn Collective,
    previous: Option<Vec<Tensor>>,
) -> Result<Vec<Tensor>> {
    if comm.world_size() == 1 {
        return hp.theta_step(previous);
    }
    from_blocks(&theta_of(hp, comm)?, &hp.blocks, &hp.layout)
}

/// The loss and ∇θ of the whole mini-batch: the shards' summed.
fn loss_and_grad(
    objective: &mut dyn Objective,
    theta: &[Tensor],
    batch: Batch,
    comm: &dyn Collective,
) -> Result<(f64, Vec<Tensor>)> {
    let (loss, grad) = objective.loss_and_grad(theta, batch)?;
    if comm.world_size() == 1 {
        return Ok((loss, grad));
    }
    Ok((
        comm.all_reduce_f64(&[loss])?[0],
        comm.all_reduce_sum_each(&grad)?,
    ))
}

/// The metrics of the whole held-out data: the shards' combined by their sizes.
fn evaluate(
    objective: &mut dyn Objective,
    theta: &[Tensor],
    comm: &dyn Collective,
) -> Result<Metrics> {
    // θ of a training step is a variable: evaluate it without building a graph.
    let theta: Vec<Tensor> = theta.iter().map(Tensor::detach).collect();
    let m = objective.evaluate(&theta)?;
    if comm.world_size() == 1 {
        return Ok(m);
    }
    let count = m.count as f64;
    let sums = comm.all_reduce_f64(&[
        m.loss * count,
        m.accuracy.unwrap_or(0.0) * count,
        count,
        if m.accuracy.is_some() { 1.0 } else { 0.0 },
    ])?;
    let total = sums[2].max(1.0);
    Ok(Metrics {
        loss: sums[0] / total,
        accuracy: (sums[3] > 0.0).then(|| sums[1] / total),
        count: sums[2] as usize,
        rank: m.rank,
    })
}

/// α of the whole model batch: the terms of every process summed.
fn alpha_of(hp: &Hyperplane, comm: &dyn Collective) -> Result<Vec<Vec<f64>>> {
    if comm.world_size() == 1 {
        return Ok(hp.alpha());
    }
    let (s, own) = hp.alpha_terms();
    let n = own.first().map_or(0, Vec::len);
    let mut flat = s.clone();
    for row in &own {
        flat.extend_from_slice(row);
    }
    let flat = comm.all_reduce_f64(&flat)?;
    let (s, rest) = flat.split_at(s.len());
    let own: Vec<Vec<f64>> = rest.chunks(n.max(1)).map(<[f64]>::to_vec).collect();
    Ok(hp.alpha_from_terms(s, &own[..s.len()]))
}

/// β̂ = ‖∇_X F(h u) − ∇_X F(0)‖ / h with u = ∇_X F(0)/‖∇_X F(0)‖ and h = [`SECANT_STEP`], on one
/// data batch: the curvature of F along the first step's direction. NaN when the gradient is zero.
fn estimate_smoothness(
    hp: &mut Hyperplane,
    objective: &mut dyn Objective,
    batch: Batch,
    comm: &dyn Collective,
) -> Result<f64> {
    let start = hp.x.clone();
    let theta = |hp: &Hyperplane| from_blocks(&theta_of(hp, comm)?, &hp.blocks, &hp.layout);
    let (_, g0) = loss_and_grad(objective, &theta(hp)?, batch, comm)?;
    let p0 = hp.project(&g0)?;
    let norm = comm.all_reduce_f64(&[p0.iter().map(|v| v * v).sum::<f64>()])?[0].sqrt();
    if !(norm.is_finite() && norm > 0.0) {
        return Ok(f64::NAN);
    }
    for (x, p) in hp.x.iter_mut().zip(&p0) {
        *x += SECANT_STEP * p / norm;
    }
    let (_, g1) = loss_and_grad(objective, &theta(hp)?, batch, comm)?;
    let p1 = hp.project(&g1)?;
    hp.x = start;
    let diff = p1
        .iter()
        .zip(&p0)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>();
    Ok(comm.all_reduce_f64(&[diff])?[0].sqrt() / SECANT_STEP)
}
