//! `cargo xtask reproduce`: the paper's experiments (spec §6) on what is available offline, one
//! file per preset: `fmnist` (the default: a tiny CLIP ViT on Fashion-MNIST, every table and
//! figure) and `dinov2` (the same on fine-tunes of the real DINOv2-S/14), both in `fmnist.rs`;
//! `multitask` (AdaMerging through MEHL and its baselines on DINOv2-S/14 fine-tuned on four
//! tasks, `multitask.rs`); `llm` (soups of SmolLM2-135M fine-tuned on three text domains,
//! `llm.rs`); `scale` (memory and time of Learned+ vs MEHL+ on ViT-B/32-size zoos) and
//! `paper-vit-b32` (the 72 model-soups checkpoints on ImageNet). Every soup runs through the
//! `soup` binary ([`Soup`]), each in its own process so its peak RSS and time are its own.

mod fmnist;
mod llm;
mod multitask;
pub(crate) mod paper;
pub(crate) mod scale;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::{cargo, root};

/// The `soup` binary the presets and benchmarks run.
#[derive(Clone, Debug)]
pub(crate) struct Soup {
    exe: PathBuf,
    /// FNV-1a of the binary's bytes: a run cached by an other build of soup is not reused.
    fingerprint: u64,
}

impl Soup {
    /// The release `soup`, built; with `dev` the dev-profile one as it is when it exists (CI
    /// reuses the binary its tests built: a separate `cargo build` would not match their feature
    /// set and would rebuild candle). `features` are soup-cli's, for the release build.
    pub(crate) fn build(dev: bool, features: &[&str]) -> Result<Self, String> {
        let profile = if dev { "debug" } else { "release" };
        let exe = root().join("target").join(profile).join("soup");
        if !dev {
            let features = features.join(",");
            let mut args = vec!["build", "--release", "-p", "soup-cli"];
            if !features.is_empty() {
                args.extend(["--features", &features]);
            }
            cargo(&args)?;
        } else if !exe.exists() {
            cargo(&["build", "-p", "soup-cli"])?;
        }
        let bytes = std::fs::read(&exe).map_err(|e| format!("{}: {e}", exe.display()))?;
        Ok(Self {
            exe,
            fingerprint: fnv1a(&bytes),
        })
    }

    /// A `soup` binary as it is (`--soup PATH`): a long run continued with the binary that
    /// began it, whatever the source has become since.
    pub(crate) fn at(exe: &Path) -> Result<Self, String> {
        let bytes = std::fs::read(exe).map_err(|e| format!("--soup {}: {e}", exe.display()))?;
        Ok(Self {
            exe: exe.to_path_buf(),
            fingerprint: fnv1a(&bytes),
        })
    }

    /// Identifies this build of soup (see [`Soup::build`]).
    pub(crate) fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    pub(crate) fn exe(&self) -> &Path {
        &self.exe
    }

    /// Runs `soup args -q` and returns its stdout; the error carries its stderr.
    pub(crate) fn run(&self, args: &[String]) -> Result<String, String> {
        let out = Command::new(&self.exe)
            .args(args)
            .arg("-q")
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.exe.display()))?;
        if !out.status.success() {
            return Err(format!(
                "soup {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Writes `text` to `path` through a temporary file beside it and a rename: a reader sees the
/// old file or the whole new one.
pub(crate) fn write_atomically(path: &Path, text: &str) -> Result<(), String> {
    let partial = path.with_file_name(format!(
        ".{}.partial",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("out")
    ));
    std::fs::write(&partial, text).map_err(|e| format!("{}: {e}", partial.display()))?;
    std::fs::rename(&partial, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// 64-bit FNV-1a hash.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Soup {
    /// Runs `soup args` with its stderr on ours (its progress lines and bars: fine-tuning takes
    /// minutes) and returns its stdout.
    pub(crate) fn run_watched(&self, args: &[String]) -> Result<String, String> {
        let out = Command::new(&self.exe)
            .args(args)
            .stderr(std::process::Stdio::inherit())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.exe.display()))?;
        if !out.status.success() {
            return Err(format!(
                "soup {} failed ({}; its message is above)",
                args.join(" "),
                out.status
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Soup {
    /// Runs `soup args` with its stderr copied line by line to ours (plain progress lines: soup
    /// sees a pipe, not a terminal) and returns its stdout; the error ends with soup's last
    /// stderr line, its message, so a caller can tell a refusal from a failure.
    pub(crate) fn run_logged(&self, args: &[String]) -> Result<String, String> {
        use std::io::BufRead as _;
        let mut child = Command::new(&self.exe)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.exe.display()))?;
        let stderr = child.stderr.take().expect("piped");
        let copier = std::thread::spawn(move || {
            let mut last = String::new();
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                eprintln!("{line}");
                if !line.trim().is_empty() {
                    last = line;
                }
            }
            last
        });
        let out = child
            .wait_with_output()
            .map_err(|e| format!("{}: {e}", self.exe.display()))?;
        let last = copier.join().unwrap_or_default();
        if !out.status.success() {
            return Err(format!(
                "soup {} failed ({}): {last}",
                args.join(" "),
                out.status
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn count(flag: &str, v: &str) -> Result<usize, String> {
    v.parse()
        .map_err(|_| format!("{flag} {v:?}: expected a whole number"))
}

pub(crate) fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

pub(crate) fn read_json(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// A zoo manifest of `paths` (absolute).
pub(crate) fn write_subset(path: &Path, paths: &[PathBuf]) -> Result<(), String> {
    let mut text = String::new();
    for p in paths {
        let _ = writeln!(text, "[[model]]\npath = {:?}\n", p.display().to_string());
    }
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

pub(crate) use soup_svg::{line_chart, CHART_SIZE};

/// `soup finetune args` into `zoo` (its `--out`): an interrupted fine-tuning of the same
/// settings continues where it stopped (`--resume`); a zoo of other settings is replaced.
pub(crate) fn finetune_resumable(soup: &Soup, args: &[String], zoo: &Path) -> Result<(), String> {
    let resumed = zoo.join("zoo.toml").exists() && {
        let mut resume = args.to_vec();
        resume.push("--resume".into());
        let resumed = soup
            .run_watched(&resume)
            .map(|out| eprint!("{out}"))
            .is_ok();
        if !resumed {
            eprintln!("xtask: the cached zoo cannot be continued; fine-tuning anew");
        }
        resumed
    };
    if !resumed {
        let mut fresh = args.to_vec();
        fresh.push("--force".into());
        eprint!("{}", soup.run_watched(&fresh)?);
    }
    Ok(())
}

pub fn reproduce(args: &[String]) -> Result<(), String> {
    let mut preset = "fmnist".to_string();
    let mut quick = false;
    let mut dev_build = false;
    let mut soup_exe: Option<PathBuf> = None;
    let mut models: Option<Vec<usize>> = None;
    let (mut imagenet, mut zoo, mut max_examples) = (None, None, None);
    let mut shifts: Vec<(String, PathBuf)> = Vec::new();
    let mut scaling = paper::Scaling::default();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--quick" => quick = true,
            "--dev-build" => dev_build = true,
            "--soup" => soup_exe = Some(PathBuf::from(value()?)),
            "--preset" => preset = value()?.clone(),
            "--models" => {
                let list = value()?;
                let parsed: Result<Vec<usize>, _> = list.split(',').map(str::parse).collect();
                models = Some(parsed.map_err(|_| format!("--models {list:?}: expected N,N,..."))?);
            }
            "--imagenet" => imagenet = Some(PathBuf::from(value()?)),
            shift if paper::SHIFTS.iter().any(|s| shift == format!("--{s}")) => {
                shifts.push((shift[2..].to_string(), PathBuf::from(value()?)));
            }
            "--zoo" => zoo = Some(PathBuf::from(value()?)),
            "--max-examples" => max_examples = Some(count(flag, value()?)?),
            "--model-batch" => scaling.model_batch = Some(count(flag, value()?)?),
            "--inner-epochs" => scaling.inner_epochs = Some(count(flag, value()?)?),
            "--batch-size" => scaling.batch_size = Some(count(flag, value()?)?),
            other => return Err(format!("unknown reproduce flag {other}")),
        }
    }
    let misplaced = |flag: &str, set: bool, owner: &str| -> Result<(), String> {
        if set && preset != owner {
            return Err(format!("{flag} belongs to --preset {owner}"));
        }
        Ok(())
    };
    if quick && !["fmnist", "dinov2", "llm"].contains(&preset.as_str()) {
        return Err("--quick belongs to --preset fmnist, dinov2 and llm".into());
    }
    // `--models` is a list of N for `scale`, the number of models to mix for `paper-vit-b32`.
    if preset == "paper-vit-b32" {
        scaling.models = match models.as_deref() {
            None => None,
            Some(&[k]) => Some(k),
            Some(_) => return Err("--models takes one number for --preset paper-vit-b32".into()),
        };
    } else {
        misplaced("--models", models.is_some(), "scale")?;
    }
    misplaced("--imagenet", imagenet.is_some(), "paper-vit-b32")?;
    if let Some((name, _)) = shifts.first() {
        misplaced(&format!("--{name}"), true, "paper-vit-b32")?;
    }
    misplaced("--zoo", zoo.is_some(), "paper-vit-b32")?;
    misplaced("--max-examples", max_examples.is_some(), "paper-vit-b32")?;
    misplaced(
        "--model-batch",
        scaling.model_batch.is_some(),
        "paper-vit-b32",
    )?;
    misplaced(
        "--inner-epochs",
        scaling.inner_epochs.is_some(),
        "paper-vit-b32",
    )?;
    misplaced(
        "--batch-size",
        scaling.batch_size.is_some(),
        "paper-vit-b32",
    )?;
    const PRESETS: [&str; 6] = [
        "fmnist",
        "dinov2",
        "multitask",
        "llm",
        "scale",
        "paper-vit-b32",
    ];
    if !PRESETS.contains(&preset.as_str()) {
        return Err(format!(
            "unknown preset {preset:?} (available: {})",
            PRESETS.join(", ")
        ));
    }
    let paper_args = if preset == "paper-vit-b32" {
        Some(paper::check_args(
            imagenet.as_deref(),
            zoo.as_deref(),
            max_examples,
            &scaling,
            &shifts,
        )?)
    } else {
        None
    };
    // The language models' matrix products run faster through OpenBLAS (BENCHMARKS.md).
    let features: &[&str] = if preset == "llm" && !dev_build {
        crate::ensure_packages(crate::OPENBLAS_PACKAGES)?;
        &["openblas"]
    } else {
        &[]
    };
    let soup = match &soup_exe {
        Some(exe) => Soup::at(exe)?,
        None => Soup::build(dev_build, features)?,
    };
    match (preset.as_str(), paper_args) {
        ("scale", _) => scale::scale(&soup, models.as_deref().unwrap_or(scale::DEFAULT_MODELS)),
        (_, Some(a)) => paper::paper(&soup, &a),
        ("dinov2", _) => fmnist::dinov2(&soup, quick),
        ("multitask", _) => multitask::multitask(&soup),
        ("llm", _) => llm::llm(&soup, quick),
        _ => fmnist::fmnist(&soup, quick),
    }
}

/// The data-free rows: (record name, label, `merge_method`, every model's parameters and the
/// top-level ones). Settings are the papers' and mergekit's documented ones; with eight task
/// vectors of one base each method normalises (weights 1) where it can, so λ = 1 is the mean.
pub(super) const DATA_FREE: &[(&str, &str, &str, (&str, &str))] = &[
    (
        "mk-task-arithmetic",
        "task arithmetic, data-free (λ = 0.3)",
        "task_arithmetic",
        ("{weight: 1.0}", "{lambda: 0.3}"),
    ),
    (
        "mk-ties",
        "TIES per tensor, data-free (density 0.2)",
        "ties",
        ("{weight: 1.0, density: 0.2}", "{}"),
    ),
    (
        "mk-dare-ties",
        "DARE-TIES, data-free (density 0.5)",
        "dare_ties",
        ("{weight: 1.0, density: 0.5}", "{normalize: true}"),
    ),
    (
        "mk-breadcrumbs-ties",
        "breadcrumbs-TIES, data-free (density 0.9, γ 0.01)",
        "breadcrumbs_ties",
        (
            "{weight: 1.0, density: 0.9, gamma: 0.01}",
            "{normalize: true}",
        ),
    ),
    (
        "mk-della",
        "DELLA, data-free (density 0.5, ε 0.1)",
        "della",
        ("{weight: 1.0, density: 0.5, epsilon: 0.1}", "{}"),
    ),
    (
        "mk-model-stock",
        "Model Stock, data-free",
        "model_stock",
        ("{}", "{}"),
    ),
];

/// mergekit's YAML for `method` over `models` fine-tuned from `base`, with every model's
/// parameters `each` and the top-level ones `top` (YAML flow mappings), in float32.
pub(super) fn mergekit_config(
    method: &str,
    (each, top): (&str, &str),
    base: &Path,
    models: &[&Path],
) -> String {
    let mut config = String::from("models:\n");
    for m in models {
        config.push_str(&format!(
            "  - model: {}\n    parameters: {each}\n",
            m.display()
        ));
    }
    config.push_str(&format!(
        "merge_method: {method}\nbase_model: {}\nparameters: {top}\ndtype: float32\n",
        base.display()
    ));
    config
}
