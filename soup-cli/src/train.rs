//! `soup train` and `soup finetune`: make a start point, then a zoo of fine-tunes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use soup_core::rng::SplitMix64;
use soup_core::{Metrics, Objective};
use soup_models::checkpoint::{
    arch_metadata, write_model_dir, write_safetensors, MODEL_DIR_FILES as MODEL_FILES,
};
use soup_models::data::text::{SpillableWindows, Windows};
use soup_models::data::Split;
use soup_models::train::finetune::TrainData;
use soup_models::train::finetune::{finetune_some, Augment, FinetuneConfig};
use soup_models::train::language::{NextTokenSums, EVAL_BATCH};
use soup_models::{build, Architecture, Checkpoint, Classification, Dataset, InputSpec};

use crate::common::{DataArgs, Progress};
use crate::error::{io, CliError, Result};
use crate::manifest::{Entry, FinetuneRun, Manifest};

/// Training hyper-parameters shared by `train` and as the base of `finetune`.
#[derive(clap::Args, Clone, Debug)]
pub struct TrainingArgs {
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0.1)]
    pub warmup_fraction: f64,
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f64,
    /// Random-crop padding in pixels (0: off).
    #[arg(long, default_value_t = 0)]
    pub crop_padding: usize,
    /// Random horizontal flips.
    #[arg(long)]
    pub flip: bool,
    /// Standard deviation of Gaussian pixel noise (0: off).
    #[arg(long, default_value_t = 0.0)]
    pub noise: f32,
    /// Clip gradients to this global norm (0: off).
    #[arg(long, default_value_t = 1.0)]
    pub clip_grad_norm: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl TrainingArgs {
    fn config(&self) -> FinetuneConfig {
        FinetuneConfig {
            epochs: self.epochs,
            batch_size: self.batch_size,
            lr: self.lr,
            weight_decay: self.weight_decay,
            warmup_fraction: self.warmup_fraction,
            label_smoothing: self.label_smoothing,
            augment: Augment {
                crop_padding: self.crop_padding,
                horizontal_flip: self.flip,
                noise_std: self.noise,
            },
            clip_grad_norm: (self.clip_grad_norm != 0.0).then_some(self.clip_grad_norm),
            seed: self.seed,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Architecture from the registry (clip-vit-b32, clip-vit-b16, clip-vit-l14, clip-vit,
    /// dinov2-vit, llama, mlp).
    #[arg(long, required_unless_present = "init")]
    pub arch: Option<String>,
    /// The architecture's configuration as JSON (required for clip-vit and mlp; the number of
    /// classes defaults to the data's).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Continue from this checkpoint instead of a random initialisation (a path,
    /// hf://org/name[@revision][:file] or a URL).
    #[arg(long)]
    pub init: Option<String>,
    /// A language model trained from scratch: the model directory whose tokenizer it reads its
    /// text with (tokenizer.json and its configuration, copied beside the model).
    #[arg(long, conflicts_with = "init")]
    pub tokenizer: Option<PathBuf>,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub training: TrainingArgs,
    #[command(flatten)]
    pub device: crate::common::DeviceArgs,
    /// Language models: the bytes of training windows held in memory (K, M, G); beyond it the
    /// windows are written once to a file of tokens beside the output and read back a batch at
    /// a time, so a corpus larger than memory trains (the file is removed at the end).
    #[arg(long, default_value = "1G")]
    pub window_memory: String,
    /// Train only the tensors whose names start with this prefix (repeatable); the others stay
    /// frozen, e.g. `--train-only classifier` fits a linear probe on a frozen backbone.
    #[arg(long)]
    pub train_only: Vec<String>,
    /// Output checkpoint: a .safetensors file, or a directory (model.safetensors + config.json).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn train(args: &TrainArgs, quiet: bool) -> Result<()> {
    let device = args.device.open()?;
    let mut init_path = PathBuf::new();
    let (arch, params) = match &args.init {
        Some(init) => {
            init_path = soup_models::fetch_str(init, crate::common::downloads(quiet))?.path;
            let ckpt = Checkpoint::open(&init_path)?;
            let arch = ckpt.architecture()?;
            let params = ckpt.load_params(arch.as_ref(), &device)?;
            (arch, params)
        }
        None => {
            let mut config = match &args.config {
                Some(path) => {
                    let text = std::fs::read_to_string(path).map_err(|e| io(path, e))?;
                    serde_json::from_str(&text)
                        .map_err(|e| CliError::new(format!("{}: {e}", path.display())))?
                }
                None => serde_json::json!({}),
            };
            if let Some(obj) = config.as_object_mut().filter(|_| args.tokenizer.is_none()) {
                if !obj.contains_key("num_classes") {
                    obj.insert("num_classes".into(), args.data.num_classes()?.into());
                }
            }
            let arch = build(args.arch.as_deref().expect("clap requires --arch"), &config)?;
            // Drawn on the CPU whatever the device: the same seed, the same start.
            let params = arch
                .init(args.training.seed, &Device::Cpu)?
                .iter()
                .map(|t| t.to_device(&device))
                .collect::<candle_core::Result<Vec<_>>>()?;
            (arch, params)
        }
    };
    let arch = args.data.name_classes(arch)?;
    let trainable: Vec<bool> = arch
        .layout()
        .tensors
        .iter()
        .map(|t| {
            args.train_only.is_empty() || args.train_only.iter().any(|p| t.name.starts_with(p))
        })
        .collect();
    if !trainable.contains(&true) {
        return Err(CliError::new(format!(
            "--train-only {}: no tensor of {} starts with it",
            args.train_only.join(", "),
            arch.family()
        )));
    }
    let model_dir = match (&args.init, &args.tokenizer) {
        (Some(_), _) => Some(crate::inspect::model_dir(&init_path)),
        (None, tokenizer) => tokenizer.clone(),
    };
    let spill = Spill {
        out: &args.out,
        memory: window_memory(&args.window_memory)?,
    };
    let sets = TrainSets::load(&args.data, &arch, model_dir.as_deref(), &spill)?;
    let config = args.training.config();
    let (trained, metrics) = run_training(
        &arch,
        &params,
        &trainable,
        (&sets, None),
        &config,
        quiet,
        "train",
    )?;
    let mut meta = config.metadata();
    if !args.train_only.is_empty() {
        meta.insert("soup.train_only".into(), args.train_only.join(","));
    }
    sets.record(&metrics, &mut meta);
    let title = match &args.init {
        Some(init) => format!("{} trained from `{init}`", arch.family()),
        None => format!("{} trained from scratch", arch.family()),
    };
    let body = training_card_body("soup train", &args.data.data, &meta);
    let card = crate::card::card(
        &[sets.tag()],
        &title,
        &body,
        arch.as_ref(),
        args.init.as_deref(),
    );
    write_checkpoint(&args.out, arch.as_ref(), &trained, meta, &card)?;
    if args.out.extension().is_none_or(|e| e != "safetensors") {
        sets.write_tokenizer(&args.out)?;
    }
    println!(
        "trained {} ({} parameters) for {} epochs: held-out {} -> {}",
        arch.family(),
        arch.layout().numel(),
        config.epochs,
        sets.said(&metrics),
        args.out.display()
    );
    Ok(())
}

/// The training and held-out data of a run: labelled images, or windows of text tokenised by
/// the tokenizer of the model's directory.
enum TrainSets {
    Images {
        train: Dataset,
        heldout: Dataset,
    },
    Text {
        /// Each domain of a union of text data sets (one for one data set).
        domains: Vec<TextDomain>,
        /// Where the tokenizer was read (copied beside every model trained).
        tokenizer: PathBuf,
    },
}

/// One text domain's training and held-out windows, each in memory or, when they take more
/// than `--window-memory`, in a file of tokens.
struct TextDomain {
    name: String,
    train: SpillableWindows,
    heldout: SpillableWindows,
}

/// Where a run writes the training windows that do not fit `--window-memory`: a file per domain
/// beside the output, removed when the run ends.
pub(crate) struct Spill<'a> {
    pub out: &'a Path,
    /// The bytes of training windows held in memory.
    pub memory: usize,
}

impl Spill<'_> {
    fn path(&self, domain: usize, split: &str) -> PathBuf {
        let dir = self
            .out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = self
            .out
            .file_name()
            .map_or("out".into(), |n| n.to_string_lossy().into_owned());
        dir.join(format!(
            ".{name}.{split}-tokens-{}-{domain}.partial",
            std::process::id()
        ))
    }
}

impl TrainSets {
    /// The splits of `data` for `arch`; a language model needs `model_dir`, its directory.
    fn load(
        data: &DataArgs,
        arch: &Arc<dyn Architecture>,
        model_dir: Option<&Path>,
        spill: &Spill,
    ) -> Result<Self> {
        match arch.input() {
            InputSpec::Images(_) => Ok(TrainSets::Images {
                train: data.load_train(arch)?,
                heldout: data.load(Split::Heldout, arch)?,
            }),
            InputSpec::Tokens(spec) => {
                let dir = model_dir.ok_or_else(|| {
                    CliError::new(
                        "a language model needs a tokenizer: continue from a model directory \
                         (--init), or name one to train from scratch with (--tokenizer DIR)",
                    )
                })?;
                let load = |split: Split, label: &str| {
                    data.load_spilled_domains(split, dir, &spec, |d| {
                        (spill.path(d, label), spill.memory)
                    })
                };
                let train = load(Split::Train, "train")?;
                let heldout = load(Split::Heldout, "heldout")?;
                let domains = train
                    .into_iter()
                    .zip(heldout)
                    .map(|((name, train), (_, heldout))| TextDomain {
                        name,
                        train,
                        heldout,
                    })
                    .collect();
                Ok(TrainSets::Text {
                    domains,
                    tokenizer: dir.to_path_buf(),
                })
            }
        }
    }

    /// The domains of a union of text data sets (none for images, one for one text data set).
    fn domains(&self) -> usize {
        match self {
            TrainSets::Images { .. } => 0,
            TrainSets::Text { domains, .. } => domains.len(),
        }
    }

    /// The name of text domain `d`.
    fn domain_name(&self, d: usize) -> Option<&str> {
        match self {
            TrainSets::Images { .. } => None,
            TrainSets::Text { domains, .. } => domains.get(d).map(|t| t.name.as_str()),
        }
    }

    /// The training windows: domain `d`'s, or every domain's (none for images).
    fn text_parts(&self, d: Option<usize>) -> Vec<&dyn Windows> {
        match self {
            TrainSets::Images { .. } => Vec::new(),
            TrainSets::Text { domains, .. } => domains
                .iter()
                .enumerate()
                .filter(|(i, _)| d.is_none_or(|d| d == *i))
                .map(|(_, t)| &t.train as &dyn Windows)
                .collect(),
        }
    }

    /// The held-out metrics of `params`: for text, on domain `d`'s windows, or every domain's.
    fn evaluate(
        &self,
        arch: &Arc<dyn Architecture>,
        params: &[Tensor],
        d: Option<usize>,
    ) -> Result<Metrics> {
        Ok(match self {
            TrainSets::Images { heldout, .. } => {
                Classification::new(arch.clone(), heldout.clone(), 256).evaluate(params)?
            }
            TrainSets::Text { domains, .. } => {
                // A batch of windows read at a time: the held-out split may be in a file.
                let mut sums = NextTokenSums::default();
                for (_, t) in domains
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| d.is_none_or(|d| d == *i))
                {
                    let n = t.heldout.len();
                    let width = t.heldout.window_len().unwrap_or(0);
                    for start in (0..n).step_by(EVAL_BATCH) {
                        let rows: Vec<usize> = (start..n.min(start + EVAL_BATCH)).collect();
                        let flat = t.heldout.read(&rows)?;
                        let batch: Vec<Vec<u32>> =
                            flat.chunks(width.max(1)).map(<[u32]>::to_vec).collect();
                        sums.add(arch.as_ref(), params, &batch)?;
                    }
                }
                sums.metrics(arch.as_ref())?
            }
        })
    }

    fn is_text(&self) -> bool {
        matches!(self, TrainSets::Text { .. })
    }

    /// The model card's task tag.
    fn tag(&self) -> &'static str {
        match self {
            TrainSets::Images { .. } => "image-classification",
            TrainSets::Text { .. } => "text-generation",
        }
    }

    /// Records the held-out score in a checkpoint's metadata.
    fn record(&self, m: &Metrics, meta: &mut BTreeMap<String, String>) {
        match self {
            TrainSets::Images { .. } => {
                let accuracy = m.accuracy.unwrap_or(0.0);
                meta.insert("soup.heldout_accuracy".into(), format!("{accuracy}"));
            }
            TrainSets::Text { .. } => {
                meta.insert("soup.heldout_loss".into(), format!("{}", m.loss));
            }
        }
    }

    /// The held-out score in words.
    fn said(&self, m: &Metrics) -> String {
        match self {
            TrainSets::Images { .. } => format!(
                "accuracy {:.4}, loss {:.4}",
                m.accuracy.unwrap_or(0.0),
                m.loss
            ),
            TrainSets::Text { .. } => {
                format!(
                    "loss {:.4} per token, perplexity {:.3}",
                    m.loss,
                    m.loss.exp()
                )
            }
        }
    }

    /// Copies a language model's tokenizer into the model directory `dir`.
    fn write_tokenizer(&self, dir: &Path) -> Result<()> {
        if let TrainSets::Text { tokenizer, .. } = self {
            soup_models::checkpoint::copy_tokenizer(tokenizer, dir)?;
        }
        Ok(())
    }
}

/// `--window-memory` in bytes.
fn window_memory(flag: &str) -> Result<usize> {
    Ok(crate::common::parse_bytes("--window-memory", flag, true)? as usize)
}

/// Fine-tunes with a progress bar, then evaluates on the held-out split.
#[allow(clippy::too_many_arguments)]
fn run_training(
    arch: &Arc<dyn Architecture>,
    params: &[Tensor],
    trainable: &[bool],
    (sets, domain): (&TrainSets, Option<usize>),
    config: &FinetuneConfig,
    quiet: bool,
    what: &str,
) -> Result<(Vec<Tensor>, Metrics)> {
    let parts = sets.text_parts(domain);
    let data = match sets {
        TrainSets::Images { train, .. } => TrainData::Images(train),
        TrainSets::Text { .. } => TrainData::Text(&parts),
    };
    let len = match data {
        TrainData::Images(d) => d.len(),
        TrainData::Text(w) => w.iter().map(|p| p.len()).sum(),
    };
    let batch = config.batch_size.max(1);
    let per_epoch = len.div_ceil(batch);
    let bar = Progress::new(quiet, config.epochs * per_epoch, &format!("{what} steps"));
    // Text reports its throughput in tokens: the windows of a step times their length.
    let window = match data {
        TrainData::Text(w) => w.iter().find_map(|p| p.window_len()).unwrap_or(0),
        TrainData::Images(_) => 0,
    };
    let (started, mut step, mut tokens) = (std::time::Instant::now(), 0, 0);
    let (trained, _) = finetune_some(arch.as_ref(), params, trainable, data, config, &mut |s| {
        tokens += window * batch.min(len - (step % per_epoch) * batch);
        step += 1;
        bar.inc(1);
        bar.set_prefix(match window {
            0 => format!("loss {:.4}", s.loss),
            _ => format!(
                "loss {:.4}, {:.0} tokens/s",
                s.loss,
                tokens as f64 / started.elapsed().as_secs_f64()
            ),
        });
    })?;
    bar.finish();
    let metrics = sets.evaluate(arch, &trained, domain)?;
    Ok((trained, metrics))
}

/// A .safetensors file for a path ending so, else a model directory.
fn write_checkpoint(
    out: &Path,
    arch: &dyn Architecture,
    params: &[Tensor],
    meta: BTreeMap<String, String>,
    card: &str,
) -> Result<()> {
    if out.extension().is_some_and(|e| e == "safetensors") {
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        let mut all = arch_metadata(arch);
        all.extend(meta);
        write_safetensors(out, arch.layout(), params, &all)?;
    } else {
        write_model_dir(out, arch, params, &meta, card)?;
    }
    Ok(())
}

/// The body of a trained model's card: the command, the data and every setting it recorded.
fn training_card_body(command: &str, data: &str, meta: &BTreeMap<String, String>) -> String {
    let rows: Vec<Vec<String>> = meta
        .iter()
        .map(|(k, v)| {
            vec![
                format!("`{}`", k.strip_prefix("soup.").unwrap_or(k)),
                format!("`{v}`"),
            ]
        })
        .collect();
    format!(
        "Made by `{command}` on the data `{data}` (held-out accuracy measured on the held-out \
         split, which training never saw).\n\n## Training\n\n{}\n",
        crate::card::table(&["setting", "value"], &rows)
    )
}

/// The random search of `soup finetune`, model-soups style: each fine-tune draws its settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Search {
    /// Learning rate, log-uniform in [min, max].
    pub lr: [f64; 2],
    /// Weight decay, log-uniform in [min, max].
    pub weight_decay: [f64; 2],
    /// Epochs, uniform in [min, max].
    pub epochs: [usize; 2],
    /// Label smoothing, one of these.
    pub label_smoothing: Vec<f64>,
    /// Augmentation, one of: none, crop-flip, crop-flip-noise.
    pub augment: Vec<String>,
    pub batch_size: usize,
    /// Fraction of the steps in linear warm-up, uniform in [min, max].
    pub warmup: [f64; 2],
}

impl Default for Search {
    fn default() -> Self {
        Self {
            lr: [1e-4, 3e-3],
            weight_decay: [1e-4, 0.1],
            epochs: [1, 2],
            label_smoothing: vec![0.0, 0.1],
            augment: vec!["none".into(), "crop-flip".into(), "crop-flip-noise".into()],
            batch_size: 64,
            warmup: [0.1, 0.1],
        }
    }
}

impl Search {
    fn check(&self) -> Result<()> {
        let bad = |m: &str| Err(CliError::new(format!("search: {m}")));
        if !(self.lr[0] > 0.0 && self.lr[0] <= self.lr[1]) {
            return bad("lr needs 0 < min ≤ max");
        }
        if !(self.weight_decay[0] > 0.0 && self.weight_decay[0] <= self.weight_decay[1]) {
            return bad("weight_decay needs 0 < min ≤ max");
        }
        if !(self.epochs[0] >= 1 && self.epochs[0] <= self.epochs[1]) {
            return bad("epochs needs 1 ≤ min ≤ max");
        }
        if !(0.0 <= self.warmup[0] && self.warmup[0] <= self.warmup[1] && self.warmup[1] < 1.0) {
            return bad("warmup needs 0 ≤ min ≤ max < 1");
        }
        if self.label_smoothing.is_empty() || self.augment.is_empty() {
            return bad("label_smoothing and augment need at least one choice");
        }
        for a in &self.augment {
            augment_named(a)?;
        }
        Ok(())
    }

    fn draw(&self, rng: &mut SplitMix64) -> Result<FinetuneConfig> {
        let log_uniform = |rng: &mut SplitMix64, [lo, hi]: [f64; 2]| {
            (lo.ln() + rng.next_f64() * (hi.ln() - lo.ln())).exp()
        };
        let lr = log_uniform(rng, self.lr);
        let weight_decay = log_uniform(rng, self.weight_decay);
        let epochs = self.epochs[0] + rng.below(self.epochs[1] - self.epochs[0] + 1);
        let label_smoothing = self.label_smoothing[rng.below(self.label_smoothing.len())];
        let augment = augment_named(&self.augment[rng.below(self.augment.len())])?;
        let seed = rng.next_u64() >> 11;
        // Drawn last, and only from a range: a search without one draws what it drew before.
        let [lo, hi] = self.warmup;
        let warmup_fraction = if lo < hi {
            lo + rng.next_f64() * (hi - lo)
        } else {
            lo
        };
        Ok(FinetuneConfig {
            epochs,
            batch_size: self.batch_size,
            lr,
            weight_decay,
            warmup_fraction,
            label_smoothing,
            augment,
            clip_grad_norm: Some(1.0),
            seed,
        })
    }
}

fn augment_named(name: &str) -> Result<Augment> {
    match name {
        "none" => Ok(Augment::default()),
        "crop-flip" => Ok(Augment {
            crop_padding: 2,
            horizontal_flip: true,
            noise_std: 0.0,
        }),
        "crop-flip-noise" => Ok(Augment {
            crop_padding: 2,
            horizontal_flip: true,
            noise_std: 0.1,
        }),
        other => Err(CliError::new(format!(
            "search: augment {other:?}: expected none, crop-flip or crop-flip-noise"
        ))),
    }
}

#[derive(clap::Args, Debug)]
pub struct FinetuneArgs {
    /// The pre-trained start point (a path, hf://org/name[@revision][:file] or a URL).
    #[arg(long)]
    pub base: String,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub device: crate::common::DeviceArgs,
    /// Number of fine-tunes.
    #[arg(long)]
    pub count: usize,
    /// The zoo directory: model-NN/ per fine-tune and zoo.toml.
    #[arg(long)]
    pub out: PathBuf,
    /// The random search as TOML (keys lr, weight_decay, epochs, warmup, label_smoothing,
    /// augment, batch_size); the built-in ranges otherwise.
    #[arg(long)]
    pub search: Option<PathBuf>,
    /// Seed of the search.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Language models: the bytes of training windows held in memory (K, M, G); beyond it the
    /// windows are written once to a file of tokens beside the output and read back a batch at
    /// a time, so a corpus larger than memory trains (the file is removed at the end).
    #[arg(long, default_value = "1G")]
    pub window_memory: String,

    /// Continue an interrupted run (the same flags) from the models its zoo.toml lists.
    #[arg(long, conflicts_with = "force")]
    pub resume: bool,
    /// Replace a zoo that `soup finetune` wrote (its model-NN directories and zoo.toml only).
    #[arg(long)]
    pub force: bool,
}

/// Whether `dir` holds only what [`write_model_dir`] writes (and temporary files of its
/// atomic writes).
pub(crate) fn is_our_model_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.filter_map(|e| e.ok()).all(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            e.path().is_file()
                && (MODEL_FILES.contains(&name.as_str())
                    || (name.starts_with('.') && name.contains(".tmp.")))
        })
    })
}

/// Removes a model directory soup wrote (only its own files, then the empty directory).
fn remove_model_dir(dir: &Path) -> Result<()> {
    if !is_our_model_dir(dir) {
        return Err(CliError::new(format!(
            "{}: holds files soup did not write; move it away",
            dir.display()
        )));
    }
    for e in std::fs::read_dir(dir).map_err(|e| io(dir, e))?.flatten() {
        std::fs::remove_file(e.path()).map_err(|err| io(&e.path(), err))?;
    }
    std::fs::remove_dir(dir).map_err(|e| io(dir, e))
}

/// Writes `manifest` to `path` atomically.
fn write_manifest(path: &Path, manifest: &Manifest) -> Result<()> {
    let text = toml::to_string_pretty(manifest)?;
    soup_models::checkpoint::atomic_write(path, |tmp| {
        std::fs::write(tmp, &text).map_err(|e| soup_models::ModelError::io(tmp, e))
    })?;
    Ok(())
}

/// The zoo.toml a `soup finetune` starts from (the existing one with `--resume`, else a new one)
/// and the model directories of an old zoo that `--force` replaces (checked to be soup's own).
fn plan_manifest(
    args: &FinetuneArgs,
    run: &FinetuneRun,
    manifest_path: &Path,
) -> Result<(Manifest, Vec<PathBuf>)> {
    let existing = if manifest_path.exists() {
        let text = std::fs::read_to_string(manifest_path).map_err(|e| io(manifest_path, e))?;
        let m: Manifest = toml::from_str(&text)
            .map_err(|e| CliError::new(format!("{}: {}", manifest_path.display(), e.message())))?;
        Some(m)
    } else {
        None
    };
    // The directories of a zoo `--force` replaces (checked to be soup's own).
    let mut replaced: Vec<PathBuf> = Vec::new();
    let manifest = match (existing, args.resume, args.force) {
        (None, true, _) => {
            return Err(CliError::new(format!(
                "--resume: no zoo to continue in {} (no zoo.toml)",
                args.out.display()
            )))
        }
        (Some(m), true, _) => {
            match &m.finetune {
                Some(r) if r == run => {}
                Some(_) => {
                    return Err(CliError::new(format!(
                        "--resume: {} was made by `soup finetune` with other settings (base, count, seed, data or search)",
                        manifest_path.display()
                    )))
                }
                None => {
                    return Err(CliError::new(format!(
                        "--resume: {} was not written by `soup finetune`",
                        manifest_path.display()
                    )))
                }
            }
            m
        }
        (Some(m), false, true) => {
            if m.finetune.is_none() {
                return Err(CliError::new(format!(
                    "{}: not written by `soup finetune`; --force replaces only a zoo soup made",
                    manifest_path.display()
                )));
            }
            let ours = |p: &str| {
                p.strip_prefix("model-")
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            };
            if let Some(e) = m.models.iter().find(|e| !ours(&e.path)) {
                return Err(CliError::new(format!(
                    "{}: lists {}, which `soup finetune` does not write; --force replaces only a zoo soup made",
                    manifest_path.display(),
                    e.path
                )));
            }
            let dirs: Vec<PathBuf> = m.models.iter().map(|e| args.out.join(&e.path)).collect();
            if let Some(foreign) = dirs.iter().find(|d| d.exists() && !is_our_model_dir(d)) {
                return Err(CliError::new(format!(
                    "{}: holds files soup did not write; --force replaces only a zoo soup made",
                    foreign.display()
                )));
            }
            replaced = dirs;
            Manifest::default()
        }
        (Some(_), false, false) => {
            return Err(CliError::new(format!(
                "{}: a zoo is already there (--resume continues it, --force replaces it)",
                manifest_path.display()
            )))
        }
        (None, false, _) => Manifest::default(),
    };
    Ok((manifest, replaced))
}

/// `soup finetune`. The zoo is durable model by model: each fine-tune is written to
/// `.model-NN.partial/`, renamed to `model-NN/`, then added to `zoo.toml` (written atomically,
/// with the planned count, so that `soup mix` refuses an unfinished zoo and `--resume` continues
/// it to the same models an uninterrupted run makes).
pub fn finetune_zoo(args: &FinetuneArgs, quiet: bool) -> Result<()> {
    if args.count == 0 {
        return Err(CliError::new("--count must be at least 1"));
    }
    let search: Search = match &args.search {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| io(path, e))?;
            toml::from_str(&text)
                .map_err(|e| CliError::new(format!("{}: {}", path.display(), e.message())))?
        }
        None => Search::default(),
    };
    search.check()?;
    let run = FinetuneRun {
        count: args.count,
        base: args.base.clone(),
        seed: args.seed,
        data: args.data.data.clone(),
        heldout: match &args.data.heldout_index {
            Some(p) => format!("index {}", p.display()),
            None => format!(
                "fraction {} seed {}",
                args.data.heldout_fraction, args.data.heldout_seed
            ),
        },
        max_examples: args.data.max_examples,
        search: toml::Value::try_from(&search)?,
    };
    if args.out.exists() && !args.out.is_dir() {
        return Err(CliError::new(format!(
            "{}: exists and is not a directory",
            args.out.display()
        )));
    }
    let manifest_path = args.out.join("zoo.toml");
    let (mut manifest, replaced) = plan_manifest(args, &run, &manifest_path)?;
    if manifest.finetune.is_none() {
        // A fresh zoo: model-NN directories of someone else's must not be mixed into it.
        for i in 0..args.count {
            let dir = args.out.join(format!("model-{i:02}"));
            if dir.exists() && !replaced.contains(&dir) {
                return Err(CliError::new(format!(
                    "{}: already exists and no zoo.toml lists it; choose a new --out",
                    dir.display()
                )));
            }
        }
    }
    let base_source = soup_models::fetch_str(&args.base, crate::common::downloads(quiet))?;
    let base = Checkpoint::open(&base_source.path)?;
    let arch = base.architecture()?;
    let params = base.load_params(arch.as_ref(), &args.device.open()?)?;
    let arch = args.data.name_classes(arch)?;
    let model_dir = crate::inspect::model_dir(&base_source.path);
    let start = Start {
        sets: TrainSets::load(
            &args.data,
            &arch,
            Some(&model_dir),
            &Spill {
                out: &args.out,
                memory: window_memory(&args.window_memory)?,
            },
        )?,
        arch,
        params,
        source: base_source,
    };
    let created = !args.out.exists();
    std::fs::create_dir_all(&args.out).map_err(|e| io(&args.out, e))?;
    let result = fill_zoo(args, &start, &search, run, &replaced, &mut manifest, quiet);
    if result.is_err() && created && manifest.models.is_empty() {
        // Nothing of this run's zoo is complete: leave no directory behind (it holds only what
        // this run wrote).
        let _ = std::fs::remove_dir_all(&args.out);
    }
    result?;
    println!(
        "{} fine-tunes of {} -> {}",
        args.count,
        args.base,
        manifest_path.display()
    );
    Ok(())
}

/// What every fine-tune of a zoo starts from: the base and the data.
struct Start {
    source: soup_models::Resolved,
    arch: Arc<dyn Architecture>,
    params: Vec<Tensor>,
    sets: TrainSets,
}

/// Fine-tunes the models `manifest` does not list yet, each written and listed in turn.
fn fill_zoo(
    args: &FinetuneArgs,
    start: &Start,
    search: &Search,
    run: FinetuneRun,
    replaced: &[PathBuf],
    manifest: &mut Manifest,
    quiet: bool,
) -> Result<()> {
    let manifest_path = args.out.join("zoo.toml");
    let Start {
        source: base_source,
        arch,
        params,
        sets,
    } = start;
    let all = vec![true; params.len()];
    if manifest.finetune.is_none() {
        if args.force && manifest_path.exists() {
            // Checked above: every directory the old zoo.toml lists is soup's own.
            std::fs::remove_file(&manifest_path).map_err(|e| io(&manifest_path, e))?;
            for dir in replaced {
                if dir.exists() {
                    remove_model_dir(dir)?;
                }
            }
        }
        manifest.finetune = Some(run);
        write_manifest(&manifest_path, manifest)?;
    }
    // Temporary files of a crashed write of zoo.toml.
    crate::output::remove_temporaries(&args.out)?;
    let mut rng = SplitMix64::new(args.seed);
    let done = manifest.models.len();
    for i in 0..args.count {
        let mut config = search.draw(&mut rng)?;
        if sets.is_text() {
            // Drawn all the same, so that the models' other settings do not depend on the data.
            config.label_smoothing = 0.0;
            config.augment = Default::default();
        }
        if i < done {
            continue;
        }
        let name = format!("model-{i:02}");
        let dir = args.out.join(&name);
        let partial = args.out.join(format!(".{name}.partial"));
        for leftover in [&dir, &partial] {
            // Left by a crash after the model was written but before zoo.toml listed it (or
            // while it was written): made again, to the same bits.
            if leftover.exists() {
                remove_model_dir(leftover)?;
            }
        }
        // A union of text domains: each fine-tune learns one, in turn.
        let domain = (sets.domains() > 1).then(|| i % sets.domains());
        let (trained, metrics) =
            run_training(arch, params, &all, (sets, domain), &config, quiet, &name)?;
        let mut meta = config.metadata();
        sets.record(&metrics, &mut meta);
        let domain_name = domain.and_then(|d| sets.domain_name(d)).map(str::to_string);
        if let Some(d) = &domain_name {
            meta.insert("soup.domain".into(), d.clone());
        }
        meta.insert("soup.base".into(), args.base.clone());
        if let Some(commit) = &base_source.commit {
            meta.insert("soup.base_commit".into(), commit.clone());
        }
        let title = format!("{name}: a fine-tune of `{}`", args.base);
        let body = training_card_body("soup finetune", &args.data.data, &meta);
        let base = Some(args.base.as_str());
        let card = crate::card::card(&[sets.tag()], &title, &body, arch.as_ref(), base);
        let written = write_model_dir(&partial, arch.as_ref(), &trained, &meta, &card)
            .map_err(CliError::from)
            .and_then(|()| sets.write_tokenizer(&partial));
        if let Err(e) = written {
            let _ = remove_model_dir(&partial);
            return Err(e);
        }
        std::fs::rename(&partial, &dir).map_err(|e| io(&dir, e))?;
        soup_models::checkpoint::sync_dir(&args.out);
        soup_models::crash::point("finetune: model directory in place");
        if !quiet {
            // Label smoothing and augmentations do not apply to text.
            let settings = match &domain_name {
                Some(d) => format!("domain {d}"),
                None if sets.is_text() => String::new(),
                None => format!(
                    "smoothing {} augment {:?}",
                    config.label_smoothing, config.augment
                ),
            };
            eprintln!(
                "{name}: lr {:.2e} wd {:.2e} epochs {} warm-up {:.2} {settings}: held-out {}",
                config.lr,
                config.weight_decay,
                config.epochs,
                config.warmup_fraction,
                sets.said(&metrics)
            );
        }
        manifest.models.push(Entry {
            path: name,
            sha256: None,
            heldout_accuracy: metrics.accuracy.filter(|_| !sets.is_text()),
            heldout_loss: sets.is_text().then_some(metrics.loss),
            domain: domain_name,
            hyperparameters: Some(toml::Value::try_from(&config)?),
        });
        write_manifest(&manifest_path, manifest)?;
    }
    Ok(())
}
