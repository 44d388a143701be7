//! A zoo: the checkpoints to soup, named by a directory or a `zoo.toml` manifest.
//!
//! `zoo.toml` (written by `soup finetune`):
//! ```toml
//! [[model]]
//! path = "model-00"          # relative to the manifest, or hf://org/name[@rev][:file], or a URL
//! sha256 = "..."             # optional, checked for URL sources
//! heldout_accuracy = 0.87    # optional
//! hyperparameters = { ... }  # optional, the fine-tuning settings
//!
//! [arch_config]              # optional: replaces what the checkpoints state or soup infers
//! num_attention_heads = 4    # (e.g. OpenAI .pt files, which store no head count)
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use soup_models::{ModelSource, Resolved};

use crate::error::{io, CliError, Result};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Manifest {
    /// The run of `soup finetune` that makes this zoo, when soup makes it: the zoo is complete
    /// when it lists `count` models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finetune: Option<FinetuneRun>,
    #[serde(default, rename = "model")]
    pub models: Vec<Entry>,
    /// Architecture settings for every model, as `--arch-config` gives them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch_config: Option<toml::Table>,
}

/// What `soup finetune` was asked for: `finetune --resume` continues only the same run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FinetuneRun {
    /// Fine-tunes planned (`--count`).
    pub count: usize,
    pub base: String,
    pub seed: u64,
    pub data: String,
    /// The held-out split: `fraction F seed S`, or `index PATH`.
    pub heldout: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_examples: Option<usize>,
    /// The random search.
    pub search: toml::Value,
}

impl Manifest {
    /// An error naming what is missing when a `soup finetune` run has not finished.
    pub fn check_complete(&self, path: &Path) -> Result<()> {
        match &self.finetune {
            Some(run) if self.models.len() < run.count => {
                let first = self.models.len();
                let missing = if first + 1 == run.count {
                    format!("model-{first:02}")
                } else {
                    format!("model-{first:02} to model-{:02}", run.count - 1)
                };
                Err(CliError::new(format!(
                    "{}: incomplete zoo: {} of {} fine-tunes finished ({missing} missing); `soup finetune --resume` continues it",
                    path.display(),
                    first,
                    run.count
                )))
            }
            _ => Ok(()),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Entry {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heldout_accuracy: Option<f64>,
    /// A language model's held-out loss per token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heldout_loss: Option<f64>,
    /// The text domain a language model was fine-tuned on, of a union of data sets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hyperparameters: Option<toml::Value>,
}

/// A zoo's manifest (`zoo.toml` in a zoo directory, or the file named), where there is one.
fn read(zoo: &Path) -> Result<Option<Manifest>> {
    let manifest = if zoo.is_dir() {
        zoo.join("zoo.toml")
    } else {
        zoo.to_path_buf()
    };
    if !manifest.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&manifest).map_err(|e| io(&manifest, e))?;
    let m: Manifest = toml::from_str(&text)
        .map_err(|e| CliError::new(format!("{}: {}", manifest.display(), e.message())))?;
    Ok(Some(m))
}

/// The model a zoo's fine-tunes start from, where `soup finetune` recorded it.
pub fn base_model(zoo: &Path) -> Result<Option<String>> {
    Ok(read(zoo)?.and_then(|m| m.finetune).map(|f| f.base))
}

/// The `[arch_config]` of a zoo's manifest, as JSON (empty without a manifest or the table).
pub fn arch_config(zoo: &Path) -> Result<serde_json::Map<String, serde_json::Value>> {
    let Some(m) = read(zoo)? else {
        return Ok(serde_json::Map::new());
    };
    match m.arch_config.map(serde_json::to_value) {
        Some(Ok(serde_json::Value::Object(map))) => Ok(map),
        _ => Ok(serde_json::Map::new()),
    }
}

/// The checkpoints of a zoo, in order, fetched where remote: the entries of a `zoo.toml`, or,
/// for a directory without one, its model directories and `.safetensors`/`.pt` files sorted by
/// name.
pub fn resolve(zoo: &Path, quiet: bool) -> Result<Vec<Resolved>> {
    let manifest = if zoo.is_dir() {
        zoo.join("zoo.toml")
    } else {
        zoo.to_path_buf()
    };
    if manifest.is_file() {
        let text = std::fs::read_to_string(&manifest).map_err(|e| io(&manifest, e))?;
        let m: Manifest = toml::from_str(&text)
            .map_err(|e| CliError::new(format!("{}: {}", manifest.display(), e.message())))?;
        let base = manifest.parent().unwrap_or(Path::new("."));
        m.check_complete(&manifest)?;
        if m.models.is_empty() {
            return Err(CliError::new(format!(
                "{}: the zoo lists no models",
                manifest.display()
            )));
        }
        return m
            .models
            .iter()
            .map(|e| {
                let source = match ModelSource::parse(&e.path)? {
                    ModelSource::Local(p) => ModelSource::Local(base.join(p)),
                    remote => remote,
                };
                Ok(soup_models::fetch(
                    &source.with_sha256(e.sha256.clone())?,
                    crate::common::downloads(quiet),
                )?)
            })
            .collect();
    }
    if !zoo.is_dir() {
        return Err(CliError::new(format!(
            "{}: no such zoo (a directory or zoo.toml)",
            zoo.display()
        )));
    }
    let mut paths: Vec<PathBuf> = std::fs::read_dir(zoo)
        .map_err(|e| io(zoo, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with('.') {
                return false;
            }
            (p.is_dir()
                && (p.join("model.safetensors").exists()
                    || p.join("model.safetensors.index.json").exists()))
                || [".safetensors", ".pt", ".pth"]
                    .iter()
                    .any(|e| name.ends_with(e))
        })
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(CliError::new(format!(
            "{}: the zoo holds no checkpoints",
            zoo.display()
        )));
    }
    paths
        .into_iter()
        .map(|p| {
            Ok(soup_models::fetch(
                &ModelSource::Local(p),
                crate::common::downloads(quiet),
            )?)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_paper_manifest_is_a_zoo_of_72_url_sources() {
        let text = include_str!("../../xtask/manifests/paper-vit-b32.toml");
        let m: Manifest = toml::from_str(text).unwrap();
        assert_eq!(m.models.len(), 72);
        for (i, e) in m.models.iter().enumerate() {
            match ModelSource::parse(&e.path).unwrap() {
                ModelSource::Url { url, .. } => assert!(url.ends_with(&format!("/model_{i}.pt"))),
                other => panic!("entry {i} is not a URL source: {other:?}"),
            }
        }
    }
}
