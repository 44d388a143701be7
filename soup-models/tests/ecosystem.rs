//! soup against what the real libraries wrote and computed (`tests/golden/ecosystem/`, made once
//! by `make_ecosystem.py` with torch 2.15, transformers 5.24, open_clip 3.3 and Pillow 13.0):
//! checkpoints they saved load to the logits they computed, and CLIP's preprocessing equals
//! Pillow's pixels.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use soup_models::data::{decode_image, prepare, square_rgb, Preprocess, RawImages};
use soup_models::testkit::fixtures;
use soup_models::{Architecture, Checkpoint};

fn golden(name: &str) -> PathBuf {
    fixtures::golden("ecosystem", name)
}

fn expected() -> HashMap<String, Tensor> {
    fixtures::golden_tensors("ecosystem")
}

fn images() -> Vec<String> {
    let path = golden("expected.safetensors");
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    serde_json::from_str(&meta.metadata().as_ref().unwrap()["images"]).unwrap()
}

/// The logits soup computes for a checkpoint on the golden pixel values.
fn logits(ckpt: &Checkpoint, arch: &dyn Architecture) -> Tensor {
    let params = ckpt.load_params(arch, &Device::Cpu).unwrap();
    arch.forward(&params, &expected()["hf_pixel_values"])
        .unwrap()
}

#[test]
fn a_clipmodel_saved_by_transformers_loads_with_its_top_level_projection_dim() {
    // transformers 5 writes vision_config.projection_dim = 512 (the class default); CLIPModel
    // builds visual_projection with the top-level 24.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden("hf-clipmodel/config.json")).unwrap())
            .unwrap();
    assert_eq!(config["vision_config"]["projection_dim"], 512);
    assert_eq!(config["projection_dim"], 24);
    let ckpt = Checkpoint::open(golden("hf-clipmodel")).unwrap();
    let arch = ckpt.architecture().unwrap();
    assert_eq!(arch.config()["projection_dim"], 24);
    assert_eq!(arch.config()["num_attention_heads"], 4);
    let d = fixtures::rel_diff(
        &logits(&ckpt, arch.as_ref()),
        &expected()["hf-clipmodel.logits"],
    );
    assert!(d < 1e-5, "logits differ from transformers' by {d}");
}

#[test]
fn every_transformers_format_gives_transformers_logits() {
    let e = expected();
    for (dir, key) in [
        ("hf-vision", "hf-vision"),
        ("hf-vision-sharded", "hf-vision"),
        ("hf-vision-bin", "hf-vision"),
        ("hf-vision-fp16", "hf-vision-fp16"),
        ("hf-vision-bf16", "hf-vision-bf16"),
    ] {
        let ckpt = Checkpoint::open(golden(dir)).unwrap();
        let arch = ckpt.architecture().unwrap();
        let d = fixtures::rel_diff(&logits(&ckpt, arch.as_ref()), &e[&format!("{key}.logits")]);
        assert!(d < 1e-5, "{dir}: logits differ from transformers' by {d}");
    }
}

#[test]
fn openai_pt_files_from_open_clip_load_and_a_head_count_override_fixes_what_no_rule_can_infer() {
    let e = expected();
    // Heads of width 64, OpenAI's rule: right without help. Storages tagged cuda:0.
    let ckpt = Checkpoint::open(golden("openai-64.pt")).unwrap();
    let arch = ckpt.architecture().unwrap();
    assert_eq!(arch.config()["num_attention_heads"], 1);
    let d = fixtures::rel_diff(&logits(&ckpt, arch.as_ref()), &e["openai-64.logits"]);
    assert!(d < 1e-5, "openai-64: logits differ from open_clip's by {d}");
    assert!(ckpt
        .inferred()
        .unwrap()
        .iter()
        .any(|(k, _)| *k == "num_attention_heads"));

    // 4 heads of width 12: the rule reads one head, and the logits are wrong...
    let ckpt = Checkpoint::open(golden("openai-48h12.pt")).unwrap();
    let guessed = ckpt.architecture().unwrap();
    let d = fixtures::rel_diff(&logits(&ckpt, guessed.as_ref()), &e["openai-48h12.logits"]);
    assert!(d > 1e-3, "one head instead of four must change the logits");
    // ...until the head count is given.
    let overrides = serde_json::json!({"num_attention_heads": 4});
    let arch = ckpt
        .architecture_with(overrides.as_object().unwrap())
        .unwrap();
    let d = fixtures::rel_diff(&logits(&ckpt, arch.as_ref()), &e["openai-48h12.logits"]);
    assert!(
        d < 1e-5,
        "openai-48h12: logits differ from open_clip's by {d}"
    );
    let bad = serde_json::json!({"heads": 4});
    let msg = ckpt
        .architecture_with(bad.as_object().unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("heads") && msg.contains("num_attention_heads"),
        "{msg}"
    );
}

fn u8s(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// An H × W × C image as C planes.
fn planar(hwc: &[u8], c: usize) -> Vec<u8> {
    let n = hwc.len() / c;
    (0..c)
        .flat_map(|ch| (0..n).map(move |i| hwc[i * c + ch]))
        .collect()
}

#[test]
fn clip_preprocessing_equals_pillow_pixel_for_pixel() {
    let e = expected();
    for name in images() {
        let decoded = &e[&format!("decoded.{name}")];
        let (h, w, _) = decoded.dims3().unwrap();
        let img = image::RgbImage::from_raw(w as u32, h as u32, u8s(decoded)).unwrap();
        for (pre, key) in [(Preprocess::Clip, "openai"), (Preprocess::HfClip, "hf")] {
            let ours = square_rgb(&img, 32, pre);
            let theirs = planar(&u8s(&e[&format!("{key}.{name}")]), 3);
            let differ = ours.iter().zip(&theirs).filter(|(a, b)| a != b).count();
            assert_eq!(differ, 0, "{name} ({key}): {differ} pixels differ");
        }
    }
    // The crop rounding is where the two differ: a 35 px side leaves a margin of 3.
    let img = image::RgbImage::from_fn(32, 35, |x, y| image::Rgb([x as u8, y as u8, 7]));
    assert_ne!(
        square_rgb(&img, 32, Preprocess::Clip),
        square_rgb(&img, 32, Preprocess::HfClip)
    );
}

#[test]
fn prepared_inputs_equal_transformers_pixel_values() {
    let e = expected();
    let names = images();
    let mut pixels = Vec::new();
    for name in &names {
        pixels.extend(planar(&u8s(&e[&format!("hf.{name}")]), 3));
    }
    let raw = RawImages {
        channels: 3,
        height: 32,
        width: 32,
        pixels,
        labels: vec![0; names.len()],
        num_classes: 1,
    };
    let ckpt = Checkpoint::open(golden("hf-vision")).unwrap();
    let arch = ckpt.architecture().unwrap();
    let data = prepare(&raw, &arch.image_input().unwrap(), &Device::Cpu).unwrap();
    let rows: Vec<u32> = (0..data.len() as u32).collect();
    let d = fixtures::rel_diff(&data.select(&rows).unwrap().0, &e["hf_pixel_values"]);
    assert!(d < 1e-6, "pixel values differ from transformers' by {d}");
}

/// PNG decodes exactly as Pillow decodes it; JPEG (the `image` crate's zune-jpeg against
/// Pillow's libjpeg-turbo) within the difference measured on the golden images: grey ≤ 1 level
/// on 1.7 % of values, 4:4:4 ≤ 2 on 2.7 %, 4:2:0 ≤ 4 on 26 % (chroma upsampling differs).
#[test]
fn decoding_matches_pillow_exactly_for_png_and_within_the_measured_bound_for_jpeg() {
    let e = expected();
    for name in images() {
        let ours = decode_image(&golden(&format!("images/{name}")))
            .unwrap()
            .to_rgb8()
            .into_raw();
        let theirs = u8s(&e[&format!("decoded.{name}")]);
        assert_eq!(ours.len(), theirs.len(), "{name}");
        let diffs: Vec<u8> = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| a.abs_diff(*b))
            .collect();
        let max = diffs.iter().copied().max().unwrap();
        let differ = diffs.iter().filter(|&&d| d > 0).count() as f64 / diffs.len() as f64;
        eprintln!(
            "{name}: max |Δ| {max}, {:.1} % of values differ",
            100.0 * differ
        );
        if name.ends_with(".png") {
            assert_eq!(max, 0, "{name}");
        } else {
            assert!(max <= JPEG_MAX_DIFF, "{name}: max |Δ| {max}");
        }
    }
}

/// The largest difference between the `image` crate's JPEG decoding and Pillow's, measured on
/// the golden JPEGs (4:2:0, 4:4:4, grey).
const JPEG_MAX_DIFF: u8 = 4;

#[test]
fn golden_tensors_are_what_the_tests_think() {
    // Guards the fixture itself: u8 images and f32 outputs.
    let e = expected();
    assert_eq!(e["hf_pixel_values"].dtype(), DType::F32);
    assert_eq!(e[&format!("openai.{}", images()[0])].dtype(), DType::U8);
}
