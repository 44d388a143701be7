//! Class names of a classifier's head: an architecture of any family wrapped with the name of
//! each logit, written as `class_names` in soup's configuration and as `id2label` / `label2id`
//! in the Hugging Face `config.json`, and read back from either.

use std::collections::HashSet;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use soup_core::ParamLayout;

use super::{tape, Architecture, ImageSpec, InputSpec};
use crate::error::{ModelError, Result};

/// The key of soup's configuration that holds the names.
pub const CLASS_NAMES_KEY: &str = "class_names";

/// A classifier whose logits have names, in the head's order.
#[derive(Debug)]
pub struct Labelled {
    inner: Arc<dyn Architecture>,
    names: Vec<String>,
}

/// Problems with `names` as the names of `classes` logits: a wrong count, an empty name, a
/// name with a line break (the names are read back one per line), or a name given twice.
pub fn check_class_names(names: &[String], classes: usize) -> std::result::Result<(), String> {
    if names.len() != classes {
        return Err(format!(
            "{} class names for a head of {classes} classes",
            names.len()
        ));
    }
    if let Some(i) = names.iter().position(|n| n.trim().is_empty()) {
        return Err(format!("class {i} has an empty name"));
    }
    if let Some(n) = names.iter().find(|n| n.contains(['\n', '\r'])) {
        return Err(format!("class name {n:?} holds a line break"));
    }
    let mut seen = HashSet::new();
    if let Some(n) = names.iter().find(|n| !seen.insert(n.as_str())) {
        return Err(format!("class name {n:?} is given twice"));
    }
    Ok(())
}

/// `arch` with its head's classes named `names` (replacing any names it had), or without names
/// for `None`; an error when `arch` reads no images or the names do not fit its head.
pub fn with_class_names(
    arch: Arc<dyn Architecture>,
    names: Option<Vec<String>>,
) -> Result<Arc<dyn Architecture>> {
    let inner = unlabelled(arch)?;
    let Some(names) = names else {
        return Ok(inner);
    };
    if !matches!(inner.input(), InputSpec::Images(_)) {
        return Err(ModelError::config(
            inner.family(),
            "class names are for image classifiers",
        ));
    }
    check_class_names(&names, inner.num_classes())
        .map_err(|e| ModelError::config(inner.family(), e))?;
    Ok(Arc::new(Labelled { inner, names }))
}

/// `arch` without class names.
fn unlabelled(arch: Arc<dyn Architecture>) -> Result<Arc<dyn Architecture>> {
    if arch.class_names().is_none() {
        return Ok(arch);
    }
    let mut config = arch.config();
    if let Some(obj) = config.as_object_mut() {
        obj.remove(CLASS_NAMES_KEY);
    }
    super::build(arch.family(), &config)
}

/// The names a Hugging Face `config.json` gives the head (`id2label`, keyed "0" … "n-1"), or
/// `None` where it gives none: no `id2label`, or transformers' placeholders `LABEL_0`,
/// `LABEL_1` … which mean "no names".
pub fn hf_class_names(json: &serde_json::Value, classes: usize) -> Option<Vec<String>> {
    let map = json.get("id2label")?.as_object()?;
    let names: Option<Vec<String>> = (0..classes)
        .map(|i| map.get(&i.to_string())?.as_str().map(str::to_string))
        .collect();
    let names = names?;
    if names
        .iter()
        .enumerate()
        .all(|(i, n)| *n == format!("LABEL_{i}"))
    {
        return None;
    }
    Some(names)
}

impl Architecture for Labelled {
    fn family(&self) -> &'static str {
        self.inner.family()
    }
    fn config(&self) -> serde_json::Value {
        let mut config = self.inner.config();
        if let Some(obj) = config.as_object_mut() {
            obj.insert(CLASS_NAMES_KEY.into(), serde_json::json!(self.names));
        }
        config
    }
    fn hf_config(&self) -> serde_json::Value {
        let mut config = self.inner.hf_config();
        if let Some(obj) = config.as_object_mut() {
            let id2label: serde_json::Map<String, serde_json::Value> = self
                .names
                .iter()
                .enumerate()
                .map(|(i, n)| (i.to_string(), n.clone().into()))
                .collect();
            let label2id: serde_json::Map<String, serde_json::Value> = self
                .names
                .iter()
                .enumerate()
                .map(|(i, n)| (n.clone(), i.into()))
                .collect();
            obj.insert("id2label".into(), id2label.into());
            obj.insert("label2id".into(), label2id.into());
        }
        config
    }
    fn layout(&self) -> &ParamLayout {
        self.inner.layout()
    }
    fn input(&self) -> InputSpec {
        self.inner.input()
    }
    fn image_input(&self) -> Result<ImageSpec> {
        self.inner.image_input()
    }
    fn num_classes(&self) -> usize {
        self.inner.num_classes()
    }
    fn class_names(&self) -> Option<&[String]> {
        Some(&self.names)
    }
    fn forward(&self, params: &[Tensor], inputs: &Tensor) -> Result<Tensor> {
        self.inner.forward(params, inputs)
    }
    fn features(&self, params: &[Tensor], images: &Tensor) -> Result<Option<Tensor>> {
        self.inner.features(params, images)
    }
    fn zero_gradient_tensors(&self) -> Vec<String> {
        self.inner.zero_gradient_tensors()
    }
    fn head_tensors(&self) -> Vec<String> {
        self.inner.head_tensors()
    }
    fn init(&self, seed: u64, device: &Device) -> Result<Vec<Tensor>> {
        self.inner.init(seed, device)
    }
    fn tape(&self, params: &[Tensor], inputs: &Tensor) -> Result<Option<Box<dyn tape::Tape>>> {
        self.inner.tape(params, inputs)
    }
}
