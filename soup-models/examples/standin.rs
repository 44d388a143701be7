//! Stand-ins for what the paper's experiment reads and cannot be fetched here: an ImageNet-shaped
//! ImageFolder and a zoo of CLIP ViT-B/32 checkpoints in model-soups' `.pt` layout
//! (`cargo xtask standin`, `cargo xtask reproduce --preset paper-vit-b32`).
//!
//! `standin imagenet --out DIR [--classes 1000] [--train 26] [--val 2] [--max-side 500]
//! [--seed 1]` writes `DIR/train/<wnid>/<wnid>_<k>.JPEG` and
//! `DIR/val/<wnid>/ILSVRC2012_val_<n>.JPEG`: JPEGs of 64–500 px per side with ImageNet's spread of aspect ratios, about 3 % of them greyscale (ImageNet
//! holds a few); each class has its own colours and stripe frequency, so the images are not all
//! alike, though nothing here is meant to be learnt.
//!
//! `standin zoo --out DIR [--models 72] [--classes 1000] [--config JSON] [--sigma 0.01]
//! [--seed 1]` writes `DIR/model_0.pt` … as model-soups publishes them: a `torch.save`d state dict
//! of its `ModelWrapper` (OpenAI CLIP with the text transformer deleted): `model.visual.*` with
//! fused `in_proj_*`, the text tower's remaining tensors at their ViT-B/32 sizes
//! (`model.token_embedding.weight` 49408 × 512, `model.positional_embedding`,
//! `model.text_projection`, `model.ln_final.*`, `model.logit_scale`; a small text tower with
//! `--config`) and `classification_head.*`.
//! Model i is one seeded `clip-vit` start point plus N(0, sigma²) noise drawn from seed (seed, i).
//! `--config` takes a `clip-vit` configuration (smaller stand-ins for tests).
//!
//! `standin shifts --out DIR [--classes 12] [--per-class 2] [--max-side 500] [--seed 1]` writes
//! small stand-ins of ImageNet's distribution shifts as distributed, for `--data NAME:DIR`:
//! `DIR/imagenet-v2/<0 … classes-1>/`, `DIR/imagenet-sketch/<wnid>/`, `DIR/imagenet-r/<wnid>/`
//! and `DIR/imagenet-a/<wnid>/` (the first classes of their 200), and
//! `DIR/objectnet-1.0/images/<name>/` (the first of the 113 classes ImageNet shares, and one
//! it does not).
//!
//! All are resumable: files are written to a temporary name and renamed, and files that exist
//! are kept.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::codecs::jpeg::JpegEncoder;
use image::ExtendedColorType;
use rayon::prelude::*;
use soup_core::rng::{derive_seed, SplitMix64};
use soup_models::arch::clip::Preset;
use soup_models::arch::clip::{ClipClassifier, ClipVitConfig};
use soup_models::arch::Architecture;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let what = args
        .next()
        .ok_or("usage: standin imagenet|zoo --out DIR ...")?;
    let mut flags: BTreeMap<String, String> = BTreeMap::new();
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        flags.insert(flag, value);
    }
    let classes_given = flags.contains_key("--classes");
    let mut take = |name: &str, default: &str| flags.remove(name).unwrap_or(default.to_string());
    let out = PathBuf::from(take("--out", ""));
    if out.as_os_str().is_empty() {
        return Err("--out DIR is required".into());
    }
    let seed: u64 = take("--seed", "1").parse()?;
    let classes: usize = take("--classes", "1000").parse()?;
    match what.as_str() {
        "imagenet" => {
            let train: usize = take("--train", "26").parse()?;
            let val: usize = take("--val", "2").parse()?;
            let max_side: usize = take("--max-side", "500").parse()?;
            check_flags(&flags)?;
            imagenet(&out, classes, train, val, max_side, seed)
        }
        "zoo" => {
            let models: usize = take("--models", "72").parse()?;
            let sigma: f64 = take("--sigma", "0.01").parse()?;
            let config = take("--config", "");
            check_flags(&flags)?;
            zoo(&out, models, classes, &config, sigma, seed)
        }
        "shifts" => {
            let per_class: usize = take("--per-class", "2").parse()?;
            let max_side: usize = take("--max-side", "500").parse()?;
            let classes = if classes_given { classes } else { 12 };
            check_flags(&flags)?;
            shifts(&out, classes, per_class, max_side, seed)
        }
        other => Err(format!("unknown stand-in {other:?} (imagenet, zoo, shifts)").into()),
    }
}

fn check_flags(rest: &BTreeMap<String, String>) -> Result<(), Box<dyn std::error::Error>> {
    match rest.keys().next() {
        Some(flag) => Err(format!("unknown flag {flag}").into()),
        None => Ok(()),
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("partial");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// WordNet-style class folder names (`n00000000` + class), as ImageNet's `n01440764`.
fn wnid(class: usize) -> String {
    format!("n{:08}", 1_440_764 + 7 * class)
}

/// The shift stand-ins: `classes` class folders of each layout, `per_class` images each.
fn shifts(
    out: &Path,
    classes: usize,
    per_class: usize,
    max_side: usize,
    seed: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    use soup_models::data::imagenet::Layout;
    let mut files: Vec<(PathBuf, usize, u64)> = Vec::new();
    for (l, layout) in Layout::ALL.into_iter().enumerate() {
        let dir = match layout {
            Layout::ObjectNet => out.join("objectnet-1.0").join("images"),
            _ => out.join(layout.name()),
        };
        let mut folders: Vec<String> = layout.class_folders().into_iter().take(classes).collect();
        if layout == Layout::ObjectNet {
            // One of ObjectNet's classes that ImageNet lacks: left out when scored.
            folders.push("tarp".to_string());
        }
        for (class, folder) in folders.iter().enumerate() {
            for k in 0..per_class {
                let seed = derive_seed(seed, &[2, l as u64, class as u64, k as u64]);
                files.push((dir.join(folder).join(format!("{k}.jpg")), class, seed));
            }
        }
    }
    files
        .par_iter()
        .try_for_each(|(path, class, seed)| write_image(path, *class, *seed, max_side))?;
    Ok(())
}

/// Writes image (`class`, `seed`) to `path` unless it exists (a resumed run keeps it).
fn write_image(path: &Path, class: usize, seed: u64, max_side: usize) -> Result<(), String> {
    if !path.exists() {
        let dir = path.parent().expect("a class folder");
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let jpeg = image(class, seed, max_side).map_err(|e| e.to_string())?;
        write_atomic(path, &jpeg).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// One image of `class`: size, aspect ratio, colours and noise drawn from `seed`.
fn image(class: usize, seed: u64, max_side: usize) -> Result<Vec<u8>, image::ImageError> {
    let mut class_rng = SplitMix64::new(derive_seed(0xC1A55, &[class as u64]));
    let colour: Vec<f64> = (0..6).map(|_| 255.0 * class_rng.next_f64()).collect();
    let frequency = 2.0 + 20.0 * class_rng.next_f64();
    let mut rng = SplitMix64::new(seed);
    // ImageNet's images are mostly 4:3 landscape, some portrait, a few extreme.
    let max_side = max_side as f64;
    let area = 64.0 * 64.0 + (max_side * max_side * 0.8 - 64.0 * 64.0).max(0.0) * rng.next_f64();
    let aspect =
        (0.5f64).powf(1.0 - 2.0 * rng.next_f64()) * if rng.next_f64() < 0.7 { 1.33 } else { 1.0 };
    let width = ((area * aspect).sqrt().round()).clamp(64.0, max_side.max(64.0)) as usize;
    let height = ((area / aspect).sqrt().round()).clamp(64.0, max_side.max(64.0)) as usize;
    let grey = rng.next_f64() < 0.03;
    let angle = std::f64::consts::PI * rng.next_f64();
    let (ca, sa) = (angle.cos(), angle.sin());
    let channels = if grey { 1 } else { 3 };
    // Stripes (a triangle wave) of the class's two colours, plus uniform noise in ±16.
    let (step_x, step_y) = (
        frequency * ca / width as f64,
        frequency * sa / height as f64,
    );
    let mut pixels = Vec::with_capacity(width * height * channels);
    let mut bits = 0u64;
    for y in 0..height {
        for x in 0..width {
            let phase = (x as f64 * step_x + y as f64 * step_y).rem_euclid(1.0);
            let stripe = 1.0 - 2.0 * (phase - 0.5).abs();
            if x % 8 == 0 {
                bits = rng.next_u64();
            }
            let n = ((bits >> (8 * (x % 8))) & 0xFF) as f64 / 8.0 - 16.0;
            for c in 0..channels {
                let value = colour[c] * stripe + colour[c + 3] * (1.0 - stripe) + n;
                pixels.push(value.clamp(0.0, 255.0) as u8);
            }
        }
    }
    let mut jpeg = Vec::new();
    let colour_type = if grey {
        ExtendedColorType::L8
    } else {
        ExtendedColorType::Rgb8
    };
    JpegEncoder::new_with_quality(&mut jpeg, 85).encode(
        &pixels,
        width as u32,
        height as u32,
        colour_type,
    )?;
    Ok(jpeg)
}

fn imagenet(
    out: &Path,
    classes: usize,
    train: usize,
    val: usize,
    max_side: usize,
    seed: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut files: Vec<(PathBuf, usize, u64)> = Vec::new();
    for class in 0..classes {
        for k in 0..train {
            let dir = out.join("train").join(wnid(class));
            let seed = derive_seed(seed, &[0, class as u64, k as u64]);
            files.push((dir.join(format!("{}_{k}.JPEG", wnid(class))), class, seed));
        }
        for k in 0..val {
            let n = 1 + class * val + k;
            let dir = out.join("val").join(wnid(class));
            let seed = derive_seed(seed, &[1, class as u64, k as u64]);
            files.push((dir.join(format!("ILSVRC2012_val_{n:08}.JPEG")), class, seed));
        }
    }
    let total = files.len();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let started = std::time::Instant::now();
    files
        .par_iter()
        .try_for_each(|(path, class, seed)| -> Result<(), String> {
            write_image(path, *class, *seed, max_side)?;
            let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            if n.is_multiple_of(5000) || n == total {
                eprintln!(
                    "standin: {n}/{total} images ({:.0} s)",
                    started.elapsed().as_secs_f64()
                );
            }
            Ok(())
        })?;
    Ok(())
}

fn zoo(
    out: &Path,
    models: usize,
    classes: usize,
    config: &str,
    sigma: f64,
    seed: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    // ViT-B/32's text tower (vocabulary 49408, width 512); a small one for smaller stand-ins.
    let (config, vocabulary, text_width) = if config.is_empty() {
        (ClipVitConfig::preset(Preset::B32, classes), 49408, 512)
    } else {
        let mut json: serde_json::Value = serde_json::from_str(config)?;
        json["num_classes"] = classes.into();
        let config: ClipVitConfig = serde_json::from_value(json)?;
        let width = config.projection_dim;
        (config, 100, width)
    };
    let arch = ClipClassifier::new(config)?;
    std::fs::create_dir_all(out)?;
    let base = arch.init(seed, &Device::Cpu)?;
    let text = text_tower(seed, vocabulary, text_width)?;
    let started = std::time::Instant::now();
    for i in 0..models {
        let path = out.join(format!("model_{i}.pt"));
        if path.exists() {
            continue;
        }
        let mut rng = SplitMix64::new(derive_seed(seed, &[i as u64]));
        let model: Vec<Tensor> = base
            .iter()
            .map(|t| {
                let noise: Vec<f32> = rng
                    .normals(t.elem_count())
                    .into_iter()
                    .map(|v| (sigma * v) as f32)
                    .collect();
                t + Tensor::from_vec(noise, t.shape(), &Device::Cpu)?
            })
            .collect::<Result<_, _>>()?;
        let tmp = path.with_extension("partial");
        soup_models::testkit::fixtures::write_model_soups_pt(&tmp, &arch, &model, &text)?;
        std::fs::rename(&tmp, &path)?;
        eprintln!(
            "standin: {} written ({:.0} s)",
            path.display(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// What model-soups' checkpoints keep of CLIP's text tower (its transformer is deleted by
/// `ModelWrapper`): for ViT-B/32 a vocabulary of 49408 and width 512; loaders skip it.
fn text_tower(
    seed: u64,
    vocabulary: usize,
    width: usize,
) -> Result<Vec<(String, Tensor)>, Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let mut rng = SplitMix64::new(derive_seed(seed, &[u64::MAX]));
    let mut normal = |shape: &[usize]| -> candle_core::Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = rng
            .normals(n)
            .into_iter()
            .map(|v| 0.02 * v as f32)
            .collect();
        Tensor::from_vec(v, shape, &dev)
    };
    Ok(vec![
        ("model.positional_embedding".into(), normal(&[77, width])?),
        ("model.text_projection".into(), normal(&[width, width])?),
        (
            "model.logit_scale".into(),
            Tensor::new(4.6052f32, &dev)?.to_dtype(DType::F32)?,
        ),
        (
            "model.token_embedding.weight".into(),
            normal(&[vocabulary, width])?,
        ),
        (
            "model.ln_final.weight".into(),
            Tensor::ones(width, DType::F32, &dev)?,
        ),
        (
            "model.ln_final.bias".into(),
            Tensor::zeros(width, DType::F32, &dev)?,
        ),
    ])
}
