//! `clip-vit`: the CLIP vision tower → visual projection → L2-normalised features → linear head,
//! as model-soups builds its classifiers, with Hugging Face tensor names. Every operation is
//! differentiable (candle's stock CLIP is inference-only: docs/STACK.md).

use std::sync::Arc;

use candle_core::{Device, Tensor, D};
use candle_transformers::models::clip::text_model::Activation;
use candle_transformers::models::clip::vision_model::ClipVisionConfig;
use serde::{Deserialize, Serialize};
use soup_core::rng::SplitMix64;
use soup_core::{ParamLayout, TensorSpec};

use super::tape::{encoder, Tape};
use super::vit::{self, LayerNames, Vit, VitSizes};
use super::{filled, index_of, normal, parse_config, Architecture, InputSpec};
use crate::error::{ModelError, Result};
use crate::ops::{layer_norm, linear};

mod head;

const FAMILY: &str = "clip-vit";

/// CLIP's pixel normalisation (RGB).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// The vision configuration, with the keys of Hugging Face's `vision_config`, plus the
/// projection width and the number of classes of the head.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClipVitConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub projection_dim: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    pub num_classes: usize,
    /// Per-channel pixel mean and standard deviation (CLIP's by default; one entry per channel).
    #[serde(default)]
    pub image_mean: Option<Vec<f32>>,
    #[serde(default)]
    pub image_std: Option<Vec<f32>>,
}

fn default_channels() -> usize {
    3
}
fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "quick_gelu".to_string()
}

/// transformers' `CLIPVisionConfig` defaults (ViT-B/32's values) for the keys soup reads, which
/// a `config.json` may leave out.
pub fn hf_vision_defaults() -> [(&'static str, serde_json::Value); 9] {
    [
        ("hidden_size", serde_json::json!(768)),
        ("intermediate_size", serde_json::json!(3072)),
        ("num_hidden_layers", serde_json::json!(12)),
        ("num_attention_heads", serde_json::json!(12)),
        ("num_channels", serde_json::json!(3)),
        ("image_size", serde_json::json!(224)),
        ("patch_size", serde_json::json!(32)),
        ("layer_norm_eps", serde_json::json!(1e-5)),
        ("hidden_act", serde_json::json!("quick_gelu")),
    ]
}

/// The Hugging Face CLIP vision towers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    B32,
    B16,
    L14,
}

impl ClipVitConfig {
    /// A preset at 224 px with a head for `num_classes` classes.
    pub fn preset(preset: Preset, num_classes: usize) -> Self {
        let b32 = ClipVisionConfig::vit_base_patch32();
        let base = Self {
            hidden_size: b32.embed_dim,
            intermediate_size: b32.intermediate_size,
            num_hidden_layers: b32.num_hidden_layers,
            num_attention_heads: b32.num_attention_heads,
            num_channels: b32.num_channels,
            image_size: b32.image_size,
            patch_size: b32.patch_size,
            projection_dim: b32.projection_dim,
            layer_norm_eps: 1e-5,
            hidden_act: default_act(),
            num_classes,
            image_mean: None,
            image_std: None,
        };
        match preset {
            Preset::B32 => base,
            Preset::B16 => Self {
                patch_size: 16,
                ..base
            },
            Preset::L14 => Self {
                hidden_size: 1024,
                intermediate_size: 4096,
                num_hidden_layers: 24,
                num_attention_heads: 16,
                patch_size: 14,
                projection_dim: 768,
                ..base
            },
        }
    }

    /// Reads a Hugging Face `config.json` with transformers' own precedence and defaults.
    /// `CLIPConfig` (`model_type` "clip", a `vision_config` inside): the vision keys from
    /// `vision_config`, the projection width from the top-level `projection_dim` (what `CLIPModel`
    /// builds `visual_projection` with; `vision_config.projection_dim` is ignored, as transformers
    /// ignores it). `CLIPVisionConfig` (`clip_vision_model`): every key at the top level. A key
    /// absent from the file takes `CLIPVisionConfig`'s default (ViT-B/32's values).
    pub fn from_hf_json(json: &serde_json::Value, num_classes: usize) -> Result<Self> {
        let bad = || ModelError::config("clip-vit", "config.json is not an object");
        let top = json.as_object().ok_or_else(bad)?;
        let vision = match top.get("vision_config") {
            Some(v) => v.as_object().ok_or_else(bad)?,
            None => top,
        };
        let mut v = serde_json::Map::new();
        for (key, default) in hf_vision_defaults() {
            v.insert(key.into(), vision.get(key).cloned().unwrap_or(default));
        }
        // Both config classes read `projection_dim` at their own top level.
        let projection = top.get("projection_dim").cloned();
        v.insert(
            "projection_dim".into(),
            projection.unwrap_or(serde_json::json!(512)),
        );
        v.insert("num_classes".into(), num_classes.into());
        parse_config("clip-vit", &serde_json::Value::Object(v))
    }

    /// The same configuration as candle-transformers' type (used by its stock CLIP).
    pub fn vision_config(&self) -> ClipVisionConfig {
        ClipVisionConfig {
            embed_dim: self.hidden_size,
            activation: Activation::QuickGelu,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            projection_dim: self.projection_dim,
            num_channels: self.num_channels,
            image_size: self.image_size,
            patch_size: self.patch_size,
        }
    }

    /// The encoder's sizes.
    fn sizes(&self) -> VitSizes {
        VitSizes {
            channels: self.num_channels,
            image_size: self.image_size,
            patch_size: self.patch_size,
            width: self.hidden_size,
            mlp_width: self.intermediate_size,
            heads: self.num_attention_heads,
            eps: self.layer_norm_eps,
            activation: encoder::Activation::QuickGelu,
        }
    }

    fn validate(&self) -> Result<()> {
        let err = |d: &str| Err(ModelError::config(FAMILY, d));
        if self.hidden_act != "quick_gelu" {
            return err("only hidden_act = quick_gelu is supported");
        }
        if self.hidden_size == 0 || self.intermediate_size == 0 || self.num_hidden_layers == 0 {
            return err("hidden_size, intermediate_size and num_hidden_layers must be positive");
        }
        // Sizes a real model never reaches, which would only overflow the arithmetic below.
        if [
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
            self.image_size,
            self.num_classes,
            self.projection_dim,
            self.num_channels,
        ]
        .iter()
        .any(|&v| v > 1 << 20)
        {
            return err("a size is beyond 2^20: not a real model");
        }
        if self.num_classes == 0 || self.num_channels == 0 || self.projection_dim == 0 {
            return err("num_classes, num_channels and projection_dim must be positive");
        }
        let given = (&self.image_mean, &self.image_std);
        vit::validate(FAMILY, &self.sizes(), self.layer_norm_eps, given)
    }

    fn num_positions(&self) -> usize {
        (self.image_size / self.patch_size).pow(2) + 1
    }
}

/// A CLIP ViT image classifier.
#[derive(Debug)]
pub struct ClipClassifier {
    pub config: ClipVitConfig,
    vit: Vit,
}

impl ClipClassifier {
    pub fn new(config: ClipVitConfig) -> Result<Self> {
        config.validate()?;
        let layout = clip_layout(&config);
        let layer = [
            "layer_norm1",
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.out_proj",
            "layer_norm2",
            "mlp.fc1",
            "mlp.fc2",
        ];
        let emb = "vision_model.embeddings";
        let vit = Vit {
            family: FAMILY,
            sizes: config.sizes(),
            patch: (format!("{emb}.patch_embedding.weight"), None),
            first: format!("{emb}.class_embedding"),
            position: format!("{emb}.position_embedding.weight"),
            pre_norm: Some("vision_model.pre_layrnorm".into()),
            layers: (0..config.num_hidden_layers)
                .map(|i| LayerNames::new(&format!("vision_model.encoder.layers.{i}"), layer, None))
                .collect(),
            index: index_of(&layout),
            layout,
        };
        Ok(Self { config, vit })
    }

    pub fn from_config(config: &serde_json::Value) -> Result<Arc<dyn Architecture>> {
        Ok(Arc::new(Self::new(parse_config(FAMILY, config)?)?))
    }

    pub fn preset(preset: Preset, config: &serde_json::Value) -> Result<Arc<dyn Architecture>> {
        #[derive(Deserialize)]
        struct Classes {
            num_classes: usize,
        }
        let Classes { num_classes } = parse_config(FAMILY, config)?;
        Ok(Arc::new(Self::new(ClipVitConfig::preset(
            preset,
            num_classes,
        ))?))
    }

    /// The pooled, projected image features before normalisation (n × projection_dim):
    /// `CLIPModel.get_image_features`.
    pub fn image_features(&self, params: &[Tensor], images: &Tensor) -> Result<Tensor> {
        let p = self.vit.params(params)?;
        let hidden = self.vit.hidden_states(&p, images, params[0].dtype())?;
        let pooled = layer_norm(
            &hidden.narrow(1, 0, 1)?.squeeze(1)?,
            p.get("vision_model.post_layernorm.weight"),
            p.get("vision_model.post_layernorm.bias"),
            self.config.layer_norm_eps,
        )?;
        Ok(linear(&pooled, p.get("visual_projection.weight"), None)?)
    }
}

impl Architecture for ClipClassifier {
    fn family(&self) -> &'static str {
        FAMILY
    }

    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).expect("ClipVitConfig serialises")
    }

    /// transformers' `CLIPVisionModelWithProjection`, so that it reads the vision tower.
    fn hf_config(&self) -> serde_json::Value {
        let mut config = self.config();
        let obj = config
            .as_object_mut()
            .expect("a struct serialises to an object");
        obj.insert(
            "architectures".into(),
            serde_json::json!(["CLIPVisionModelWithProjection"]),
        );
        obj.insert("model_type".into(), "clip_vision_model".into());
        config
    }

    fn layout(&self) -> &ParamLayout {
        &self.vit.layout
    }

    fn input(&self) -> InputSpec {
        let given = (&self.config.image_mean, &self.config.image_std);
        InputSpec::Images(self.vit.image_spec(given, (CLIP_MEAN, CLIP_STD)))
    }

    fn num_classes(&self) -> usize {
        self.config.num_classes
    }

    fn forward(&self, params: &[Tensor], images: &Tensor) -> Result<Tensor> {
        let features = self.image_features(params, images)?;
        let norm = features.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
        let features = features.broadcast_div(&norm)?;
        let p = self.vit.params(params)?;
        Ok(linear(
            &features,
            p.get("classification_head.weight"),
            Some(p.get("classification_head.bias")),
        )?)
    }

    fn zero_gradient_tensors(&self) -> Vec<String> {
        self.vit.key_biases()
    }

    fn features(&self, params: &[Tensor], images: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.image_features(params, images)?))
    }

    fn tape(&self, params: &[Tensor], images: &Tensor) -> Result<Option<Box<dyn Tape>>> {
        vit::tape(self, params, images)
    }

    fn init(&self, seed: u64, device: &Device) -> Result<Vec<Tensor>> {
        let mut rng = SplitMix64::new(seed);
        let e = self.config.hidden_size as f64;
        self.vit
            .layout
            .tensors
            .iter()
            .map(|t| {
                let name = t.name.as_str();
                if name.ends_with("class_embedding") {
                    normal(&mut rng, &t.shape, e.powf(-0.5), device)
                } else if name.contains("layer_norm") || name.contains("layrnorm") {
                    let one = if name.ends_with("weight") { 1.0 } else { 0.0 };
                    filled(&t.shape, one, device)
                } else if name.ends_with("bias") {
                    filled(&t.shape, 0.0, device)
                } else if name == "classification_head.weight" {
                    // Features are unit vectors, so the head's row norms bound the logits: start
                    // them near 10 (CLIP's zero-shot heads carry its logit scale, 100), or the
                    // softmax starts flat and training crawls.
                    normal(
                        &mut rng,
                        &t.shape,
                        10.0 / (t.shape[1] as f64).sqrt(),
                        device,
                    )
                } else if name.ends_with("position_embedding.weight") {
                    normal(&mut rng, &t.shape, 0.02, device)
                } else {
                    let fan_in: usize = t.shape[1..].iter().product();
                    normal(&mut rng, &t.shape, (fan_in as f64).powf(-0.5), device)
                }
            })
            .collect()
    }
}

/// The tensors of a CLIP classifier in the order of the Hugging Face state dict.
fn clip_layout(c: &ClipVitConfig) -> ParamLayout {
    ParamLayout::new(
        clip_tensors(c.num_hidden_layers, "")
            .into_iter()
            .map(|t| TensorSpec {
                shape: t.shape(c),
                name: t.hf,
            })
            .collect(),
    )
}

/// Where a Hugging Face tensor comes from in OpenAI's layout of the visual tower (model-soups'
/// and the MEHL-Soup authors' `.pt` checkpoints).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The tensor of that name, as is.
    Same(String),
    /// Rows `part`·n..(`part`+1)·n of a tensor stacked from `parts` equal pieces along dim 0
    /// (`in_proj_weight` holds q, k, v).
    Rows {
        name: String,
        part: usize,
        parts: usize,
    },
    /// The transpose of a matrix (OpenAI's `proj` is x @ proj; HF's projection is x Wᵀ).
    Transposed(String),
}

/// A dimension of a CLIP tensor, named by the configuration value it is.
#[derive(Clone, Copy, Debug)]
enum Dim {
    Width,
    Mlp,
    Channels,
    Patch,
    Positions,
    Projection,
    Classes,
}

impl Dim {
    fn of(self, c: &ClipVitConfig) -> usize {
        match self {
            Dim::Width => c.hidden_size,
            Dim::Mlp => c.intermediate_size,
            Dim::Channels => c.num_channels,
            Dim::Patch => c.patch_size,
            Dim::Positions => c.num_positions(),
            Dim::Projection => c.projection_dim,
            Dim::Classes => c.num_classes,
        }
    }
}

/// One tensor of the CLIP classifier: its Hugging Face name, its shape, and where OpenAI's
/// layout keeps it.
#[derive(Clone, Debug)]
pub struct ClipTensor {
    pub hf: String,
    dims: Vec<Dim>,
    pub openai: Origin,
}

impl ClipTensor {
    /// The shape for configuration `c`.
    pub fn shape(&self, c: &ClipVitConfig) -> Vec<usize> {
        self.dims.iter().map(|d| d.of(c)).collect()
    }
}

/// The one table of CLIP's tensor names: every tensor of a classifier of `layers` blocks in the
/// model's order (its `ParamLayout`), with its shape and its OpenAI origin under the visual
/// tower's `prefix` (`model.visual.`, `visual.`). The model, the `.pt` reader and the `.pt`
/// writer of the tests all read it.
pub fn clip_tensors(layers: usize, prefix: &str) -> Vec<ClipTensor> {
    use Dim::*;
    let v = |s: &str| format!("{prefix}{s}");
    let mut t = Vec::new();
    let mut add = |hf: String, dims: &[Dim], openai: Origin| {
        t.push(ClipTensor {
            hf,
            dims: dims.to_vec(),
            openai,
        })
    };
    let same = Origin::Same;
    let emb = "vision_model.embeddings";
    add(
        format!("{emb}.class_embedding"),
        &[Width],
        same(v("class_embedding")),
    );
    add(
        format!("{emb}.patch_embedding.weight"),
        &[Width, Channels, Patch, Patch],
        same(v("conv1.weight")),
    );
    add(
        format!("{emb}.position_embedding.weight"),
        &[Positions, Width],
        same(v("positional_embedding")),
    );
    for wb in ["weight", "bias"] {
        add(
            format!("vision_model.pre_layrnorm.{wb}"),
            &[Width],
            same(v(&format!("ln_pre.{wb}"))),
        );
    }
    for i in 0..layers {
        let l = format!("vision_model.encoder.layers.{i}");
        let oa = v(&format!("transformer.resblocks.{i}"));
        for proj in ["k_proj", "v_proj", "q_proj", "out_proj"] {
            for (wb, dims) in [("weight", &[Width, Width][..]), ("bias", &[Width][..])] {
                let openai = match ["q_proj", "k_proj", "v_proj"]
                    .iter()
                    .position(|&p| p == proj)
                {
                    Some(part) => Origin::Rows {
                        name: format!("{oa}.attn.in_proj_{wb}"),
                        part,
                        parts: 3,
                    },
                    None => same(format!("{oa}.attn.out_proj.{wb}")),
                };
                add(format!("{l}.self_attn.{proj}.{wb}"), dims, openai);
            }
        }
        let blocks: [(&str, &str, &[Dim], &[Dim]); 4] = [
            ("layer_norm1", "ln_1", &[Width], &[Width]),
            ("mlp.fc1", "mlp.c_fc", &[Mlp, Width], &[Mlp]),
            ("mlp.fc2", "mlp.c_proj", &[Width, Mlp], &[Width]),
            ("layer_norm2", "ln_2", &[Width], &[Width]),
        ];
        for (hf, openai, weight, bias) in blocks {
            add(
                format!("{l}.{hf}.weight"),
                weight,
                same(format!("{oa}.{openai}.weight")),
            );
            add(
                format!("{l}.{hf}.bias"),
                bias,
                same(format!("{oa}.{openai}.bias")),
            );
        }
    }
    for wb in ["weight", "bias"] {
        add(
            format!("vision_model.post_layernorm.{wb}"),
            &[Width],
            same(v(&format!("ln_post.{wb}"))),
        );
    }
    add(
        "visual_projection.weight".into(),
        &[Projection, Width],
        Origin::Transposed(v("proj")),
    );
    add(
        "classification_head.weight".into(),
        &[Classes, Projection],
        same("classification_head.weight".into()),
    );
    add(
        "classification_head.bias".into(),
        &[Classes],
        same("classification_head.bias".into()),
    );
    t
}

#[cfg(test)]
mod table_tests {
    use super::*;

    #[test]
    fn the_table_gives_vit_b32_its_published_size() {
        // OpenAI's ViT-B/32 image encoder (projection included) has 87,849,216 parameters;
        // the head adds 512 × 10 + 10.
        let c = ClipVitConfig::preset(Preset::B32, 10);
        assert_eq!(clip_layout(&c).numel(), 87_849_216 + 5_130);
        let names = clip_tensors(12, "visual.");
        assert_eq!(names.len(), 3 + 2 + 12 * 16 + 2 + 1 + 2);
        let fused = names
            .iter()
            .filter(|t| matches!(&t.openai, Origin::Rows { name, .. } if name.ends_with("in_proj_weight")))
            .count();
        assert_eq!(fused, 12 * 3);
    }
}
