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

use super::tape::encoder;
use super::vit::{self, LayerNames, Normalisation, VitClassifier, VitFamily, VitNames, VitSizes};
use super::{filled, normal, parse_config, Architecture, Params};
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
    #[serde(default = "vit::default_channels")]
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub projection_dim: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    pub num_classes: usize,
    /// CLIP's by default.
    #[serde(flatten)]
    pub normalisation: Normalisation,
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
            normalisation: Normalisation::default(),
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
}

/// A CLIP ViT image classifier.
pub type ClipClassifier = VitClassifier<ClipVitConfig>;

impl ClipClassifier {
    /// A preset of [`REGISTRY`](super::REGISTRY) with a head for `{"num_classes": K}`.
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
        let (p, hidden) = self.encode(params, images)?;
        self.config.head_features(&p, &hidden)
    }
}

/// The layers' tensors under `vision_model.encoder.layers.{i}`, in [`LayerNames::new`]'s order.
const LAYER: [&str; 8] = [
    "layer_norm1",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "layer_norm2",
    "mlp.fc1",
    "mlp.fc2",
];

impl VitFamily for ClipVitConfig {
    const FAMILY: &'static str = FAMILY;

    fn validate(&self) -> Result<()> {
        let sizes = (&self.sizes(), self.hidden_act.as_str());
        let named = [("projection_dim", self.projection_dim)];
        vit::validate(FAMILY, sizes, &named, &self.normalisation)
    }

    fn sizes(&self) -> VitSizes {
        VitSizes {
            channels: self.num_channels,
            image_size: self.image_size,
            patch_size: self.patch_size,
            width: self.hidden_size,
            mlp_width: self.intermediate_size,
            layers: self.num_hidden_layers,
            heads: self.num_attention_heads,
            classes: self.num_classes,
            eps: self.layer_norm_eps,
            activation: encoder::Activation::QuickGelu,
        }
    }

    fn names(&self) -> VitNames {
        let emb = "vision_model.embeddings";
        let layer = |i| LayerNames::new(&format!("vision_model.encoder.layers.{i}"), LAYER, None);
        VitNames {
            patch: (format!("{emb}.patch_embedding.weight"), None),
            first: format!("{emb}.class_embedding"),
            position: format!("{emb}.position_embedding.weight"),
            pre_norm: Some("vision_model.pre_layrnorm".into()),
            layers: (0..self.num_hidden_layers).map(layer).collect(),
        }
    }

    fn layout(&self) -> ParamLayout {
        clip_layout(self)
    }

    /// transformers' `CLIPVisionModelWithProjection`, so that it reads the vision tower.
    fn hf_config(&self, mut config: serde_json::Value) -> serde_json::Value {
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

    fn normalisation(&self) -> (&Normalisation, ([f32; 3], [f32; 3])) {
        (&self.normalisation, (CLIP_MEAN, CLIP_STD))
    }

    /// The class token after the last LayerNorm, projected: `image_embeds`.
    fn head_features(&self, p: &Params, hidden: &Tensor) -> Result<Tensor> {
        let pooled = layer_norm(
            &hidden.narrow(1, 0, 1)?.squeeze(1)?,
            p.get("vision_model.post_layernorm.weight"),
            p.get("vision_model.post_layernorm.bias"),
            self.layer_norm_eps,
        )?;
        Ok(linear(&pooled, p.get("visual_projection.weight"), None)?)
    }

    /// The head on the L2-normalised features.
    fn head_logits(&self, p: &Params, features: &Tensor) -> Result<Tensor> {
        let norm = features.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
        let features = features.broadcast_div(&norm)?;
        Ok(linear(
            &features,
            p.get("classification_head.weight"),
            Some(p.get("classification_head.bias")),
        )?)
    }

    fn init(&self, layout: &ParamLayout, seed: u64, device: &Device) -> Result<Vec<Tensor>> {
        let mut rng = SplitMix64::new(seed);
        let e = self.hidden_size as f64;
        layout
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
            Dim::Positions => c.sizes().tokens(),
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
