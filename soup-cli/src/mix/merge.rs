//! `soup mix` for models fine-tuned from one base on different tasks (spec §3.9): AdaMerging and
//! AdaMerging+ through MEHL's model batches, task arithmetic and TIES.
//!
//! The zoo lists the task models, `--base` names θ_0, and `--data` lists the tasks' data sets in
//! zoo order, comma-separated. Each task keeps the head of its own fine-tune; only the encoder
//! is merged. OUT holds the merged encoder, the heads, and per-task tables.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use soup_core::SoupResult;
use soup_core::{data_free_merge, Collective, MergeMethod, ModelStore, SeededMasks};
use soup_models::checkpoint::write_safetensors;
use soup_models::data::Split;
use soup_models::train::multitask::{EncoderStore, MultiTask, Task, TaskLoss};
use soup_models::{Architecture, Checkpoint, Classification};

use super::args::MixArgs;
use super::outputs::{evaluations_json, write_text, Scores};
use super::outputs::{memory_json, short_names, timings, write_coefficients, write_curve};
use crate::common::{human_bytes, peak_rss_bytes, phase, DataArgs};
use crate::error::{io, CliError, Result};
use crate::merge::config::{Dtype, MergeConfig};
use crate::output::Output;
use crate::recipe::{Recipe, TaskLossName};
use soup_svg as svg;

/// The files a multi-task `soup mix` writes into OUT.
const OUTPUTS: &[&str] = &[
    "encoder.safetensors",
    "heads.safetensors",
    "tasks.json",
    "coefficients.json",
    "report.json",
    "report.md",
    "coefficients.svg",
    "curve.svg",
    "recipe.toml",
    "mergekit_config.yml",
];

/// The tasks' data arguments: `--data` split at commas, one per task model.
fn task_data(args: &MixArgs, tasks: usize) -> Result<Vec<DataArgs>> {
    let names: Vec<&str> = args.data.data.split(',').map(str::trim).collect();
    if names.len() != tasks {
        return Err(CliError::new(format!(
            "--data lists {} data set(s) for {tasks} task model(s): give one per model of the zoo, in its order, comma-separated",
            names.len()
        )));
    }
    Ok(names
        .iter()
        .map(|d| DataArgs {
            data: d.to_string(),
            ..args.data.clone()
        })
        .collect())
}

/// The paths a multi-task run reads (which OUT must not hold).
fn inputs(args: &MixArgs) -> Vec<PathBuf> {
    let mut v = vec![args.zoo.clone()];
    v.extend(args.base.clone());
    v.extend(args.recipe.clone());
    v.extend(
        args.data
            .data
            .split(',')
            .map(|d| DataArgs {
                data: d.trim().to_string(),
                ..args.data.clone()
            })
            .map(|d| d.spec().root),
    );
    v
}

/// A task's name: its data set's last path component.
fn task_name(data: &str) -> String {
    Path::new(data)
        .file_name()
        .map_or(data.to_string(), |f| f.to_string_lossy().into_owned())
}

/// One task's scores on both splits.
#[derive(Clone, serde::Serialize)]
struct TaskScores {
    name: String,
    model: String,
    data: String,
    classes: usize,
    heldout: Scores,
    test: Scores,
}

/// How a multi-task run merges the encoders.
enum How {
    /// A method of soup's registry, run as the recipe says.
    Method(MergeMethod),
    /// The data-free method of a mergekit configuration (`--mergekit-config`).
    Config(PathBuf, MergeConfig),
}

impl How {
    fn name(&self, recipe: &Recipe) -> String {
        match self {
            How::Method(_) => recipe.method().name().to_string(),
            How::Config(_, config) => config.method.name().to_string(),
        }
    }
}

/// `soup mix` with a multi-task method, in one process.
pub(super) fn mix(
    args: &MixArgs,
    recipe: Recipe,
    kind: MergeMethod,
    quiet: bool,
    comm: &dyn Collective,
) -> Result<()> {
    checked_and_run(args, recipe, How::Method(kind), quiet, comm)
}

/// `soup mix --mergekit-config CONFIG`: the task models' encoders merged by the configuration's
/// data-free method, each task with its own head. The configuration's models are the zoo's
/// models and its base_model is `--base`, named as `soup merge` resolves them.
pub(super) fn mix_config(
    args: &MixArgs,
    path: &Path,
    quiet: bool,
    comm: &dyn Collective,
) -> Result<()> {
    let config = MergeConfig::read(path)?;
    crate::merge::checked_inputs(path, &config)?;
    let refuse = |what: &str| {
        Err(CliError::new(format!(
            "--mergekit-config {}: {what}",
            path.display()
        )))
    };
    if args.recipe.is_some() {
        return refuse(
            "the configuration names the method and its parameters; --recipe is for --method",
        );
    }
    for (key, dtype) in [("dtype", config.dtype), ("out_dtype", config.out_dtype)] {
        if dtype.is_some_and(|d| d != Dtype::F32) {
            return refuse(&format!(
                "soup mix merges encoders in float32; {key} other than float32 is for soup merge"
            ));
        }
    }
    if args.base.is_none() {
        return refuse("merges task models fine-tuned from one base: --base names it (θ_0)");
    }
    if super::args::merges_language_models(args)? {
        return refuse(
            "a merge of language models is one model, without task heads: soup merge CONFIG makes it",
        );
    }
    let recipe = args.knobs.clone();
    checked_and_run(
        args,
        recipe,
        How::Config(path.to_path_buf(), config),
        quiet,
        comm,
    )
}

/// OUT checked, then the run; OUT.partial/ is removed when the run fails.
fn checked_and_run(
    args: &MixArgs,
    recipe: Recipe,
    how: How,
    quiet: bool,
    comm: &dyn Collective,
) -> Result<()> {
    if comm.world_size() > 1 {
        return Err(CliError::new(format!(
            "{} runs in one process; over several processes soup mixes uniform, mehl and mehl+",
            how.name(&recipe)
        )));
    }
    if !args.test.is_empty() {
        return Err(CliError::new(
            "--test scores one classifier; a multi-task merge scores each task on its own --data set",
        ));
    }
    let mut inputs = inputs(args);
    if let How::Config(path, _) = &how {
        inputs.push(path.clone());
    }
    let inputs: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
    let mut output = Output::check(&args.out, "mix", OUTPUTS, &inputs, args.force, false)?;
    let result = run(args, recipe, how, quiet, &mut output);
    if result.is_err() {
        output.abandon();
    }
    result
}

/// The inputs of a mergekit configuration, in its order, read from the encoders of a
/// multi-task store (θ_0 first, then the task models).
struct ConfigInputs<'a> {
    store: &'a EncoderStore,
    /// The store's index of each of the configuration's inputs.
    order: Vec<usize>,
}

impl ModelStore for ConfigInputs<'_> {
    fn len(&self) -> usize {
        self.order.len()
    }
    fn name(&self, i: usize) -> String {
        self.store.name(self.order[i])
    }
    fn layout(&self, i: usize) -> soup_core::Result<soup_core::ParamLayout> {
        self.store.layout(self.order[i])
    }
    fn load(&self, i: usize) -> soup_core::Result<Vec<candle_core::Tensor>> {
        self.store.load(self.order[i])
    }
    fn load_tensor(&self, i: usize, tensor: usize) -> soup_core::Result<candle_core::Tensor> {
        self.store.load_tensor(self.order[i], tensor)
    }
    fn device(&self) -> candle_core::Device {
        self.store.device()
    }
}

/// The store's index (θ_0 = 0, task model k = k) of each of the configuration's inputs; every
/// task model must be one of them and base_model must be `--base`.
fn config_order(
    path: &Path,
    config: &MergeConfig,
    base: &Path,
    zoo: &[soup_models::Resolved],
    quiet: bool,
) -> Result<Vec<usize>> {
    let canonical = |p: &Path| std::fs::canonicalize(p).map_err(|e| io(p, e));
    let known: Vec<PathBuf> = std::iter::once(base)
        .chain(zoo.iter().map(|r| r.path.as_path()))
        .map(canonical)
        .collect::<Result<_>>()?;
    let (inputs, config_base) = config.inputs();
    let mut order = Vec::with_capacity(inputs.len());
    for (i, m) in inputs.iter().enumerate() {
        let at = canonical(&crate::merge::resolve(m, quiet)?)?;
        let j = known.iter().position(|k| *k == at);
        if Some(i) == config_base && j != Some(0) {
            return Err(CliError::new(format!(
                "{}: base_model {m} is not --base {}",
                path.display(),
                base.display()
            )));
        }
        let Some(j) = j else {
            return Err(CliError::new(format!(
                "{}: model {m} is neither --base nor a model of the zoo",
                path.display()
            )));
        };
        order.push(j);
    }
    if let Some(missing) = (1..known.len()).find(|j| !order.contains(j)) {
        return Err(CliError::new(format!(
            "{}: the zoo's model {} is not among its models (each task's head is scored on the merged encoder, so every task model is merged)",
            path.display(),
            zoo[missing - 1].source
        )));
    }
    Ok(order)
}

/// The configuration's merge of the encoders, as a [`SoupResult`] with no coefficients (a
/// data-free merge follows no α).
fn config_merge(
    (path, config): (&Path, &MergeConfig),
    store: &EncoderStore,
    order: Vec<usize>,
    seed: u64,
) -> Result<SoupResult> {
    let inputs = ConfigInputs { store, order };
    let params = crate::merge::tensor_params(path, config, &inputs)?;
    let (_, base) = config.inputs();
    let started = Instant::now();
    let soup = data_free_merge(
        &inputs,
        config.method,
        base,
        &mut |k, _| Ok(params[k].clone()),
        &mut SeededMasks { seed },
    )?;
    let layout = store.layout(0)?;
    let model = 4 * layout.numel();
    let mut timings = soup_core::Timings::default();
    timings.add("merge", started);
    Ok(SoupResult {
        method: config.method.name().to_string(),
        model_names: (0..store.len()).map(|i| store.name(i)).collect(),
        soup,
        blocks: soup_core::BlockCut::WHOLE.blocks(&layout)?,
        layout,
        alpha: Vec::new(),
        history: Vec::new(),
        evaluations: Vec::new(),
        timings,
        memory: soup_core::MemoryAccount {
            models: model,
            ..Default::default()
        },
    })
}

/// The base, the task models as one store of encoders and heads, and their data sets.
struct Loaded {
    zoo: Vec<soup_models::Resolved>,
    store: EncoderStore,
    data: Vec<DataArgs>,
    device: candle_core::Device,
}

/// Opens `--base` and the zoo's task models, with one data set per task.
fn load(args: &MixArgs, base: &Path, quiet: bool) -> Result<Loaded> {
    let zoo = crate::manifest::resolve(&args.zoo, quiet)?;
    let k = zoo.len();
    if k == 0 {
        return Err(CliError::new("the zoo is empty"));
    }
    let mut overrides = crate::manifest::arch_config(&args.zoo)?;
    overrides.extend(args.arch.map()?);
    let data = task_data(args, k)?;
    let mut models: Vec<(PathBuf, Arc<dyn Architecture>)> = Vec::with_capacity(k + 1);
    for path in std::iter::once(base).chain(zoo.iter().map(|r| r.path.as_path())) {
        let arch = Checkpoint::open(path)?.architecture_with(&overrides)?;
        models.push((path.to_path_buf(), arch));
    }
    let device = args.device.open()?;
    let store = EncoderStore::new(models, &device)?;
    Ok(Loaded {
        zoo,
        store,
        data,
        device,
    })
}

/// Every task's held-out and test classification, with the task model's head.
fn task_splits(
    store: &EncoderStore,
    data: &[DataArgs],
    recipe: &Recipe,
) -> Result<(Vec<Task>, Vec<Task>)> {
    let batch_size = recipe.batch_size.unwrap_or(16);
    let mut heldout_tasks = Vec::with_capacity(data.len());
    let mut test_tasks = Vec::with_capacity(data.len());
    for (i, d) in data.iter().enumerate() {
        let arch = store.models[i + 1].arch.clone();
        let head = store.head(i + 1)?;
        for (split, list) in [
            (Split::Heldout, &mut heldout_tasks),
            (Split::Test, &mut test_tasks),
        ] {
            let classification = Classification {
                eval_batch_size: 256,
                label_smoothing: recipe.label_smoothing.unwrap_or(0.0),
                ..Classification::new(arch.clone(), d.load(split, &arch)?, batch_size)
            };
            list.push(Task {
                name: task_name(&d.data),
                classification,
                head: head.clone(),
            });
        }
    }
    Ok((heldout_tasks, test_tasks))
}

/// The multi-task `soup mix`, once OUT is checked.
fn run(args: &MixArgs, recipe: Recipe, how: How, quiet: bool, output: &mut Output) -> Result<()> {
    let started = Instant::now();
    let method = how.name(&recipe);
    if args.resume || args.dry_run {
        return Err(CliError::new(format!(
            "{method} does not take --resume or --dry-run"
        )));
    }
    let base = args.base.clone().ok_or_else(|| {
        CliError::new(format!(
            "{method} merges task models fine-tuned from one base: --base names it (θ_0)"
        ))
    })?;
    let t_load = Instant::now();
    let Loaded {
        zoo,
        store,
        data,
        device,
    } = load(args, &base, quiet)?;
    let k = zoo.len();
    let d = store.encoder.numel();
    // The configuration's models are matched to the zoo before any data is read.
    let order = match &how {
        How::Config(path, config) => Some(config_order(path, config, &base, &zoo, quiet)?),
        How::Method(_) => None,
    };
    phase(
        quiet,
        &format!("base and {k} task models, encoder of {d} parameters; loading each task's data"),
    );
    let (heldout_tasks, test_tasks) = task_splits(&store, &data, &recipe)?;
    let objective = |tasks: &Vec<Task>, loss| MultiTask {
        encoder: store.encoder.clone(),
        tasks: tasks.clone(),
        loss,
    };
    let mut heldout = objective(&heldout_tasks, TaskLoss::CrossEntropy);
    let mut test = objective(&test_tasks, TaskLoss::CrossEntropy);
    let load_s = t_load.elapsed().as_secs_f64();
    output.begin(false)?;

    let t_soup = Instant::now();
    let mut recipe = recipe;
    let (result, grid) = match how {
        How::Config(ref path, ref config) => {
            let order = order.expect("matched above");
            let seed = recipe.seed.unwrap_or(0);
            (
                config_merge((path, config), &store, order, seed)?,
                Vec::new(),
            )
        }
        How::Method(MergeMethod::AdaMerging) => {
            recipe.model_batch = Some(recipe.model_batch.unwrap_or(k).min(k));
            let config =
                recipe.adamerging_config(&store.models[0].arch.zero_gradient_tensors(), 0)?;
            // AdaMerging learns on the test inputs, labels unused; cross-entropy on the
            // labelled held-out split.
            let mut train = match recipe.task_loss.unwrap_or(TaskLossName::Entropy) {
                TaskLossName::Entropy => objective(&test_tasks, TaskLoss::Entropy),
                TaskLossName::CrossEntropy => objective(&heldout_tasks, TaskLoss::CrossEntropy),
            };
            let (result, _) =
                super::task_vectors::adamerging(&store, &mut train, &config, (k, &method, quiet))?;
            (result, Vec::new())
        }
        How::Method(kind @ (MergeMethod::TaskArithmetic | MergeMethod::Ties)) => {
            // The first λ of the best held-out average accuracy.
            let accuracy = |m: &soup_core::Metrics| m.accuracy.unwrap_or(f64::NAN);
            let (merged, lambda, grid) = super::task_vectors::chosen_lambda(
                kind,
                &store,
                &recipe,
                &mut heldout,
                (accuracy, accuracy),
                quiet,
            )?;
            let soup = merged.at(lambda)?;
            (
                super::task_vectors::merged_result(kind, &recipe, &store, soup, lambda)?,
                grid,
            )
        }
    };
    let soup_s = t_soup.elapsed().as_secs_f64();

    phase(
        quiet,
        "evaluating every task on its held-out and test splits",
    );
    let t_eval = Instant::now();
    let h = heldout.evaluate_tasks(&result.soup)?;
    let t = test.evaluate_tasks(&result.soup)?;
    let eval_s = t_eval.elapsed().as_secs_f64();
    let scores: Vec<TaskScores> = (0..k)
        .map(|i| TaskScores {
            name: heldout_tasks[i].name.clone(),
            model: zoo[i].source.clone(),
            data: data[i].data.clone(),
            classes: heldout_tasks[i].classification.arch.num_classes(),
            heldout: h[i].into(),
            test: t[i].into(),
        })
        .collect();
    let config = match &how {
        How::Config(path, _) => Some(path.as_path()),
        How::Method(_) => None,
    };
    let written = Written {
        args,
        method: &method,
        config,
        recipe: &recipe,
        store: &store,
        heads: &heldout_tasks,
        result: &result,
        scores: &scores,
        grid: &grid,
        phases: [("load", load_s), ("soup", soup_s), ("evaluate", eval_s)],
        started,
        device: soup_models::device::name(&device),
    };
    written.write(&output.partial)?;
    output.finish()?;
    let mean = |f: fn(&TaskScores) -> f64| scores.iter().map(f).sum::<f64>() / k as f64;
    println!(
        "{method}: base + {k} task models -> mean held-out accuracy {:.4}, mean test accuracy {:.4}, {:.1} s -> {}",
        mean(|s| s.heldout.accuracy),
        mean(|s| s.test.accuracy),
        started.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}

/// What a finished multi-task run writes.
struct Written<'a> {
    args: &'a MixArgs,
    /// The method's name: soup's, or the mergekit configuration's merge_method.
    method: &'a str,
    /// The mergekit configuration the merge follows (`--mergekit-config`), copied into OUT.
    config: Option<&'a Path>,
    recipe: &'a Recipe,
    store: &'a EncoderStore,
    heads: &'a [Task],
    result: &'a SoupResult,
    scores: &'a [TaskScores],
    /// (λ, mean held-out accuracy) of task arithmetic and TIES.
    grid: &'a [(f64, f64)],
    phases: [(&'static str, f64); 3],
    started: Instant,
    device: String,
}

impl Written<'_> {
    fn write(&self, dir: &Path) -> Result<()> {
        let write = |name: &str, text: &str| write_text(dir, name, text);
        let (recipe, result, store) = (self.recipe, self.result, self.store);
        let method = self.method;
        let names: Vec<String> = std::iter::once(store.name(0))
            .chain(self.scores.iter().map(|s| s.model.clone()))
            .collect();
        let config_text = match self.config {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|e| io(path, e))?),
            None => None,
        };
        let mut meta = BTreeMap::from([
            ("soup.method".to_string(), method.to_string()),
            ("soup.models".to_string(), serde_json::to_string(&names)?),
        ]);
        match &config_text {
            Some(text) => meta.insert("soup.mergekit_config".to_string(), text.clone()),
            None => meta.insert("soup.recipe".to_string(), serde_json::to_string(recipe)?),
        };
        write_safetensors(
            &dir.join("encoder.safetensors"),
            &store.encoder,
            &result.soup,
            &meta,
        )?;
        // Every task's head, named task.<k>.<tensor>.
        let mut specs = Vec::new();
        let mut tensors = Vec::new();
        for (i, task) in self.heads.iter().enumerate() {
            let arch = &task.classification.arch;
            for (name, t) in arch.head_tensors().iter().zip(&task.head) {
                specs.push(soup_core::TensorSpec {
                    name: format!("task.{i}.{name}"),
                    shape: t.dims().to_vec(),
                });
                tensors.push(t.clone());
            }
        }
        write_safetensors(
            &dir.join("heads.safetensors"),
            &soup_core::ParamLayout::new(specs),
            &tensors,
            &meta,
        )?;
        let tasks: Vec<serde_json::Value> = self
            .heads
            .iter()
            .zip(self.scores)
            .enumerate()
            .map(|(i, (task, s))| {
                let arch = &task.classification.arch;
                serde_json::json!({
                    "task": i, "name": s.name, "model": s.model, "data": s.data,
                    "architecture": arch.family(), "config": arch.config(),
                    "head_tensors": arch.head_tensors(),
                })
            })
            .collect();
        write("tasks.json", &serde_json::to_string_pretty(&tasks)?)?;
        let k = self.scores.len() as f64;
        let mean = |f: &dyn Fn(&TaskScores) -> f64| self.scores.iter().map(f).sum::<f64>() / k;
        let report = serde_json::json!({
            "method": method,
            "base": names[0],
            "tasks": self.scores,
            "mean_heldout_accuracy": mean(&|s| s.heldout.accuracy),
            "mean_test_accuracy": mean(&|s| s.test.accuracy),
            "lambda_grid": self.grid.iter().map(|(l, a)| serde_json::json!({"lambda": l, "mean_heldout_accuracy": a})).collect::<Vec<_>>(),
            "model_batch": recipe.model_batch,
            "parameters": store.encoder.numel(),
            "blocks": result.blocks.len(),
            "time_s": self.started.elapsed().as_secs_f64(),
            "timings_s": timings(&self.phases, result),
            "peak_rss_bytes": peak_rss_bytes(),
            "device": self.device,
            "memory_account_bytes": memory_json(&result.memory),
            "steps": result.history.len(),
            "evaluations": evaluations_json(result, "mean_accuracy"),
            "data": self.args.data.data,
            "mergekit_config": config_text,
        });
        write("report.json", &serde_json::to_string_pretty(&report)?)?;
        write(
            "report.md",
            &self.markdown(mean(&|s| s.heldout.accuracy), mean(&|s| s.test.accuracy)),
        )?;
        if let Some(text) = &config_text {
            // A data-free merge follows no α and takes no steps: the configuration is its recipe.
            write("mergekit_config.yml", text)?;
            return Ok(());
        }
        write_coefficients(dir, &names, result)?;
        let short = short_names(&names);
        write(
            "coefficients.svg",
            &svg::coefficients(
                &result.alpha,
                &short,
                &format!(
                    "α of {method} ({} blocks × base + {} task models)",
                    result.blocks.len(),
                    self.scores.len()
                ),
            ),
        )?;
        write_curve(
            dir,
            result,
            &format!("{method}: loss per step, mean accuracy after each model batch"),
            match recipe.task_loss {
                Some(TaskLossName::CrossEntropy) => (
                    "held-out cross-entropy, summed over tasks",
                    "mean held-out accuracy",
                ),
                _ => (
                    "entropy on the test inputs, summed over tasks",
                    "mean test accuracy",
                ),
            },
        )?;
        write("recipe.toml", &toml::to_string_pretty(recipe)?)?;
        Ok(())
    }

    /// The per-task table, in the style of FusionBench's: one row per split, one column per
    /// task, the mean last.
    fn markdown(&self, heldout: f64, test: f64) -> String {
        let method = self.method;
        let mut header = vec!["split".to_string()];
        header.extend(self.scores.iter().map(|s| s.name.clone()));
        header.push("mean".into());
        let row = |split: &str, f: &dyn Fn(&TaskScores) -> f64, mean: f64| {
            let mut r = vec![split.to_string()];
            r.extend(self.scores.iter().map(|s| format!("{:.2}", 100.0 * f(s))));
            r.push(format!("{:.2}", 100.0 * mean));
            r
        };
        let rows = vec![
            row("held-out", &|s| s.heldout.accuracy, heldout),
            row("test", &|s| s.test.accuracy, test),
        ];
        let header: Vec<&str> = header.iter().map(String::as_str).collect();
        let mut out = format!(
            "# {method}: base + {} task models\n\n{}Accuracy (%) of the merged encoder with each task's own head.\n\n{}",
            self.scores.len(),
            match self.config {
                Some(path) => format!(
                    "Data-free, as the mergekit configuration `{}` says (copied here as `mergekit_config.yml`).\n\n",
                    path.display()
                ),
                None => String::new(),
            },
            crate::card::table(&header, &rows)
        );
        if !self.grid.is_empty() {
            out.push_str("\nλ chosen on the mean held-out accuracy:\n\n");
            let rows: Vec<Vec<String>> = self
                .grid
                .iter()
                .map(|(l, a)| vec![format!("{l:.1}"), format!("{:.2}", 100.0 * a)])
                .collect();
            out.push_str(&crate::card::table(&["λ", "mean held-out accuracy"], &rows));
        }
        out.push_str(&format!(
            "\nPeak RSS {}; {:.1} s.\n",
            human_bytes(peak_rss_bytes()),
            self.started.elapsed().as_secs_f64()
        ));
        out
    }
}
