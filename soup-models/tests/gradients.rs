//! The trainable forwards: gradients against finite differences (f64), and the CLIP forward
//! against candle-transformers' stock CLIP (f32).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Module, VarBuilder};
use candle_transformers::models::clip::vision_model::ClipVisionTransformer;
use soup_core::rng::SplitMix64;
use soup_models::arch::clip::{ClipClassifier, ClipVitConfig};
use soup_models::arch::dinov2::{Dinov2Classifier, Dinov2Config};
use soup_models::arch::mlp::{Mlp, MlpConfig};
use soup_models::ops::cross_entropy;
use soup_models::testkit::fixtures::tiny_clip_config;
use soup_models::Architecture;

fn tiny_clip(channels: usize) -> ClipClassifier {
    // Smaller than the fixture's: finite differences over every parameter.
    ClipClassifier::new(ClipVitConfig {
        hidden_size: 8,
        intermediate_size: 12,
        image_size: 8,
        projection_dim: 6,
        ..tiny_clip_config(channels, 3)
    })
    .unwrap()
}

/// Parameters from `init`, perturbed so no tensor is trivially constant, in `dtype`.
fn params(arch: &dyn Architecture, seed: u64, dtype: DType) -> Vec<Tensor> {
    let mut rng = SplitMix64::new(seed ^ 77);
    arch.init(seed, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|t| {
            let noise: Vec<f32> = rng
                .normals(t.elem_count())
                .into_iter()
                .map(|v| 0.1 * v as f32)
                .collect();
            let noise = Tensor::from_vec(noise, t.shape(), &Device::Cpu).unwrap();
            (t + noise).unwrap().to_dtype(dtype).unwrap()
        })
        .collect()
}

fn images(arch: &dyn Architecture, n: usize, seed: u64, dtype: DType) -> Tensor {
    let i = arch.image_input().unwrap();
    let mut rng = SplitMix64::new(seed);
    let v = rng.normals(n * i.channels * i.height * i.width);
    Tensor::from_vec(v, (n, i.channels, i.height, i.width), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Checks ∂loss/∂θ of every tensor at `samples` sampled elements against central differences
/// (h = 1e-5, f64). The error of an element is |autograd − fd| / max(|fd|, 1e-3 · G), G the
/// largest |fd| sampled over all tensors: relative, except for gradients below 1e-3 · G (some
/// are exactly zero, e.g. the key bias, which softmax cancels), where the rounding noise of the
/// differences (~1e-11) would dominate. Returns the worst error.
fn gradient_check(arch: &dyn Architecture, seed: u64, samples: usize) -> f64 {
    let p = params(arch, seed, DType::F64);
    let x = images(arch, 4, seed + 1, DType::F64);
    let labels = [0u32, 1, 2, 1];
    let loss = |p: &[Tensor]| cross_entropy(&arch.forward(p, &x).unwrap(), &labels, 0.1).unwrap();
    let vars: Vec<Var> = p.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let inputs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let grads = loss(&inputs).backward().unwrap();
    let mut rng = SplitMix64::new(seed);
    let mut all = Vec::new();
    for (k, spec) in arch.layout().tensors.iter().enumerate() {
        let g = grads
            .get(&inputs[k])
            .unwrap_or_else(|| panic!("no gradient reaches {}", spec.name))
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let base = p[k].flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let mut pairs = Vec::new();
        for _ in 0..samples {
            let e = rng.below(base.len());
            let h = 1e-5;
            let at = |delta: f64| {
                let mut v = base.clone();
                v[e] += delta;
                let mut q = p.clone();
                q[k] = Tensor::from_vec(v, p[k].shape(), &Device::Cpu).unwrap();
                loss(&q).to_scalar::<f64>().unwrap()
            };
            pairs.push((g[e], (at(h) - at(-h)) / (2.0 * h)));
        }
        all.extend(pairs.into_iter().map(|(a, f)| (spec.name.clone(), a, f)));
    }
    let scale = all.iter().fold(0.0f64, |m, (_, _, f)| m.max(f.abs()));
    assert!(scale > 0.0);
    let mut worst = 0.0f64;
    for (name, a, f) in all {
        let err = (a - f).abs() / f.abs().max(1e-3 * scale);
        assert!(
            err <= 1e-6,
            "{name}: autograd {a} vs finite differences {f} (error {err:e})"
        );
        worst = worst.max(err);
    }
    worst
}

#[test]
fn clip_gradients_match_finite_differences() {
    for (seed, channels) in [(1, 3), (2, 1)] {
        let worst = gradient_check(&tiny_clip(channels), seed, 4);
        eprintln!("clip ({channels} channels): worst relative error {worst:e}");
    }
}

fn tiny_dinov2() -> Dinov2Classifier {
    Dinov2Classifier::new(Dinov2Config {
        hidden_size: 8,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        mlp_ratio: 2,
        image_size: 8,
        patch_size: 4,
        num_classes: 3,
        ..Dinov2Config::small(14, 3)
    })
    .unwrap()
}

#[test]
fn dinov2_gradients_match_finite_differences() {
    // Every tensor, LayerScale and the exact GELU's kernel included.
    let worst = gradient_check(&tiny_dinov2(), 6, 4);
    eprintln!("dinov2: worst relative error {worst:e}");
}

#[test]
fn mlp_gradients_match_finite_differences() {
    let mlp = Mlp::new(MlpConfig {
        input: [1, 4, 4],
        hidden: vec![7, 5],
        num_classes: 3,
    })
    .unwrap();
    let worst = gradient_check(&mlp, 3, 6);
    eprintln!("mlp: worst relative error {worst:e}");
}

#[test]
fn every_clip_and_dinov2_parameter_gets_a_gradient() {
    // The stock candle CLIP leaves layer norms, embeddings and class_embedding without one.
    every_parameter_gets_a_gradient(&tiny_clip(3));
    every_parameter_gets_a_gradient(&tiny_dinov2());
}

fn every_parameter_gets_a_gradient(arch: &dyn Architecture) {
    let p = params(arch, 5, DType::F32);
    let vars: Vec<Var> = p.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let inputs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let logits = arch
        .forward(&inputs, &images(arch, 2, 9, DType::F32))
        .unwrap();
    let grads = cross_entropy(&logits, &[0, 2], 0.0)
        .unwrap()
        .backward()
        .unwrap();
    for (spec, t) in arch.layout().tensors.iter().zip(&inputs) {
        let g = grads
            .get(t)
            .unwrap_or_else(|| panic!("no gradient for {}", spec.name));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0, "zero gradient for {}", spec.name);
    }
}

#[test]
fn clip_forward_equals_the_stock_candle_clip() {
    let arch = ClipClassifier::new(ClipVitConfig {
        hidden_size: 32,
        intermediate_size: 64,
        num_attention_heads: 4,
        projection_dim: 16,
        ..tiny_clip_config(3, 5)
    })
    .unwrap();
    let p = params(&arch, 11, DType::F32);
    let x = images(&arch, 3, 12, DType::F32);
    let ours = arch.image_features(&p, &x).unwrap();

    let map: HashMap<String, Tensor> = arch
        .layout()
        .tensors
        .iter()
        .zip(&p)
        .map(|(s, t)| (s.name.clone(), t.clone()))
        .collect();
    let vb = VarBuilder::from_tensors(map.clone(), DType::F32, &Device::Cpu);
    let stock =
        ClipVisionTransformer::new(vb.pp("vision_model"), &arch.config.vision_config()).unwrap();
    let pooled = stock.forward(&x).unwrap();
    let theirs = pooled
        .matmul(&map["visual_projection.weight"].t().unwrap())
        .unwrap();
    let diff = (ours - theirs)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    eprintln!("max |ours − stock| = {diff:e}");
    assert!(diff <= 1e-5, "max abs difference {diff}");
}
