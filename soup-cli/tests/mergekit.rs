//! `soup merge` against mergekit 0.1.5 itself: every configuration of
//! `soup-models/tests/golden/mergekit/configs/` (made, with its models and mergekit's outputs, by
//! `make_mergekit.py`) run by soup from the configs directory, as mergekit ran it, must give
//! mergekit's tensors. Bad configurations are one line and exit code 2, with nothing written.

use std::path::{Path, PathBuf};

use soup_models::testkit::fixtures::ScratchDir;
use soup_models::Checkpoint;

mod common;
use common::run;

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../soup-models/tests/golden/mergekit")
}

/// Runs `soup merge CONFIG --out OUT` in the configs directory; returns the status and stderr.
fn merge(config: &Path, out: &Path, extra: &[&str]) -> (Option<i32>, String) {
    let mut args = vec![
        "merge".to_string(),
        config.display().to_string(),
        "--out".to_string(),
        out.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run(Some(&golden().join("configs")), &args, &[]);
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Every tensor of `ours` against `theirs`: the largest difference within `tolerance` relative
/// to the larger of the value and the tensor's RMS (so values near zero are judged on the
/// tensor's scale), and the number of entries beyond it.
fn compare(ours: &Path, theirs: &Path, tolerance: f64) -> Result<(f64, usize), String> {
    let a = Checkpoint::open(ours).map_err(|e| e.to_string())?;
    let b = Checkpoint::open(theirs).map_err(|e| e.to_string())?;
    let mut names_a: Vec<String> = a.names().map(str::to_string).collect();
    let mut names_b: Vec<String> = b.names().map(str::to_string).collect();
    names_a.sort();
    names_b.sort();
    if names_a != names_b {
        return Err(format!(
            "tensor names differ: {names_a:?} against {names_b:?}"
        ));
    }
    let cpu = candle_core::Device::Cpu;
    let mut worst = 0f64;
    let mut over = 0usize;
    for name in &names_b {
        let values = |c: &Checkpoint| -> Vec<f32> {
            let t = c.load(name, &cpu).unwrap();
            t.flatten_all().unwrap().to_vec1().unwrap()
        };
        let (x, y) = (values(&a), values(&b));
        let rms = (y.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / y.len() as f64).sqrt();
        for (p, q) in x.iter().zip(&y) {
            let scale = f64::from(q.abs()).max(rms).max(1e-30);
            let d = f64::from(p - q).abs() / scale;
            if !d.is_finite() {
                return Err(format!("{name}: {p} against {q}"));
            }
            if d > tolerance {
                over += 1;
            } else {
                worst = worst.max(d);
            }
        }
    }
    Ok((worst, over))
}

#[test]
fn every_mergekit_configuration_gives_mergekits_tensors() {
    let dir = ScratchDir::new("mergekit");
    let mut configs: Vec<PathBuf> = std::fs::read_dir(golden().join("configs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yml"))
        .collect();
    configs.sort();
    assert!(configs.len() >= 19, "{configs:?}");
    let mut failures = Vec::new();
    for config in &configs {
        let name = config.file_stem().unwrap().to_string_lossy().into_owned();
        let out = dir.path().join(&name);
        let (code, err) = merge(config, &out, &[]);
        if code != Some(0) {
            failures.push(format!("{name}: soup merge failed: {err}"));
            continue;
        }
        let ours = out.join("model.safetensors");
        let theirs = |dir: &str| golden().join("out").join(dir).join("model.safetensors");
        // A float16 configuration: mergekit's float16 arithmetic is emulated step by step, but
        // its float16 `linear` rounds once from float32, where soup's float32 sum may differ in
        // the last bit (one float16 step, 2^-10 relative). TIES' trim ranks float16 task
        // vectors, whose magnitudes tie, and torch's unstable argsort keeps an unspecified one
        // of the tied entries (soup the first): soup must equal mergekit run with a stable sort
        // (`-stable-sort`), and differ from mergekit itself only in a handful of entries (at most 10 of about 7,000).
        let text = std::fs::read_to_string(config).unwrap();
        let checks: Vec<(String, f64, usize)> =
            if text.contains("dtype: float16") || text.contains("dtype: bfloat16") {
                let step = if text.contains("merge_method: linear") {
                    1e-3
                } else {
                    1e-6
                };
                vec![
                    (format!("{name}-stable-sort"), step, 0),
                    (name.clone(), step, 10),
                ]
            } else {
                vec![(name.clone(), 1e-6, 0)]
            };
        for (golden_dir, tolerance, allowed) in checks {
            let compared = compare(&ours, &theirs(&golden_dir), tolerance);
            eprintln!("{golden_dir}: {compared:?}");
            match compared {
                Ok((_, over)) if over <= allowed => {}
                Ok((worst, over)) => failures.push(format!(
                    "{golden_dir}: {over} entries beyond {tolerance:e} (largest other difference {worst:.3e})"
                )),
                Err(e) => failures.push(format!("{golden_dir}: {e}")),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A configuration written into `dir`, with the fixtures' models by absolute path.
fn config_in(dir: &Path, name: &str, text: &str) -> PathBuf {
    let models = golden().join("models");
    let text = text.replace("MODELS", &models.display().to_string());
    let path = dir.join(format!("{name}.yml"));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn bad_configurations_are_one_line_and_exit_2_with_nothing_written() {
    let dir = ScratchDir::new("mergekit-bad");
    let three = "models:\n  - model: MODELS/m1\n    parameters: {weight: 1.0, density: 0.5}\n  - model: MODELS/m2\n    parameters: {weight: 1.0, density: 0.5}\n";
    let cases = [
        ("unknown-method", format!("{three}merge_method: ranked_ties\nbase_model: MODELS/base\n"), "ranked_ties is not one soup has"),
        ("unknown-key", format!("{three}merge_method: ties\nbase_model: MODELS/base\nlayers: 3\n"), "unknown key layers"),
        ("missing-model", "models:\n  - model: MODELS/nowhere\n    parameters: {weight: 1.0}\n  - model: MODELS/m1\n    parameters: {weight: 1.0}\nmerge_method: task_arithmetic\nbase_model: MODELS/base\n".to_string(), "nowhere"),
        ("odd-shapes", "models:\n  - model: MODELS/m1\n    parameters: {weight: 1.0}\n  - model: MODELS/odd\n    parameters: {weight: 1.0}\nmerge_method: task_arithmetic\nbase_model: MODELS/base\n".to_string(), "does not match"),
        ("density", format!("{three}merge_method: ties\nbase_model: MODELS/base\nparameters: {{density: 1.5}}\n").replace("density: 0.5", "density: 1.5"), "outside (0, 1]"),
        ("zero-weights", "models:\n  - model: MODELS/m1\n    parameters: {weight: 1.0}\n  - model: MODELS/m2\n    parameters: {weight: -1.0}\nmerge_method: linear\n".to_string(), "sum to zero"),
        ("no-base", format!("{three}merge_method: ties\n"), "needs base_model"),
        ("duplicate", "models:\n  - model: MODELS/m1\n    parameters: {weight: 1.0}\n  - model: MODELS/m1\n    parameters: {weight: 2.0}\nmerge_method: linear\n".to_string(), "listed twice"),
        ("no-models", "models: []\nmerge_method: ties\nbase_model: MODELS/base\n".to_string(), "at least 1 model besides"),
        ("slerp-no-t", "models:\n  - model: MODELS/base\n  - model: MODELS/m1\nmerge_method: slerp\nbase_model: MODELS/base\n".to_string(), "needs parameter t"),
        ("no-weight", "models:\n  - model: MODELS/m1\nmerge_method: task_arithmetic\nbase_model: MODELS/base\n".to_string(), "needs parameter weight"),
    ];
    for (name, text, says) in cases {
        let config = config_in(dir.path(), name, &text);
        let out = dir.path().join(format!("out-{name}"));
        let (code, err) = merge(&config, &out, &[]);
        assert_eq!(code, Some(2), "{name}: {err}");
        assert!(err.contains(says), "{name}: expected {says:?} in {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{name}: {err}");
        assert!(!out.exists(), "{name}: wrote {}", out.display());
        assert!(
            !dir.path().join(format!("out-{name}.partial")).exists(),
            "{name}"
        );
    }
    // mergekit's example that uses `slices` is refused by name.
    let slerp = golden().join("refused/example-gradient-slerp.yml");
    let out = dir.path().join("out-slices");
    let (code, err) = merge(&slerp, &out, &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("slices"), "{err}");
    assert!(!out.exists());
}

#[test]
fn a_merge_is_a_model_directory_with_the_bases_tokenizer_config_and_card() {
    let dir = ScratchDir::new("mergekit-dir");
    let out = dir.path().join("ties");
    let (code, err) = merge(&golden().join("configs/ties.yml"), &out, &["--seed", "3"]);
    assert_eq!(code, Some(0), "{err}");
    for file in [
        "model.safetensors",
        "config.json",
        "README.md",
        "mergekit_config.yml",
    ] {
        assert!(out.join(file).is_file(), "{file}");
    }
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.contains("base_model:") && card.contains("ties"),
        "{card}"
    );
    assert!(card.contains("../models/m3"), "{card}");
    // The same configuration again: the same bytes; and OUT is not replaced without --force.
    let (code, err) = merge(&golden().join("configs/ties.yml"), &out, &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("already exists"), "{err}");
    let again = dir.path().join("again");
    let (code, _) = merge(&golden().join("configs/ties.yml"), &again, &[]);
    assert_eq!(code, Some(0));
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        std::fs::read(again.join("model.safetensors")).unwrap()
    );
}

#[test]
fn dare_merges_are_fixed_by_the_seed() {
    let dir = ScratchDir::new("mergekit-dare");
    let config = config_in(
        dir.path(),
        "dare",
        "models:\n  - model: MODELS/m1\n    parameters: {weight: 1.0, density: 0.5}\n  - model: MODELS/m2\n    parameters: {weight: 0.5, density: 0.5}\nmerge_method: dare_ties\nbase_model: MODELS/base\n",
    );
    let bytes = |name: &str, seed: &str| {
        let out = dir.path().join(name);
        let (code, err) = merge(&config, &out, &["--seed", seed]);
        assert_eq!(code, Some(0), "{err}");
        std::fs::read(out.join("model.safetensors")).unwrap()
    };
    let a = bytes("a", "1");
    assert_eq!(a, bytes("b", "1"));
    assert_ne!(a, bytes("c", "2"));
}
