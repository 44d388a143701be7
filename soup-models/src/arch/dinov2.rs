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

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use soup_core::rng::SplitMix64;
use soup_core::{ParamLayout, TensorSpec};

use super::tape::encoder;
use super::vit::{self, LayerNames, Normalisation, VitClassifier, VitFamily, VitNames, VitSizes};
use super::{filled, normal, parse_config, Params};
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
    #[serde(default = "vit::default_channels")]
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    pub num_classes: usize,
    /// ImageNet's by default.
    #[serde(flatten)]
    pub normalisation: Normalisation,
}

fn default_mlp_ratio() -> usize {
    4
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
            normalisation: Normalisation::default(),
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

    /// Tokens per image: the CLS token and one per patch.
    pub fn num_positions(&self) -> usize {
        self.sizes().tokens()
    }
}

/// A DINOv2 ViT image classifier.
pub type Dinov2Classifier = VitClassifier<Dinov2Config>;

impl Dinov2Classifier {
    /// The final hidden states after the last LayerNorm (n × tokens × width): transformers'
    /// `Dinov2Model(...).last_hidden_state`.
    pub fn last_hidden_state(&self, params: &[Tensor], images: &Tensor) -> Result<Tensor> {
        let (p, hidden) = self.encode(params, images)?;
        normed(&self.config, &p, &hidden)
    }

    /// What the head reads (n × 2·width): [CLS ‖ mean of the patch tokens] of the last hidden
    /// state, as `Dinov2ForImageClassification` builds it.
    pub fn head_input(&self, params: &[Tensor], images: &Tensor) -> Result<Tensor> {
        let (p, hidden) = self.encode(params, images)?;
        self.config.head_features(&p, &hidden)
    }
}

/// The encoder's output after the last LayerNorm.
fn normed(c: &Dinov2Config, p: &Params, hidden: &Tensor) -> Result<Tensor> {
    Ok(layer_norm(
        hidden,
        p.get("dinov2.layernorm.weight"),
        p.get("dinov2.layernorm.bias"),
        c.layer_norm_eps,
    )?)
}

/// The layers' tensors under `dinov2.encoder.layer.{i}`, in [`LayerNames::new`]'s order.
const LAYER: [&str; 8] = [
    "norm1",
    "attention.attention.query",
    "attention.attention.key",
    "attention.attention.value",
    "attention.output.dense",
    "norm2",
    "mlp.fc1",
    "mlp.fc2",
];

impl VitFamily for Dinov2Config {
    const FAMILY: &'static str = FAMILY;

    fn validate(&self) -> Result<()> {
        let named = [("mlp_ratio", self.mlp_ratio)];
        let sizes = (&self.sizes(), self.hidden_act.as_str());
        vit::validate(FAMILY, sizes, &named, &self.normalisation)
    }

    fn sizes(&self) -> VitSizes {
        VitSizes {
            channels: self.num_channels,
            image_size: self.image_size,
            patch_size: self.patch_size,
            width: self.hidden_size,
            mlp_width: self.hidden_size.saturating_mul(self.mlp_ratio),
            layers: self.num_hidden_layers,
            heads: self.num_attention_heads,
            classes: self.num_classes,
            eps: self.layer_norm_eps,
            activation: encoder::Activation::Gelu,
        }
    }

    fn names(&self) -> VitNames {
        let emb = "dinov2.embeddings";
        let layer = |i| {
            let l = format!("dinov2.encoder.layer.{i}");
            let scale = |j: usize| format!("{l}.layer_scale{j}.lambda1");
            LayerNames::new(&l, LAYER, Some((scale(1), scale(2))))
        };
        VitNames {
            patch: (
                format!("{emb}.patch_embeddings.projection.weight"),
                Some(format!("{emb}.patch_embeddings.projection.bias")),
            ),
            first: format!("{emb}.cls_token"),
            position: format!("{emb}.position_embeddings"),
            pre_norm: None,
            layers: (0..self.num_hidden_layers).map(layer).collect(),
        }
    }

    fn layout(&self) -> ParamLayout {
        dinov2_layout(self)
    }

    /// transformers' `Dinov2Config` for `Dinov2ForImageClassification`, without the mask token.
    fn hf_config(&self, mut config: serde_json::Value) -> serde_json::Value {
        let c = self;
        let labels: serde_json::Map<String, serde_json::Value> = (0..c.num_classes)
            .map(|i| (i.to_string(), format!("LABEL_{i}").into()))
            .collect();
        let ids: serde_json::Map<String, serde_json::Value> = (0..c.num_classes)
            .map(|i| (format!("LABEL_{i}"), i.into()))
            .collect();
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

    fn normalisation(&self) -> (&Normalisation, ([f32; 3], [f32; 3])) {
        (&self.normalisation, (IMAGENET_MEAN, IMAGENET_STD))
    }

    fn head_features(&self, p: &Params, hidden: &Tensor) -> Result<Tensor> {
        let h = normed(self, p, hidden)?;
        let tokens = h.dim(1)?;
        let cls = h.narrow(1, 0, 1)?.squeeze(1)?;
        let patches = h.narrow(1, 1, tokens - 1)?.mean(1)?;
        Ok(Tensor::cat(&[&cls, &patches], 1)?)
    }

    fn head_logits(&self, p: &Params, features: &Tensor) -> Result<Tensor> {
        Ok(linear(
            features,
            p.get("classifier.weight"),
            Some(p.get("classifier.bias")),
        )?)
    }

    /// transformers' initialisation: weights N(0, 0.02²) (it truncates at ±2σ), biases 0,
    /// LayerNorms 1 and 0, LayerScale 1.
    fn init(&self, layout: &ParamLayout, seed: u64, device: &Device) -> Result<Vec<Tensor>> {
        let mut rng = SplitMix64::new(seed);
        layout
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
    use crate::arch::Architecture;

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
