//! Fine-tuning: AdamW on every parameter, linear warm-up then cosine decay, seeded data order;
//! for images, label smoothing and light augmentation (random crop, horizontal flip, Gaussian
//! noise); for text, next-token prediction on windows of tokens. Used by `soup train`, `soup
//! finetune` and the reproduction to make zoos.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use serde::{Deserialize, Serialize};
use soup_core::rng::{derive_seed, permutation, SplitMix64};
use soup_core::StepSchedule;

use crate::arch::tape::Target;
use crate::arch::Architecture;
use crate::data::text::Windows;
use crate::error::{ModelError, Result};
use crate::ops::cross_entropy;
use crate::train::objective::Dataset;

/// Augmentations applied to each training mini-batch.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Augment {
    /// Pad by this many pixels (zeros, i.e. the mean colour after normalisation), then crop back
    /// at a random offset. 0 disables.
    pub crop_padding: usize,
    /// Mirror each image left-right with probability ½.
    pub horizontal_flip: bool,
    /// Standard deviation of Gaussian noise added to the normalised pixels. 0 disables.
    pub noise_std: f32,
}

/// The hyper-parameters of one fine-tuning run; written into the checkpoint's metadata.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FinetuneConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// Fraction of all steps spent in linear warm-up.
    pub warmup_fraction: f64,
    pub label_smoothing: f64,
    pub augment: Augment,
    /// Clip the gradient to this global L2 norm.
    pub clip_grad_norm: Option<f64>,
    pub seed: u64,
}

impl FinetuneConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |d: &str| Err(ModelError::config("finetune", d));
        if self.epochs == 0 || self.batch_size == 0 {
            return bad("epochs and batch_size must be at least 1");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr must be a positive number");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight_decay must be ≥ 0");
        }
        if !(0.0..1.0).contains(&self.warmup_fraction) {
            return bad("warmup_fraction must be in [0, 1)");
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return bad("label_smoothing must be in [0, 1)");
        }
        if !(self.augment.noise_std.is_finite() && self.augment.noise_std >= 0.0) {
            return bad("noise_std must be ≥ 0");
        }
        if matches!(self.clip_grad_norm, Some(c) if !(c.is_finite() && c > 0.0)) {
            return bad("clip_grad_norm must be a positive number");
        }
        Ok(())
    }

    /// The metadata entry that records these hyper-parameters in a checkpoint.
    pub fn metadata(&self) -> BTreeMap<String, String> {
        BTreeMap::from([(
            "soup.finetune".to_string(),
            serde_json::to_string(self).expect("FinetuneConfig serialises"),
        )])
    }
}

/// What a model is trained on.
#[derive(Clone, Copy)]
pub enum TrainData<'a> {
    /// Labelled images: classification.
    Images(&'a Dataset),
    /// Windows of tokens of one length, the parts' one after another (several text domains):
    /// next-token prediction (label smoothing and the image augmentations do not apply).
    Text(&'a [&'a dyn Windows]),
}

/// The windows `rows` (indices into the parts one after another), one after another.
fn read_windows(parts: &[&dyn Windows], rows: &[u32]) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    for &r in rows {
        let mut r = r as usize;
        let part = parts
            .iter()
            .find(|p| {
                let inside = r < p.len();
                if !inside {
                    r -= p.len();
                }
                inside
            })
            .ok_or_else(|| ModelError::config("finetune", format!("no window {r}")))?;
        out.extend(part.read(&[r])?);
    }
    Ok(out)
}

impl<'a> From<&'a Dataset> for TrainData<'a> {
    fn from(data: &'a Dataset) -> Self {
        TrainData::Images(data)
    }
}

impl TrainData<'_> {
    fn len(&self) -> usize {
        match self {
            TrainData::Images(d) => d.len(),
            TrainData::Text(parts) => parts.iter().map(|p| p.len()).sum(),
        }
    }
}

/// One training step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainStep {
    pub epoch: usize,
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
}

/// Trains `params` of `arch` on `data`; returns the trained parameters and the loss of every step.
/// `on_step` sees every step (for progress display).
pub fn finetune<'a>(
    arch: &dyn Architecture,
    params: &[Tensor],
    data: impl Into<TrainData<'a>>,
    config: &FinetuneConfig,
    on_step: &mut dyn FnMut(&TrainStep),
) -> Result<(Vec<Tensor>, Vec<TrainStep>)> {
    let all = vec![true; params.len()];
    finetune_some(arch, params, &all, data, config, on_step)
}

/// [`finetune`] of the tensors whose `trainable` entry is true; the others stay as they are and
/// are constants of the graph, so no gradient is computed through them (a linear probe trains
/// the head alone at the cost of the frozen part's forward).
pub fn finetune_some<'a>(
    arch: &dyn Architecture,
    params: &[Tensor],
    trainable: &[bool],
    data: impl Into<TrainData<'a>>,
    config: &FinetuneConfig,
    on_step: &mut dyn FnMut(&TrainStep),
) -> Result<(Vec<Tensor>, Vec<TrainStep>)> {
    config.validate()?;
    let data = data.into();
    if trainable.len() != params.len() || !trainable.contains(&true) {
        return Err(ModelError::config(
            "finetune",
            "no tensor to train (the trainable set is empty)",
        ));
    }
    if data.len() == 0 {
        return Err(ModelError::config("finetune", "the training data is empty"));
    }
    if let TrainData::Text(parts) = data {
        let lens: Vec<Option<usize>> = parts
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| p.window_len())
            .collect();
        if lens
            .iter()
            .any(|&t| t.is_none_or(|t| t < 2 || Some(t) != lens[0]))
        {
            return Err(ModelError::config(
                "finetune",
                "windows of at least 2 tokens, all of one length, are needed",
            ));
        }
    }
    let (h, w) = match data {
        TrainData::Images(d) => {
            let (_, h, w) = d.image_shape()?;
            (h, w)
        }
        TrainData::Text(_) => (usize::MAX, usize::MAX),
    };
    if config.augment.crop_padding > h.min(w) {
        return Err(ModelError::config(
            "finetune",
            format!(
                "crop_padding {} is larger than the {h} × {w} images",
                config.augment.crop_padding
            ),
        ));
    }
    let slots: Vec<Option<Var>> = params
        .iter()
        .zip(trainable)
        .map(|(t, &train)| train.then(|| Var::from_tensor(t)).transpose())
        .collect::<candle_core::Result<_>>()?;
    let vars: Vec<Var> = slots.iter().flatten().cloned().collect();
    let tensors: Vec<Tensor> = slots
        .iter()
        .zip(params)
        .map(|(v, t)| {
            v.as_ref()
                .map_or_else(|| t.clone(), |v| v.as_tensor().clone())
        })
        .collect();
    let all_trainable = !trainable.contains(&false);
    let mut optimizer = AdamW::new(
        vars.clone(),
        ParamsAdamW {
            lr: config.lr,
            weight_decay: config.weight_decay,
            ..ParamsAdamW::default()
        },
    )?;
    let schedule = StepSchedule::WarmupCosine {
        warmup_fraction: config.warmup_fraction,
    };
    let per_epoch = data.len().div_ceil(config.batch_size);
    let total = config.epochs * per_epoch;
    let mut history = Vec::with_capacity(total);
    for epoch in 0..config.epochs {
        let order = permutation(data.len(), derive_seed(config.seed, &[3, epoch as u64]));
        let batches: Vec<Vec<u32>> = order
            .chunks(config.batch_size)
            .map(|rows| rows.iter().map(|&r| r as u32).collect())
            .collect();
        for (b, rows) in batches.iter().enumerate() {
            let step = epoch * per_epoch + b;
            let (value, mut grads) = match data {
                TrainData::Images(data) => {
                    // A streamed data set decodes the next batch while this one trains.
                    if let Some(next) = batches.get(b + 1) {
                        data.prefetch(next.clone());
                    }
                    image_step(arch, &tensors, all_trainable, data, rows, (config, step))?
                }
                TrainData::Text(windows) => {
                    text_step(arch, &tensors, all_trainable, windows, rows)?
                }
            };
            if !value.is_finite() {
                return Err(ModelError::config(
                    "finetune",
                    format!("non-finite loss at step {step}: lower the learning rate"),
                ));
            }
            if let Some(max) = config.clip_grad_norm {
                let g: Vec<Tensor> = tensors
                    .iter()
                    .filter_map(|t| grads.get(t).cloned())
                    .collect();
                let norm = soup_core::global_norm(&g)?;
                let coef = max / (norm + 1e-6);
                if coef < 1.0 {
                    for t in &tensors {
                        if let Some(g) = grads.remove(t) {
                            grads.insert(t, g.affine(coef, 0.0)?);
                        }
                    }
                }
            }
            let lr = schedule.lr(config.lr, step, total);
            optimizer.set_learning_rate(lr);
            optimizer.step(&grads)?;
            let record = TrainStep {
                epoch,
                step,
                loss: value,
                lr,
            };
            on_step(&record);
            history.push(record);
        }
    }
    let trained = slots
        .into_iter()
        .zip(params)
        .map(|(v, t)| v.map_or_else(|| t.clone(), |v| v.as_detached_tensor()))
        .collect();
    Ok((trained, history))
}

/// The loss and gradients of one batch of images (augmented, seeded by the step): by the
/// hand-written backward where the family has one and every tensor trains (a linear probe's
/// autograd stops at the head), else by autograd.
fn image_step(
    arch: &dyn Architecture,
    tensors: &[Tensor],
    all_trainable: bool,
    data: &Dataset,
    rows: &[u32],
    (config, step): (&FinetuneConfig, usize),
) -> Result<(f64, GradStore)> {
    let (images, labels) = data.select(rows)?;
    let mut rng = SplitMix64::new(derive_seed(config.seed, &[4, step as u64]));
    let images = augment(&images, &config.augment, &mut rng)?;
    let images = images.to_device(tensors[0].device())?;
    let tape = match all_trainable {
        true => arch.tape(tensors, &images)?,
        false => None,
    };
    match tape {
        Some(tape) => {
            let target = Target::Classes {
                labels: &labels,
                label_smoothing: config.label_smoothing,
            };
            let (value, g) = tape.loss_backward(&target, 1.0)?;
            Ok((value, grad_store(tensors, g)))
        }
        None => {
            let logits = arch.forward(tensors, &images)?;
            let loss = cross_entropy(&logits, &labels, config.label_smoothing)?;
            let value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            Ok((value, loss.backward()?))
        }
    }
}

/// The mean next-token cross-entropy of one batch of windows and its gradients, as
/// [`image_step`] computes them.
fn text_step(
    arch: &dyn Architecture,
    tensors: &[Tensor],
    all_trainable: bool,
    windows: &[&dyn Windows],
    rows: &[u32],
) -> Result<(f64, GradStore)> {
    let flat = read_windows(windows, rows)?;
    let t = flat.len() / rows.len().max(1);
    let tokens = Tensor::from_vec(flat.clone(), (rows.len(), t), tensors[0].device())?;
    let tape = match all_trainable {
        true => arch.tape(tensors, &tokens)?,
        false => None,
    };
    match tape {
        Some(tape) => {
            let target = Target::NextTokens {
                tokens: &flat,
                mask: None,
            };
            let (value, g) = tape.loss_backward(&target, 1.0)?;
            Ok((value, grad_store(tensors, g)))
        }
        None => {
            let logits = arch.forward(tensors, &tokens)?;
            let (n, _, v) = logits.dims3()?;
            let shifted = logits.narrow(1, 0, t - 1)?.reshape((n * (t - 1), v))?;
            let labels: Vec<u32> = flat
                .chunks(t)
                .flat_map(|w| w[1..].iter().copied())
                .collect();
            let loss = cross_entropy(&shifted, &labels, 0.0)?;
            let value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            Ok((value, loss.backward()?))
        }
    }
}

/// Gradients in layout order as the optimizer's store.
fn grad_store(tensors: &[Tensor], grads: Vec<Tensor>) -> GradStore {
    let mut store = GradStore::default();
    for (t, g) in tensors.iter().zip(grads) {
        store.insert(t, g);
    }
    store
}

/// Applies `augment` to a batch (n × c × h × w), drawing from `rng`.
pub fn augment(images: &Tensor, augment: &Augment, rng: &mut SplitMix64) -> Result<Tensor> {
    let (n, _, h, w) = images.dims4()?;
    let mut x = images.clone();
    if augment.crop_padding > 0 || augment.horizontal_flip {
        let p = augment.crop_padding;
        let padded = x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?;
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let (dy, dx) = (rng.below(2 * p + 1), rng.below(2 * p + 1));
            let mut img = padded
                .narrow(0, i, 1)?
                .narrow(2, dy, h)?
                .narrow(3, dx, w)?
                .contiguous()?;
            if augment.horizontal_flip && rng.next_u64() & 1 == 1 {
                img = img.flip(&[3])?;
            }
            out.push(img);
        }
        x = Tensor::cat(&out, 0)?;
    }
    if augment.noise_std > 0.0 {
        let noise: Vec<f32> = rng
            .normals(x.elem_count())
            .into_iter()
            .map(|v| v as f32 * augment.noise_std)
            .collect();
        let noise = Tensor::from_vec(noise, x.shape(), &Device::Cpu)?.to_device(x.device())?;
        x = (x + noise.to_dtype(images.dtype())?)?;
    }
    Ok(x)
}
