//! The baselines of spec §2: Uniform-, Greedy-, Learned- and Learned-Soup+. They share the model
//! store and the objective with MEHL.

use std::time::Instant;

use candle_core::{Tensor, Var};

use crate::error::{Result, SoupError};
use crate::layout::{frozen_blocks, Block, BlockCut, ParamLayout};
use crate::mehl::Event;
use crate::mehl::{validate_optimizer, validate_schedule};
use crate::optim::{Optimizer, OptimizerKind};
use crate::options::RunOptions;
use crate::result::{bytes_of, BatchEval, MemoryAccount, SoupResult, StepRecord, Timings};
use crate::rng::derive_seed;
use crate::schedule::StepSchedule;
use crate::traits::{Batch, ModelStore, Objective};
use crate::transfer;
use crate::zoo::{scale, Zoo};

/// Uniform-Soup: θ = (1/N) Σ θ_i, streamed (one model resident besides the running sum). Over
/// `options.comm`'s processes each sums its [`crate::share`] of the models, and the sums are
/// summed over the processes.
pub fn uniform_soup(store: &dyn ModelStore, options: RunOptions) -> Result<SoupResult> {
    let comm = options.comm;
    let started = Instant::now();
    let zoo = Zoo::open(store)?;
    let n = zoo.len();
    let all: Vec<usize> = (0..n).collect();
    let soup = if comm.world_size() == 1 {
        zoo.mean(&all)?
    } else {
        let mine = crate::mehl::share(&all, comm.rank(), comm.world_size());
        scale(&zoo.sum_over(mine, comm)?, 1.0 / n as f64)?
    };
    let mut timings = Timings::default();
    timings.add("load", started);
    let model_bytes = bytes_of(&soup);
    Ok(finish(
        "uniform",
        &zoo,
        soup,
        vec![1.0 / n as f64; n],
        timings,
        MemoryAccount {
            models: 2 * model_bytes,
            ..Default::default()
        },
    ))
}

/// Refuses a run over several processes of a method that holds what it needs in one (`why`).
fn one_process(options: &RunOptions, why: &'static str) -> Result<()> {
    match options.comm.world_size() {
        1 => Ok(()),
        w => Err(SoupError::config("world_size", w, why)),
    }
}

/// When Greedy-Soup keeps a candidate (spec §2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GreedyAccept {
    /// Keep it only if held-out accuracy strictly improves: the model-soups code (`>`), the default.
    #[default]
    Improves,
    /// Keep it if held-out accuracy does not drop: the model-soups paper (`>=`).
    NotWorse,
}

/// Greedy-Soup: rank the models by held-out score, start from the best, and add each next model
/// to the uniform mean if the held-out score of the mean with it is accepted. N + (N − 1)
/// evaluations; the running sum, one model and the candidate mean are resident.
pub fn greedy_soup(
    store: &dyn ModelStore,
    objective: &mut dyn Objective,
    accept: GreedyAccept,
    options: RunOptions,
) -> Result<SoupResult> {
    one_process(&options, "greedy runs in one process")?;
    let zoo = Zoo::open(store)?;
    let n = zoo.len();
    let mut timings = Timings::default();
    let mut evaluations = Vec::new();

    let mut scores = Vec::with_capacity(n);
    for i in 0..n {
        let started = Instant::now();
        let (_, model) = zoo.load(i)?;
        timings.add("load", started);
        let started = Instant::now();
        scores.push(objective.evaluate(&model)?.score());
        timings.add("evaluate", started);
    }
    // Best first; ties keep the zoo order.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));

    let (_, mut sum) = zoo.load(order[0])?;
    let mut ingredients = vec![order[0]];
    let mut best = scores[order[0]];
    let model_bytes = bytes_of(&sum);
    for &i in &order[1..] {
        let started = Instant::now();
        let (_, model) = zoo.load(i)?;
        let with: Vec<Tensor> = sum
            .iter()
            .zip(&model)
            .map(|(s, m)| s + m.to_dtype(s.dtype())?)
            .collect::<candle_core::Result<_>>()?;
        drop(model);
        let candidate = scale(&with, 1.0 / (ingredients.len() + 1) as f64)?;
        timings.add("load", started);
        let started = Instant::now();
        let metrics = objective.evaluate(&candidate)?;
        timings.add("evaluate", started);
        let keep = match accept {
            GreedyAccept::Improves => metrics.score() > best,
            GreedyAccept::NotWorse => metrics.score() >= best,
        };
        if keep {
            sum = with;
            ingredients.push(i);
            best = metrics.score();
            evaluations.push(BatchEval {
                model_batch: ingredients.len() - 1,
                global_step: 0,
                metrics,
            });
        }
    }
    let soup = scale(&sum, 1.0 / ingredients.len() as f64)?;
    let mut alpha = vec![0.0; n];
    for &i in &ingredients {
        alpha[i] = 1.0 / ingredients.len() as f64;
    }
    let mut result = finish(
        "greedy",
        &zoo,
        soup,
        alpha,
        timings,
        MemoryAccount {
            models: 3 * model_bytes,
            ..Default::default()
        },
    );
    result.evaluations = evaluations;
    Ok(result)
}

fn finish(
    method: &str,
    zoo: &Zoo,
    soup: Vec<Tensor>,
    alpha: Vec<f64>,
    timings: Timings,
    memory: MemoryAccount,
) -> SoupResult {
    let layout = zoo.layout.clone();
    let blocks = vec![Block {
        name: "all".to_string(),
        tensors: 0..layout.len(),
        numel: layout.numel(),
    }];
    SoupResult {
        method: method.to_string(),
        model_names: zoo.names.clone(),
        layout,
        blocks,
        soup,
        alpha: vec![alpha],
        history: Vec::new(),
        evaluations: Vec::new(),
        timings,
        memory,
    }
}

/// Learned-Soup (one block) and Learned-Soup+ (one block per tensor): α = softmax(a) per block,
/// logits scaled by a learned temperature, held-out cross-entropy minimised through a graph that
/// runs through all N models, which are all resident. The faithful, memory-hungry reference.
#[derive(Clone, Debug, PartialEq)]
pub struct LearnedConfig {
    /// Passes over the held-out data.
    pub epochs: usize,
    /// The learning rate of the coefficients.
    pub lr: f64,
    /// Weight decay on the coefficients.
    pub weight_decay: f64,
    /// The optimizer of the coefficients.
    pub optimizer: OptimizerKind,
    /// Over all epochs × batches (`ConvergenceRate` applies to MEHL only).
    pub schedule: StepSchedule,
    /// One coefficient per model (`WHOLE`: Learned-Soup) or per model and block (Learned-Soup+).
    pub block_cut: BlockCut,
    /// Tensors whose loss gradient is identically zero: a block made only of them keeps its
    /// logits at 0, α uniform ([`crate::MehlConfig::frozen_tensors`]).
    pub frozen_tensors: Vec<String>,
    /// Fixes the data order of every epoch.
    pub seed: u64,
    /// Initial logit scale; a = 0 starts at the uniform soup.
    pub init_temperature: f64,
    /// Evaluate the soup on the held-out data after every epoch.
    pub evaluate_each_epoch: bool,
}

impl LearnedConfig {
    /// Learned-Soup as model-soups runs it: AdamW lr 0.05, wd 0, 5 epochs, one block.
    pub fn learned() -> Self {
        Self {
            epochs: 5,
            lr: 0.05,
            weight_decay: 0.0,
            optimizer: OptimizerKind::ADAMW,
            schedule: StepSchedule::Constant,
            block_cut: BlockCut::WHOLE,
            frozen_tensors: Vec::new(),
            seed: 1,
            init_temperature: 1.0,
            evaluate_each_epoch: true,
        }
    }

    /// Learned-Soup+: one softmax per tensor.
    pub fn learned_plus() -> Self {
        Self {
            block_cut: BlockCut::PER_TENSOR,
            ..Self::learned()
        }
    }

    /// An error naming the first setting out of range.
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 {
            return Err(SoupError::config("epochs", 0, "must be at least 1"));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
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
        if !(self.init_temperature.is_finite() && self.init_temperature > 0.0) {
            return Err(SoupError::config(
                "init_temperature",
                self.init_temperature,
                "must be a positive number",
            ));
        }
        if let StepSchedule::ConvergenceRate { .. } = self.schedule {
            return Err(SoupError::config(
                "schedule",
                "convergence-rate",
                "applies to MEHL only",
            ));
        }
        validate_optimizer(&self.optimizer)?;
        validate_schedule(&self.schedule)
    }
}

/// Runs Learned-Soup or Learned-Soup+ (by `config.block_cut`), telling `options`' observer of
/// every coefficient step ([`Event::LearnedStep`]).
pub fn learned_soup(
    store: &dyn ModelStore,
    objective: &mut dyn Objective,
    config: &LearnedConfig,
    mut options: RunOptions,
) -> Result<SoupResult> {
    one_process(&options, "learned runs in one process")?;
    config.validate()?;
    let zoo = Zoo::open(store)?;
    let n = zoo.len();
    let num_batches = objective.num_batches();
    if num_batches == 0 {
        return Err(SoupError::NoData);
    }
    let layout = zoo.layout.clone();
    let blocks = config.block_cut.blocks(&layout)?;
    let num_blocks = blocks.len();
    let frozen = frozen_blocks(&blocks, &layout, &config.frozen_tensors);
    let mut timings = Timings::default();

    // All N models resident: tensor t of every model stacked into an (N × numel) matrix.
    let started = Instant::now();
    let stacks = stack_models(&zoo, &layout)?;
    timings.add("load", started);
    let model_bytes = bytes_of(&stacks) / n;

    // Coefficients: logits a (L × N) then the temperature, on the host.
    let mut coef = vec![0.0; num_blocks * n + 1];
    coef[num_blocks * n] = config.init_temperature;
    let mut optimizer = Optimizer::new(config.optimizer, coef.len());
    let steps = config.epochs * num_batches;
    let mut history = Vec::with_capacity(steps);
    let mut evaluations = Vec::new();
    let started = Instant::now();
    for epoch in 0..config.epochs {
        let epoch_seed = derive_seed(config.seed, &[2, epoch as u64]);
        for index in 0..num_batches {
            let step = epoch * num_batches + index;
            let (value, mut g) = learned_loss_and_grad(
                objective,
                &stacks,
                &blocks,
                &layout,
                &coef,
                Batch { epoch_seed, index },
            )?;
            if !value.is_finite() {
                return Err(SoupError::NonFinite {
                    what: "loss",
                    step,
                    model_batch: 0,
                });
            }
            if g.iter().any(|v| !v.is_finite()) {
                return Err(SoupError::NonFinite {
                    what: "gradient",
                    step,
                    model_batch: 0,
                });
            }
            // Frozen blocks keep their logits a (L × N, row-major) at 0: α uniform.
            for (l, _) in frozen.iter().enumerate().filter(|(_, f)| **f) {
                g[l * n..(l + 1) * n].iter_mut().for_each(|v| *v = 0.0);
            }
            let lr = config.schedule.lr(config.lr, step, steps);
            optimizer.step(&mut coef, &g, lr, config.weight_decay);
            let grad_norm = g.iter().map(|v| v * v).sum::<f64>().sqrt();
            history.push(StepRecord {
                outer_pass: epoch,
                model_batch: 0,
                step,
                global_step: step,
                loss: value,
                lr,
                grad_norm,
            });
            let record = history.last().expect("just pushed");
            options.notify(&Event::LearnedStep { record });
        }
        if config.evaluate_each_epoch {
            let soup = current_soup(&coef, num_blocks, n, &stacks, &blocks, &layout)?;
            evaluations.push(BatchEval {
                model_batch: epoch,
                global_step: (epoch + 1) * num_batches,
                metrics: objective.evaluate(&soup)?,
            });
        }
    }
    timings.add("steps", started);

    let soup = current_soup(&coef, num_blocks, n, &stacks, &blocks, &layout)?;
    let alpha: Vec<Vec<f64>> = softmax_host(&coef[..num_blocks * n], n)
        .chunks(n)
        .map(<[f64]>::to_vec)
        .collect();
    Ok(SoupResult {
        method: if config.block_cut == BlockCut::WHOLE {
            "learned"
        } else {
            "learned+"
        }
        .to_string(),
        model_names: zoo.names.clone(),
        layout,
        blocks,
        soup,
        alpha,
        history,
        evaluations,
        timings,
        memory: MemoryAccount {
            models: n * model_bytes,
            theta: model_bytes,
            gradient: model_bytes,
            coefficients: (coef.len() * std::mem::size_of::<f64>()) + optimizer.state_bytes(),
            ..Default::default()
        },
    })
}

/// Loads every model, one at a time, into per-tensor (N × numel) matrices.
/// The loss of Learned-Soup's soup on `batch` and its gradient with respect to `coef`: the
/// coefficient logits (L × N, row-major; α = row softmax) followed by the temperature that
/// multiplies the logits. `stacks` holds every model's tensors ([`stack_models`]).
///
/// θ = Σ_i α_i θ_i is formed outside the autograd graph: only ∇θ and the temperature's gradient
/// come from backpropagation, and ∂L/∂α_{l,i} = Σ_{t ∈ l} ⟨∇θ_t, θ_i^t⟩ is one
/// (N × numel)·(numel × 1) product per tensor, then ∂L/∂a = α ⊙ (∂L/∂α − ⟨∂L/∂α, α⟩) per row.
/// Differentiating through the mixing instead makes candle build the (N × numel) gradient of
/// every constant stack: three copies of the zoo in memory instead of one.
pub fn learned_loss_and_grad(
    objective: &mut dyn Objective,
    stacks: &[Tensor],
    blocks: &[Block],
    layout: &ParamLayout,
    coef: &[f64],
    batch: Batch,
) -> Result<(f64, Vec<f64>)> {
    let num_blocks = blocks.len();
    let n = stacks.first().ok_or(SoupError::EmptyLayout)?.dim(0)?;
    let (dtype, device) = (stacks[0].dtype(), stacks[0].device().clone());
    let alpha = softmax_host(&coef[..num_blocks * n], n);
    let alpha_t = transfer::upload(&alpha, (num_blocks, n), dtype, &device)?;
    let theta = mix(&alpha_t, stacks, blocks, layout)?
        .iter()
        .map(Var::from_tensor)
        .collect::<candle_core::Result<Vec<_>>>()?;
    let inputs: Vec<Tensor> = theta.iter().map(|v| v.as_tensor().clone()).collect();
    let t = Var::from_tensor(&transfer::upload(
        &coef[num_blocks * n..],
        (),
        dtype,
        &device,
    )?)?;
    let loss = objective.loss(&inputs, Some(t.as_tensor()), batch)?;
    let value = transfer::scalar(&loss)?;
    if !value.is_finite() {
        return Ok((value, vec![f64::NAN; coef.len()]));
    }
    let grads = loss.backward()?;
    let mut g_alpha = vec![0.0; num_blocks * n];
    for (l, block) in blocks.iter().enumerate() {
        for ti in block.tensors.clone() {
            let Some(g) = grads.get(&inputs[ti]) else {
                continue;
            };
            let col = g.flatten_all()?.to_dtype(dtype)?.unsqueeze(1)?;
            let dots = transfer::to_vec(&stacks[ti].matmul(&col)?)?;
            for (acc, d) in g_alpha[l * n..(l + 1) * n].iter_mut().zip(dots) {
                *acc += d;
            }
        }
    }
    let mut g: Vec<f64> = Vec::with_capacity(coef.len());
    for (ga, p) in g_alpha.chunks(n).zip(alpha.chunks(n)) {
        let inner: f64 = ga.iter().zip(p).map(|(x, y)| x * y).sum();
        g.extend(ga.iter().zip(p).map(|(x, y)| y * (x - inner)));
    }
    g.push(match grads.get(t.as_tensor()) {
        Some(g) => transfer::scalar(g)?,
        None => 0.0,
    });
    Ok((value, g))
}

/// Every model of the zoo resident: tensor t of model i is row i of an (N × numel) matrix.
pub fn stack_models(zoo: &Zoo, layout: &ParamLayout) -> Result<Vec<Tensor>> {
    let n = zoo.len();
    let mut stacks: Vec<Tensor> = Vec::new();
    for i in 0..n {
        let (_, model) = zoo.load(i)?;
        if stacks.is_empty() {
            stacks = layout
                .tensors
                .iter()
                .zip(&model)
                .map(|(spec, t)| Tensor::zeros((n, spec.numel()), t.dtype(), t.device()))
                .collect::<candle_core::Result<_>>()?;
        }
        for (s, t) in stacks.iter().zip(&model) {
            s.slice_set(&t.to_dtype(s.dtype())?.flatten_all()?.unsqueeze(0)?, 0, i)?;
        }
    }
    Ok(stacks)
}

/// Softmax of each row of `n` logits, in f64.
fn softmax_host(a: &[f64], n: usize) -> Vec<f64> {
    a.chunks(n)
        .flat_map(|row| {
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = row.iter().map(|v| (v - m).exp()).collect();
            let z: f64 = e.iter().sum();
            e.into_iter().map(move |v| v / z)
        })
        .collect()
}

/// θ_t = Σ_i α_{l(t),i} θ_i^t for every tensor t: one (1 × N)·(N × numel) product per tensor.
fn mix(
    alpha: &Tensor,
    stacks: &[Tensor],
    blocks: &[Block],
    layout: &ParamLayout,
) -> Result<Vec<Tensor>> {
    let mut out = Vec::with_capacity(stacks.len());
    for (l, block) in blocks.iter().enumerate() {
        let row = alpha.narrow(0, l, 1)?;
        for t in block.tensors.clone() {
            let shape = layout.tensors[t].shape.as_slice();
            out.push(row.matmul(&stacks[t])?.reshape(shape)?);
        }
    }
    Ok(out)
}

fn current_soup(
    coef: &[f64],
    num_blocks: usize,
    n: usize,
    stacks: &[Tensor],
    blocks: &[Block],
    layout: &ParamLayout,
) -> Result<Vec<Tensor>> {
    let alpha = softmax_host(&coef[..num_blocks * n], n);
    let a = transfer::upload(
        &alpha,
        (num_blocks, n),
        stacks[0].dtype(),
        stacks[0].device(),
    )?;
    mix(&a, stacks, blocks, layout)
}
