//! The architecture a checkpoint describes: soup's own metadata, a Hugging Face `config.json`,
//! or the OpenAI layout's shapes; what was inferred and how, for `soup inspect`.

use std::path::PathBuf;
use std::sync::Arc;

use super::reader::Backend;
use super::torch::openai_config;
use super::{Checkpoint, META_ARCH, META_CONFIG};
use crate::arch::clip::{ClipClassifier, ClipVitConfig};
use crate::arch::dinov2::{Dinov2Classifier, Dinov2Config};
use crate::arch::labels::{hf_class_names, with_class_names};
use crate::arch::llama::{Llama, LlamaConfig};
use crate::arch::{build, Architecture};
use crate::error::{ModelError, Result};

impl Checkpoint {
    /// The architecture the checkpoint describes: soup's own metadata, else a Hugging Face CLIP
    /// `config.json` with the number of classes read off `classification_head.weight`. An
    /// architecture that cannot be built from what the files say is an error naming the file
    /// that says it (the checkpoint, or its `config.json`).
    pub fn architecture(&self) -> Result<Arc<dyn Architecture>> {
        self.described().map_err(|e| match e {
            ModelError::Config { .. } | ModelError::UnknownArchitecture { .. } => {
                ModelError::format(&self.describing_file(), e)
            }
            e => e,
        })
    }

    /// The file the architecture is read from: `config.json` beside the weights where the
    /// weights carry no soup metadata, else the checkpoint itself.
    fn describing_file(&self) -> PathBuf {
        let soup_meta = self
            .metadata()
            .map(|m| m.contains_key(META_ARCH))
            .unwrap_or(false);
        match (&self.hf_config, soup_meta, self.path.is_dir()) {
            (Some(_), false, true) => self.path.join("config.json"),
            _ => self.path.clone(),
        }
    }

    fn described(&self) -> Result<Arc<dyn Architecture>> {
        let meta = self.metadata()?;
        if let Some(family) = meta.get(META_ARCH) {
            let config = meta.get(META_CONFIG).map(String::as_str).unwrap_or("{}");
            let config: serde_json::Value = serde_json::from_str(config)
                .map_err(|e| ModelError::format(&self.path, format!("bad {META_CONFIG}: {e}")))?;
            return build(family, &config);
        }
        if let Backend::Torch {
            openai: Some((prefix, layers)),
            pth,
            file,
            ..
        } = &self.backend
        {
            let shape = |n: &str| -> Result<Vec<usize>> {
                pth.tensor_infos()
                    .get(n)
                    .map(|i| i.layout.dims().to_vec())
                    .ok_or_else(|| ModelError::MissingTensor {
                        path: file.clone(),
                        tensor: n.to_string(),
                    })
            };
            let config = openai_config(prefix, *layers, shape)?;
            return Ok(Arc::new(ClipClassifier::new(config)?));
        }
        if let Some(json) = &self.hf_config {
            let model_type = json.get("model_type").and_then(|v| v.as_str());
            if matches!(model_type, Some("llama" | "qwen2")) {
                return Ok(Arc::new(Llama::new(LlamaConfig::from_hf_json(json)?)?));
            }
            if model_type == Some("dinov2") {
                let head = self.shape("classifier.weight")?;
                if head.len() != 2 {
                    return Err(ModelError::format(
                        &self.path,
                        format!("tensor classifier.weight has shape {head:?}, expected [classes, features]"),
                    ));
                }
                let arch = Arc::new(Dinov2Classifier::new(Dinov2Config::from_hf_json(
                    json, head[0],
                )?)?);
                return with_class_names(arch, hf_class_names(json, head[0]));
            }
            let head = self.shape("classification_head.weight")?;
            if head.len() != 2 {
                return Err(ModelError::format(
                    &self.path,
                    format!("tensor classification_head.weight has shape {head:?}, expected [classes, features]"),
                ));
            }
            let arch = Arc::new(ClipClassifier::new(ClipVitConfig::from_hf_json(
                json, head[0],
            )?)?);
            return with_class_names(arch, hf_class_names(json, head[0]));
        }
        Err(ModelError::format(
            &self.path,
            "cannot tell the architecture: no soup metadata and no config.json (pass it explicitly)",
        ))
    }

    /// The architecture with some of its configuration replaced: `overrides` (keys of the
    /// family's config, e.g. `{"num_attention_heads": 4}`) win over what the checkpoint says or
    /// what was inferred by rule ([`Checkpoint::inferred`]). Needed where a file cannot say it:
    /// an OpenAI `.pt` stores no head count.
    pub fn architecture_with(
        &self,
        overrides: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Arc<dyn Architecture>> {
        let arch = self.architecture()?;
        if overrides.is_empty() {
            return Ok(arch);
        }
        let mut config = arch.config();
        let obj = config
            .as_object_mut()
            .ok_or_else(|| ModelError::config(arch.family(), "config is not an object"))?;
        for (k, v) in overrides {
            // Class names may be given to a model that has none.
            if !obj.contains_key(k) && k != crate::arch::labels::CLASS_NAMES_KEY {
                let known: Vec<&str> = obj.keys().map(String::as_str).collect();
                return Err(ModelError::config(
                    arch.family(),
                    format!(
                        "no config key {k:?} to override (keys: {})",
                        known.join(", ")
                    ),
                ));
            }
            obj.insert(k.clone(), v.clone());
        }
        build(arch.family(), &config)
    }

    /// The configuration values the checkpoint does not state, with the rule that filled each:
    /// (key, rule). Empty for soup's own files, which state everything.
    pub fn inferred(&self) -> Result<Vec<(&'static str, &'static str)>> {
        if self.metadata()?.contains_key(META_ARCH) {
            return Ok(Vec::new());
        }
        if let Backend::Torch {
            openai: Some(_), ..
        } = &self.backend
        {
            return Ok(vec![
                (
                    "num_attention_heads",
                    "hidden_size / 64, OpenAI's rule for every released ViT; --arch-config overrides it",
                ),
                ("layer_norm_eps", "1e-5, OpenAI's"),
                ("hidden_act", "quick_gelu, OpenAI's"),
            ]);
        }
        if let Some(json) = &self.hf_config {
            if json.get("model_type").and_then(|v| v.as_str()) == Some("dinov2") {
                return Ok(crate::arch::dinov2::hf_defaults()
                    .into_iter()
                    .filter(|(key, _)| json.get(key).is_none())
                    .map(|(key, _)| {
                        (
                            key,
                            "absent from config.json: transformers' Dinov2Config default",
                        )
                    })
                    .collect());
            }
            let vision = json.get("vision_config").unwrap_or(json);
            let mut found = Vec::new();
            for (key, _) in crate::arch::clip::hf_vision_defaults() {
                if vision.get(key).is_none() {
                    found.push((
                        key,
                        "absent from config.json: transformers' CLIPVisionConfig default",
                    ));
                }
            }
            if json.get("projection_dim").is_none() {
                found.push((
                    "projection_dim",
                    "absent from config.json: transformers' default, 512",
                ));
            }
            return Ok(found);
        }
        Ok(Vec::new())
    }
}
