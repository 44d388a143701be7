//! `soup mix`: a soup from a zoo, with its coefficients, report, figures and recipe.
//!
//! Outputs go to `OUT.partial/` while the run lasts (MEHL saves its progress there after every
//! model batch, which `--resume` continues from); the finished directory is renamed to OUT, so
//! OUT is never half-written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use soup_core::{
    greedy_soup, learned_soup_observed, run_mehl, uniform_soup_on, Collective, Event, MehlOptions,
    MehlProgress, Method, Metrics, ModelStore, Objective, SoupResult, TensorSpec,
};
use soup_models::checkpoint::{atomic_write, write_model_dir, write_safetensors};
use soup_models::data::Split;
use soup_models::{Architecture, Checkpoint, Classification, FileStore, ModelError, Resolved};

use crate::common::{human_bytes, peak_rss_bytes, phase, DataArgs, Progress};
use crate::error::{io, CliError, Result};
use crate::output::{Output, Partial, PROGRESS};
use crate::recipe::{DirectionDtypeName, Recipe};
use crate::svg;

#[derive(clap::Args, Debug)]
pub struct MixArgs {
    /// The zoo: a directory of checkpoints or a zoo.toml. For the multi-task methods
    /// (adamerging, adamerging+, task-arithmetic, ties): the task models, each fine-tuned from
    /// `--base` on its own task, with `--data` listing their data sets in the same order.
    #[arg(long)]
    pub zoo: PathBuf,
    /// Multi-task methods: the pre-trained model θ_0 every task model was fine-tuned from.
    #[arg(long)]
    pub base: Option<PathBuf>,
    #[command(flatten)]
    pub data: DataArgs,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// A recipe.toml; flags override its values.
    #[arg(long)]
    pub recipe: Option<PathBuf>,
    #[command(flatten)]
    pub knobs: Recipe,
    /// Continue an interrupted MEHL run from OUT.partial/.
    #[arg(long)]
    pub resume: bool,
    /// Refuse to start when the estimated memory exceeds this many bytes (suffixes K, M, G).
    #[arg(long)]
    pub max_memory: Option<String>,
    /// Replace OUT if it exists.
    #[arg(long)]
    pub force: bool,
    /// Check everything, measure a model load, a gradient step and an evaluation batch, print
    /// the memory and time estimates, and stop: nothing is written.
    #[arg(long)]
    pub dry_run: bool,
    /// Overrides the zoo.toml's [arch_config] key by key.
    #[command(flatten)]
    pub arch: crate::common::ArchOverride,
    #[command(flatten)]
    pub device: crate::common::DeviceArgs,
}

/// α per block, as `coefficients.json` stores it.
#[derive(Serialize, Deserialize)]
pub struct Coefficients {
    pub models: Vec<String>,
    pub blocks: Vec<String>,
    pub alpha: Vec<Vec<f64>>,
}

#[derive(Clone, Copy, Serialize, Deserialize)]
pub struct Scores {
    pub accuracy: f64,
    pub loss: f64,
    pub count: usize,
}

impl From<Metrics> for Scores {
    fn from(m: Metrics) -> Self {
        Scores {
            accuracy: m.accuracy.unwrap_or(f64::NAN),
            loss: m.loss,
            count: m.count,
        }
    }
}

/// The metadata key of `progress.safetensors` that holds [`SavedProgress`].
const META_PROGRESS: &str = "soup.progress";

/// The saved state of an interrupted run: the soup's block vectors are the tensors of
/// `OUT.partial/progress.safetensors`, this is in its metadata.
#[derive(Serialize, Deserialize)]
struct SavedProgress {
    recipe: Recipe,
    models: Vec<String>,
    /// The run's state but for the soup's block vectors (the file's tensors).
    progress: MehlProgress,
}

fn parse_bytes(s: &str) -> Result<u64> {
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1e3),
        Some('M' | 'm') => (&s[..s.len() - 1], 1e6),
        Some('G' | 'g') => (&s[..s.len() - 1], 1e9),
        _ => (s, 1.0),
    };
    num.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v > 0.0)
        .map(|v| (v * mult) as u64)
        .ok_or_else(|| CliError::new(format!("--max-memory {s:?}: expected a size such as 8G")))
}

/// What one process of a run held and did, for the report.
#[derive(Clone, Copy, Debug, Default)]
struct RankStats {
    models_loaded: f64,
    max_models_per_batch: f64,
    direction_bytes: f64,
    peak_rss_bytes: f64,
}

/// A store that counts the models it loads.
struct Counted<'a> {
    inner: &'a FileStore,
    loads: std::cell::Cell<usize>,
    /// Reports each load (uniform, greedy and learned: loading or evaluating models is their
    /// long part; MEHL reports its steps instead).
    progress: Progress,
}

impl ModelStore for Counted<'_> {
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn name(&self, i: usize) -> String {
        self.inner.name(i)
    }
    fn layout(&self, i: usize) -> soup_core::Result<soup_core::ParamLayout> {
        self.inner.layout(i)
    }
    fn load(&self, i: usize) -> soup_core::Result<Vec<Tensor>> {
        self.loads.set(self.loads.get() + 1);
        let params = self.inner.load(i);
        self.progress.inc(1);
        params
    }
    fn device(&self) -> Device {
        self.inner.device()
    }
}

/// The recipe of the run: `--recipe`'s file, overridden by the flags, resolved.
fn resolve_recipe(args: &MixArgs) -> Result<Recipe> {
    let from_file = match &args.recipe {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| io(path, e))?;
            toml::from_str::<Recipe>(&text)
                .map_err(|e| CliError::new(format!("{}: {}", path.display(), e.message())))?
        }
        None => Recipe::default(),
    };
    from_file.overridden_by(&args.knobs).resolved()
}

/// Refuses a run whose `estimate` exceeds `--max-memory`.
fn check_memory(args: &MixArgs, method: Method, estimate: u64, n: usize, d: usize) -> Result<()> {
    if let Some(limit) = &args.max_memory {
        let limit = parse_bytes(limit)?;
        if estimate > limit {
            return Err(CliError::new(format!(
                "{} needs about {} for {n} models of {d} parameters plus the data, over --max-memory {}",
                method.name(),
                human_bytes(estimate),
                human_bytes(limit)
            )));
        }
    }
    Ok(())
}

/// `--dry-run`: the memory estimate, and a time estimate from one timed model load, one timed
/// gradient step (after a warm-up step) and one timed evaluation batch, scaled by the counts the
/// recipe implies. Rough by design: it ignores what the measured parts do not show (MEHL's
/// projection and θ update, Learned's mixing of N models), stated in its output.
fn dry_run(
    args: &MixArgs,
    recipe: &Recipe,
    store: &Counted,
    mut objective: Classification,
    test_len: usize,
    estimate: u64,
) -> Result<()> {
    let method = recipe.method();
    let (n, d) = (store.len(), store.inner.arch.layout().numel());
    let timed = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        let t = Instant::now();
        f()?;
        Ok(t.elapsed().as_secs_f64())
    };
    let mut params = Vec::new();
    let t_load = timed(&mut || {
        params = store.inner.load(0)?;
        Ok(())
    })?;
    let batch = |index| soup_core::Batch {
        epoch_seed: 0,
        index,
    };
    let batches = objective.num_batches();
    objective.loss_and_grad(&params, batch(0))?;
    let t_step = timed(&mut || {
        objective.loss_and_grad(&params, batch(1.min(batches - 1)))?;
        Ok(())
    })?;
    // One evaluation batch, scaled to the held-out and test splits.
    let eval_bs = objective.eval_batch_size;
    let first = objective.data.len().min(eval_bs);
    let rows: Vec<u32> = (0..first as u32).collect();
    let (images, labels) = objective.data.select(&rows)?;
    let mut one = Classification {
        eval_batch_size: eval_bs,
        ..Classification::new(
            store.inner.arch.clone(),
            soup_models::Dataset::in_memory(images, labels),
            eval_bs,
        )
    };
    let t_eval_batch = timed(&mut || {
        one.evaluate(&params)?;
        Ok(())
    })?;
    let heldout_eval = t_eval_batch * objective.data.len().div_ceil(eval_bs) as f64;
    let test_eval = t_eval_batch * test_len.div_ceil(eval_bs) as f64;
    let (nf, final_eval) = (n as f64, heldout_eval + test_eval);
    let (what, seconds) = match method {
        Method::Uniform => (format!("{n} loads + the final evaluation"), nf * t_load),
        Method::Greedy => (
            format!(
                "{} loads + {} held-out evaluations + the final evaluation",
                2 * n,
                2 * n - 1
            ),
            2.0 * nf * t_load + (2.0 * nf - 1.0) * heldout_eval,
        ),
        Method::Learned | Method::LearnedPlus => {
            let steps = recipe.learned_config(&[])?.epochs * batches;
            (
                format!("{n} loads + {steps} steps (each at least one model's step; mixing N models adds to it)"),
                nf * t_load + steps as f64 * t_step,
            )
        }
        Method::Mehl | Method::MehlPlus => {
            let c = recipe.mehl_config(&[])?;
            let model_batches = c.outer_passes * n.div_ceil(c.model_batch.min(n));
            let steps = model_batches * c.inner_epochs * batches;
            (
                format!(
                    "{} loads + {steps} steps (one model's step + 20 % for the directions, as measured at b = 8) + {model_batches} held-out evaluations",
                    c.outer_passes * n
                ),
                (c.outer_passes * n) as f64 * t_load
                    + steps as f64 * t_step * 1.2
                    + model_batches as f64 * heldout_eval,
            )
        }
        _ => unreachable!("multi-task methods run in crate::multitask"),
    };
    let total = seconds + final_eval;
    println!(
        "dry run of {}: {n} models of {d} parameters; held-out {} examples ({batches} batches of {}), test {test_len}",
        method.name(),
        objective.data.len(),
        objective.batch_size
    );
    println!(
        "  memory   about {} (the method's tensors and the data)",
        human_bytes(estimate)
    );
    if let Err(e) = check_memory(args, method, estimate, n, d) {
        println!("  refused  {}", e.0);
    }
    println!(
        "  measured a model load {:.3} s, a gradient step {:.3} s, an evaluation batch of {} {:.3} s",
        t_load, t_step, first, t_eval_batch
    );
    println!(
        "  time     about {} ({what}; final evaluation {}); rough, on this machine",
        crate::common::clock(total),
        crate::common::clock(final_eval)
    );
    println!("  nothing was written");
    Ok(())
}

/// What every rank held, gathered on every rank (each fills its own slots of a sum).
fn gather_ranks(comm: &dyn Collective, mine: RankStats) -> Result<Vec<RankStats>> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let mut slots = vec![0.0; 4 * world];
    slots[4 * rank..4 * rank + 4].copy_from_slice(&[
        mine.models_loaded,
        mine.max_models_per_batch,
        mine.direction_bytes,
        mine.peak_rss_bytes,
    ]);
    Ok(comm
        .all_reduce_f64(&slots)?
        .chunks(4)
        .map(|c| RankStats {
            models_loaded: c[0],
            max_models_per_batch: c[1],
            direction_bytes: c[2],
            peak_rss_bytes: c[3],
        })
        .collect())
}

/// Where a MEHL run saves its progress, and what it resumes from.
struct Saved<'a> {
    /// `OUT.partial/`.
    dir: &'a Path,
    recipe: &'a Recipe,
    names: &'a [String],
    /// The zoo's store when the run continues from the saved progress.
    resume: Option<&'a FileStore>,
}

/// MEHL or MEHL+ with a progress bar, saving progress after every model batch (rank 0);
/// returns the soup and the most models a model batch held on this rank.
fn mix_mehl(
    store: &Counted,
    objective: &mut Classification,
    saved: Saved,
    comm: &dyn Collective,
    quiet: bool,
) -> Result<(SoupResult, usize)> {
    let Saved {
        dir: partial,
        recipe,
        names,
        resume,
    } = saved;
    let (method, rank, n) = (recipe.method(), comm.rank(), store.len());
    let mut max_rows = 0;
    let config = recipe.mehl_config(&store.inner.arch.zero_gradient_tensors())?;
    let progress = match resume {
        Some(files) => Some(load_progress(partial, recipe, names, files)?),
        None => None,
    };
    let batches = config.outer_passes * n.div_ceil(config.model_batch.min(n));
    let steps_per_batch = config.inner_epochs * objective.num_batches();
    let bar = Progress::new(
        quiet,
        batches * steps_per_batch,
        &format!("{} steps", method.name()),
    );
    if let Some(p) = &progress {
        bar.set_position((p.model_batches_done * steps_per_batch) as u64);
    }
    let mut save_error = None;
    let result = run_mehl(
        store,
        objective,
        &config,
        MehlOptions::new(&mut |e| match e {
            Event::Step { record, .. } => {
                bar.inc(1);
                bar.set_prefix(format!("loss {:.4}", record.loss));
            }
            Event::BatchEnd { progress, .. } => {
                if rank == 0 {
                    if let Err(e) = save_progress(partial, recipe, names, progress) {
                        save_error.get_or_insert(e);
                    }
                }
            }
            Event::BatchStart { hyperplane, .. } => {
                max_rows = max_rows.max(hyperplane.batch_len());
            }
        })
        .resume(progress)
        .on(comm),
    );
    bar.finish();
    if let Some(e) = save_error {
        return Err(e);
    }
    Ok((result?, max_rows))
}

/// The files `soup mix` writes into OUT.
pub const OUTPUTS: &[&str] = &[
    "model.safetensors",
    "config.json",
    "preprocessor_config.json",
    "README.md",
    "coefficients.json",
    "report.json",
    "coefficients.svg",
    "curve.svg",
    "recipe.toml",
];

/// The paths a run reads, which OUT must not hold (and `--force` must not delete).
fn inputs(args: &MixArgs) -> Vec<PathBuf> {
    let mut inputs = vec![args.zoo.clone(), args.data.spec().root];
    inputs.extend(args.recipe.clone());
    inputs.extend(args.data.heldout_index.clone());
    inputs
}

/// `soup mix`. Over several processes (`comm`), only uniform, mehl and mehl+ run; every rank
/// loads its share of the models, and rank 0 alone evaluates and writes OUT. Everything is
/// checked before any work; a run that fails leaves no `OUT.partial/` unless it saved progress.
pub fn mix(args: &MixArgs, quiet: bool, comm: &dyn Collective) -> Result<()> {
    let recipe = resolve_recipe(args)?;
    if recipe.method().is_multitask() {
        return mix_multitask(args, recipe, quiet, comm);
    }
    if args.base.is_some() {
        return Err(CliError::new(format!(
            "--base is for the multi-task methods (adamerging, adamerging+, task-arithmetic, ties), not {}",
            recipe.method().name()
        )));
    }
    let inputs = inputs(args);
    let inputs: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
    let mut output = Output::check(&args.out, "mix", OUTPUTS, &inputs, args.force, args.resume)?;
    if output.state == Partial::Finished && args.resume {
        // Killed after its outputs were complete: only the rename is left (rank 0's job).
        if comm.rank() == 0 {
            output.finish()?;
            println!(
                "completed the finished run in {} -> {}",
                output.partial.display(),
                args.out.display()
            );
        }
        return Ok(());
    }
    let result = run(args, quiet, comm, &mut output);
    if result.is_err() && comm.rank() == 0 {
        output.abandon();
    }
    result
}

/// `soup mix` with a multi-task method, in one process.
fn mix_multitask(args: &MixArgs, recipe: Recipe, quiet: bool, comm: &dyn Collective) -> Result<()> {
    if comm.world_size() > 1 {
        return Err(CliError::new(format!(
            "{} runs in one process; over several processes soup mixes uniform, mehl and mehl+",
            recipe.method().name()
        )));
    }
    let inputs = crate::multitask::inputs(args);
    let inputs: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
    let outputs = crate::multitask::OUTPUTS;
    let mut output = Output::check(&args.out, "mix", outputs, &inputs, args.force, false)?;
    let result = crate::multitask::run(args, recipe, quiet, &mut output);
    if result.is_err() {
        output.abandon();
    }
    result
}

/// The work of `soup mix` once OUT is checked: load and check the zoo and data, make the soup,
/// evaluate it and write OUT.
fn run(args: &MixArgs, quiet: bool, comm: &dyn Collective, output: &mut Output) -> Result<()> {
    let started = Instant::now();
    let (rank, world) = (comm.rank(), comm.world_size());
    let recipe = resolve_recipe(args)?;
    let method = recipe.method();
    if world > 1 && !method.runs_distributed() {
        return Err(CliError::new(format!(
            "{} runs in one process; over several processes soup mixes uniform, mehl and mehl+",
            method.name()
        )));
    }
    let partial = output.partial.clone();

    let t_load = Instant::now();
    // Over several processes rank 0 fetches remote models first; the others then find them in
    // the cache instead of racing it for the same downloads.
    if rank > 0 {
        comm.all_reduce_f64(&[0.0])?;
    }
    let zoo = crate::manifest::resolve(&args.zoo, quiet)?;
    if world > 1 && rank == 0 {
        comm.all_reduce_f64(&[0.0])?;
    }
    let paths: Vec<PathBuf> = zoo.iter().map(|r| r.path.clone()).collect();
    let mut overrides = crate::manifest::arch_config(&args.zoo)?;
    overrides.extend(args.arch.map()?);
    let first = paths
        .first()
        .ok_or_else(|| CliError::new("the zoo is empty"))?;
    let arch = Checkpoint::open(first)?.architecture_with(&overrides)?;
    let files = FileStore::with_arch(paths, arch, args.device.open()?);
    let n = files.len();
    // Greedy loads every model twice: to rank them, then to try each in the soup.
    let (what, loads) = match method {
        Method::Greedy => ("greedy: models ranked and tried", 2 * n),
        _ => ("models loaded", n),
    };
    let store = Counted {
        inner: &files,
        loads: std::cell::Cell::new(0),
        progress: if method.is_mehl() {
            Progress::Hidden
        } else {
            Progress::new(quiet || rank > 0, loads, what)
        },
    };
    let arch = files.arch.clone();
    // Every member's header against the first's, before any weight is read.
    for i in 0..n {
        arch.layout()
            .check_same(&files.name(i), &files.layout(i)?)?;
    }
    let d = arch.layout().numel();
    phase(
        quiet || rank > 0,
        &format!("{n} models of {d} parameters; loading the held-out and test data"),
    );
    let heldout = args.data.load(Split::Heldout, &arch)?;
    let test = args.data.load(Split::Test, &arch)?;
    // Evaluation reads batches of 256, the largest a run uses.
    let data_bytes = heldout.resident_bytes(256) + test.resident_bytes(256);
    let per_rank_batch = recipe
        .model_batch
        .unwrap_or(Method::mehl_defaults().model_batch)
        .min(n)
        .div_ceil(world);
    let direction_elem_bytes = match recipe.direction_dtype {
        Some(DirectionDtypeName::Bf16 | DirectionDtypeName::F16) => 2,
        _ => 4,
    };
    let estimate =
        method.tensor_bytes_with(n, d, per_rank_batch, direction_elem_bytes) + data_bytes;
    let heldout_len = heldout.len();
    let mut objective = Classification {
        eval_batch_size: 256,
        label_smoothing: recipe.label_smoothing.unwrap_or(0.0),
        ..Classification::new(arch.clone(), heldout, recipe.batch_size.unwrap_or(128))
    };
    if args.dry_run {
        return dry_run(args, &recipe, &store, objective, test.len(), estimate);
    }
    check_memory(args, method, estimate, n, d)?;
    tracing::info!(
        models = n,
        parameters = d,
        heldout = heldout_len,
        test = test.len(),
        estimated_bytes = estimate,
        "zoo and data loaded"
    );
    let load_s = t_load.elapsed().as_secs_f64();
    let resume = args.resume && output.state == Partial::Progress;
    if rank == 0 {
        output.begin(args.resume)?;
    }

    let names: Vec<String> = zoo.iter().map(|r| r.source.clone()).collect();
    let mut max_rows = 0;
    let t_soup = Instant::now();
    let result = match method {
        Method::Uniform => uniform_soup_on(&store, comm)?,
        Method::Greedy => greedy_soup(&store, &mut objective, recipe.accept())?,
        Method::Learned | Method::LearnedPlus => {
            let config = recipe.learned_config(&arch.zero_gradient_tensors())?;
            let steps = config.epochs * objective.num_batches();
            let bar = Progress::new(quiet, steps, &format!("{} steps", method.name()));
            let result = learned_soup_observed(&store, &mut objective, &config, &mut |record| {
                bar.inc(1);
                bar.set_prefix(format!("loss {:.4}", record.loss));
            })?;
            bar.finish();
            result
        }
        Method::Mehl | Method::MehlPlus => {
            let saved = Saved {
                dir: &partial,
                recipe: &recipe,
                names: &names,
                resume: resume.then_some(&files),
            };
            let (result, rows) = mix_mehl(&store, &mut objective, saved, comm, quiet)?;
            max_rows = rows;
            result
        }
        _ => unreachable!("multi-task methods run in crate::multitask"),
    };
    let soup_s = t_soup.elapsed().as_secs_f64();
    store.progress.finish();

    let ranks = gather_ranks(
        comm,
        RankStats {
            models_loaded: store.loads.get() as f64,
            max_models_per_batch: max_rows as f64,
            direction_bytes: result.memory.directions as f64,
            peak_rss_bytes: peak_rss_bytes() as f64,
        },
    )?;
    if rank > 0 {
        return Ok(());
    }
    objective.set_shard(0, 1)?;

    phase(quiet, "evaluating the soup on the held-out and test splits");
    let t_eval = Instant::now();
    let heldout_scores: Scores = objective.evaluate(&result.soup)?.into();
    objective.data = test;
    let test_scores: Scores = objective.evaluate(&result.soup)?.into();
    let eval_s = t_eval.elapsed().as_secs_f64();

    Finished {
        args,
        recipe: &recipe,
        arch: arch.as_ref(),
        zoo: &zoo,
        result: &result,
        heldout: heldout_scores,
        test: test_scores,
        phases: [("load", load_s), ("soup", soup_s), ("evaluate", eval_s)],
        started,
        estimate,
        ranks: &ranks,
        device: soup_models::device::name(&files.device),
    }
    .write_outputs(&partial)?;
    output.finish()?;
    println!(
        "{}: {n} models -> held-out accuracy {:.4}, test accuracy {:.4}, {:.1} s -> {}",
        method.name(),
        heldout_scores.accuracy,
        test_scores.accuracy,
        started.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}

fn save_progress(dir: &Path, recipe: &Recipe, models: &[String], p: &MehlProgress) -> Result<()> {
    let saved = SavedProgress {
        recipe: recipe.clone(),
        models: models.to_vec(),
        progress: p.clone(),
    };
    let layout = soup_core::ParamLayout::new(
        p.soup_blocks
            .iter()
            .enumerate()
            .map(|(l, t)| TensorSpec {
                name: format!("block.{l}"),
                shape: t.dims().to_vec(),
            })
            .collect(),
    );
    // One file, written atomically: the soup's blocks with the rest of the state in its
    // metadata, so a crash leaves either the previous state or this one, never a mix.
    let meta = BTreeMap::from([(META_PROGRESS.to_string(), serde_json::to_string(&saved)?)]);
    write_safetensors(&dir.join(PROGRESS), &layout, &p.soup_blocks, &meta)?;
    Ok(())
}

fn load_progress(
    dir: &Path,
    recipe: &Recipe,
    models: &[String],
    store: &FileStore,
) -> Result<MehlProgress> {
    let path = dir.join(PROGRESS);
    let ckpt = Checkpoint::open(&path)?;
    let text = ckpt.metadata()?.remove(META_PROGRESS).ok_or_else(|| {
        CliError::new(format!(
            "{}: no saved run state in its metadata",
            path.display()
        ))
    })?;
    let saved: SavedProgress = serde_json::from_str(&text)
        .map_err(|e| CliError::new(format!("{}: {e}", path.display())))?;
    if &saved.recipe != recipe || saved.models != models {
        return Err(CliError::new(format!(
            "--resume: {} was saved by a run with another recipe or zoo",
            path.display()
        )));
    }
    let mut progress = saved.progress;
    progress.soup_blocks = (0..progress.alpha.len())
        .map(|l| ckpt.load(&format!("block.{l}"), &store.device))
        .collect::<std::result::Result<Vec<Tensor>, _>>()?;
    Ok(progress)
}

/// A finished run of `soup mix`: what its outputs are made of.
struct Finished<'a> {
    args: &'a MixArgs,
    recipe: &'a Recipe,
    arch: &'a dyn Architecture,
    zoo: &'a [Resolved],
    result: &'a SoupResult,
    heldout: Scores,
    test: Scores,
    /// Seconds of loading, souping and evaluating.
    phases: [(&'static str, f64); 3],
    started: Instant,
    /// The memory estimate checked against `--max-memory`.
    estimate: u64,
    ranks: &'a [RankStats],
    /// Where the models were computed (`cpu`, `cuda:N`).
    device: String,
}

impl Finished<'_> {
    /// The model card (README.md): what the soup is, its sources, α, scores and recipe.
    fn card(&self) -> String {
        let (recipe, result, arch) = (self.recipe, self.result, self.arch);
        let method = recipe.method().name();
        let n = self.zoo.len();
        let sources: Vec<Vec<String>> = self
            .zoo
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let alpha: Vec<f64> = result.alpha.iter().map(|a| a[i]).collect();
                let mean = alpha.iter().sum::<f64>() / alpha.len().max(1) as f64;
                let (lo, hi) = alpha
                    .iter()
                    .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &a| {
                        (lo.min(a), hi.max(a))
                    });
                let pin = r
                    .commit
                    .as_ref()
                    .map(|c| format!("commit `{c}`"))
                    .or_else(|| r.sha256.as_ref().map(|h| format!("sha256 `{h}`")))
                    .unwrap_or_else(|| "local file".into());
                vec![
                    i.to_string(),
                    format!("`{}`", r.source),
                    pin,
                    format!("{mean:.4}"),
                    format!("{lo:.4} … {hi:.4}"),
                ]
            })
            .collect();
        let scores = [("held-out", &self.heldout), ("test", &self.test)]
            .iter()
            .map(|(split, s)| {
                vec![
                    split.to_string(),
                    format!("{:.4}", s.accuracy),
                    format!("{:.4}", s.loss),
                    s.count.to_string(),
                ]
            })
            .collect::<Vec<_>>();
        let body = format!(
            "A {method} soup of {n} models made by `soup mix` (MEHL-Soup, ECCV 2024, and its \
             baselines): one model of {} parameters whose weights are, block by block ({} \
             blocks), affine combinations Σ α_i θ_i of the models below (α of a block sums to \
             1). Data: `{}`; the held-out split chose the soup, the test split did not.\n\n\
             ## Scores\n\n{}\n## Sources\n\nα per model: mean over blocks, and its range \
             (every block's α in `coefficients.json`, drawn in `coefficients.svg`).\n\n{}\n\
             ## Run\n\nTimings and memory in `report.json`. Files: `model.safetensors`, `config.json`, \
             `preprocessor_config.json`, `coefficients.json`, `coefficients.svg`, `curve.svg`, \
             `recipe.toml`, `report.json`.\n\n## Recipe\n\n```toml\n{}```\n\n",
            arch.layout().numel(),
            result.blocks.len(),
            self.args.data.data,
            crate::card::table(&["split", "accuracy", "loss", "examples"], &scores),
            crate::card::table(&["#", "source", "pinned to", "mean α", "α range"], &sources),
            toml::to_string_pretty(recipe).unwrap_or_default(),
        );
        crate::card::card(
            &["model-soup", "merge", method],
            &format!("Soup: {method} of {n} models"),
            &body,
            arch,
        )
    }

    /// Writes every output file of [`OUTPUTS`] into `dir`, each atomically.
    fn write_outputs(&self, dir: &Path) -> Result<()> {
        let Finished {
            args,
            recipe,
            arch,
            zoo,
            result,
            heldout,
            test,
            phases,
            started,
            estimate,
            ranks,
            ref device,
        } = *self;
        let write = |name: &str, text: &str| -> Result<()> {
            let path = dir.join(name);
            atomic_write(&path, |tmp| {
                std::fs::write(tmp, text).map_err(|e| ModelError::io(tmp, e))
            })?;
            Ok(())
        };
        let method = recipe.method().name();
        let models: Vec<String> = zoo.iter().map(|r| r.source.clone()).collect();
        let models = models.as_slice();
        // Provenance: each model's source with the Hub commit or download sha256 it resolved to.
        let sources: Vec<serde_json::Value> = zoo
            .iter()
            .map(
                |r| serde_json::json!({"source": r.source, "commit": r.commit, "sha256": r.sha256}),
            )
            .collect();
        let meta = BTreeMap::from([
            ("soup.method".to_string(), method.to_string()),
            ("soup.models".to_string(), serde_json::to_string(models)?),
            ("soup.sources".to_string(), serde_json::to_string(&sources)?),
            ("soup.recipe".to_string(), serde_json::to_string(recipe)?),
        ]);
        let coefficients = Coefficients {
            models: models.to_vec(),
            blocks: result.blocks.iter().map(|b| b.name.clone()).collect(),
            alpha: result.alpha.clone(),
        };
        write(
            "coefficients.json",
            &serde_json::to_string_pretty(&coefficients)?,
        )?;

        let mut timings: BTreeMap<String, f64> =
            phases.iter().map(|(p, s)| (p.to_string(), *s)).collect();
        for (p, s) in &result.timings.phases {
            timings.insert(format!("soup.{p}"), *s);
        }
        let m = &result.memory;
        let report = serde_json::json!({
            "method": method,
            "models": models.len(),
            "zoo": zoo,
            "parameters": arch.layout().numel(),
            "blocks": result.blocks.len(),
            "heldout": heldout,
            "test": test,
            "time_s": started.elapsed().as_secs_f64(),
            "timings_s": timings,
            "peak_rss_bytes": peak_rss_bytes(),
            "estimated_bytes": estimate,
            "world_size": ranks.len(),
            "device": device,
            "ranks": ranks.iter().enumerate().map(|(r, s)| serde_json::json!({
                "rank": r, "models_loaded": s.models_loaded,
                "max_models_per_batch": s.max_models_per_batch,
                "direction_bytes": s.direction_bytes, "peak_rss_bytes": s.peak_rss_bytes,
            })).collect::<Vec<_>>(),
            "memory_account_bytes": {
                "models": m.models, "directions": m.directions, "center": m.center,
                "theta": m.theta, "gradient": m.gradient, "coefficients": m.coefficients,
                "total": m.total(),
            },
            "steps": result.history.len(),
            "evaluations": result.evaluations.iter().map(|e| serde_json::json!({
                "model_batch": e.model_batch, "global_step": e.global_step,
                "loss": e.metrics.loss, "accuracy": e.metrics.accuracy,
            })).collect::<Vec<_>>(),
            "data": args.data.data,
        });
        write("report.json", &serde_json::to_string_pretty(&report)?)?;
        // The soup as a model directory (model.safetensors, config.json, preprocessor_config.json)
        // with its model card as README.md.
        let card = self.card();
        write_model_dir(dir, arch, &result.soup, &meta, &card)?;
        let short = short_names(models);
        write(
            "coefficients.svg",
            &svg::coefficients(
                &result.alpha,
                &short,
                &format!(
                    "α of {method} ({} blocks × {} models)",
                    result.blocks.len(),
                    models.len()
                ),
            ),
        )?;
        let losses: Vec<f64> = result.history.iter().map(|r| r.loss).collect();
        let accuracy: Vec<(usize, f64)> = result
            .evaluations
            .iter()
            .filter_map(|e| Some((e.global_step, e.metrics.accuracy?)))
            .collect();
        write(
            "curve.svg",
            &svg::curve(
                &losses,
                &accuracy,
                &format!("{method}: loss per step, held-out accuracy"),
                ("held-out loss (mini-batch)", "held-out accuracy"),
            ),
        )?;
        write("recipe.toml", &toml::to_string_pretty(recipe)?)?;
        Ok(())
    }
}

/// The models' last path components, for the labels of the figures.
pub(crate) fn short_names(models: &[String]) -> Vec<String> {
    models
        .iter()
        .map(|m| {
            Path::new(m)
                .file_name()
                .map_or(m.clone(), |f| f.to_string_lossy().into_owned())
        })
        .collect()
}
