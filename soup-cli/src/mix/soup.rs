//! `soup mix` with a single-task soup (uniform, greedy, learned, learned+, mehl, mehl+): one
//! soup of a zoo's models, with its coefficients, report, figures and recipe. A zoo of language
//! models also takes the multi-task merges here (AdaMerging, AdaMerging+, task arithmetic, TIES
//! of the fine-tunes and their `--base`): a language model has no task heads to keep apart, so
//! the merge is one causal-LM directory like a soup, and AdaMerging learns on the next-token
//! loss of every domain's held-out text.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use soup_core::{
    greedy_soup, learned_soup, uniform_soup, Collective, Event, Kind, MergeMethod, Method, Metrics,
    ModelStore, Objective, RunOptions, SoupMethod, SoupResult,
};
use soup_models::checkpoint::write_model_dir;
use soup_models::{Architecture, Checkpoint, FileStore, Resolved};

use super::args::{check_memory, MixArgs};
use super::evaluation::Evaluation;
use super::mehl::{mix_mehl, Saved};
use super::outputs::{evaluations_json, write_text, Scores};
use super::outputs::{memory_json, short_names, timings, write_coefficients, write_curve};
use crate::common::{peak_rss_bytes, phase, Progress};
use crate::error::{CliError, Result};
use crate::output::{Output, Partial};
use crate::recipe::{DirectionDtypeName, Recipe};
use soup_svg as svg;

/// What one process of a run held and did, for the report.
#[derive(Clone, Copy, Debug, Default)]
struct RankStats {
    models_loaded: f64,
    max_models_per_batch: f64,
    direction_bytes: f64,
    peak_rss_bytes: f64,
}

/// A store that counts the models it loads.
pub(super) struct Counted<'a> {
    pub inner: &'a FileStore,
    pub loads: std::cell::Cell<usize>,
    /// Reports each load (uniform, greedy and learned: loading or evaluating models is their
    /// long part; MEHL reports its steps instead).
    pub progress: Progress,
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

/// The files `soup mix` writes into OUT.
const OUTPUTS: &[&str] = &[
    "model.safetensors",
    "config.json",
    "preprocessor_config.json",
    "README.md",
    "coefficients.json",
    "report.json",
    "coefficients.svg",
    "curve.svg",
    "recipe.toml",
    // A language model's tokenizer, copied from the zoo's first model.
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];

/// The paths a run reads, which OUT must not hold (and `--force` must not delete).
fn inputs(args: &MixArgs) -> Vec<PathBuf> {
    let mut inputs = vec![args.zoo.clone(), args.data.spec().root];
    inputs.extend(args.base.clone());
    if args.data.domains().len() > 1 {
        inputs.extend(args.data.domains().into_iter().map(PathBuf::from));
    }
    inputs.extend(args.recipe.clone());
    inputs.extend(args.data.heldout_index.clone());
    inputs.extend(
        args.test
            .iter()
            .map(|d| soup_models::data::DataSpec::new(d).root),
    );
    inputs
}

/// `soup mix` with a single-task soup. Over several processes (`comm`), only uniform, mehl and
/// mehl+ run; every rank loads its share of the models, and rank 0 alone evaluates and writes
/// OUT. Everything is checked before any work; a run that fails leaves no `OUT.partial/` unless
/// it saved progress.
pub(super) fn mix(
    args: &MixArgs,
    recipe: Recipe,
    kind: Kind,
    quiet: bool,
    comm: &dyn Collective,
) -> Result<()> {
    let name = recipe.method().name();
    match kind {
        Kind::Soup(_) if args.base.is_some() => {
            return Err(CliError::new(format!(
                "--base is for the multi-task methods (adamerging, adamerging+, task-arithmetic, ties), not {name}"
            )));
        }
        Kind::Merge(_) if args.resume || args.dry_run => {
            return Err(CliError::new(format!(
                "{name} does not take --resume or --dry-run"
            )));
        }
        Kind::Merge(_) if args.data.data.contains(',') => {
            return Err(CliError::new(format!(
                "--data {}: {name} of language models learns on the union of the domains' \
                 held-out text: join the data sets with + (a+b+c), not commas",
                args.data.data
            )));
        }
        Kind::Merge(_) if args.knobs.task_loss.is_some() => {
            return Err(CliError::new(format!(
                "--task-loss: {name} of language models learns on the next-token loss of each \
                 domain's held-out text, not on a task loss"
            )));
        }
        Kind::Merge(_) if !args.test.is_empty() => {
            return Err(CliError::new(format!(
                "--test is for soups of image classifiers; {name} of language models is scored on each domain of --data a+b+c"
            )));
        }
        _ => {}
    }
    // The evaluation sets are checked before any work; a language model's are refused once its
    // zoo is read.
    crate::eval_sets::eval_sets(&args.test, &args.data)?;
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
    let result = run(args, recipe, kind, quiet, comm, &mut output);
    if result.is_err() && comm.rank() == 0 {
        output.abandon();
    }
    result
}

/// The zoo of `args`, resolved, as a store of checkpoints whose headers all match the first's
/// (checked before any weight is read); a merge's `--base` first.
fn open_zoo(
    args: &MixArgs,
    comm: &dyn Collective,
    quiet: bool,
    kind: Kind,
) -> Result<(Vec<Resolved>, FileStore)> {
    let (rank, world) = (comm.rank(), comm.world_size());
    // Over several processes rank 0 fetches remote models first; the others then find them in
    // the cache instead of racing it for the same downloads.
    if rank > 0 {
        comm.all_reduce_f64(&[0.0])?;
    }
    let mut zoo = crate::manifest::resolve(&args.zoo, quiet)?;
    if world > 1 && rank == 0 {
        comm.all_reduce_f64(&[0.0])?;
    }
    if let Kind::Merge(_) = kind {
        let base = args.base.clone().ok_or_else(|| {
            CliError::new(
                "the multi-task methods merge task models fine-tuned from one base: --base names it (θ_0)",
            )
        })?;
        zoo.insert(
            0,
            Resolved {
                source: base.display().to_string(),
                path: base,
                commit: None,
                sha256: None,
            },
        );
    }
    let paths: Vec<PathBuf> = zoo.iter().map(|r| r.path.clone()).collect();
    let mut overrides = crate::manifest::arch_config(&args.zoo)?;
    overrides.extend(args.arch.map()?);
    let first = paths
        .first()
        .ok_or_else(|| CliError::new("the zoo is empty"))?;
    let arch = Checkpoint::open(first)?.architecture_with(&overrides)?;
    let files = FileStore::with_arch(paths, arch, args.device.open()?);
    for i in 0..files.len() {
        files
            .arch
            .layout()
            .check_same(&files.name(i), &files.layout(i)?)?;
    }
    Ok((zoo, files))
}

/// The tensor memory the method holds on one rank, for the zoo's N models of d parameters.
fn tensor_estimate(recipe: &Recipe, n: usize, d: usize, world: usize) -> u64 {
    // AdaMerging takes every task model in one batch unless told otherwise.
    let default_batch = match recipe.method().is_adamerging() {
        true => n,
        false => Method::mehl_defaults().model_batch,
    };
    let per_rank_batch = recipe
        .model_batch
        .unwrap_or(default_batch)
        .min(n)
        .div_ceil(world);
    let direction_elem_bytes = match recipe.direction_dtype {
        Some(DirectionDtypeName::Bf16 | DirectionDtypeName::F16) => 2,
        _ => 4,
    };
    recipe
        .method()
        .tensor_bytes_with(n, d, per_rank_batch, direction_elem_bytes)
}

/// What a method made: the soup, the most models a model batch held on this rank (MEHL), and a
/// data-free merge's (λ, held-out loss) grid.
type Made = (SoupResult, usize, Vec<(f64, f64)>);

/// Runs the method.
fn make_soup(
    kind: Kind,
    store: &Counted,
    objective: &mut dyn Objective,
    saved: Saved,
    comm: &dyn Collective,
    quiet: bool,
) -> Result<Made> {
    let recipe = saved.recipe;
    let method = recipe.method();
    let kind = match kind {
        Kind::Soup(kind) => kind,
        Kind::Merge(kind) => return merge(kind, store, objective, recipe, quiet),
    };
    let (result, rows) = match kind {
        SoupMethod::Uniform => (uniform_soup(store, RunOptions::default().on(comm))?, 0),
        SoupMethod::Greedy => (
            greedy_soup(store, objective, recipe.accept(), RunOptions::default())?,
            0,
        ),
        SoupMethod::Learned => {
            let config = recipe.learned_config(&store.inner.arch.zero_gradient_tensors())?;
            let steps = config.epochs * objective.num_batches();
            let bar = Progress::new(quiet, steps, &format!("{} steps", method.name()));
            let mut on_step = |e: &Event| {
                if let Event::LearnedStep { record } = e {
                    bar.inc(1);
                    bar.set_prefix(format!("loss {:.4}", record.loss));
                }
            };
            let result = learned_soup(store, objective, &config, RunOptions::new(&mut on_step))?;
            bar.finish();
            (result, 0)
        }
        SoupMethod::Mehl => mix_mehl(store, objective, saved, comm, quiet)?,
    };
    Ok((result, rows, Vec::new()))
}

/// A multi-task merge of the store's models (the base first) as one model: AdaMerging learns λ
/// on the objective; task arithmetic and TIES take the λ of [`super::task_vectors::LAMBDAS`] that
/// scores best on it (the lowest held-out loss for a language model).
fn merge(
    kind: MergeMethod,
    store: &Counted,
    objective: &mut dyn Objective,
    recipe: &Recipe,
    quiet: bool,
) -> Result<Made> {
    let method = recipe.method();
    let k = store.len() - 1;
    match kind {
        MergeMethod::AdaMerging => {
            let config = recipe.adamerging_config(&store.inner.arch.zero_gradient_tensors(), 0)?;
            let (result, b) = super::task_vectors::adamerging(
                store,
                objective,
                &config,
                (k, method.name(), quiet),
            )?;
            Ok((result, b, Vec::new()))
        }
        MergeMethod::TaskArithmetic | MergeMethod::Ties => {
            let (merged, lambda, grid) = super::task_vectors::chosen_lambda(
                kind,
                store,
                recipe,
                objective,
                (Metrics::score, |m| m.loss),
                quiet,
            )?;
            let soup = merged.at(lambda)?;
            let result = super::task_vectors::merged_result(kind, recipe, store, soup, lambda)?;
            Ok((result, 0, grid))
        }
    }
}

/// The work of `soup mix` once OUT is checked: load and check the zoo and data, make the soup,
/// evaluate it and write OUT.
fn run(
    args: &MixArgs,
    recipe: Recipe,
    kind: Kind,
    quiet: bool,
    comm: &dyn Collective,
    output: &mut Output,
) -> Result<()> {
    let started = Instant::now();
    let (rank, world) = (comm.rank(), comm.world_size());
    let method = recipe.method();
    if world > 1 && !method.runs_distributed() {
        return Err(CliError::new(format!(
            "{} runs in one process; over several processes soup mixes uniform, mehl and mehl+",
            method.name()
        )));
    }
    let partial = output.partial.clone();

    let t_load = Instant::now();
    let (zoo, files) = open_zoo(args, comm, quiet, kind)?;
    let n = files.len();
    // Greedy loads every model twice: to rank them, then to try each in the soup.
    let (what, loads) = match kind {
        Kind::Soup(SoupMethod::Greedy) => ("greedy: models ranked and tried", 2 * n),
        _ => ("models loaded", n),
    };
    let store = Counted {
        inner: &files,
        loads: std::cell::Cell::new(0),
        progress: match kind {
            Kind::Soup(SoupMethod::Mehl) | Kind::Merge(MergeMethod::AdaMerging) => Progress::Hidden,
            _ => Progress::new(quiet || rank > 0, loads, what),
        },
    };
    let arch = files.arch.clone();
    let d = arch.layout().numel();
    phase(
        quiet || rank > 0,
        &format!("{n} models of {d} parameters; loading the held-out and test data"),
    );
    let model_dir = crate::inspect::model_dir(&files.paths[0]);
    let sets = crate::eval_sets::eval_sets(&args.test, &args.data)?;
    if !sets.is_empty() && !matches!(arch.input(), soup_models::InputSpec::Images(_)) {
        return Err(CliError::new(
            "--test is for image classifiers; a language model's domains are --data a+b+c",
        ));
    }
    let mut objective = Evaluation::load(&args.data, &arch, &recipe, &model_dir)?;
    let estimate = tensor_estimate(&recipe, n, d, world) + objective.resident_bytes();
    let (heldout_len, test_len) = (objective.len(), objective.test_len());
    if let (true, Kind::Soup(kind)) = (args.dry_run, kind) {
        return super::dry_run::dry_run(args, &recipe, kind, &store, objective, estimate);
    }
    check_memory(args, method, estimate, n, d)?;
    tracing::info!(
        models = n,
        parameters = d,
        heldout = heldout_len,
        test = test_len,
        estimated_bytes = estimate,
        "zoo and data loaded"
    );
    let load_s = t_load.elapsed().as_secs_f64();
    let resume = args.resume && output.state == Partial::Progress;
    if rank == 0 {
        output.begin(args.resume)?;
    }

    let names: Vec<String> = zoo.iter().map(|r| r.source.clone()).collect();
    let t_soup = Instant::now();
    let saved = Saved {
        dir: &partial,
        recipe: &recipe,
        names: &names,
        resume: resume.then_some(&files),
    };
    let (result, max_rows, grid) = make_soup(kind, &store, &mut objective, saved, comm, quiet)?;
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
    let (heldout_metrics, test_metrics, domains) = objective.final_scores(&result.soup)?;
    let (heldout_scores, test_scores): (Scores, Scores) =
        (heldout_metrics.into(), test_metrics.into());
    let tests = crate::eval_sets::score(&sets, &arch, &result.soup)?;
    let domains: Vec<(String, Scores, Scores)> = domains
        .into_iter()
        .map(|d| (d.name, d.heldout.into(), d.test.into()))
        .collect();
    let eval_s = t_eval.elapsed().as_secs_f64();

    Finished {
        args,
        text: objective.is_text().then_some(model_dir.as_path()),
        domains: &domains,
        base: crate::manifest::base_model(&args.zoo)?
            .or_else(|| args.base.as_ref().map(|b| b.display().to_string())),
        merge: match kind {
            Kind::Merge(_) => Some(&grid),
            Kind::Soup(_) => None,
        },
        recipe: &recipe,
        arch: arch.as_ref(),
        zoo: &zoo,
        result: &result,
        heldout: heldout_scores,
        test: test_scores,
        tests: &tests,
        phases: [("load", load_s), ("soup", soup_s), ("evaluate", eval_s)],
        started,
        estimate,
        ranks: &ranks,
        device: soup_models::device::name(&files.device),
    }
    .write_outputs(&partial)?;
    output.finish()?;
    let said = |s: &Scores| match s.perplexity {
        Some(p) => format!("perplexity {p:.3}"),
        None => format!("accuracy {:.4}", s.accuracy),
    };
    let shifts = match tests.as_slice() {
        [] => String::new(),
        t => format!(
            ", mean accuracy over {} --test sets {:.4}",
            t.len(),
            crate::eval_sets::mean_accuracy(t)
        ),
    };
    println!(
        "{}: {n} models -> held-out {}, test {}{shifts}, {:.1} s -> {}",
        method.name(),
        said(&heldout_scores),
        said(&test_scores),
        started.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}

/// A finished run of `soup mix`: what its outputs are made of.
struct Finished<'a> {
    args: &'a MixArgs,
    /// For a language model, the directory its tokenizer is copied from.
    text: Option<&'a Path>,
    /// Each domain's held-out and test scores, for a union of text data sets.
    domains: &'a [(String, Scores, Scores)],
    /// The model the zoo's fine-tunes start from, where its zoo.toml records it (else a
    /// merge's `--base`).
    base: Option<String>,
    /// A multi-task merge (its first model is the base), with the (λ, held-out loss) grid of a
    /// data-free one.
    merge: Option<&'a [(f64, f64)]>,
    recipe: &'a Recipe,
    arch: &'a dyn Architecture,
    zoo: &'a [Resolved],
    result: &'a SoupResult,
    heldout: Scores,
    test: Scores,
    /// The scores on each `--test` set.
    tests: &'a [crate::eval_sets::SetScores],
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
        let splits = [("held-out", &self.heldout), ("test", &self.test)];
        let scores = match self.text {
            None => crate::card::table(
                &["split", "accuracy", "loss", "examples"],
                &splits
                    .iter()
                    .map(|(split, s)| {
                        vec![
                            split.to_string(),
                            format!("{:.4}", s.accuracy),
                            format!("{:.4}", s.loss),
                            s.count.to_string(),
                        ]
                    })
                    .collect::<Vec<_>>(),
            ),
            Some(_) => crate::card::table(
                &[
                    "split",
                    "loss per token",
                    "perplexity",
                    "next-token accuracy",
                    "tokens",
                ],
                &splits
                    .iter()
                    .map(|(split, s)| {
                        vec![
                            split.to_string(),
                            format!("{:.4}", s.loss),
                            format!("{:.3}", s.perplexity.unwrap_or(f64::NAN)),
                            format!("{:.4}", s.accuracy),
                            s.count.to_string(),
                        ]
                    })
                    .collect::<Vec<_>>(),
            ),
        };
        let scores = match self.domains {
            [] => scores,
            domains => {
                let rows: Vec<Vec<String>> = domains
                    .iter()
                    .flat_map(|(name, h, t)| {
                        [("held-out", h), ("test", t)].map(|(split, s)| {
                            vec![
                                name.clone(),
                                split.to_string(),
                                format!("{:.4}", s.loss),
                                format!("{:.3}", s.perplexity.unwrap_or(f64::NAN)),
                                s.count.to_string(),
                            ]
                        })
                    })
                    .collect();
                let header = ["domain", "split", "loss per token", "perplexity", "tokens"];
                format!(
                    "{scores}\nBy domain (the rows above weigh them by their tokens):\n\n{}",
                    crate::card::table(&header, &rows)
                )
            }
        };
        let scores = match self.tests {
            [] => scores,
            tests => format!(
                "{scores}\nOn the evaluation sets of `--test` (test splits):\n\n{}",
                crate::eval_sets::table(tests)
            ),
        };
        let files = match self.text {
            None => "`preprocessor_config.json`",
            Some(_) => "the tokenizer's files",
        };
        let what = match self.merge {
            None => format!(
                "A {method} soup of {n} models made by `soup mix` (MEHL-Soup, ECCV 2024, and its \
                 baselines): one model of {} parameters whose weights are, block by block ({} \
                 blocks), affine combinations Σ α_i θ_i of the models below (α of a block sums \
                 to 1).",
                arch.layout().numel(),
                result.blocks.len(),
            ),
            Some(_) => format!(
                "A {method} merge made by `soup mix` of the base θ_0 (model 0) and the {} models \
                 fine-tuned from it: one model of {} parameters, θ_0 plus the task vectors \
                 θ_k − θ_0 scaled by λ ({} blocks; TIES trims the task vectors and elects their \
                 signs first). λ was chosen on the held-out text's next-token loss.",
                n - 1,
                arch.layout().numel(),
                result.blocks.len(),
            ),
        };
        let body = format!(
            "{what} Data: `{}`; the held-out split chose the soup, the test split did not.\n\n\
             ## Scores\n\n{}\n## Sources\n\nα per model: mean over blocks, and its range \
             (every block's α in `coefficients.json`, drawn in `coefficients.svg`).\n\n{}\n\
             ## Run\n\nTimings and memory in `report.json`. Files: `model.safetensors`, `config.json`, \
             {files}, `coefficients.json`, `coefficients.svg`, `curve.svg`, `recipe.toml`, \
             `report.json`.\n\n## Recipe\n\n```toml\n{}```\n\n",
            self.args.data.data,
            scores,
            crate::card::table(&["#", "source", "pinned to", "mean α", "α range"], &sources),
            toml::to_string_pretty(recipe).unwrap_or_default(),
        );
        crate::card::card(
            &["model-soup", "merge", method],
            &format!("Soup: {method} of {n} models"),
            &body,
            arch,
            self.base.as_deref(),
        )
    }

    /// Writes every output file of [`OUTPUTS`] into `dir`, each atomically.
    fn write_outputs(&self, dir: &Path) -> Result<()> {
        let Finished {
            args,
            text,
            domains,
            base: _,
            merge,
            recipe,
            arch,
            zoo,
            result,
            heldout,
            test,
            tests,
            phases,
            started,
            estimate,
            ranks,
            ref device,
        } = *self;
        let write = |name: &str, text: &str| write_text(dir, name, text);
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
        write_coefficients(dir, models, result)?;
        let report = serde_json::json!({
            "method": method,
            "models": models.len(),
            "zoo": zoo,
            "parameters": arch.layout().numel(),
            "blocks": result.blocks.len(),
            "heldout": heldout,
            "test": test,
            "time_s": started.elapsed().as_secs_f64(),
            "timings_s": timings(&phases, result),
            "peak_rss_bytes": peak_rss_bytes(),
            "estimated_bytes": estimate,
            "world_size": ranks.len(),
            "device": device,
            "ranks": ranks.iter().enumerate().map(|(r, s)| serde_json::json!({
                "rank": r, "models_loaded": s.models_loaded,
                "max_models_per_batch": s.max_models_per_batch,
                "direction_bytes": s.direction_bytes, "peak_rss_bytes": s.peak_rss_bytes,
            })).collect::<Vec<_>>(),
            "memory_account_bytes": memory_json(&result.memory),
            "steps": result.history.len(),
            "evaluations": evaluations_json(result, "accuracy"),
            "objective": if text.is_some() { "next-token cross-entropy" } else { "classification" },
            "domains": domains.iter().map(|(name, h, t)| serde_json::json!({
                "name": name, "heldout": h, "test": t,
            })).collect::<Vec<_>>(),
            "data": args.data.data,
        });
        let mut report = report;
        if !tests.is_empty() {
            report["tests"] = serde_json::to_value(tests)?;
            report["tests_mean_accuracy"] = crate::eval_sets::mean_accuracy(tests).into();
        }
        if let Some(grid) = merge.filter(|g| !g.is_empty()) {
            report["lambda_grid"] = grid
                .iter()
                .map(|(l, loss)| serde_json::json!({"lambda": l, "heldout_loss": loss}))
                .collect();
        }
        write("report.json", &serde_json::to_string_pretty(&report)?)?;
        // The soup as a model directory (model.safetensors, config.json, preprocessor_config.json)
        // with its model card as README.md.
        let card = self.card();
        write_model_dir(dir, arch, &result.soup, &meta, &card)?;
        if let Some(from) = text {
            soup_models::checkpoint::copy_tokenizer(from, dir)?;
        }
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
        write_curve(
            dir,
            result,
            &format!("{method}: loss per step, held-out accuracy"),
            match text {
                None => ("held-out loss (mini-batch)", "held-out accuracy"),
                Some(_) => (
                    "held-out loss per token (mini-batch)",
                    "held-out next-token accuracy",
                ),
            },
        )?;
        write("recipe.toml", &toml::to_string_pretty(recipe)?)?;
        Ok(())
    }
}
