//! DINOv2 ViT image classifiers (`dinov2-vit`) with Hugging Face's names and configuration, so
//! that a `Dinov2ForImageClassification` saved by transformers loads as it is and what soup
//! writes loads back into transformers.
//!
//! The model (transformers' `Dinov2Model` + `Dinov2ForImageClassification`): a patch embedding
//! (a stride-p convolution with bias), a CLS token and learned position embeddings at the
//! model's `image_size` (no interpolation at run time: `soup import` resamples them once), then
//! pre-norm blocks x += γ₁ ⊙ attn(LN₁(x)), x += γ₂ ⊙ MLP(LN₂(x)) with LayerScale vectors γ and
//! the exact GELU, a final LayerNorm, and the head `classifier` on [CLS ‖ mean of the patch
//! tokens]. The mask token of self-supervised pre-training is not part of the classifier
//! (`use_mask_token: false` in the config soup writes; a checkpoint's `mask_token` is ignored).

use std::sync::Arc;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use soup_core::rng::SplitMix64;
use soup_core::{ParamLayout, TensorSpec};

use super::tape::{encoder, Tape};
use super::vit::{self, LayerNames, Vit, VitSizes};
use super::{filled, index_of, normal, parse_config, Architecture, InputSpec};
use crate::error::{ModelError, Result};
use crate::ops::{layer_norm, linear};

mod head;

/// ImageNet's per-channel mean and standard deviation (DINOv2's preprocessing).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

const FAMILY: &str = "dinov2-vit";

/// The configuration, with the keys of Hugging Face's `Dinov2Config`, plus the number of classes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Dinov2Config {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: usize,
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    pub num_classes: usize,
    /// Per-channel pixel mean and standard deviation (ImageNet's by default).
    #[serde(default)]
    pub image_mean: Option<Vec<f32>>,
    #[serde(default)]
    pub image_std: Option<Vec<f32>>,
}

fn default_mlp_ratio() -> usize {
    4
}
fn default_channels() -> usize {
    3
}
fn default_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "gelu".to_string()
}

/// transformers' `Dinov2Config` defaults for the keys soup reads, which a `config.json` may
/// leave out.
pub fn hf_defaults() -> [(&'static str, serde_json::Value); 9] {
    use serde_json::json;
    [
        ("hidden_size", json!(768)),
        ("num_hidden_layers", json!(12)),
        ("num_attention_heads", json!(12)),
        ("mlp_ratio", json!(4)),
        ("num_channels", json!(3)),
        ("image_size", json!(224)),
        ("patch_size", json!(14)),
        ("layer_norm_eps", json!(1e-6)),
        ("hidden_act", json!("gelu")),
    ]
}

impl Dinov2Config {
    /// DINOv2-S/14 (facebook/dinov2-small: 12 layers, width 384, 6 heads) at `image_size`.
    pub fn small(image_size: usize, num_classes: usize) -> Self {
        Self {
            hidden_size: 384,
            num_hidden_layers: 12,
            num_attention_heads: 6,
            mlp_ratio: 4,
            num_channels: 3,
            image_size,
            patch_size: 14,
            layer_norm_eps: 1e-6,
            hidden_act: default_act(),
            num_classes,
            image_mean: None,
            image_std: None,
        }
    }

    /// Reads a Hugging Face `Dinov2Config` (`config.json`), absent keys taking transformers'
    /// defaults. Variants soup does not implement are refused, not misread: SwiGLU MLPs, no q/k/v
    /// bias, an activation other than the exact GELU, a non-square image size.
    pub fn from_hf_json(json: &serde_json::Value, num_classes: usize) -> Result<Self> {
        let err = |d: String| ModelError::config(FAMILY, d);
        let top = json
            .as_object()
            .ok_or_else(|| err("config.json is not an object".into()))?;
        let flag =
            |key: &str, default: bool| top.get(key).and_then(|v| v.as_bool()).unwrap_or(default);
        if flag("use_swiglu_ffn", false) {
            return Err(err(
                "use_swiglu_ffn = true (DINOv2-g) is not supported".into()
            ));
        }
        if !flag("qkv_bias", true) {
            return Err(err("qkv_bias = false is not supported".into()));
        }
        let mut v = serde_json::Map::new();
        for (key, default) in hf_defaults() {
            v.insert(key.into(), top.get(key).cloned().unwrap_or(default));
        }
        v.insert("num_classes".into(), num_classes.into());
        let config: Self = parse_config(FAMILY, &serde_json::Value::Object(v))?;
        config.validate()?;
        Ok(config)
    }

    /// The encoder's sizes.
    fn sizes(&self) -> VitSizes {
        VitSizes {
            channels: self.num_channels,
            image_size: self.image_size,
            patch_size: self.patch_size,
            width: self.hidden_size,
            mlp_width: self.hidden_size * self.mlp_ratio,
            heads: self.num_attention_heads,
            eps: self.layer_norm_eps,
            activation: encoder::Activation::Gelu,
        }
    }

    fn validate(&self) -> Result<()> {
        let err = |d: &str| Err(ModelError::config(FAMILY, d));
        if self.hidden_act != "gelu" {
            return err("only hidden_act = gelu (the exact GELU) is supported");
        }
        if [
            self.hidden_size,
            self.num_hidden_layers,
            self.mlp_ratio,
            self.num_classes,
            self.num_channels,
        ]
        .contains(&0)
        {
            return err("hidden_size, num_hidden_layers, mlp_ratio, num_classes and num_channels must be positive");
        }
        if [
            self.hidden_size * self.mlp_ratio,
            self.num_hidden_layers,
            self.image_size,
            self.num_classes,
            self.num_channels,
        ]
        .iter()
        .any(|&v| v > 1 << 20)
        {
            return err("a size is beyond 2^20: not a real model");
        }
        let given = (&self.image_mean, &self.image_std);
        vit::validate(FAMILY, &self.sizes(), self.layer_norm_eps, given)
    }

    /// Tokens per image: the CLS token and one per patch.
    pub fn num_positions(&self) -> usize {
        (self.image_size / self.patch_size).pow(2) + 1
    }
}

/// A DINOv2 ViT image classifier.
#[derive(Debug)]
pub struct Dinov2Classifier {
    pub config: Dinov2Config,
    vit: Vit,
}

impl Dinov2Classifier {
    pub fn new(config: Dinov2Config) -> Result<Self> {
        config.validate()?;
        let layout = dinov2_layout(&config);
        let layer = [
            "norm1",
            "attention.attention.query",
            "attention.attention.key",
            "attention.attention.value",
            "attention.output.dense",
            "norm2",
            "mlp.fc1",
            "mlp.fc2",
        ];
        let layers = (0..config.num_hidden_layers).map(|i| {
            let l = format!("dinov2.encoder.layer.{i}");
            let scale = |j: usize| format!("{l}.layer_scale{j}.lambda1");
            LayerNames::new(&l, layer, Some((scale(1), scale(2))))
        });
        let emb = "dinov2.embeddings";
        let vit = Vit {
            family: FAMILY,
            sizes: config.sizes(),
            patch: (
                format!("{emb}.patch_embeddings.projection.weight"),
                Some(format!("{emb}.patch_embeddings.projection.bias")),
            ),
            first: format!("{emb}.cls_token"),
            position: format!("{emb}.position_embeddings"),
            pre_norm: None,
            layers: layers.collect(),
            index: index_of(&layout),
            layout,
        };
        Ok(Self { config, vit })
    }

    pub fn from_config(config: &serde_json::Value) -> Result<Arc<dyn Architecture>> {
        Ok(Arc::new(Self::new(parse_config(FAMILY, config)?)?))
    }

    /// The final hidden states after the last LayerNorm (n × tokens × width): transformers'
    /// `Dinov2Model(...).last_hidden_state`.
    pub fn last_hidden_state(&self, params: &[Tensor], images: &Tensor) -> Result<Tensor> {
        let p = self.vit.params(params)?;
        let hidden = self.vit.hidden_states(&p, images, params[0].dtype())?;
        Ok(layer_norm(
            &hidden,
            p.get("dinov2.layernorm.weight"),
            p.get("dinov2.layernorm.bias"),
            self.config.layer_norm_eps,
        )?)
    }

    /// What the head reads (n × 2·width): [CLS ‖ mean of the patch tokens] of the last hidden
    /// state, as `Dinov2ForImageClassification` builds it.
    pub fn head_input(&self, params: &[Tensor], images: &Tensor) -> Result<Tensor> {
        let h = self.last_hidden_state(params, images)?;
        let tokens = h.dim(1)?;
        let cls = h.narrow(1, 0, 1)?.squeeze(1)?;
        let patches = h.narrow(1, 1, tokens - 1)?.mean(1)?;
        Ok(Tensor::cat(&[&cls, &patches], 1)?)
    }
}

impl Architecture for Dinov2Classifier {
    fn family(&self) -> &'static str {
        FAMILY
    }

    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).expect("Dinov2Config serialises")
    }

    /// transformers' `Dinov2Config` for `Dinov2ForImageClassification`, without the mask token.
    fn hf_config(&self) -> serde_json::Value {
        let c = &self.config;
        let labels: serde_json::Map<String, serde_json::Value> = (0..c.num_classes)
            .map(|i| (i.to_string(), format!("LABEL_{i}").into()))
            .collect();
        let ids: serde_json::Map<String, serde_json::Value> = (0..c.num_classes)
            .map(|i| (format!("LABEL_{i}"), i.into()))
            .collect();
        let mut config = self.config();
        let obj = config
            .as_object_mut()
            .expect("a struct serialises to an object");
        for (k, v) in [
            (
                "architectures",
                serde_json::json!(["Dinov2ForImageClassification"]),
            ),
            ("model_type", "dinov2".into()),
            ("qkv_bias", true.into()),
            ("layerscale_value", 1.0.into()),
            ("use_swiglu_ffn", false.into()),
            ("use_mask_token", false.into()),
            ("id2label", labels.into()),
            ("label2id", ids.into()),
        ] {
            obj.insert(k.into(), v);
        }
        config
    }

    fn layout(&self) -> &ParamLayout {
        &self.vit.layout
    }

    fn input(&self) -> InputSpec {
        let given = (&self.config.image_mean, &self.config.image_std);
        InputSpec::Images(self.vit.image_spec(given, (IMAGENET_MEAN, IMAGENET_STD)))
    }

    fn num_classes(&self) -> usize {
        self.config.num_classes
    }

    fn forward(&self, params: &[Tensor], images: &Tensor) -> Result<Tensor> {
        let features = self.head_input(params, images)?;
        let p = self.vit.params(params)?;
        Ok(linear(
            &features,
            p.get("classifier.weight"),
            Some(p.get("classifier.bias")),
        )?)
    }

    fn features(&self, params: &[Tensor], images: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.head_input(params, images)?))
    }

    fn tape(&self, params: &[Tensor], images: &Tensor) -> Result<Option<Box<dyn Tape>>> {
        vit::tape(self, params, images)
    }

    fn zero_gradient_tensors(&self) -> Vec<String> {
        self.vit.key_biases()
    }

    /// transformers' initialisation: weights N(0, 0.02²) (it truncates at ±2σ), biases 0,
    /// LayerNorms 1 and 0, LayerScale 1.
    fn init(&self, seed: u64, device: &Device) -> Result<Vec<Tensor>> {
        let mut rng = SplitMix64::new(seed);
        self.vit
            .layout
            .tensors
            .iter()
            .map(|t| {
                let name = t.name.as_str();
                if name.contains("norm") && name.ends_with("weight") || name.ends_with("lambda1") {
                    filled(&t.shape, 1.0, device)
                } else if name.ends_with("bias") {
                    filled(&t.shape, 0.0, device)
                } else {
                    normal(&mut rng, &t.shape, 0.02, device)
                }
            })
            .collect()
    }
}

/// The tensors of a DINOv2 classifier in the order of transformers' state dict.
fn dinov2_layout(c: &Dinov2Config) -> ParamLayout {
    let e = c.hidden_size;
    let m = c.hidden_size * c.mlp_ratio;
    let p = c.patch_size;
    let mut t: Vec<TensorSpec> = Vec::new();
    let mut add = |name: String, shape: &[usize]| {
        t.push(TensorSpec {
            name,
            shape: shape.to_vec(),
        })
    };
    let emb = "dinov2.embeddings";
    add(format!("{emb}.cls_token"), &[1, 1, e]);
    add(
        format!("{emb}.position_embeddings"),
        &[1, c.num_positions(), e],
    );
    add(
        format!("{emb}.patch_embeddings.projection.weight"),
        &[e, c.num_channels, p, p],
    );
    add(format!("{emb}.patch_embeddings.projection.bias"), &[e]);
    for i in 0..c.num_hidden_layers {
        let l = format!("dinov2.encoder.layer.{i}");
        add(format!("{l}.norm1.weight"), &[e]);
        add(format!("{l}.norm1.bias"), &[e]);
        for part in ["query", "key", "value"] {
            add(format!("{l}.attention.attention.{part}.weight"), &[e, e]);
            add(format!("{l}.attention.attention.{part}.bias"), &[e]);
        }
        add(format!("{l}.attention.output.dense.weight"), &[e, e]);
        add(format!("{l}.attention.output.dense.bias"), &[e]);
        add(format!("{l}.layer_scale1.lambda1"), &[e]);
        add(format!("{l}.norm2.weight"), &[e]);
        add(format!("{l}.norm2.bias"), &[e]);
        add(format!("{l}.mlp.fc1.weight"), &[m, e]);
        add(format!("{l}.mlp.fc1.bias"), &[m]);
        add(format!("{l}.mlp.fc2.weight"), &[e, m]);
        add(format!("{l}.mlp.fc2.bias"), &[e]);
        add(format!("{l}.layer_scale2.lambda1"), &[e]);
    }
    add("dinov2.layernorm.weight".into(), &[e]);
    add("dinov2.layernorm.bias".into(), &[e]);
    add("classifier.weight".into(), &[c.num_classes, 2 * e]);
    add("classifier.bias".into(), &[c.num_classes]);
    ParamLayout::new(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dinov2_small_has_the_published_size() {
        // facebook/dinov2-small: 22,056,576 parameters with its mask token (384); the classifier
        // here has no mask token and a 10-class head on 768 features.
        let arch = Dinov2Classifier::new(Dinov2Config::small(518, 10)).unwrap();
        let backbone: usize = arch
            .layout()
            .tensors
            .iter()
            .filter(|t| !t.name.starts_with("classifier."))
            .map(|t| t.shape.iter().product::<usize>())
            .sum();
        assert_eq!(backbone, 22_056_192);
        assert_eq!(arch.layout().len(), 222 + 2);
    }

    #[test]
    fn unsupported_variants_are_refused() {
        let base = serde_json::json!({"model_type": "dinov2", "hidden_size": 64, "num_attention_heads": 4});
        assert!(Dinov2Config::from_hf_json(&base, 3).is_ok());
        for (k, v) in [
            ("use_swiglu_ffn", serde_json::json!(true)),
            ("qkv_bias", serde_json::json!(false)),
            ("hidden_act", serde_json::json!("relu")),
            ("image_size", serde_json::json!([224, 320])),
        ] {
            let mut c = base.clone();
            c[k] = v;
            assert!(Dinov2Config::from_hf_json(&c, 3).is_err(), "{k} accepted");
        }
    }
}
