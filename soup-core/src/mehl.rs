//! The MEHL-Soup driver: block coordinate descent over model batches (spec §3.5).

use std::time::Instant;

use candle_core::Tensor;

use crate::error::{Result, SoupError};
use crate::hyperplane::Hyperplane;
use crate::layout::{from_blocks, to_blocks, BlockCut};
use crate::optim::{clip_coefficient, global_norm, Optimizer, OptimizerKind};
use crate::result::{bytes_of, BatchEval, MemoryAccount, SoupResult, StepRecord, Timings};
use crate::rng::{derive_seed, permutation};
use crate::schedule::StepSchedule;
use crate::traits::{Batch, Collective, Metrics, ModelStore, Objective, SingleProcess};
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
    pub optimizer: OptimizerKind,
    pub schedule: StepSchedule,
    /// Clip ∇θ to this global L2 norm before projecting it (the authors clip ViTs at 1.0).
    pub clip_grad_norm: Option<f64>,
    pub block_cut: BlockCut,
    /// Fixes the model order of every pass and the data order of every inner epoch.
    pub seed: u64,
    /// Evaluate the soup on the held-out data after every model batch.
    pub evaluate_each_model_batch: bool,
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
            seed: 1,
            evaluate_each_model_batch: true,
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
        outer_pass: usize,
        model_batch: usize,
        hyperplane: &'a Hyperplane,
    },
    /// A coefficient step was taken; `hyperplane.x` holds the updated X.
    Step {
        record: &'a StepRecord,
        hyperplane: &'a Hyperplane,
    },
    /// A model batch ended; `metrics` when the held-out data was evaluated. `resume` is the state
    /// from which [`resume_mehl`] continues the run after this batch.
    BatchEnd {
        model_batch: usize,
        hyperplane: &'a Hyperplane,
        metrics: Option<Metrics>,
        resume: &'a MehlProgress,
    },
}

/// A MEHL run between two model batches: everything the rest of the run depends on. The model
/// order of every pass and the data order of every epoch derive from the seed, so resuming from
/// here with the same inputs gives the same soup, bit for bit, as the uninterrupted run.
#[derive(Clone, Debug)]
pub struct MehlProgress {
    /// Model batches completed, counted over the whole run.
    pub model_batches_done: usize,
    /// Coefficient steps taken.
    pub global_step: usize,
    /// The soup after them, as block vectors of the run's block cut.
    pub soup_blocks: Vec<Tensor>,
    /// α[l][j] of that soup.
    pub alpha: Vec<Vec<f64>>,
    pub history: Vec<StepRecord>,
    pub evaluations: Vec<BatchEval>,
}

/// Step of the secant that estimates the smoothness β along the gradient, in parameter-norm
/// units (directions have unit norm, so X moves θ by this distance).
pub const SECANT_STEP: f64 = 1e-2;

/// Runs MEHL-Soup (or MEHL-Soup+, by the block cut) over the models of `store`, learning the
/// coefficients on `objective`'s held-out data. At most `model_batch` directions and one loaded
/// model are resident at any time.
pub fn run_mehl(
    store: &dyn ModelStore,
    objective: &mut dyn Objective,
    config: &MehlConfig,
    observer: &mut dyn FnMut(&Event),
) -> Result<SoupResult> {
    resume_mehl(store, objective, config, None, observer)
}

/// [`run_mehl`], continuing from `progress` (reported by an earlier run's `BatchEnd` event with
/// the same store, objective and configuration) when given. Timings and the memory account cover
/// the part of the run done by this call.
pub fn resume_mehl(
    store: &dyn ModelStore,
    objective: &mut dyn Objective,
    config: &MehlConfig,
    progress: Option<MehlProgress>,
    observer: &mut dyn FnMut(&Event),
) -> Result<SoupResult> {
    resume_mehl_on(store, objective, config, progress, &SingleProcess, observer)
}

/// The models of a model batch that rank `rank` of `world` holds: a contiguous share of
/// ⌈b/W⌉ (the last ranks may hold fewer, or none).
pub fn share(members: &[usize], rank: usize, world: usize) -> &[usize] {
    let k = members.len().div_ceil(world.max(1));
    let start = (rank * k).min(members.len());
    &members[start..(start + k).min(members.len())]
}

/// [`resume_mehl`] as one of `comm.world_size()` processes (spec §3.7). Every process runs this
/// with the same arguments; each loads only its [`share`] of every model batch (its directions
/// and rows of X) and its shard of every data mini-batch (see [`Objective::set_shard`]). Per step,
/// θ − c and ∇θ are summed over the processes; the first center is the summed mean. Every process
/// returns the same soup and α, equal to the one-process run's up to rounding.
pub fn resume_mehl_on(
    store: &dyn ModelStore,
    objective: &mut dyn Objective,
    config: &MehlConfig,
    progress: Option<MehlProgress>,
    comm: &dyn Collective,
    observer: &mut dyn FnMut(&Event),
) -> Result<SoupResult> {
    config.validate()?;
    let (rank, world) = (comm.rank(), comm.world_size());
    if world > 1 {
        objective.set_shard(rank, world)?;
    }
    let zoo = Zoo::open(store)?;
    let n = zoo.len();
    let num_batches = objective.num_batches();
    if num_batches == 0 {
        return Err(SoupError::NoData);
    }
    let layout = zoo.layout.clone();
    let blocks = config.block_cut.blocks(&layout)?;
    let b = config.model_batch.min(n);
    let steps = config.inner_epochs * num_batches; // S per model batch
    let total_steps = config.outer_passes * n.div_ceil(b) * steps; // T of spec §3.6

    let mut timings = Timings::default();
    let mut memory = MemoryAccount::default();
    let mut history = Vec::with_capacity(total_steps);
    let mut evaluations = Vec::new();
    // The current soup as block vectors and its α; None before the first model batch.
    let mut soup: Option<(Vec<Tensor>, Vec<Vec<f64>>)> = None;
    let mut model_batch = 0;
    let mut global_step = 0;
    let mut done = 0;
    if let Some(p) = progress {
        check_progress(&p, &blocks, n)?;
        done = p.model_batches_done;
        global_step = p.global_step;
        history = p.history;
        evaluations = p.evaluations;
        soup = Some((p.soup_blocks, p.alpha));
    }

    for outer_pass in 0..config.outer_passes {
        let order = permutation(n, derive_seed(config.seed, &[0, outer_pass as u64]));
        for members in order.chunks(b) {
            if model_batch < done {
                model_batch += 1;
                continue;
            }
            let started = Instant::now();
            let mine = share(members, rank, world);
            let (center, gamma) = match soup.take() {
                Some(s) => s,
                None => {
                    // The first model batch starts at the uniform soup of its models.
                    let mean = if world == 1 {
                        zoo.mean(members)?
                    } else {
                        scale(&zoo.sum_over(mine, comm)?, 1.0 / members.len() as f64)?
                    };
                    memory = memory.peak(MemoryAccount {
                        models: 2 * bytes_of(&mean),
                        ..Default::default()
                    });
                    let mut gamma = vec![vec![0.0; n]; blocks.len()];
                    for row in &mut gamma {
                        for &j in members {
                            row[j] = 1.0 / members.len() as f64;
                        }
                    }
                    (to_blocks(&mean, &blocks)?, gamma)
                }
            };
            let mut hp = Hyperplane::new_part(
                layout.clone(),
                blocks.clone(),
                center,
                gamma,
                mine.to_vec(),
                members.len(),
                |j| zoo.load(j),
            )?;
            timings.add("load", started);
            let model_bytes = hp.center_bytes();
            memory = memory
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
            observer(&Event::BatchStart {
                outer_pass,
                model_batch,
                hyperplane: &hp,
            });

            let started = Instant::now();
            let first_batch = Batch {
                epoch_seed: epoch_seed(config.seed, outer_pass, model_batch, 0),
                index: 0,
            };
            let eta = match config.schedule {
                StepSchedule::ConvergenceRate { smoothness, scale } => {
                    let beta = match smoothness {
                        Some(beta) => beta,
                        None => estimate_smoothness(&mut hp, objective, first_batch, comm)?,
                    };
                    StepSchedule::convergence_rate(beta, scale, total_steps)
                }
                _ => config.lr,
            };
            let mut optimizer = Optimizer::new(config.optimizer, hp.x.len());
            memory = memory.peak(MemoryAccount {
                coefficients: hp.coefficient_bytes() + optimizer.state_bytes(),
                ..Default::default()
            });
            let mut theta = from_blocks(hp.center(), &blocks, &layout)?;
            for epoch in 0..config.inner_epochs {
                let seed = epoch_seed(config.seed, outer_pass, model_batch, epoch);
                for index in 0..num_batches {
                    let step = epoch * num_batches + index;
                    let lr = config.schedule.lr(eta, step, steps);
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
                    let grad_norm = global_norm(&grad)?;
                    if !grad_norm.is_finite() {
                        return Err(non_finite("gradient"));
                    }
                    let mut grad_x = hp.project(&grad)?;
                    // Clipping ∇θ to a global norm scales its projection by the same factor
                    // (torch's clip_grad_norm_ coefficient), without a pass over ∇θ.
                    if let Some(max) = config.clip_grad_norm {
                        let coef = clip_coefficient(grad_norm, max);
                        if coef < 1.0 {
                            grad_x.iter_mut().for_each(|v| *v *= coef);
                        }
                    }
                    optimizer.step(&mut hp.x, &grad_x, lr, config.weight_decay);
                    theta = theta_params(&hp, comm, theta)?;
                    let record = StepRecord {
                        outer_pass,
                        model_batch,
                        step,
                        global_step,
                        loss,
                        lr,
                        grad_norm,
                    };
                    history.push(record);
                    global_step += 1;
                    observer(&Event::Step {
                        record: &record,
                        hyperplane: &hp,
                    });
                }
            }
            timings.add("steps", started);

            let metrics = if config.evaluate_each_model_batch {
                let started = Instant::now();
                let m = evaluate(objective, &theta, comm)?;
                timings.add("evaluate", started);
                evaluations.push(BatchEval {
                    model_batch,
                    global_step,
                    metrics: m,
                });
                Some(m)
            } else {
                None
            };
            let progress = MehlProgress {
                model_batches_done: model_batch + 1,
                global_step,
                soup_blocks: to_blocks(&theta, &blocks)?
                    .iter()
                    .map(Tensor::detach)
                    .collect(),
                alpha: alpha_of(&hp, comm)?,
                history: history.clone(),
                evaluations: evaluations.clone(),
            };
            observer(&Event::BatchEnd {
                model_batch,
                hyperplane: &hp,
                metrics,
                resume: &progress,
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
    Ok(SoupResult {
        method: if config.block_cut == BlockCut::WHOLE {
            "mehl"
        } else {
            "mehl+"
        }
        .to_string(),
        model_names: zoo.names.clone(),
        soup: from_blocks(&soup_blocks, &blocks, &layout)?,
        layout,
        blocks,
        alpha,
        history,
        evaluations,
        timings,
        memory,
    })
}

/// Checks that saved progress fits this run: its blocks and models.
fn check_progress(p: &MehlProgress, blocks: &[crate::layout::Block], n: usize) -> Result<()> {
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

/// θ as named tensors for the next step: [`Hyperplane::theta_params`] in one process, the
/// all-reduced rows of every process over several.
/// `previous` (the θ of the last step, no longer needed) is overwritten in place when it can be.
fn theta_params(
    hp: &Hyperplane,
    comm: &dyn Collective,
    previous: Vec<Tensor>,
) -> Result<Vec<Tensor>> {
    if comm.world_size() == 1 {
        return hp.theta_params_into(previous);
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
