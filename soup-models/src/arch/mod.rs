//! Architecture plugins: a model family is a file (or a folder) here plus a line in
//! [`REGISTRY`]. A family describes its tensors ([`Architecture::layout`]), what it reads
//! ([`InputSpec`]: images or tokens), its forward pass as candle ops, and optionally a
//! hand-written pass on slices ([`tape`]) that computes its loss ([`tape::Target`]) and every
//! gradient in one go. The transformer layers the families share live in [`tape`] (on slices)
//! and `vit` (the ViT encoder of CLIP and DINOv2, both ways).

pub mod clip;
pub mod dinov2;
pub mod labels;
pub mod llama;
pub mod mlp;
pub mod tape;
pub(crate) mod vit;

pub use vit::Normalisation;

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use soup_core::rng::SplitMix64;
use soup_core::ParamLayout;

use crate::error::{ModelError, Result};

/// What a model reads.
#[derive(Clone, Debug, PartialEq)]
pub enum InputSpec {
    /// Images, n × channels × height × width (f32, normalised).
    Images(ImageSpec),
    /// Token ids, n × sequence (u32).
    Tokens(TokenSpec),
}

/// How token sequences must be for a model.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenSpec {
    /// Ids run from 0 to `vocab_size` − 1.
    pub vocab_size: usize,
    /// The longest sequence the model's positions cover.
    pub max_positions: usize,
}

/// How images must be prepared for a model: shape and per-channel normalisation.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageSpec {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// Per-channel mean subtracted from pixels in [0, 1].
    pub mean: Vec<f32>,
    /// Per-channel standard deviation the centred pixels are divided by.
    pub std: Vec<f32>,
}

/// A model whose parameters are an ordered list of named tensors: an image classifier, or a
/// model of token sequences.
pub trait Architecture: std::fmt::Debug + Send + Sync {
    /// The registry name of the family (`clip-vit`, `mlp`).
    fn family(&self) -> &'static str;
    /// The family's configuration; `build(family(), &config())` rebuilds this architecture.
    fn config(&self) -> serde_json::Value;
    /// The `config.json` a Hugging Face library reads this model with (what soup writes beside
    /// its `model.safetensors`); by default the family's own configuration.
    fn hf_config(&self) -> serde_json::Value {
        self.config()
    }
    /// Parameter names and shapes, in the order `forward` takes them.
    fn layout(&self) -> &ParamLayout;
    /// What the model reads.
    fn input(&self) -> InputSpec;
    /// How images must be prepared for the model; an error naming the family when it reads
    /// something else.
    fn image_input(&self) -> Result<ImageSpec> {
        match self.input() {
            InputSpec::Images(spec) => Ok(spec),
            InputSpec::Tokens(_) => Err(ModelError::config(
                self.family(),
                "the model reads token sequences, not images",
            )),
        }
    }
    /// The logits' last dimension: the classes of a classifier, the vocabulary of a model of
    /// token sequences.
    fn num_classes(&self) -> usize;
    /// The name of each class of a classifier's head, in its order, where the model has them
    /// ([`labels::with_class_names`]).
    fn class_names(&self) -> Option<&[String]> {
        None
    }
    /// Logits of `inputs`, differentiable with respect to every parameter: n × classes for
    /// normalised images (n × channels × height × width); n × sequence × vocabulary for tokens
    /// (n × sequence).
    fn forward(&self, params: &[Tensor], inputs: &Tensor) -> Result<Tensor>;
    /// Per-example features the head reads (n × width), for export; `None` where the
    /// architecture has no such layer to offer. CLIP: the projected image features before
    /// normalisation (transformers' `image_embeds`).
    fn features(&self, _params: &[Tensor], _images: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// Tensors whose loss gradient is identically zero for every input (the soup methods keep
    /// their coefficients fixed: `soup_core::MehlConfig::frozen_tensors`).
    fn zero_gradient_tensors(&self) -> Vec<String> {
        Vec::new()
    }
    /// The classification head's tensors: what a multi-task merge keeps per task instead of
    /// merging (spec §3.9). By default the two tensors of the layout's last layer.
    fn head_tensors(&self) -> Vec<String> {
        let t = &self.layout().tensors;
        t[t.len().saturating_sub(2)..]
            .iter()
            .map(|t| t.name.clone())
            .collect()
    }
    /// A seeded random initialisation (f32), for training from scratch.
    fn init(&self, seed: u64, device: &Device) -> Result<Vec<Tensor>>;

    /// A forward pass of `inputs` kept for this family's hand-written backward (`arch/tape`),
    /// which computes the loss and every gradient ([`tape::Tape::loss_backward`]), or `None`
    /// where there is none for these tensors (another family, a GPU, another dtype): then
    /// autograd through [`Self::forward`] is the way.
    fn tape(&self, _params: &[Tensor], _inputs: &Tensor) -> Result<Option<Box<dyn tape::Tape>>> {
        Ok(None)
    }
}

type Constructor = fn(&serde_json::Value) -> Result<Arc<dyn Architecture>>;

/// Every architecture by name. Presets take `{"num_classes": K}`; families take their config.
pub const REGISTRY: &[(&str, Constructor)] = &[
    ("clip-vit-b32", |c| {
        clip::ClipClassifier::preset(clip::Preset::B32, c)
    }),
    ("clip-vit-b16", |c| {
        clip::ClipClassifier::preset(clip::Preset::B16, c)
    }),
    ("clip-vit-l14", |c| {
        clip::ClipClassifier::preset(clip::Preset::L14, c)
    }),
    ("clip-vit", clip::ClipClassifier::from_config),
    ("dinov2-vit", dinov2::Dinov2Classifier::from_config),
    ("llama", llama::Llama::from_config),
    ("mlp", mlp::Mlp::from_config),
];

/// The architecture `name` with configuration `config`.
pub fn build(name: &str, config: &serde_json::Value) -> Result<Arc<dyn Architecture>> {
    if let Some(names) = config.get(labels::CLASS_NAMES_KEY) {
        let names: Vec<String> = serde_json::from_value(names.clone())
            .map_err(|e| ModelError::config(name, format!("{}: {e}", labels::CLASS_NAMES_KEY)))?;
        let mut rest = config.clone();
        if let Some(obj) = rest.as_object_mut() {
            obj.remove(labels::CLASS_NAMES_KEY);
        }
        return labels::with_class_names(build(name, &rest)?, Some(names));
    }
    match REGISTRY.iter().find(|(n, _)| *n == name) {
        Some((_, make)) => make(config),
        None => Err(ModelError::UnknownArchitecture {
            name: name.to_string(),
            known: REGISTRY
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// Named access to the parameters handed to `forward`, checked against the layout.
pub(crate) struct Params<'a> {
    index: &'a HashMap<String, usize>,
    tensors: &'a [Tensor],
}

impl<'a> Params<'a> {
    pub fn new(
        family: &str,
        layout: &ParamLayout,
        index: &'a HashMap<String, usize>,
        tensors: &'a [Tensor],
    ) -> Result<Self> {
        if tensors.len() != layout.len() {
            return Err(ModelError::config(
                family,
                format!(
                    "forward got {} tensors, the layout has {}",
                    tensors.len(),
                    layout.len()
                ),
            ));
        }
        Ok(Self { index, tensors })
    }

    pub fn get(&self, name: &str) -> &'a Tensor {
        &self.tensors[self.index[name]]
    }
}

/// Name → position in the layout.
pub(crate) fn index_of(layout: &ParamLayout) -> HashMap<String, usize> {
    layout
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect()
}

/// Reads field `key` of a JSON config as `T`, with an error naming the architecture.
pub(crate) fn parse_config<T: serde::de::DeserializeOwned>(
    arch: &str,
    config: &serde_json::Value,
) -> Result<T> {
    serde_json::from_value(config.clone()).map_err(|e| ModelError::config(arch, e))
}

/// A seeded tensor of normal samples with standard deviation `std`, f32.
pub(crate) fn normal(
    rng: &mut SplitMix64,
    shape: &[usize],
    std: f64,
    device: &Device,
) -> Result<Tensor> {
    let n = shape.iter().product();
    let v: Vec<f32> = rng
        .normals(n)
        .into_iter()
        .map(|x| (x * std) as f32)
        .collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

/// A constant f32 tensor.
pub(crate) fn filled(shape: &[usize], value: f64, device: &Device) -> Result<Tensor> {
    Ok((Tensor::ones(shape, DType::F32, device)? * value)?)
}
