//! mergekit's merge configuration, read as `mergekit-yaml` reads it, for the methods soup has:
//! `merge_method`, `base_model`, `models[].model` with per-model `parameters`, top-level
//! `parameters`, `dtype`, `out_dtype` and `tokenizer_source: base`. A parameter is a number, a
//! boolean, a gradient over the layers (a list of numbers) or a list of `filter`/`value`
//! conditions on the tensor's name. Anything else (`slices`, `modules`, `tokenizer`, an unknown
//! method or parameter) is refused by name before any work.

use std::collections::BTreeMap;
use std::path::Path;

use soup_core::{Arithmetic, DataFreeMethod, Scope, TensorParams};
use yaml_rust2::{Yaml, YamlLoader};

use crate::error::{CliError, Result};

/// One parameter's setting as written.
#[derive(Clone, Debug, PartialEq)]
pub enum Setting {
    /// A number (booleans as 1 and 0).
    Value(f64),
    /// A gradient: values spread evenly over the layers, interpolated in between.
    Gradient(Vec<f64>),
    /// A list of booleans: the one at the layer's position, not interpolated.
    Discrete(Vec<f64>),
    /// Conditions in order: the first whose filter is absent, `*`, or part of the tensor's name
    /// gives the value.
    Conditions(Vec<(Option<String>, Setting)>),
}

impl Setting {
    /// mergekit's `evaluate_setting`: the value for tensor `name` at layer position `t` (0 at
    /// the first layer, 1 at the last), `None` when no condition matches.
    pub fn evaluate(&self, name: &str, t: f64) -> Option<f64> {
        match self {
            Setting::Value(v) => Some(*v),
            Setting::Gradient(values) => {
                let scaled = t * (values.len() - 1) as f64;
                let i0 = scaled as usize;
                let i1 = (i0 + 1).min(values.len() - 1);
                let frac = scaled - i0 as f64;
                Some((1.0 - frac) * values[i0] + frac * values[i1])
            }
            Setting::Discrete(values) => Some(values[(t * (values.len() - 1) as f64) as usize]),
            Setting::Conditions(conditions) => conditions
                .iter()
                .find(|(filter, _)| match filter.as_deref() {
                    None | Some("*") => true,
                    Some(f) => name.contains(f),
                })
                .and_then(|(_, s)| s.evaluate(name, t)),
        }
    }
}

/// The dtype of `dtype` and `out_dtype`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    Bf16,
}

impl Dtype {
    fn parse(key: &str, text: &str) -> Result<Self> {
        match text {
            "float32" | "fp32" => Ok(Dtype::F32),
            "float16" | "fp16" => Ok(Dtype::F16),
            "bfloat16" | "bf16" => Ok(Dtype::Bf16),
            other => Err(CliError::new(format!(
                "{key}: {other} is not a dtype soup writes (float32, float16 or bfloat16)"
            ))),
        }
    }

    pub fn candle(self) -> candle_core::DType {
        match self {
            Dtype::F32 => candle_core::DType::F32,
            Dtype::F16 => candle_core::DType::F16,
            Dtype::Bf16 => candle_core::DType::BF16,
        }
    }
}

/// One entry of `models`.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelEntry {
    /// The model as written (a path, or a Hub repository).
    pub model: String,
    /// Its own parameters.
    pub parameters: BTreeMap<String, Setting>,
}

/// A merge configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct MergeConfig {
    pub method: DataFreeMethod,
    pub base_model: Option<String>,
    pub models: Vec<ModelEntry>,
    pub parameters: BTreeMap<String, Setting>,
    pub dtype: Option<Dtype>,
    pub out_dtype: Option<Dtype>,
}

/// Keys of mergekit's configuration soup does not support, and why.
const UNSUPPORTED: &[(&str, &str)] = &[
    (
        "slices",
        "slices (layer ranges) are not supported: soup merges whole models listed under `models`",
    ),
    (
        "modules",
        "modules are not supported: list whole models under `models`",
    ),
    (
        "tokenizer",
        "a tokenizer section is not supported: soup copies the base model's tokenizer",
    ),
    ("chat_template", "chat_template is not supported"),
];

fn err(path: &Path, what: impl std::fmt::Display) -> CliError {
    CliError::new(format!("{}: {what}", path.display()))
}

/// A YAML scalar as a number: integers, reals, booleans (1/0), and strings that read as a
/// number (mergekit reads `1e-3`, a string in YAML 1.1, as one).
fn number(y: &Yaml) -> Option<f64> {
    match y {
        Yaml::Integer(i) => Some(*i as f64),
        Yaml::Real(s) | Yaml::String(s) => s.parse::<f64>().ok(),
        Yaml::Boolean(b) => Some(if *b { 1.0 } else { 0.0 }),
        _ => None,
    }
}

fn setting(path: &Path, name: &str, y: &Yaml) -> Result<Setting> {
    let bad = || {
        err(path, format!("parameter {name}: not a number, a list of numbers or a list of filter/value conditions"))
    };
    match y {
        Yaml::Array(items) if items.is_empty() => {
            Err(err(path, format!("parameter {name}: an empty list")))
        }
        Yaml::Array(items) if items.iter().all(|i| !matches!(i, Yaml::Hash(_))) => {
            let values = items
                .iter()
                .map(number)
                .collect::<Option<Vec<f64>>>()
                .ok_or_else(bad)?;
            if items.iter().all(|i| matches!(i, Yaml::Boolean(_))) {
                Ok(Setting::Discrete(values))
            } else {
                Ok(Setting::Gradient(values))
            }
        }
        Yaml::Array(items) => items
            .iter()
            .map(|i| condition(path, name, i))
            .collect::<Result<Vec<_>>>()
            .map(Setting::Conditions),
        Yaml::Hash(_) => Ok(Setting::Conditions(vec![condition(path, name, y)?])),
        other => number(other).map(Setting::Value).ok_or_else(bad),
    }
}

fn condition(path: &Path, name: &str, y: &Yaml) -> Result<(Option<String>, Setting)> {
    let Yaml::Hash(h) = y else {
        return Err(err(
            path,
            format!("parameter {name}: a list mixing values and filter/value conditions"),
        ));
    };
    let mut filter = None;
    let mut value = None;
    for (k, v) in h {
        match k.as_str() {
            Some("filter") => match v {
                Yaml::String(s) => filter = Some(s.clone()),
                Yaml::Null => {}
                _ => {
                    return Err(err(
                        path,
                        format!("parameter {name}: filter must be a string"),
                    ))
                }
            },
            Some("value") => value = Some(setting(path, name, v)?),
            other => {
                return Err(err(
                    path,
                    format!(
                        "parameter {name}: unknown key {} in a condition (filter and value only)",
                        other.unwrap_or("?")
                    ),
                ))
            }
        }
    }
    let value = value.ok_or_else(|| {
        err(
            path,
            format!("parameter {name}: a condition without a value"),
        )
    })?;
    Ok((filter, value))
}

fn parameters(
    path: &Path,
    method: DataFreeMethod,
    y: &Yaml,
    per_model: bool,
) -> Result<BTreeMap<String, Setting>> {
    let mut out = BTreeMap::new();
    match y {
        Yaml::Null => return Ok(out),
        Yaml::Hash(h) => {
            let known = method.parameters();
            for (k, v) in h {
                let name = k
                    .as_str()
                    .ok_or_else(|| err(path, "a parameter name is not a string"))?;
                let Some(info) = known.iter().find(|p| p.name == name) else {
                    let names: Vec<&str> = known.iter().map(|p| p.name).collect();
                    return Err(err(
                        path,
                        format!(
                            "{} has no parameter {name} (it has: {})",
                            method.name(),
                            names.join(", ")
                        ),
                    ));
                };
                if per_model && info.scope == Scope::Shared {
                    return Err(err(path, format!("{name} is one value for the whole merge: give it under the top-level parameters")));
                }
                out.insert(name.to_string(), setting(path, name, v)?);
            }
        }
        _ => return Err(err(path, "parameters must be a mapping of names to values")),
    }
    Ok(out)
}

impl MergeConfig {
    /// Reads `path`; every refusal names the key or value and the file.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| crate::error::io(path, e))?;
        Self::parse(path, &text)
    }

    /// Parses `text` (read from `path`, which errors name).
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let docs =
            YamlLoader::load_from_str(text).map_err(|e| err(path, format!("not YAML: {e}")))?;
        let [doc] = docs.as_slice() else {
            return Err(err(path, "expected one YAML document"));
        };
        let Yaml::Hash(top) = doc else {
            return Err(err(
                path,
                "expected a mapping (merge_method, base_model, models, ...)",
            ));
        };
        let get = |key: &str| top.get(&Yaml::String(key.to_string()));
        for k in top.keys() {
            let key = k.as_str().unwrap_or("?");
            if let Some((_, why)) = UNSUPPORTED.iter().find(|(u, _)| *u == key) {
                return Err(err(path, why));
            }
            if ![
                "merge_method",
                "base_model",
                "models",
                "parameters",
                "dtype",
                "out_dtype",
                "tokenizer_source",
            ]
            .contains(&key)
            {
                return Err(err(path, format!("unknown key {key}")));
            }
        }
        let method_name = get("merge_method")
            .and_then(Yaml::as_str)
            .ok_or_else(|| err(path, "merge_method is missing"))?;
        let method = DataFreeMethod::from_name(method_name).ok_or_else(|| {
            let names: Vec<&str> = DataFreeMethod::ALL.iter().map(|m| m.name()).collect();
            err(
                path,
                format!(
                    "merge_method {method_name} is not one soup has (it has: {})",
                    names.join(", ")
                ),
            )
        })?;
        let model_name = |y: &Yaml, what: &str| -> Result<String> {
            match y {
                Yaml::String(s) if !s.trim().is_empty() => {
                    if s.contains('+') {
                        return Err(err(
                            path,
                            format!("{what} {s}: LoRA adapters (model+lora) are not supported"),
                        ));
                    }
                    Ok(s.clone())
                }
                _ => Err(err(
                    path,
                    format!("{what} must be a path or a Hub repository"),
                )),
            }
        };
        let base_model = match get("base_model") {
            None | Some(Yaml::Null) => None,
            Some(y) => Some(model_name(y, "base_model")?),
        };
        let mut models = Vec::new();
        match get("models") {
            Some(Yaml::Array(items)) => {
                for item in items {
                    let Yaml::Hash(h) = item else {
                        return Err(err(
                            path,
                            "each entry of models must be a mapping with model (and parameters)",
                        ));
                    };
                    let mut model = None;
                    let mut params = BTreeMap::new();
                    for (k, v) in h {
                        match k.as_str() {
                            Some("model") => model = Some(model_name(v, "model")?),
                            Some("parameters") => params = parameters(path, method, v, true)?,
                            other => {
                                return Err(err(
                                    path,
                                    format!(
                                        "unknown key {} in a models entry",
                                        other.unwrap_or("?")
                                    ),
                                ))
                            }
                        }
                    }
                    let model = model.ok_or_else(|| err(path, "a models entry has no model"))?;
                    models.push(ModelEntry {
                        model,
                        parameters: params,
                    });
                }
            }
            None => return Err(err(path, "models is missing")),
            Some(_) => return Err(err(path, "models must be a list")),
        }
        let parameters = match get("parameters") {
            Some(y) => parameters(path, method, y, false)?,
            None => BTreeMap::new(),
        };
        let dtype_of = |key: &str| -> Result<Option<Dtype>> {
            match get(key) {
                None | Some(Yaml::Null) => Ok(None),
                Some(Yaml::String(s)) => Dtype::parse(key, s).map(Some).map_err(|e| err(path, e)),
                Some(_) => Err(err(path, format!("{key} must be a dtype name"))),
            }
        };
        let dtype = dtype_of("dtype")?;
        let out_dtype = dtype_of("out_dtype")?;
        match get("tokenizer_source") {
            None | Some(Yaml::Null) => {}
            Some(Yaml::String(s)) if s == "base" => {}
            Some(y) => {
                return Err(err(
                    path,
                    format!("tokenizer_source {}: only base is supported (the base model's tokenizer is copied)", y.as_str().unwrap_or("?")),
                ))
            }
        }
        Ok(MergeConfig {
            method,
            base_model,
            models,
            parameters,
            dtype,
            out_dtype,
        })
    }

    /// The merge's inputs in mergekit's order: the models as listed, then the base when it is
    /// not one of them; and the base's index among them.
    pub fn inputs(&self) -> (Vec<String>, Option<usize>) {
        let mut inputs: Vec<String> = self.models.iter().map(|m| m.model.clone()).collect();
        let base = self
            .base_model
            .as_ref()
            .map(|b| match inputs.iter().position(|m| m == b) {
                Some(i) => i,
                None => {
                    inputs.push(b.clone());
                    inputs.len() - 1
                }
            });
        (inputs, base)
    }

    /// The resolved parameters of the tensor `name` at layer position `t`, for the inputs of
    /// [`Self::inputs`]: each input's own setting first, then the top-level one, then the
    /// method's default; a required parameter nowhere given is an error naming it.
    pub fn tensor_params(&self, name: &str, t: f64) -> Result<TensorParams> {
        let (inputs, base) = self.inputs();
        let mut p = TensorParams::defaults(self.method, inputs.len());
        for info in self.method.parameters() {
            let top = self
                .parameters
                .get(info.name)
                .and_then(|s| s.evaluate(name, t));
            match info.scope {
                Scope::Shared => match (top, info.default) {
                    (Some(v), _) => p.set_shared(info.name, v),
                    (None, Some(_)) => {}
                    (None, None) => {
                        return Err(CliError::new(format!(
                            "{} needs parameter {} (for tensor {name})",
                            self.method.name(),
                            info.name
                        )))
                    }
                },
                Scope::EveryInput | Scope::NonBase => {
                    for (i, input) in inputs.iter().enumerate() {
                        if info.scope == Scope::NonBase && Some(i) == base {
                            continue;
                        }
                        let own = self
                            .models
                            .iter()
                            .find(|m| &m.model == input)
                            .and_then(|m| m.parameters.get(info.name))
                            .and_then(|s| s.evaluate(name, t));
                        match (own.or(top), info.default) {
                            (Some(v), _) => p.set_input(i, info.name, v),
                            (None, Some(_)) => {}
                            (None, None) => {
                                return Err(CliError::new(format!(
                                    "{} needs parameter {} for model {input} (for tensor {name})",
                                    self.method.name(),
                                    info.name
                                )))
                            }
                        }
                    }
                }
            }
        }
        // mergekit computes in `dtype`; soup does so for the task-arithmetic family.
        p.shared.arithmetic = match self.dtype {
            Some(Dtype::F16) => Arithmetic::F16,
            Some(Dtype::Bf16) => Arithmetic::Bf16,
            Some(Dtype::F32) | None => Arithmetic::F32,
        };
        Ok(p)
    }
}

/// Each tensor's position among the layers for gradients, as mergekit places them: the tensors
/// of layer i of L (the first number in the name, e.g. `model.layers.3.mlp...`) are at
/// i / (L − 1), or 1 when there is one layer; the others (embeddings, final norm, head) at 0.
/// L counts the layers under the same name prefix, so two towers keep their own depths.
pub fn layer_positions(names: &[String]) -> Vec<f64> {
    let split = |name: &str| -> Option<(String, usize)> {
        let parts: Vec<&str> = name.split('.').collect();
        parts
            .iter()
            .enumerate()
            .find_map(|(k, p)| p.parse::<usize>().ok().map(|i| (parts[..k].join("."), i)))
    };
    let mut layers: BTreeMap<String, usize> = BTreeMap::new();
    for name in names {
        if let Some((prefix, i)) = split(name) {
            let l = layers.entry(prefix).or_insert(0);
            *l = (*l).max(i + 1);
        }
    }
    names
        .iter()
        .map(|name| match split(name) {
            Some((prefix, i)) => {
                let l = layers[&prefix];
                if l > 1 {
                    i as f64 / (l - 1) as f64
                } else {
                    1.0
                }
            }
            None => 0.0,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<MergeConfig> {
        MergeConfig::parse(Path::new("merge.yml"), text)
    }

    #[test]
    fn gradients_interpolate_over_the_layers_as_mergekit_does() {
        let g = Setting::Gradient(vec![0.2, 0.5, 0.9]);
        assert_eq!(g.evaluate("x", 0.0), Some(0.2));
        assert!((g.evaluate("x", 0.25).unwrap() - 0.35).abs() < 1e-12);
        assert_eq!(g.evaluate("x", 1.0), Some(0.9));
        let d = Setting::Discrete(vec![1.0, 0.0]);
        assert_eq!(d.evaluate("x", 0.9), Some(1.0));
        assert_eq!(d.evaluate("x", 1.0), Some(0.0));
    }

    #[test]
    fn the_first_matching_filter_gives_the_value() {
        let s = Setting::Conditions(vec![
            (Some("self_attn".into()), Setting::Value(0.7)),
            (Some("mlp".into()), Setting::Gradient(vec![0.0, 1.0])),
        ]);
        assert_eq!(
            s.evaluate("model.layers.0.self_attn.q_proj.weight", 0.5),
            Some(0.7)
        );
        assert_eq!(
            s.evaluate("model.layers.0.mlp.up_proj.weight", 0.5),
            Some(0.5)
        );
        assert_eq!(s.evaluate("model.norm.weight", 0.0), None);
    }

    #[test]
    fn layer_positions_follow_the_first_number_of_each_tower() {
        let names: Vec<String> = [
            "model.embed_tokens.weight",
            "model.layers.0.mlp.w",
            "model.layers.1.mlp.w",
            "model.layers.2.mlp.w",
            "vision.blocks.0.w",
            "vision.blocks.1.w",
            "head.0.weight",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            layer_positions(&names),
            vec![0.0, 0.0, 0.5, 1.0, 0.0, 1.0, 1.0]
        );
    }

    #[test]
    fn per_model_settings_fall_back_to_the_top_level_and_then_the_default() {
        let c = parse(
            "merge_method: ties\nbase_model: b\nmodels:\n  - model: m1\n    parameters: {weight: 0.5}\n  - model: m2\n    parameters: {weight: 1.0, density: 0.3}\nparameters: {density: 0.6, normalize: false}\n",
        )
        .unwrap();
        let (inputs, base) = c.inputs();
        assert_eq!(inputs, vec!["m1", "m2", "b"]);
        assert_eq!(base, Some(2));
        let p = c.tensor_params("w", 0.0).unwrap();
        assert_eq!(p.inputs[0].density, 0.6);
        assert_eq!(p.inputs[1].density, 0.3);
        assert_eq!(p.inputs[0].weight, 0.5);
        assert!(!p.shared.normalize);
        assert_eq!(p.shared.lambda, 1.0);
    }

    #[test]
    fn what_soup_does_not_support_is_refused_by_name() {
        for (text, says) in [
            ("merge_method: ties\nslices: []\nmodels: []\n", "slices"),
            ("merge_method: ranked_ties\nmodels: []\n", "ranked_ties"),
            (
                "merge_method: ties\nmodels: []\nfoo: 1\n",
                "unknown key foo",
            ),
            (
                "merge_method: ties\nmodels:\n  - model: a\n    parameters: {gama: 1}\n",
                "no parameter gama",
            ),
            ("merge_method: ties\nmodels:\n  - model: a+lora\n", "LoRA"),
            (
                "merge_method: ties\nmodels: []\ntokenizer_source: union\n",
                "tokenizer_source union",
            ),
            ("merge_method: ties\nmodels: []\ndtype: int8\n", "int8"),
            (
                "merge_method: ties\nmodels:\n  - model: a\n    parameters: {lambda: 2}\n",
                "top-level",
            ),
        ] {
            let e = parse(text).unwrap_err().0;
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn a_required_parameter_given_nowhere_is_named() {
        let c =
            parse("merge_method: task_arithmetic\nbase_model: b\nmodels:\n  - model: a\n").unwrap();
        let e = c.tensor_params("w", 0.0).unwrap_err().0;
        assert!(e.contains("weight") && e.contains("model a"), "{e}");
    }
}
