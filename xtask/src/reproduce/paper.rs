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

/// The checked arguments of the preset.
#[derive(Debug)]
pub struct PaperArgs {
    pub imagenet: PathBuf,
    /// The zoo manifest to mix: the shipped URLs, or local files.
    pub zoo: Vec<String>,
    pub max_examples: Option<usize>,
}

/// The URLs of the shipped manifest, in order.
pub fn manifest_urls() -> Vec<String> {
    MANIFEST
        .lines()
        .filter_map(|l| l.strip_prefix("path = "))
        .map(|v| v.trim_matches('"').to_string())
        .collect()
}

/// Checks `--imagenet` and `--zoo` before any work; the error says what is missing and how to
/// provide it.
pub fn check_args(
    imagenet: Option<&Path>,
    zoo: Option<&Path>,
    max_examples: Option<usize>,
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
    let zoo = match zoo {
        None => manifest_urls(),
        Some(dir) => {
            let files: Vec<PathBuf> = (0..MODELS)
                .map(|i| dir.join(format!("model_{i}.pt")))
                .collect();
            if let Some(missing) = files.iter().find(|f| !f.is_file()) {
                return Err(format!(
                    "--zoo {}: {} is missing (expected model_0.pt … model_{}.pt)",
                    dir.display(),
                    missing.display(),
                    MODELS - 1
                ));
            }
            files.iter().map(|f| f.display().to_string()).collect()
        }
    };
    Ok(PaperArgs {
        imagenet: imagenet.to_path_buf(),
        zoo,
        max_examples,
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

pub fn paper(soup: &Soup, a: &PaperArgs) -> Result<(), String> {
    let started = Instant::now();
    let results = root().join("results/paper-vit-b32");
    let runs = results.join("runs");
    std::fs::create_dir_all(&runs).map_err(|e| format!("{}: {e}", runs.display()))?;
    let manifest = runs.join("zoo.toml");
    let paths: Vec<PathBuf> = a.zoo.iter().map(PathBuf::from).collect();
    write_subset(&manifest, &paths)?;

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
        eprintln!("xtask: paper-vit-b32: model {i} on the held-out split");
        let acc = eval(m, "heldout")?;
        if acc > best.0 {
            best = (acc, m.clone());
        }
    }
    let mut rows = vec![(
        "best individual".to_string(),
        json!({"heldout": best.0, "test": eval(&best.1, "test")?, "model": best.1}),
    )];
    for method in ["uniform", "greedy", "learned+", "mehl+"] {
        eprintln!("xtask: paper-vit-b32: {method}");
        let out = runs.join(method);
        let mut args = strings(&["mix", "--method", method, "--zoo"]);
        args.push(manifest.display().to_string());
        args.extend(data_args(a));
        args.extend(strings(&[
            "--model-batch",
            "18",
            "--lr",
            "0.01",
            "--inner-epochs",
            "5",
            "--outer-passes",
            "1",
            "--force",
            "--out",
        ]));
        args.push(out.display().to_string());
        soup.run(&args)?;
        let r = read_json(&out.join("report.json"))?;
        rows.push((
            method.to_string(),
            json!({"heldout": r["heldout"]["accuracy"], "test": r["test"]["accuracy"],
                   "time_s": r["timings_s"]["soup"], "peak_rss_bytes": r["peak_rss_bytes"]}),
        ));
    }
    let mut md = String::from(
        "# Reproduction: preset `paper-vit-b32`\n\n| method | ImageNet top-1 (ours) | paper | soup time (ours) | paper | peak RSS (ours) | paper |\n|---|---|---|---|---|---|---|\n",
    );
    for ((name, v), (_, acc, time, mem)) in rows.iter().zip(PAPER) {
        let _ = writeln!(
            md,
            "| {name} | {:.2} | {acc} | {} | {time} | {} | {mem} |",
            100.0 * v["test"].as_f64().unwrap_or(f64::NAN),
            v["time_s"]
                .as_f64()
                .map_or("–".into(), |t| format!("{t:.0} s")),
            v["peak_rss_bytes"]
                .as_f64()
                .map_or("–".into(), |b| format!("{:.1} GB", b / 1e9)),
        );
    }
    let _ = writeln!(
        md,
        "\nTotal time {:.1} min. Command: `cargo xtask reproduce --preset paper-vit-b32 --imagenet {}`.",
        started.elapsed().as_secs_f64() / 60.0,
        a.imagenet.display()
    );
    let all = json!({"preset": "paper-vit-b32", "rows": rows.iter().map(|(n, v)| json!({"method": n, "result": v})).collect::<Vec<_>>()});
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
        let e = check_args(None, None, None).unwrap_err();
        assert!(e.contains("--imagenet"), "{e}");
        let dir = std::env::temp_dir().join(format!("xtask-paper-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("train")).unwrap();
        let e = check_args(Some(&dir), None, None).unwrap_err();
        assert!(e.contains("no val/"), "{e}");
        std::fs::create_dir_all(dir.join("val")).unwrap();
        let ok = check_args(Some(&dir), None, Some(100)).unwrap();
        assert_eq!(ok.zoo.len(), MODELS);
        let zoo = dir.join("zoo");
        std::fs::create_dir_all(&zoo).unwrap();
        for i in 0..MODELS - 1 {
            std::fs::write(zoo.join(format!("model_{i}.pt")), b"").unwrap();
        }
        let e = check_args(Some(&dir), Some(&zoo), None).unwrap_err();
        assert!(e.contains("model_71.pt is missing"), "{e}");
        std::fs::write(zoo.join("model_71.pt"), b"").unwrap();
        let ok = check_args(Some(&dir), Some(&zoo), None).unwrap();
        assert!(ok.zoo[3].ends_with("model_3.pt"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
