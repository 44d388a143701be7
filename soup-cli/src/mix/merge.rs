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
use soup_core::{Collective, MergeMethod, ModelStore};
use soup_models::checkpoint::write_safetensors;
use soup_models::data::Split;
use soup_models::train::multitask::{EncoderStore, MultiTask, Task, TaskLoss};
use soup_models::{Architecture, Checkpoint, Classification};

use super::args::MixArgs;
use super::outputs::{evaluations_json, write_text, Scores};
use super::outputs::{memory_json, short_names, timings, write_coefficients, write_curve};
use crate::common::{human_bytes, peak_rss_bytes, phase, DataArgs};
use crate::error::{CliError, Result};
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

/// `soup mix` with a multi-task method, in one process.
pub(super) fn mix(
    args: &MixArgs,
    recipe: Recipe,
    kind: MergeMethod,
    quiet: bool,
    comm: &dyn Collective,
) -> Result<()> {
    if comm.world_size() > 1 {
        return Err(CliError::new(format!(
            "{} runs in one process; over several processes soup mixes uniform, mehl and mehl+",
            recipe.method().name()
        )));
    }
    let inputs = inputs(args);
    let inputs: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
    let mut output = Output::check(&args.out, "mix", OUTPUTS, &inputs, args.force, false)?;
    let result = run(args, recipe, kind, quiet, &mut output);
    if result.is_err() {
        output.abandon();
    }
    result
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
fn run(
    args: &MixArgs,
    recipe: Recipe,
    kind: MergeMethod,
    quiet: bool,
    output: &mut Output,
) -> Result<()> {
    let started = Instant::now();
    let method = recipe.method();
    if args.resume || args.dry_run {
        return Err(CliError::new(format!(
            "{} does not take --resume or --dry-run",
            method.name()
        )));
    }
    let base = args.base.clone().ok_or_else(|| {
        CliError::new(format!(
            "{} merges task models fine-tuned from one base: --base names it (θ_0)",
            method.name()
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
    let (result, grid) = match kind {
        MergeMethod::AdaMerging => {
            recipe.model_batch = Some(recipe.model_batch.unwrap_or(k).min(k));
            let config =
                recipe.adamerging_config(&store.models[0].arch.zero_gradient_tensors(), 0)?;
            // AdaMerging learns on the test inputs, labels unused; cross-entropy on the
            // labelled held-out split.
            let mut train = match recipe.task_loss.unwrap_or(TaskLossName::Entropy) {
                TaskLossName::Entropy => objective(&test_tasks, TaskLoss::Entropy),
                TaskLossName::CrossEntropy => objective(&heldout_tasks, TaskLoss::CrossEntropy),
            };
            let (result, _) = super::task_vectors::adamerging(
                &store,
                &mut train,
                &config,
                (k, method.name(), quiet),
            )?;
            (result, Vec::new())
        }
        MergeMethod::TaskArithmetic | MergeMethod::Ties => {
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
    let written = Written {
        args,
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
        "{}: base + {k} task models -> mean held-out accuracy {:.4}, mean test accuracy {:.4}, {:.1} s -> {}",
        method.name(),
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
        let method = recipe.method().name();
        let names: Vec<String> = std::iter::once(store.name(0))
            .chain(self.scores.iter().map(|s| s.model.clone()))
            .collect();
        let meta = BTreeMap::from([
            ("soup.method".to_string(), method.to_string()),
            ("soup.models".to_string(), serde_json::to_string(&names)?),
            ("soup.recipe".to_string(), serde_json::to_string(recipe)?),
        ]);
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
        write_coefficients(dir, &names, result)?;
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
        });
        write("report.json", &serde_json::to_string_pretty(&report)?)?;
        write(
            "report.md",
            &self.markdown(mean(&|s| s.heldout.accuracy), mean(&|s| s.test.accuracy)),
        )?;
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
        let method = self.recipe.method().name();
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
            "# {method}: base + {} task models\n\nAccuracy (%) of the merged encoder with each task's own head.\n\n{}",
            self.scores.len(),
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
