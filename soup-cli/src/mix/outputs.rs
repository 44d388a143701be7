//! What every `soup mix` writes the same way: scores, coefficients, timings and the memory
//! account, figures' labels, and text files written atomically.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use soup_core::{MemoryAccount, Metrics, SoupResult};
use soup_models::checkpoint::atomic_write;
use soup_models::ModelError;

use crate::error::Result;

/// Writes `text` to `dir/name`, atomically.
pub(super) fn write_text(dir: &Path, name: &str, text: &str) -> Result<()> {
    let path = dir.join(name);
    atomic_write(&path, |tmp| {
        std::fs::write(tmp, text).map_err(|e| ModelError::io(tmp, e))
    })?;
    Ok(())
}

/// Seconds per phase of the command (`phases`) and of the method (`soup.<phase>`).
pub(super) fn timings(phases: &[(&str, f64)], result: &SoupResult) -> BTreeMap<String, f64> {
    let mut timings: BTreeMap<String, f64> =
        phases.iter().map(|(p, s)| (p.to_string(), *s)).collect();
    for (p, s) in &result.timings.phases {
        timings.insert(format!("soup.{p}"), *s);
    }
    timings
}

/// The method's byte account, as report.json records it.
pub(super) fn memory_json(m: &MemoryAccount) -> serde_json::Value {
    serde_json::json!({
        "models": m.models, "directions": m.directions, "center": m.center,
        "theta": m.theta, "gradient": m.gradient, "coefficients": m.coefficients,
        "total": m.total(),
    })
}

/// `curve.svg`: the loss of every step and the accuracy after each evaluation of `result`.
pub(super) fn write_curve(
    dir: &Path,
    result: &SoupResult,
    title: &str,
    labels: (&str, &str),
) -> Result<()> {
    let losses: Vec<f64> = result.history.iter().map(|r| r.loss).collect();
    let accuracy: Vec<(usize, f64)> = result
        .evaluations
        .iter()
        .filter_map(|e| Some((e.global_step, e.metrics.accuracy?)))
        .collect();
    write_text(
        dir,
        "curve.svg",
        &soup_svg::curve(&losses, &accuracy, title, labels),
    )
}

/// The held-out evaluations of `result` after each model batch, as report.json records them,
/// the accuracy under `accuracy_key`.
pub(super) fn evaluations_json(result: &SoupResult, accuracy_key: &str) -> serde_json::Value {
    result
        .evaluations
        .iter()
        .map(|e| {
            let mut v = serde_json::json!({
                "model_batch": e.model_batch, "global_step": e.global_step,
                "loss": e.metrics.loss,
            });
            v[accuracy_key] = serde_json::json!(e.metrics.accuracy);
            v
        })
        .collect()
}

/// `coefficients.json` of `result` over `models`.
pub(super) fn write_coefficients(dir: &Path, models: &[String], result: &SoupResult) -> Result<()> {
    let coefficients = Coefficients {
        models: models.to_vec(),
        blocks: result.blocks.iter().map(|b| b.name.clone()).collect(),
        alpha: result.alpha.clone(),
    };
    write_text(
        dir,
        "coefficients.json",
        &serde_json::to_string_pretty(&coefficients)?,
    )
}

/// α per block, as `coefficients.json` stores it.
#[derive(Serialize, Deserialize)]
pub(super) struct Coefficients {
    pub models: Vec<String>,
    pub blocks: Vec<String>,
    pub alpha: Vec<Vec<f64>>,
}

#[derive(Clone, Copy, Serialize, Deserialize)]
pub struct Scores {
    pub accuracy: f64,
    pub loss: f64,
    pub count: usize,
    /// e^loss, for a language model (its loss is per token).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub perplexity: Option<f64>,
}

impl From<Metrics> for Scores {
    fn from(m: Metrics) -> Self {
        Scores {
            accuracy: m.accuracy.unwrap_or(f64::NAN),
            loss: m.loss,
            count: m.count,
            perplexity: (m.rank == soup_core::Rank::Loss).then(|| m.loss.exp()),
        }
    }
}

/// The models' last path components, for the labels of the figures.
pub(super) fn short_names(models: &[String]) -> Vec<String> {
    models
        .iter()
        .map(|m| {
            Path::new(m)
                .file_name()
                .map_or(m.clone(), |f| f.to_string_lossy().into_owned())
        })
        .collect()
}
