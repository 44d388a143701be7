//! Preset `scale` of `cargo xtask reproduce`: the paper's memory and time claims (spec §6) on
//! ViT-B/32-size classifiers (88 M parameters, 352 MB each in f32).
//!
//! The zoo is one random start point of `clip-vit-b32` (10 classes) plus Gaussian noise per model
//! (`soup-models/examples/perturbed_zoo.rs`): accuracy is irrelevant here, only the sizes are.
//! For each N, Learned-Soup+ and MEHL-Soup+ (b = 4) run through the release `soup` binary, each in
//! its own process, on the same held-out examples and mini-batches (same seed); the table gives
//! each run's peak RSS (VmHWM), the seconds per coefficient step (the `steps` phase over the number
//! of steps) and the ratios. Learned-Soup+ runs with `--max-memory` set to the memory available,
//! so a run that would not fit is refused before it starts and reported as such.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Value};

use super::paper::mem_available;
use super::{line_chart, read_json, strings, write_subset, Soup};
use crate::{ensure_packages, root, DATA_PACKAGES};

const SIGMA: f64 = 0.01;
const SEED: u64 = 1;
/// Held-out and test examples (Fashion-MNIST, resized to 224 px RGB): 4 mini-batches of 8.
const EXAMPLES: usize = 32;
const BATCH: usize = 8;
/// MEHL-Soup+'s model batch.
const B: usize = 4;
pub const DEFAULT_MODELS: &[usize] = &[4, 8, 16, 24];

/// Points (N, value) of Learned-Soup+ and of MEHL-Soup+.
type Series = (Vec<(f64, f64)>, Vec<(f64, f64)>);

/// One measured run, or why it did not run.
enum Outcome {
    Ran {
        peak_rss: f64,
        step_s: f64,
        steps: f64,
        soup_s: f64,
        load_s: f64,
        account: f64,
    },
    Refused(String),
}

fn run(
    soup: &Soup,
    manifest: &Path,
    out: &Path,
    method: &str,
    limit: u64,
) -> Result<Outcome, String> {
    let mut args = strings(&["mix", "--method", method, "--zoo"]);
    args.push(manifest.display().to_string());
    args.extend(strings(&["--data", "fashion-mnist", "--max-examples"]));
    args.push(EXAMPLES.to_string());
    args.extend(strings(&["--batch-size"]));
    args.push(BATCH.to_string());
    args.extend(strings(&["--inner-epochs", "1", "--model-batch"]));
    args.push(B.to_string());
    args.extend(strings(&["--seed", "1", "--force", "--max-memory"]));
    args.push(limit.to_string());
    args.push("--out".into());
    args.push(out.display().to_string());
    match soup.run(&args) {
        Ok(_) => {}
        Err(e) if e.contains("over --max-memory") => {
            let why = e.rsplit("soup: ").next().unwrap_or(&e).trim().to_string();
            return Ok(Outcome::Refused(why));
        }
        Err(e) => return Err(e),
    }
    let r = read_json(&out.join("report.json"))?;
    let t = |k: &str| r["timings_s"][k].as_f64().unwrap_or(f64::NAN);
    let steps = r["steps"].as_f64().unwrap_or(f64::NAN);
    Ok(Outcome::Ran {
        peak_rss: r["peak_rss_bytes"].as_f64().unwrap_or(f64::NAN),
        step_s: t("soup.steps") / steps,
        steps,
        soup_s: t("soup"),
        load_s: t("soup.load"),
        account: r["memory_account_bytes"]["total"]
            .as_f64()
            .unwrap_or(f64::NAN),
    })
}

/// Makes (or reuses) the perturbed zoo of `n` models; returns the model directories.
fn zoo(exe: &Path, n: usize) -> Result<Vec<PathBuf>, String> {
    let cache = root().join("results/cache/scale");
    let dir = cache.join("zoo");
    let key = format!("version 1\narch clip-vit-b32\nclasses 10\nsigma {SIGMA}\nseed {SEED}\n");
    let key_file = cache.join("key.txt");
    if std::fs::read_to_string(&key_file).ok().as_deref() != Some(key.as_str()) {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&cache).map_err(|e| format!("{}: {e}", cache.display()))?;
        std::fs::write(&key_file, &key).map_err(|e| format!("{}: {e}", key_file.display()))?;
    }
    let status = std::process::Command::new(exe)
        .args(["--arch", "clip-vit-b32", "--classes", "10", "--count"])
        .arg(n.to_string())
        .args([
            "--sigma",
            &SIGMA.to_string(),
            "--seed",
            &SEED.to_string(),
            "--out",
        ])
        .arg(&dir)
        .status()
        .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
    if !status.success() {
        return Err(format!("{} failed", exe.display()));
    }
    Ok((0..n).map(|i| dir.join(format!("model-{i:02}"))).collect())
}

pub fn scale(soup: &Soup, models: &[usize]) -> Result<(), String> {
    let started = Instant::now();
    let max_n = *models.iter().max().ok_or("--models needs at least one N")?;
    if models.contains(&0) {
        return Err("--models: N must be at least 1".into());
    }
    ensure_packages(DATA_PACKAGES)?;
    let exe = crate::release_example("perturbed_zoo")?;
    eprintln!("xtask: scale: a perturbed zoo of {max_n} ViT-B/32 classifiers");
    let paths = zoo(&exe, max_n)?;
    let results = root().join("results/scale");
    let runs = results.join("runs");
    std::fs::create_dir_all(&runs).map_err(|e| format!("{}: {e}", runs.display()))?;
    let mut rows = Vec::new();
    for &n in models {
        let manifest = runs.join(format!("zoo-{n}.toml"));
        write_subset(&manifest, &paths[..n])?;
        let mut pair = Vec::new();
        for method in ["learned+", "mehl+"] {
            let limit = mem_available()?;
            eprintln!("xtask: scale: {method}, N = {n}");
            let out = runs.join(format!("{method}-{n}"));
            pair.push(run(soup, &manifest, &out, method, limit)?);
        }
        let mehl = pair.pop().expect("two runs");
        let learned = pair.pop().expect("two runs");
        rows.push((n, learned, mehl));
    }
    write_results(&results, &rows, started)
}

fn write_results(
    results: &Path,
    rows: &[(usize, Outcome, Outcome)],
    started: Instant,
) -> Result<(), String> {
    let gb = |b: f64| format!("{:.2}", b / 1e9);
    let mut md = String::new();
    let _ = writeln!(md, "# Reproduction: preset `scale`\n");
    let _ = writeln!(
        md,
        "ViT-B/32-size CLIP classifiers (88 M parameters, 10 classes), a random start point plus \
         N(0, {SIGMA}²) noise per model. Learned-Soup+ vs MEHL-Soup+ (b = {B}), {EXAMPLES} held-out \
         Fashion-MNIST images at 224 px in mini-batches of {BATCH}, one epoch, seed 1. Peak RSS \
         is each process's VmHWM; s/step is the `steps` phase over the number of coefficient steps. \
         Command: `cargo xtask reproduce --preset scale`.\n"
    );
    let _ = writeln!(
        md,
        "| N | Learned+ peak RSS (GB) | MEHL+ peak RSS (GB) | memory ratio | Learned+ s/step | MEHL+ s/step | time ratio | Learned+ soup s | MEHL+ soup s |\n|---|---|---|---|---|---|---|---|---|"
    );
    let mut json_rows = Vec::new();
    let mut mem: Series = (Vec::new(), Vec::new());
    let mut time: Series = (Vec::new(), Vec::new());
    for (n, learned, mehl) in rows {
        let x = *n as f64;
        let cell = |o: &Outcome| -> Value {
            match o {
                Outcome::Ran {
                    peak_rss,
                    step_s,
                    steps,
                    soup_s,
                    load_s,
                    account,
                } => json!({"peak_rss_bytes": peak_rss, "step_s": step_s, "steps": steps,
                            "soup_s": soup_s, "load_s": load_s, "account_bytes": account}),
                Outcome::Refused(why) => json!({"refused": why}),
            }
        };
        json_rows.push(json!({"n": n, "learned+": cell(learned), "mehl+": cell(mehl)}));
        let (
            Outcome::Ran {
                peak_rss: m1,
                step_s: s1,
                soup_s: t1,
                ..
            },
            Outcome::Ran {
                peak_rss: m2,
                step_s: s2,
                soup_s: t2,
                ..
            },
        ) = (learned, mehl)
        else {
            let why = match (learned, mehl) {
                (Outcome::Refused(w), _) => format!("Learned+ not run: {w}"),
                (_, Outcome::Refused(w)) => format!("MEHL+ not run: {w}"),
                _ => String::new(),
            };
            if let Outcome::Ran {
                peak_rss, step_s, ..
            } = mehl
            {
                mem.1.push((x, peak_rss / 1e9));
                time.1.push((x, *step_s));
                let _ = writeln!(
                    md,
                    "| {n} | – | {} | – | – | {step_s:.2} | – | – | – |",
                    gb(*peak_rss)
                );
            }
            let _ = writeln!(md, "\n{why}\n");
            continue;
        };
        mem.0.push((x, m1 / 1e9));
        mem.1.push((x, m2 / 1e9));
        time.0.push((x, *s1));
        time.1.push((x, *s2));
        let _ = writeln!(
            md,
            "| {n} | {} | {} | {:.1}× | {s1:.2} | {s2:.2} | {:.2}× | {t1:.0} | {t2:.0} |",
            gb(*m1),
            gb(*m2),
            m1 / m2,
            s1 / s2
        );
    }
    let _ = writeln!(
        md,
        "\nFigures: `fig-memory.svg` (peak RSS against N), `fig-time.svg` (seconds per step against N).\n\nTotal time {:.1} min.",
        started.elapsed().as_secs_f64() / 60.0
    );
    let series = |pair: &Series| {
        vec![
            ("Learned-Soup+".to_string(), pair.0.clone()),
            (format!("MEHL-Soup+ (b = {B})"), pair.1.clone()),
        ]
    };
    let write = |name: &str, text: &str| -> Result<(), String> {
        let path = results.join(name);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))
    };
    write(
        "fig-memory.svg",
        &line_chart("Peak RSS vs number of models", "N", "GB", &series(&mem)),
    )?;
    write(
        "fig-time.svg",
        &line_chart(
            "Seconds per coefficient step vs N",
            "N",
            "s/step",
            &series(&time),
        ),
    )?;
    write("results.md", &md)?;
    let all = json!({"preset": "scale", "b": B, "examples": EXAMPLES, "batch_size": BATCH,
                     "sigma": SIGMA, "rows": json_rows,
                     "time_s": started.elapsed().as_secs_f64()});
    write(
        "results.json",
        &serde_json::to_string_pretty(&all).map_err(|e| e.to_string())?,
    )?;
    println!("{md}");
    eprintln!("xtask: results in {}", results.display());
    Ok(())
}
