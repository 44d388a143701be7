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

/// Every tensor of `ours` against `theirs`: the largest difference relative to the larger of
/// the value and the tensor's RMS (so values near zero are judged on the tensor's scale).
fn compare(ours: &Path, theirs: &Path) -> Result<f64, String> {
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
    for name in &names_b {
        let x: Vec<f32> = a
            .load(name, &cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let y: Vec<f32> = b
            .load(name, &cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let rms = (y.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / y.len() as f64).sqrt();
        for (p, q) in x.iter().zip(&y) {
            let scale = f64::from(q.abs()).max(rms).max(1e-30);
            let d = f64::from(p - q).abs() / scale;
            if !d.is_finite() {
                return Err(format!("{name}: {p} against {q}"));
            }
            worst = worst.max(d);
        }
    }
    Ok(worst)
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
    assert!(configs.len() >= 13, "{configs:?}");
    let mut failures = Vec::new();
    for config in &configs {
        let name = config.file_stem().unwrap().to_string_lossy().into_owned();
        let out = dir.path().join(&name);
        let (code, err) = merge(config, &out, &[]);
        if code != Some(0) {
            failures.push(format!("{name}: soup merge failed: {err}"));
            continue;
        }
        let theirs = golden().join("out").join(&name).join("model.safetensors");
        let compared = compare(&out.join("model.safetensors"), &theirs);
        eprintln!("{name}: {compared:?}");
        match compared {
            Ok(worst) if worst <= 1e-6 => {}
            Ok(worst) => failures.push(format!("{name}: relative difference {worst:.3e}")),
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
