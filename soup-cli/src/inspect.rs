//! `soup eval` and `soup inspect`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use soup_core::Objective;
use soup_models::checkpoint::atomic_write;
use soup_models::data::{shifted, Shift, Split};
use soup_models::train::language::{NextTokenSums, EVAL_BATCH};
use soup_models::{
    Architecture, Checkpoint, Classification, Dataset, InputSpec, ModelError, ModelSource,
    TokenSpec,
};

use crate::common::{human_bytes, ArchOverride, DataArgs};
use crate::error::{CliError, Result};
use crate::mix::Scores;

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// The model: a checkpoint file or directory, hf://org/name[@revision][:file] or a URL.
    #[arg(long)]
    pub model: String,
    #[command(flatten)]
    pub data: DataArgs,
    /// Which split: test, heldout or train.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Evaluate under distribution shifts instead: noise, blur, rotate, contrast (comma-separated)
    /// or all; the split's images under each shift in turn.
    #[arg(long)]
    pub shift: Option<String>,
    /// Further evaluation sets (comma-separated, read as --data is, their test split): each is
    /// scored by name after --data's split, then their mean accuracy.
    #[arg(long, value_delimiter = ',')]
    pub test: Vec<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Also write every example's logits, features and label to this .safetensors file
    /// (tensors `logits` n × classes, `features` n × width where the architecture has them,
    /// `labels` u32), in the split's order.
    #[arg(long)]
    pub save_logits: Option<PathBuf>,
    #[command(flatten)]
    pub arch: ArchOverride,
    #[command(flatten)]
    pub device: crate::common::DeviceArgs,
}

pub fn eval(args: &EvalArgs, quiet: bool) -> Result<()> {
    let split: Split = args.split.parse().map_err(CliError::new)?;
    let ckpt = Checkpoint::open(
        soup_models::fetch_str(&args.model, crate::common::downloads(quiet))?.path,
    )?;
    let arch = args.arch.architecture(&ckpt)?;
    let params = ckpt.load_params(arch.as_ref(), &args.device.open()?)?;
    if let InputSpec::Tokens(spec) = arch.input() {
        if !args.test.is_empty() {
            return Err(CliError::new(
                "--test is for image classifiers; a language model's domains are --data a+b+c",
            ));
        }
        return eval_text(args, &ckpt, arch.as_ref(), &params, (split, spec));
    }
    let sets = crate::eval_sets::eval_sets(&args.test, &args.data)?;
    // Shifts apply to stored pixels, so a shifted split is read whole; otherwise an image folder
    // streams.
    if let Some(path) = &args.save_logits {
        // Checked before any work: the file is written after the evaluation.
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        if dir.is_some_and(|d| !d.is_dir()) {
            return Err(CliError::new(format!(
                "--save-logits {}: no directory {}",
                path.display(),
                dir.map_or(String::new(), |d| d.display().to_string())
            )));
        }
    }
    let data = match &args.shift {
        Some(list) => {
            let raw = args.data.load_raw(split)?;
            let raw = shifted(&raw, &Shift::parse_list(list).map_err(CliError::new)?, 0);
            args.data.prepare(&raw, &arch)?
        }
        None => args.data.load(split, &arch)?,
    };
    if let Some(path) = &args.save_logits {
        save_logits(path, arch.as_ref(), &params, &data)?;
    }
    // A split of fewer classes than the head's is scored over its own (model-soups' projection).
    let restricted = data.classes.as_ref().map(Vec::len);
    let mut objective = Classification::new(arch.clone(), data, 256);
    let scores: Scores = objective.evaluate(&params)?.into();
    let set_scores = crate::eval_sets::score(&sets, &arch, &params)?;
    if args.json {
        let mut json = serde_json::to_value(scores)?;
        if let Some(k) = restricted {
            json["classes_scored"] = k.into();
            json["head_classes"] = arch.num_classes().into();
        }
        if !set_scores.is_empty() {
            json["tests"] = serde_json::to_value(&set_scores)?;
            json["tests_mean_accuracy"] = crate::eval_sets::mean_accuracy(&set_scores).into();
        }
        println!("{}", serde_json::to_string(&json)?);
    } else {
        let shift = args
            .shift
            .as_deref()
            .map_or(String::new(), |s| format!(" shifted ({s})"));
        let subset = restricted.map_or(String::new(), |k| {
            format!(
                ", logits restricted to the split's {k} of the head's {} classes",
                arch.num_classes()
            )
        });
        println!(
            "{} on {} {}{shift}: accuracy {:.4}, loss {:.4}, {} examples{subset}",
            args.model, args.data.data, args.split, scores.accuracy, scores.loss, scores.count
        );
        for s in &set_scores {
            let subset = s.classes_scored.map_or(String::new(), |k| {
                format!(
                    ", logits restricted to its {k} of the head's {} classes",
                    arch.num_classes()
                )
            });
            println!(
                "{} on {} ({}): accuracy {:.4}, loss {:.4}, {} examples{subset}",
                args.model, s.name, s.data, s.scores.accuracy, s.scores.loss, s.scores.count
            );
        }
        if !set_scores.is_empty() {
            println!(
                "{}: mean accuracy over the {} --test sets {:.4}",
                args.model,
                set_scores.len(),
                crate::eval_sets::mean_accuracy(&set_scores)
            );
        }
    }
    Ok(())
}

/// `soup eval` of a language model on a text data set: loss per token, perplexity and
/// next-token accuracy over `--max-examples` windows of `--seq-len` tokens.
fn eval_text(
    args: &EvalArgs,
    ckpt: &Checkpoint,
    arch: &dyn Architecture,
    params: &[Tensor],
    (split, spec): (Split, TokenSpec),
) -> Result<()> {
    if args.shift.is_some() || args.save_logits.is_some() {
        return Err(CliError::new(
            "--shift and --save-logits are for image classifiers, not language models",
        ));
    }
    let dir = model_dir(&ckpt.path);
    // Streamed: a batch of windows at a time per domain, never the split.
    let mut sums: Vec<NextTokenSums> = Vec::new();
    let mut pending: Vec<Vec<Vec<u32>>> = Vec::new();
    let domains = args.data.visit_domains(split, &dir, &spec, |d, window| {
        if sums.len() <= d {
            sums.resize(d + 1, NextTokenSums::default());
            pending.resize(d + 1, Vec::new());
        }
        pending[d].push(window);
        if pending[d].len() == EVAL_BATCH {
            sums[d].add(arch, params, &pending[d])?;
            pending[d].clear();
        }
        Ok(())
    })?;
    for (s, rest) in sums.iter_mut().zip(&pending) {
        if !rest.is_empty() {
            s.add(arch, params, rest)?;
        }
    }
    let score = |d: usize| -> Result<serde_json::Value> {
        let m = sums[d].metrics(arch)?;
        Ok(
            serde_json::json!({"loss": m.loss, "perplexity": m.loss.exp(),
            "accuracy": m.accuracy.unwrap_or(f64::NAN), "count": m.count,
            "windows": domains[d].1}),
        )
    };
    // A union of data sets is scored domain by domain; the whole weighs them by their tokens,
    // as `soup mix` reports a union.
    let each: Vec<(String, serde_json::Value)> = domains
        .iter()
        .enumerate()
        .map(|(d, (name, _))| Ok((name.clone(), score(d)?)))
        .collect::<Result<_>>()?;
    let mut scores = match each.as_slice() {
        [(_, one)] => one.clone(),
        _ => {
            let count: f64 = each
                .iter()
                .map(|(_, s)| s["count"].as_f64().unwrap_or(0.0))
                .sum();
            let mean = |key: &str| {
                each.iter()
                    .map(|(_, s)| {
                        s[key].as_f64().unwrap_or(f64::NAN) * s["count"].as_f64().unwrap_or(0.0)
                    })
                    .sum::<f64>()
                    / count
            };
            let loss = mean("loss");
            serde_json::json!({"loss": loss, "perplexity": loss.exp(), "accuracy": mean("accuracy"),
                "count": count as u64,
                "windows": domains.iter().map(|d| d.1).sum::<usize>()})
        }
    };
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    if args.json {
        if each.len() > 1 {
            scores["domains"] = each
                .iter()
                .map(|(name, s)| {
                    let mut s = s.clone();
                    s["name"] = name.clone().into();
                    s
                })
                .collect();
        }
        println!("{scores}");
    } else {
        let line = |what: &str, s: &serde_json::Value| {
            format!(
                "{what}: loss {:.4} per token, perplexity {:.3}, next-token accuracy {:.4}, {} tokens in {} windows",
                f(s, "loss"),
                f(s, "perplexity"),
                f(s, "accuracy"),
                s["count"],
                s["windows"]
            )
        };
        println!(
            "{}",
            line(
                &format!("{} on {} {}", args.model, args.data.data, args.split),
                &scores
            )
        );
        if each.len() > 1 {
            for (name, s) in &each {
                println!("{}", line(&format!("  {name}"), s));
            }
        }
    }
    Ok(())
}

/// The directory of a checkpoint (itself, or the folder of a file): where its tokenizer is.
pub fn model_dir(path: &Path) -> PathBuf {
    match path.is_dir() {
        true => path.to_path_buf(),
        false => path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf),
    }
}

/// Writes the logits (and features) of `params` on `data` to `path`, batch by batch, atomically.
fn save_logits(
    path: &Path,
    arch: &dyn Architecture,
    params: &[Tensor],
    data: &Dataset,
) -> Result<()> {
    let n = data.labels.len();
    let (mut logits, mut features) = (Vec::new(), Vec::new());
    for start in (0..n).step_by(256) {
        let rows: Vec<u32> = (start..n.min(start + 256)).map(|r| r as u32).collect();
        let (images, _) = data.select(&rows)?;
        let device = params.first().map_or(&Device::Cpu, Tensor::device);
        let images = images.to_device(device)?;
        logits.push(arch.forward(params, &images)?.to_device(&Device::Cpu)?);
        if let Some(f) = arch.features(params, &images)? {
            features.push(f.to_device(&Device::Cpu)?);
        }
    }
    let mut tensors = HashMap::from([
        ("logits".to_string(), Tensor::cat(&logits, 0)?),
        (
            "labels".to_string(),
            Tensor::from_vec(data.labels.clone(), n, &Device::Cpu)?,
        ),
    ]);
    if !features.is_empty() {
        tensors.insert("features".to_string(), Tensor::cat(&features, 0)?);
    }
    atomic_write(path, |tmp| {
        candle_core::safetensors::save(&tensors, tmp).map_err(|e| ModelError::format(tmp, e))
    })?;
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// A checkpoint (file or directory, hf://org/name[@revision][:file] or a URL), a zoo
    /// directory or a zoo.toml. Hub safetensors models are inspected from their headers alone.
    pub target: String,
    /// Model batch b for the MEHL memory figures.
    #[arg(long, default_value_t = 18)]
    pub model_batch: usize,
    #[command(flatten)]
    pub arch: ArchOverride,
}

pub fn inspect(args: &InspectArgs, quiet: bool) -> Result<()> {
    let source = ModelSource::parse(&args.target)?;
    let (ckpt, label, n, is_zoo) = match &source {
        ModelSource::Local(target) => {
            let is_zoo = target.join("zoo.toml").exists()
                || target.extension().is_some_and(|e| e == "toml")
                || (target.is_dir()
                    && !target.join("model.safetensors").exists()
                    && !target.join("model.safetensors.index.json").exists());
            let zoo = if is_zoo {
                crate::manifest::resolve(target, quiet)?
            } else {
                vec![soup_models::fetch(
                    &source,
                    crate::common::downloads(quiet),
                )?]
            };
            let ckpt = Checkpoint::open(&zoo[0].path)?;
            (ckpt, zoo[0].source.clone(), zoo.len(), is_zoo)
        }
        remote => (open_remote(remote, quiet)?, remote.to_string(), 1, false),
    };
    let mut overrides = match &source {
        ModelSource::Local(target) if is_zoo => crate::manifest::arch_config(target)?,
        _ => serde_json::Map::new(),
    };
    overrides.extend(args.arch.map()?);
    let arch = ckpt.architecture_with(&overrides)?;
    let layout = ckpt.layout(arch.as_ref())?;
    let mut dtypes: Vec<String> = layout
        .tensors
        .iter()
        .map(|t| ckpt.dtype(&t.name))
        .collect::<std::result::Result<_, _>>()?;
    dtypes.sort();
    dtypes.dedup();
    let d = layout.numel();
    println!("{label}");
    println!("  architecture  {} {}", arch.family(), arch.config());
    println!("  tensors       {}", layout.len());
    println!("  parameters    {d}");
    println!("  stored as     {}", dtypes.join(", "));
    match arch.input() {
        InputSpec::Images(i) => {
            println!(
                "  inputs        images {}×{}×{}",
                i.channels, i.height, i.width
            );
            println!("  classes       {}", arch.num_classes());
        }
        InputSpec::Tokens(t) => {
            println!("  vocabulary    {}", t.vocab_size);
            println!("  context       {} tokens", t.max_positions);
            let head = match arch.head_tensors().is_empty() {
                true => "tied to the embeddings",
                false => "a tensor of its own",
            };
            println!("  output head   {head}");
        }
    }
    for (key, rule) in ckpt.inferred()? {
        if !overrides.contains_key(key) {
            println!("  inferred      {key} = {} ({rule})", arch.config()[key]);
        }
    }
    if is_zoo {
        println!("zoo of {n} models");
        println!(
            "  memory each method holds (f32 weights and soup state, before activations and data):"
        );
        let b = args.model_batch.min(n);
        for m in &soup_core::REGISTRY {
            let batch = match m.holds.starts_with("b ") {
                true => format!(", b = {b}"),
                false => String::new(),
            };
            println!(
                "  {:<16} {:>10}  ({}{batch})",
                m.name,
                human_bytes(m.method.tensor_bytes(n, d, b)),
                m.holds,
            );
        }
    }
    Ok(())
}

/// A remote checkpoint for inspection: from its headers alone where the Hub has safetensors.
fn open_remote(source: &ModelSource, quiet: bool) -> Result<Checkpoint> {
    #[cfg(feature = "hub")]
    {
        let hub = soup_models::remote::hub::Hub::from_env()?
            .with_progress(crate::common::downloads(quiet));
        Ok(hub.open_remote(source)?)
    }
    #[cfg(not(feature = "hub"))]
    Ok(Checkpoint::open(
        soup_models::fetch(source, crate::common::downloads(quiet))?.path,
    )?)
}
