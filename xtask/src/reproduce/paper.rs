//! Preset `paper-vit-b32` of `cargo xtask reproduce`: the original experiment, for users with the
//! data. The 72 model-soups CLIP ViT-B/32 checkpoints (`manifests/paper-vit-b32.toml`, fetched
//! through soup's URL sources, or `--zoo DIR` with local `model_<i>.pt` files), ImageNet from
//! `--imagenet DIR` (ImageFolder: `train/<class>/`, `val/<class>/`) with the 2 % held-out split
//! of the training images, the authors' hyper-parameters (b = 18, AdamW lr 0.01, 5 inner epochs,
//! one outer pass), and the paper's numbers (spec §6) printed beside ours.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Value};

use super::{read_json, strings, write_subset, Soup};
use crate::root;

/// The shipped manifest of the 72 checkpoints.
pub const MANIFEST: &str = include_str!("../../manifests/paper-vit-b32.toml");
pub const MODELS: usize = 72;

/// Spec §6: method, ImageNet top-1, soup time, memory.
const PAPER: &[(&str, &str, &str, &str)] = &[
    ("best individual", "80.38", "–", "–"),
    ("uniform", "79.97", "–", "–"),
    ("greedy", "81.03", "3501 s", "3 GB"),
    ("learned+", "81.39", "7701 s", "253 GB"),
    ("mehl+", "81.62", "808 s", "19 GB"),
];

/// ImageNet's distribution shifts as model-soups' table orders them: the flag that names each
/// one's folder is `--<name> DIR`, and soup reads it as `<name>:DIR`.
pub const SHIFTS: [&str; 5] = [
    "imagenet-v2",
    "imagenet-r",
    "imagenet-sketch",
    "objectnet",
    "imagenet-a",
];

/// The authors' settings (spec §3.5): model batch, inner epochs, data batch.
pub const AUTHORS_B: usize = 18;
pub const AUTHORS_INNER_EPOCHS: usize = 5;
pub const AUTHORS_BATCH: usize = 128;

/// The checked arguments of the preset.
#[derive(Debug)]
pub struct PaperArgs {
    pub imagenet: PathBuf,
    /// The zoo manifest to mix: the shipped URLs, or local files (the first `--models` of them).
    pub zoo: Vec<String>,
    /// Whether `zoo` holds local files (`--zoo DIR`).
    pub local_zoo: Option<PathBuf>,
    pub max_examples: Option<usize>,
    /// The authors' settings, or smaller ones for a stand-in run.
    pub model_batch: usize,
    pub inner_epochs: usize,
    pub batch_size: usize,
    /// The distribution shifts given (`--imagenet-v2 DIR`, …), in [`SHIFTS`]' order.
    pub shifts: Vec<(String, PathBuf)>,
}

/// What the preset's flags may scale: the number of models and the authors' settings.
#[derive(Debug, Default)]
pub struct Scaling {
    pub models: Option<usize>,
    pub model_batch: Option<usize>,
    pub inner_epochs: Option<usize>,
    pub batch_size: Option<usize>,
}

/// The URLs of the shipped manifest, in order.
pub fn manifest_urls() -> Vec<String> {
    MANIFEST
        .lines()
        .filter_map(|l| l.strip_prefix("path = "))
        .map(|v| v.trim_matches('"').to_string())
        .collect()
}

/// Checks `--imagenet`, `--zoo` and the scaling flags before any work; the error says what is
/// missing and how to provide it.
pub fn check_args(
    imagenet: Option<&Path>,
    zoo: Option<&Path>,
    max_examples: Option<usize>,
    scaling: &Scaling,
    shifts: &[(String, PathBuf)],
) -> Result<PaperArgs, String> {
    let imagenet = imagenet.ok_or(
        "preset paper-vit-b32 needs --imagenet DIR (an ImageFolder with train/<class>/ and val/<class>/)",
    )?;
    for split in ["train", "val"] {
        let d = imagenet.join(split);
        if !d.is_dir() {
            return Err(format!(
                "--imagenet {}: no {split}/ directory (expected train/<class>/ and val/<class>/)",
                imagenet.display()
            ));
        }
    }
    if let Some((name, dir)) = shifts.iter().find(|(_, d)| !d.is_dir()) {
        return Err(format!("--{name} {}: no such directory", dir.display()));
    }
    let mut shifts = shifts.to_vec();
    shifts.sort_by_key(|(name, _)| SHIFTS.iter().position(|s| s == name));
    let models = scaling.models.unwrap_or(MODELS);
    if !(1..=MODELS).contains(&models) {
        return Err(format!("--models {models}: expected 1 to {MODELS}"));
    }
    let model_batch = scaling.model_batch.unwrap_or(AUTHORS_B);
    if model_batch == 0 {
        return Err("--model-batch must be at least 1".into());
    }
    for (flag, v) in [
        ("--inner-epochs", scaling.inner_epochs),
        ("--batch-size", scaling.batch_size),
        ("--max-examples", max_examples),
    ] {
        if v == Some(0) {
            return Err(format!("{flag} must be at least 1"));
        }
    }
    let zoo_files = match zoo {
        None => manifest_urls(),
        Some(dir) => {
            let files: Vec<PathBuf> = (0..models)
                .map(|i| dir.join(format!("model_{i}.pt")))
                .collect();
            if let Some(missing) = files.iter().find(|f| !f.is_file()) {
                return Err(format!(
                    "--zoo {}: {} is missing (expected model_0.pt … model_{}.pt; \
                     `cargo xtask standin zoo --out DIR` writes stand-ins)",
                    dir.display(),
                    missing.display(),
                    models - 1
                ));
            }
            files.iter().map(|f| f.display().to_string()).collect()
        }
    };
    Ok(PaperArgs {
        imagenet: imagenet.to_path_buf(),
        zoo: zoo_files.into_iter().take(models).collect(),
        local_zoo: zoo.map(Path::to_path_buf),
        max_examples,
        model_batch,
        inner_epochs: scaling.inner_epochs.unwrap_or(AUTHORS_INNER_EPOCHS),
        batch_size: scaling.batch_size.unwrap_or(AUTHORS_BATCH),
        shifts,
    })
}

fn data_args(a: &PaperArgs) -> Vec<String> {
    let mut v = strings(&["--data"]);
    v.push(a.imagenet.display().to_string());
    v.extend(strings(&["--heldout-fraction", "0.02"]));
    if let Some(m) = a.max_examples {
        v.push("--max-examples".into());
        v.push(m.to_string());
    }
    v
}

/// `--test` with every shift given, as soup names them (`imagenet-r:DIR`); nothing without.
fn test_args(a: &PaperArgs) -> Vec<String> {
    if a.shifts.is_empty() {
        return Vec::new();
    }
    let list: Vec<String> = a
        .shifts
        .iter()
        .map(|(name, dir)| format!("{name}:{}", dir.display()))
        .collect();
    vec!["--test".into(), list.join(",")]
}

/// Each shift's accuracy from a report's `tests` (soup names them by layout), and their mean.
fn shift_scores(report: &Value) -> Value {
    let tests = report["tests"].as_array().cloned().unwrap_or_default();
    let by_name: serde_json::Map<String, Value> = tests
        .iter()
        .filter_map(|t| Some((t["name"].as_str()?.to_string(), t["accuracy"].clone())))
        .collect();
    json!({"shifts": by_name, "shifts_mean": report["tests_mean_accuracy"]})
}

/// The command line that reproduces this run.
fn command(a: &PaperArgs) -> String {
    let mut c = format!(
        "cargo xtask reproduce --preset paper-vit-b32 --imagenet {}",
        a.imagenet.display()
    );
    if let Some(z) = &a.local_zoo {
        let _ = write!(c, " --zoo {}", z.display());
    }
    if a.zoo.len() != MODELS {
        let _ = write!(c, " --models {}", a.zoo.len());
    }
    for (name, dir) in &a.shifts {
        let _ = write!(c, " --{name} {}", dir.display());
    }
    for (flag, v, authors) in [
        ("--model-batch", a.model_batch, AUTHORS_B),
        ("--inner-epochs", a.inner_epochs, AUTHORS_INNER_EPOCHS),
        ("--batch-size", a.batch_size, AUTHORS_BATCH),
    ] {
        if v != authors {
            let _ = write!(c, " {flag} {v}");
        }
    }
    if let Some(m) = a.max_examples {
        let _ = write!(c, " --max-examples {m}");
    }
    c
}

/// The memory this machine has available now (`MemAvailable`), the limit Learned-Soup+ is held
/// to: a run that cannot fit is refused before it starts, not killed hours in.
pub(crate) fn mem_available() -> Result<u64, String> {
    let info =
        std::fs::read_to_string("/proc/meminfo").map_err(|e| format!("/proc/meminfo: {e}"))?;
    info.lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| "/proc/meminfo: no MemAvailable".to_string())
}

pub fn paper(soup: &Soup, a: &PaperArgs) -> Result<(), String> {
    let started = Instant::now();
    let results = root().join("results/paper-vit-b32");
    let runs = results.join("runs");
    std::fs::create_dir_all(&runs).map_err(|e| format!("{}: {e}", runs.display()))?;
    let manifest = runs.join("zoo.toml");
    let paths: Vec<PathBuf> = a.zoo.iter().map(PathBuf::from).collect();
    write_subset(&manifest, &paths)?;
    let n = a.zoo.len();
    let elapsed = || format!("{:.1} min", started.elapsed().as_secs_f64() / 60.0);

    // Best individual model: every model on the held-out split, the best on the test split.
    let eval = |model: &str, split: &str| -> Result<f64, String> {
        let mut args = strings(&["eval", "--model", model]);
        args.extend(data_args(a));
        args.extend(strings(&["--split", split, "--json"]));
        let v: Value = serde_json::from_str(&soup.run(&args)?).map_err(|e| e.to_string())?;
        Ok(v["accuracy"].as_f64().unwrap_or(f64::NAN))
    };
    let mut best = (f64::MIN, String::new());
    for (i, m) in a.zoo.iter().enumerate() {
        let acc = eval(m, "heldout")?;
        eprintln!(
            "xtask: paper-vit-b32: model {}/{n} on the held-out split: {:.2} % ({})",
            i + 1,
            100.0 * acc,
            elapsed()
        );
        if acc > best.0 {
            best = (acc, m.clone());
        }
    }
    // The best model on the test split, and on every shift given.
    let mut args = strings(&["eval", "--model", &best.1]);
    args.extend(data_args(a));
    args.extend(strings(&["--split", "test", "--json"]));
    args.extend(test_args(a));
    let report: Value = serde_json::from_str(&soup.run(&args)?).map_err(|e| e.to_string())?;
    let mut best_row = json!({"heldout": best.0, "test": report["accuracy"], "model": best.1});
    if !a.shifts.is_empty() {
        let s = shift_scores(&report);
        best_row["shifts"] = s["shifts"].clone();
        best_row["shifts_mean"] = s["shifts_mean"].clone();
    }
    let mut rows = vec![("best individual".to_string(), best_row)];
    for method in ["uniform", "greedy", "learned+", "mehl+"] {
        eprintln!("xtask: paper-vit-b32: {method} ({})", elapsed());
        let out = runs.join(method);
        let mut args = strings(&["mix", "--method", method, "--zoo"]);
        args.push(manifest.display().to_string());
        args.extend(data_args(a));
        args.extend(test_args(a));
        args.extend(strings(&["--lr", "0.01", "--outer-passes", "1", "--force"]));
        for (flag, v) in [
            ("--model-batch", a.model_batch),
            ("--inner-epochs", a.inner_epochs),
            ("--batch-size", a.batch_size),
        ] {
            args.push(flag.into());
            args.push(v.to_string());
        }
        if method == "learned+" {
            args.push("--max-memory".into());
            args.push(mem_available()?.to_string());
        }
        args.push("--out".into());
        args.push(out.display().to_string());
        match soup.run_logged(&args) {
            Ok(_) => {}
            Err(e) if method == "learned+" && e.contains("over --max-memory") => {
                let why = e.rsplit("soup: ").next().unwrap_or(&e).trim().to_string();
                eprintln!("xtask: paper-vit-b32: learned+ refused: {why}");
                rows.push((method.to_string(), json!({ "refused": why })));
                continue;
            }
            Err(e) => return Err(e),
        }
        let r = read_json(&out.join("report.json"))?;
        let mut row = json!({"heldout": r["heldout"]["accuracy"], "test": r["test"]["accuracy"],
               "time_s": r["timings_s"]["soup"], "peak_rss_bytes": r["peak_rss_bytes"]});
        if !a.shifts.is_empty() {
            let s = shift_scores(&r);
            row["shifts"] = s["shifts"].clone();
            row["shifts_mean"] = s["shifts_mean"].clone();
        }
        rows.push((method.to_string(), row));
    }
    write_results(&results, a, &rows, started)
}
fn write_results(
    results: &Path,
    a: &PaperArgs,
    rows: &[(String, Value)],
    started: Instant,
) -> Result<(), String> {
    let n = a.zoo.len();
    let mut md = String::from("# Reproduction: preset `paper-vit-b32`\n\n");
    let _ = writeln!(
        md,
        "{n} models, ImageFolder `{}` (held-out: 2 % of train/, test: val/{}), MEHL-Soup+ with \
         b = {}, {} inner epochs, data batch {}, AdamW lr 0.01, one outer pass (the authors': \
         72 models, b = {AUTHORS_B}, {AUTHORS_INNER_EPOCHS} epochs, batch {AUTHORS_BATCH}).\n",
        a.imagenet.display(),
        a.max_examples
            .map_or(String::new(), |m| format!("; at most {m} images per split")),
        a.model_batch,
        a.inner_epochs,
        a.batch_size,
    );
    md.push_str(
        "| method | ImageNet top-1 (ours) | paper | soup time (ours) | paper | peak RSS (ours) | paper |\n|---|---|---|---|---|---|---|\n",
    );
    for ((name, v), (_, acc, time, mem)) in rows.iter().zip(PAPER) {
        if let Some(why) = v["refused"].as_str() {
            let _ = writeln!(
                md,
                "| {name} | refused: {why} | {acc} | – | {time} | – | {mem} |"
            );
            continue;
        }
        let _ = writeln!(
            md,
            "| {name} | {:.2} | {acc} | {} | {time} | {} | {mem} |",
            100.0 * v["test"].as_f64().unwrap_or(f64::NAN),
            v["time_s"]
                .as_f64()
                .map_or("–".into(), |t| format!("{t:.1} s")),
            v["peak_rss_bytes"]
                .as_f64()
                .map_or("–".into(), |b| if b < 1e9 {
                    format!("{:.0} MB", b / 1e6)
                } else {
                    format!("{:.1} GB", b / 1e9)
                }),
        );
    }
    if !a.shifts.is_empty() {
        md.push_str(&shift_table(a, rows));
    }
    let _ = writeln!(
        md,
        "\nTotal time {:.1} min. Command: `{}`.",
        started.elapsed().as_secs_f64() / 60.0,
        command(a)
    );
    let all = json!({
        "preset": "paper-vit-b32",
        "command": command(a),
        "models": n,
        "model_batch": a.model_batch,
        "inner_epochs": a.inner_epochs,
        "batch_size": a.batch_size,
        "rows": rows.iter().map(|(n, v)| json!({"method": n, "result": v})).collect::<Vec<_>>(),
    });
    for (name, text) in [
        ("results.md", md.clone()),
        (
            "results.json",
            serde_json::to_string_pretty(&all).map_err(|e| e.to_string())?,
        ),
    ] {
        let path = results.join(name);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    println!("{md}");
    Ok(())
}

/// model-soups' table: top-1 on ImageNet, on each shift given, and their mean ("avg shifts").
fn shift_table(a: &PaperArgs, rows: &[(String, Value)]) -> String {
    let pct = |v: &Value| {
        v.as_f64()
            .map_or("–".into(), |x| format!("{:.2}", 100.0 * x))
    };
    let mut md = String::from("\nUnder distribution shift (top-1 %; the shifts as soup names them, read with model-soups' conventions):\n\n| method | ImageNet |");
    for (name, _) in &a.shifts {
        let _ = write!(md, " {name} |");
    }
    md.push_str(" avg shifts |\n|---|---|");
    md.push_str(&"---|".repeat(a.shifts.len() + 1));
    md.push('\n');
    for (name, v) in rows {
        if v["refused"].is_string() {
            continue;
        }
        let _ = write!(md, "| {name} | {} |", pct(&v["test"]));
        for (shift, _) in &a.shifts {
            let _ = write!(md, " {} |", pct(&v["shifts"][shift]));
        }
        let _ = writeln!(md, " {} |", pct(&v["shifts_mean"]));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manifest_lists_the_72_model_soups_checkpoints_in_order() {
        let urls = manifest_urls();
        assert_eq!(urls.len(), MODELS);
        for (i, u) in urls.iter().enumerate() {
            assert_eq!(
                u,
                &format!(
                    "https://github.com/mlfoundations/model-soups/releases/download/v0.0.2/model_{i}.pt"
                )
            );
        }
    }

    #[test]
    fn arguments_are_checked_before_any_work() {
        let e = check_args(None, None, None, &Scaling::default(), &[]).unwrap_err();
        assert!(e.contains("--imagenet"), "{e}");
        let dir = std::env::temp_dir().join(format!("xtask-paper-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("train")).unwrap();
        let e = check_args(Some(&dir), None, None, &Scaling::default(), &[]).unwrap_err();
        assert!(e.contains("no val/"), "{e}");
        std::fs::create_dir_all(dir.join("val")).unwrap();
        let ok = check_args(Some(&dir), None, Some(100), &Scaling::default(), &[]).unwrap();
        assert_eq!(ok.zoo.len(), MODELS);
        let zoo = dir.join("zoo");
        std::fs::create_dir_all(&zoo).unwrap();
        for i in 0..MODELS - 1 {
            std::fs::write(zoo.join(format!("model_{i}.pt")), b"").unwrap();
        }
        let e = check_args(Some(&dir), Some(&zoo), None, &Scaling::default(), &[]).unwrap_err();
        assert!(e.contains("model_71.pt is missing"), "{e}");
        std::fs::write(zoo.join("model_71.pt"), b"").unwrap();
        let ok = check_args(Some(&dir), Some(&zoo), None, &Scaling::default(), &[]).unwrap();
        assert!(ok.zoo[3].ends_with("model_3.pt"));
        assert_eq!(
            (ok.model_batch, ok.inner_epochs, ok.batch_size),
            (18, 5, 128)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_stand_in_run_scales_the_zoo_and_the_settings() {
        let dir = std::env::temp_dir().join(format!("xtask-paper-s-{}", std::process::id()));
        let zoo = dir.join("zoo");
        for d in ["train", "val", "zoo"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        for i in 0..3 {
            std::fs::write(zoo.join(format!("model_{i}.pt")), b"").unwrap();
        }
        let scaling = |models| Scaling {
            models: Some(models),
            model_batch: Some(2),
            inner_epochs: Some(1),
            batch_size: Some(16),
        };
        let e = check_args(Some(&dir), Some(&zoo), None, &scaling(4), &[]).unwrap_err();
        assert!(e.contains("model_3.pt is missing"), "{e}");
        let a = check_args(Some(&dir), Some(&zoo), Some(50), &scaling(3), &[]).unwrap();
        assert_eq!(a.zoo.len(), 3);
        assert_eq!((a.model_batch, a.inner_epochs, a.batch_size), (2, 1, 16));
        let c = command(&a);
        for part in [
            "--models 3",
            "--model-batch 2",
            "--inner-epochs 1",
            "--batch-size 16",
            "--max-examples 50",
            "--zoo ",
        ] {
            assert!(c.contains(part), "{c}");
        }
        let e = check_args(Some(&dir), Some(&zoo), None, &scaling(73), &[]).unwrap_err();
        assert!(e.contains("1 to 72"), "{e}");
        let zero = Scaling {
            model_batch: Some(0),
            ..Scaling::default()
        };
        assert!(check_args(Some(&dir), None, None, &zero, &[]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
