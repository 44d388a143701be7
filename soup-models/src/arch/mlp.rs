//! `mlp`: a multi-layer perceptron with ReLU on flattened images, for fast tests.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use soup_core::rng::SplitMix64;
use soup_core::{ParamLayout, TensorSpec};

use super::{filled, index_of, normal, parse_config, Architecture, ImageSpec, InputSpec, Params};
use crate::error::{ModelError, Result};
use crate::ops::linear;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MlpConfig {
    /// Input image shape: channels, height, width.
    pub input: [usize; 3],
    /// Widths of the hidden layers.
    pub hidden: Vec<usize>,
    pub num_classes: usize,
}

/// Layers `layers.{i}.{weight,bias}` then `classification_head.{weight,bias}`.
#[derive(Debug)]
pub struct Mlp {
    pub config: MlpConfig,
    layout: ParamLayout,
    index: HashMap<String, usize>,
}

impl Mlp {
    pub fn new(config: MlpConfig) -> Result<Self> {
        if config.num_classes == 0 || config.input.contains(&0) || config.hidden.contains(&0) {
            return Err(ModelError::config(
                "mlp",
                "input dimensions, hidden widths and num_classes must be positive",
            ));
        }
        if config
            .input
            .iter()
            .chain(&config.hidden)
            .chain([&config.num_classes])
            .any(|&v| v > 1 << 24)
        {
            return Err(ModelError::config(
                "mlp",
                "a width is beyond 2^24: not a real model",
            ));
        }
        let mut tensors = Vec::new();
        let mut width: usize = config.input.iter().product();
        let spec = |name: String, shape: Vec<usize>| TensorSpec { name, shape };
        for (i, &h) in config.hidden.iter().enumerate() {
            tensors.push(spec(format!("layers.{i}.weight"), vec![h, width]));
            tensors.push(spec(format!("layers.{i}.bias"), vec![h]));
            width = h;
        }
        tensors.push(spec(
            "classification_head.weight".into(),
            vec![config.num_classes, width],
        ));
        tensors.push(spec(
            "classification_head.bias".into(),
            vec![config.num_classes],
        ));
        let layout = ParamLayout::new(tensors);
        Ok(Self {
            index: index_of(&layout),
            layout,
            config,
        })
    }

    pub fn from_config(config: &serde_json::Value) -> Result<Arc<dyn Architecture>> {
        Ok(Arc::new(Self::new(parse_config("mlp", config)?)?))
    }
}

impl Architecture for Mlp {
    fn family(&self) -> &'static str {
        "mlp"
    }

    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).expect("MlpConfig serialises")
    }

    fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    fn input(&self) -> InputSpec {
        let [channels, height, width] = self.config.input;
        InputSpec::Images(ImageSpec {
            channels,
            height,
            width,
            mean: vec![0.5; channels],
            std: vec![0.5; channels],
        })
    }

    fn num_classes(&self) -> usize {
        self.config.num_classes
    }

    fn forward(&self, params: &[Tensor], images: &Tensor) -> Result<Tensor> {
        let p = Params::new("mlp", &self.layout, &self.index, params)?;
        let mut x = images.flatten_from(1)?.to_dtype(params[0].dtype())?;
        for i in 0..self.config.hidden.len() {
            let w = p.get(&format!("layers.{i}.weight"));
            let b = p.get(&format!("layers.{i}.bias"));
            x = linear(&x, w, Some(b))?.relu()?;
        }
        let w = p.get("classification_head.weight");
        let b = p.get("classification_head.bias");
        Ok(linear(&x, w, Some(b))?)
    }

    fn init(&self, seed: u64, device: &Device) -> Result<Vec<Tensor>> {
        // He initialisation for the ReLU layers, zero biases.
        let mut rng = SplitMix64::new(seed);
        self.layout
            .tensors
            .iter()
            .map(|t| {
                if t.shape.len() == 2 {
                    normal(&mut rng, &t.shape, (2.0 / t.shape[1] as f64).sqrt(), device)
                } else {
                    filled(&t.shape, 0.0, device)
                }
            })
            .collect()
    }
}
